"""The miniature world's committed evaluators beat their bars on fresh generator samples (new seed), offline."""

import dataclasses

import pytest
import torch

from dreamguide.toyworld import SUBJECTS, caption, from_pil, reference_images, render, sample_labels, subject_labels
from dreamguide.toyworld.evaluators import ATTRIBUTES, ToyEvaluators, load_validation, tokenize
from dreamguide.toyworld.train_evaluators import auc, supervised_contrastive

SEED = 424242  # never used in training or in the recorded validation


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evaluators():
    return ToyEvaluators.load()


@pytest.fixture(scope="module")
def fresh():
    gen = torch.Generator().manual_seed(SEED)
    labels = sample_labels(400, gen)
    return render(labels, gen), labels


def test_attribute_classifiers_beat_their_bars(evaluators, fresh):
    images, labels = fresh
    predicted = evaluators.classify(images)
    accuracy = {name: sum(p == getattr(lab, name) for p, lab in zip(predicted[name], labels)) / len(labels)
                for name in ATTRIBUTES}
    # material is left out: at 32 px it is barely above its 70% prior (see docs/TOYWORLD.md)
    bars = {"cls": 0.87, "scene": 0.97, "style": 0.97, "pattern": 0.78, "color": 0.65}
    for name, bar in bars.items():
        assert accuracy[name] >= bar, (name, accuracy[name])


def test_judge_accepts_true_prompts_and_rejects_wrong_style_or_scene(evaluators, fresh):
    images, labels = fresh
    true = evaluators.judge(images, [caption(lab) for lab in labels]).all.float().mean()
    assert true >= 0.85
    wrong_style = [caption(dataclasses.replace(lab, style="sketch" if lab.style != "sketch" else "neon"))
                   for lab in labels]
    assert evaluators.judge(images, wrong_style).style.float().mean() <= 0.05
    # no scene in the prompt accepts any scene; no style asks for a photo
    short = [f"a {lab.cls}" for lab in labels]
    judged = evaluators.judge(images, short)
    assert judged.scene.all()
    photos = torch.tensor([lab.style == "photo" for lab in labels])
    assert judged.style[photos].float().mean() >= 0.95 and judged.style[~photos].float().mean() <= 0.05


def test_text_alignment_prefers_the_true_caption(evaluators, fresh):
    images, labels = fresh
    true = evaluators.text_alignment(images, [caption(lab) for lab in labels])
    for name, other in (("style", lambda lab: "watercolor" if lab.style != "watercolor" else "photo"),
                        ("scene", lambda lab: "snow" if lab.scene != "snow" else "beach"),
                        ("cls", lambda lab: "ring" if lab.cls != "ring" else "ball")):
        wrong = [caption(dataclasses.replace(lab, **{name: other(lab)})) for lab in labels]
        assert (true > evaluators.text_alignment(images, wrong)).float().mean() >= 0.85, name
    # retrieval among 100 full captions
    emb_i = evaluators.text_model.encode_features(evaluators.features(images[:100]))
    emb_t = evaluators.text_model.encode_texts([caption(lab) for lab in labels[:100]])
    assert ((emb_i @ emb_t.T).argmax(1) == torch.arange(100)).float().mean() >= 0.5


def test_identity_tells_each_subject_from_other_objects_of_its_class(evaluators):
    gen = torch.Generator().manual_seed(SEED + 1)
    positives, negatives = [], []
    for subject in SUBJECTS:
        refs = reference_images(subject)
        views = render(subject_labels(subject, 12, gen, scenes=("snow", "city", "water", "jungle")), gen)
        others = [dataclasses.replace(lab, cls=subject.cls, style="photo") for lab in sample_labels(12, gen)]
        positives.append(evaluators.identity(views, refs))
        negatives.append(evaluators.identity(render(others, gen), refs))
    assert auc(torch.cat(positives), torch.cat(negatives)) >= 0.9


def test_scores_have_the_documented_shapes_and_ranges(evaluators, fresh):
    images, labels = fresh
    text = evaluators.text_alignment(images[:5], "a photo of a ball")
    assert text.shape == (5,) and (text.abs() <= 1 + 1e-5).all()
    identity = evaluators.identity(images[:5], images[5:8])
    assert identity.shape == (5,) and (identity.abs() <= 1 + 1e-5).all()
    own = evaluators.identity(images[:1], images[:1])
    assert torch.allclose(own, torch.ones(1), atol=1e-4)
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize(["a photo of a dog"])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        evaluators.identity(images[0], images)


def test_validation_record_matches_the_weights():
    record = load_validation()
    figures = record["figures"]
    assert figures["attributes"]["accuracy"]["style"] >= 0.95
    assert set(record["recipe"]) >= {"seed", "trunk_steps", "text_epochs", "identity_epochs"}


def test_supervised_contrastive_loss_is_low_for_separated_instances():
    ids = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert supervised_contrastive(separated, ids) < supervised_contrastive(mixed, ids)
    # exact value: the positive has logit 10, the two negatives 0 -> -log(e^10 / (e^10 + 2))
    expected = -torch.log(torch.exp(torch.tensor(10.0)) / (torch.exp(torch.tensor(10.0)) + 2))
    assert torch.allclose(supervised_contrastive(separated, ids), expected, atol=1e-5)
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)


def test_bench_world_cases_and_scores(evaluators):
    from dreamguide.evaluation.protocol import Generated, Job, Setting, World
    from dreamguide.toyworld.bench_world import ToyBenchWorld
    from dreamguide.toyworld.render import to_pil

    def generate(jobs):  # stands in for a sampler: the subject's own photo for every job
        return [Generated(to_pil(reference_images(job.case.subject or "sks")[:1])[0]) for job in jobs]

    world = ToyBenchWorld(generate, subjects=["sks", "zwx"], adapters=("dco", "dreambooth-ti"),
                          prompt_sets=("normal", "stylized"), evaluators=evaluators)
    assert isinstance(world, World)
    world.prepare()
    cases = world.cases()
    assert len(cases) == 2 * 2 * (20 + 7)
    first = cases[0]
    assert (first.subject, first.adapter, first.template) == ("sks", "dco", "a {} on the beach")
    assert first.token_prompt == "a sks ball on the beach" and first.base_prompt == "a ball on the beach"
    pivotal = next(c for c in cases if c.adapter == "dreambooth-ti")
    assert pivotal.token_prompt == "a <sks> ball on the beach" and pivotal.base_prompt == "a ball on the beach"
    stylized = [c for c in cases if c.subject == "zwx" and c.prompt_set == "stylized"]
    assert stylized[0].base_prompt == "a pencil sketch of a cup"
    jobs = [Job(case, Setting("consistency", 7.5, 3.0), 0) for case in (first, stylized[0])]
    images = [g.image for g in world.generate(jobs)]
    rows = world.score(jobs, images)
    assert set(rows[0]) == set(world.metric_kinds()) == {"identity", "text_alignment", "carries_prompt",
                                                         "follows_style", "carries_class", "carries_scene"}
    assert rows[0]["identity"] > 0.7  # a reference photo resembles its own references
    assert rows[0]["carries_class"] == 1.0 and rows[0]["follows_style"] == 1.0  # a photo of the ball
    assert rows[1]["carries_prompt"] == 0.0 and rows[1]["follows_style"] == 0.0  # not "a pencil sketch of a cup"
    # scores are the evaluators' own, one batch for all images
    tensor = from_pil(images)
    assert rows[1]["text_alignment"] == evaluators.text_alignment(tensor, [j.case.base_prompt for j in jobs])[1].item()

    base = ToyBenchWorld(generate, adapters=("base",), prompt_sets={"bar": ("a photo of a red ball on the beach",)},
                         evaluators=evaluators)
    (case,) = base.cases()
    assert (case.subject, case.adapter, case.token_prompt, case.base_prompt) == (
        "", "base", "a photo of a red ball on the beach", "a photo of a red ball on the beach")
    (row,) = base.score([Job(case, Setting("cfg", 7.5, None), 0)], images[:1])
    assert row["identity"] is None and row["carries_class"] == 1.0
    with pytest.raises(ValueError, match="base model"):
        ToyBenchWorld(adapters=("base",), prompt_sets=("normal",), evaluators=evaluators)
    with pytest.raises(ValueError, match="needs '{}'"):
        ToyBenchWorld(adapters=("dco",), prompt_sets={"bar": ("a red ball",)}, evaluators=evaluators)
    with pytest.raises(FileNotFoundError, match="no dco adapter for 'sks'.*personalize"):
        ToyBenchWorld(subjects=["sks"], steps=2, adapters_dir="/nonexistent", evaluators=evaluators).prepare()


def test_training_command_writes_weights_that_load_and_match(tmp_path):
    from dreamguide.toyworld.evaluators import AttributeClassifier
    from dreamguide.toyworld.train_evaluators import Recipe, train_all

    recipe = Recipe(batch_size=32, trunk_steps=2, text_images=64, text_epochs=1, identity_instances=256,
                    identity_epochs=1, warmup_steps=1, threads=1)
    record = train_all(tmp_path, recipe, log=lambda message: None, validation_samples=100)
    assert record["recipe"] == dataclasses.asdict(recipe)
    assert load_validation(tmp_path)["figures"]["samples"] == 100
    loaded = ToyEvaluators.load(tmp_path)
    assert isinstance(loaded.classifier, AttributeClassifier)
    # loading is deterministic: two loads score identically
    images = render(sample_labels(4, 0), 0)
    again = ToyEvaluators.load(tmp_path)
    assert torch.equal(loaded.text_alignment(images, "a ball"), again.text_alignment(images, "a ball"))
    with pytest.raises(FileNotFoundError, match="train_evaluators"):
        ToyEvaluators.load(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# every attribute: validate_attributes and the judge's optional color/pattern/material checks


def test_validate_attributes_covers_every_attribute_and_matches_a_direct_computation(evaluators):
    import random

    from dreamguide.toyworld.evaluators import validate_attributes
    from dreamguide.toyworld.world import CLASSES, MATERIALS

    n, seed = 12, 777
    figures = validate_attributes(evaluators, n=n, seed=seed)
    assert (figures["samples"], figures["seed"]) == (n, seed)
    for key in ("classifier_accuracy", "majority_prior", "text_swap_accuracy"):
        assert set(figures[key]) == {"cls", "color", "pattern", "material", "scene", "style"}, key
        assert all(0.0 <= v <= 1.0 for v in figures[key].values()), (key, figures[key])
    assert set(figures["material_recall"]) == set(MATERIALS)
    assert all(0.0 <= v <= 1.0 for v in [*figures["material_swap_by_pair"].values(),
                                         *figures["material_recall"].values(),
                                         *figures["judge_accepts_true_caption"].values()])
    # the same images and the first swap (class), computed here without the library's helpers
    gen = torch.Generator().manual_seed(seed)
    labels = sample_labels(n, gen)
    images = render(labels, gen)
    rng = random.Random(seed)
    swapped = [caption(dataclasses.replace(lab, cls=rng.choice([c for c in CLASSES if c != lab.cls])))
               for lab in labels]
    true = evaluators.text_alignment(images, [caption(lab) for lab in labels])
    wins = sum(bool(t > s) for t, s in zip(true, evaluators.text_alignment(images, swapped)))
    assert figures["text_swap_accuracy"]["cls"] == wins / n
    colors = evaluators.logits(images)["color"].argmax(-1).tolist()
    assert figures["classifier_accuracy"]["color"] == sum(
        ATTRIBUTES["color"][k] == lab.color for k, lab in zip(colors, labels)) / n
    with pytest.raises(ValueError, match="n must be at least 1"):
        validate_attributes(evaluators, n=0)


def test_judge_checks_color_on_photos_of_known_color(evaluators):
    gen = torch.Generator().manual_seed(SEED + 1)
    labels = [dataclasses.replace(lab, style="photo", pattern="plain", material="matte")
              for lab in sample_labels(48, gen)]
    images = render(labels, gen)
    true = [caption(lab) for lab in labels]
    wrong = [caption(dataclasses.replace(lab, color="blue" if lab.color != "blue" else "yellow")) for lab in labels]
    everything = tuple(ATTRIBUTES)
    judged_true = evaluators.judge(images, true, attributes=everything)
    judged_wrong = evaluators.judge(images, wrong, attributes=everything)
    assert judged_true.color.float().mean() >= 0.85
    assert judged_wrong.color.float().mean() <= 0.15
    # exactly "the predicted color is the prompt's color", and part of .all
    predicted = evaluators.classify(images)["color"]
    assert judged_true.color.tolist() == [p == lab.color for p, lab in zip(predicted, labels)]
    assert not (judged_wrong.all & ~judged_wrong.color).any()
    # a prompt that names no color, pattern or material accepts any
    unnamed = evaluators.judge(images, [caption(lab, color=False, pattern=False, material=False) for lab in labels],
                               attributes=everything)
    assert unnamed.color.all() and unnamed.pattern.all() and unnamed.material.all()


def test_default_judge_is_class_scene_style_only(evaluators, fresh):
    images, labels = fresh[0][:64], fresh[1][:64]
    prompts = [caption(lab) for lab in labels]
    judged = evaluators.judge(images, prompts)
    assert judged.color is None and judged.pattern is None and judged.material is None
    predicted = evaluators.classify(images)
    for name in ("cls", "scene", "style"):
        assert getattr(judged, name).tolist() == [p == getattr(lab, name) for p, lab in zip(predicted[name], labels)]
    assert torch.equal(judged.all, judged.cls & judged.scene & judged.style)
    explicit = evaluators.judge(images, prompts, attributes=("style", "cls", "scene"))
    assert torch.equal(explicit.all, judged.all) and explicit.color is None
    with pytest.raises(ValueError, match="'shape'"):
        evaluators.judge(images, prompts, attributes=("cls", "scene", "style", "shape"))
    with pytest.raises(ValueError, match="must include"):
        evaluators.judge(images, prompts, attributes=("cls", "color"))


def test_validate_only_command_prints_the_table_and_writes_json(tmp_path, capsys):
    import json

    from dreamguide.toyworld.train_evaluators import main

    out = tmp_path / "figures.json"
    assert main(["--validate-only", "--samples", "8", "--validation-seed", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["figures"]["samples"] == 8 and record["figures"]["seed"] == 5
    for name in ATTRIBUTES:
        assert name in printed and name in record["figures"]["text_swap_accuracy"]
    assert "--validate-only --samples 8 --validation-seed 5" in record["command"]
