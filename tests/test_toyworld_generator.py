"""The miniature world's generator: determinism, caption <-> labels round trip, subjects kept out of base data."""

import dataclasses

import pytest
import torch

from dreamguide.toyworld import (
    CLASSES,
    PROMPT_SETS,
    SCENES,
    STYLES,
    SUBJECT_COMBINATIONS,
    SUBJECTS,
    VOCABULARY,
    Labels,
    caption,
    parse,
    prompts,
    random_caption,
    reference_images,
    reference_labels,
    render,
    sample,
    sample_base_labels,
    sample_labels,
)


def test_same_seed_same_images_and_labels():
    images_a, labels_a, captions_a = sample(64, 7)
    images_b, labels_b, captions_b = sample(64, 7)
    assert torch.equal(images_a, images_b)
    assert labels_a == labels_b and captions_a == captions_b


def test_different_seeds_differ():
    images_a, labels_a, _ = sample(64, 1)
    images_b, labels_b, _ = sample(64, 2)
    assert labels_a != labels_b
    assert (images_a - images_b).abs().mean() > 0.1


def test_render_noise_depends_only_on_generator():
    labels = sample_labels(8, 3)
    assert torch.equal(render(labels, 5), render(labels, 5))
    assert not torch.equal(render(labels, 5), render(labels, 6))


def test_images_shape_dtype_range():
    images, labels, _ = sample(40, 0)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # not degenerate: every image has contrast
    assert (images.flatten(1).std(dim=1) > 0.05).all()


def test_object_is_drawn_where_the_labels_say():
    # same scene, style, noise; with and without a black ball at the left: only the left half changes much
    base = Labels(cls="ball", color="black", pattern="plain", material="matte", scene="snow", style="photo",
                  x=0.25, y=0.5, scale=0.4)
    image = render([base], 0)[0]
    left, right = image[:, :, :16], image[:, :, 16:]
    assert left.mean() < right.mean() - 0.3  # dark ball on bright snow in the left half


def test_caption_parse_round_trip():
    for labels in sample_labels(300, 11):
        assert parse(caption(labels)) == labels.without_pose()
    for labels in reference_labels("zwx"):
        assert parse(caption(labels)) == labels.without_pose()
    recolored = dataclasses.replace(reference_labels("sks")[0], color="purple")
    assert caption(recolored).startswith("a photo of a matte purple sks ball")
    assert parse(caption(recolored)) == recolored.without_pose()


def test_caption_grammar_examples():
    labels = Labels(cls="ball", color="red", pattern="striped", material="shiny", scene="beach", style="photo")
    assert caption(labels) == "a photo of a shiny red striped ball on the beach"
    assert caption(labels, material=False, style=False) == "a red striped ball on the beach"
    sketch = Labels(cls="cup", color="orange", pattern="plain", material="matte", scene="snow", style="pixel")
    assert caption(sketch) == "a matte orange plain cup in the snow in pixel art style"
    assert caption(sketch, material=False) == "an orange plain cup in the snow in pixel art style"
    assert parse("a blue cup") == Labels(cls="cup", color="blue")
    assert parse("a sks ball on top of green grass") == Labels(
        cls="ball", color="red", pattern="striped", scene="grass", subject="sks")


@pytest.mark.parametrize("bad", ["a red ball cup", "a photo of a dog", "a teal ball", "a ball on the moon",
                                 "a sks cup", "a red blue ball"])
def test_parse_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError):
        parse(bad)


def test_vocabulary_covers_every_caption_and_prompt():
    gen = torch.Generator().manual_seed(0)
    texts = [random_caption(lab, gen) for lab in sample_labels(200, 4)]
    for name in PROMPT_SETS:
        for subject in SUBJECTS:
            texts += prompts(name, subject) + prompts(name, class_word=subject.cls)
    vocabulary = set(VOCABULARY)
    for text in texts:
        assert set(text.split()) <= vocabulary, text
        parse(text)
    assert len(CLASSES) >= 6 and len(SCENES) >= 6 and len(STYLES) >= 6
    assert all(" " not in word for word in CLASSES)


def test_random_caption_only_drops_default_style_and_material():
    gen = torch.Generator().manual_seed(0)
    for labels in sample_labels(300, 9):
        parsed = parse(random_caption(labels, gen))
        assert parsed.style == labels.style or (parsed.style is None and labels.style == "photo")
        assert parsed.material == labels.material or (parsed.material is None and labels.material == "matte")
        assert parsed.cls == labels.cls
        for key in ("color", "pattern", "scene"):
            assert getattr(parsed, key) in (None, getattr(labels, key))


def test_base_sampler_never_yields_a_subject():
    combos = {(lab.cls, lab.color, lab.pattern) for lab in sample_base_labels(20000, 0)}
    assert combos.isdisjoint(SUBJECT_COMBINATIONS)
    assert len(combos) == 8 * 8 * 4 - len(SUBJECT_COMBINATIONS)  # everything else does occur


def test_subject_references_are_fixed_and_varied():
    assert len(SUBJECTS) >= 5 and len({s.token for s in SUBJECTS}) == len(SUBJECTS)
    for subject in SUBJECTS:
        refs = reference_images(subject.token)
        assert refs.shape == (5, 3, 32, 32)
        assert torch.equal(refs, reference_images(subject))
        labels = reference_labels(subject)
        assert {lab.style for lab in labels} == {"photo"}
        assert len({lab.scene for lab in labels}) >= 2 and len({lab.scale for lab in labels}) == 5
        assert subject.token in VOCABULARY


def test_coverage_mask_matches_the_shape_area():
    # a ball is the disc u^2 + v^2 <= 0.92 in units of half its size: area pi * 0.92 * (scale / 2)^2
    labels = Labels(cls="ball", color="red", pattern="plain", material="matte", scene="beach", style="photo",
                    x=0.5, y=0.5, scale=0.5)
    _, mask = render([labels], 0, return_masks=True)
    assert mask.shape == (1, 1, 32, 32)
    assert mask.mean().item() == pytest.approx(3.14159 * 0.92 * 0.25 ** 2, abs=0.005)
    assert mask[0, 0, 16, 16] == 1 and mask[0, 0, 0, 0] == 0
