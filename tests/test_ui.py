"""``dreamguide ui`` without a browser: forms give the command line's messages for the same bad values,
the workspace samples exactly as ``dreamguide sample`` does (toy world and a tiny SDXL model), and a
training run goes on in the background, stops on cancel and resumes (offline, CPU)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dreamguide.cli import main
from dreamguide.images import read_png_metadata
from dreamguide.toyworld.model import BUNDLED_MODEL_DIR
from dreamguide.toyworld.personalize import adapter_dir
from dreamguide.ui.forms import FieldErrors, SampleForm, TrainForm, sample_settings
from dreamguide.ui.workspace import Workspace

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "model_index.json").exists() or not adapter_dir().exists(),
    reason="bundled toy-world weights not built",
)

TOY_PROMPT = ["--token", "sks", "--class-word", "ball", "--prompt", "a pencil sketch of a sks ball"]


def cli_error(capsys, args: list[str]) -> str:
    """The message ``dreamguide ARGS`` prints after ``error:`` (its own or argparse's)."""
    try:
        assert main(args) == 2
    except SystemExit as exit_:  # argparse rejects a flag's value itself
        assert exit_.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].split("error: ", 1)[1]


def field_errors(fn) -> dict[str, str]:
    with pytest.raises(FieldErrors) as caught:
        fn()
    return caught.value.errors


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    workspace = Workspace(output=tmp_path_factory.mktemp("ui"), device="cpu")
    workspace.use_toy_subject("sks")
    return workspace


# ---------------------------------------------------------------------------------------------
# The sample form: the same message as `dreamguide sample`


@pytest.mark.parametrize(
    "field,values,flags",
    [
        ("prompt", {"prompt": "a pencil sketch of a ball"}, ["--prompt", "a pencil sketch of a ball"]),
        ("w_cons", {"w_cons": "nan"}, ["--w-cons", "nan"]),
        ("w_text", {"w_text": "seven"}, ["--w-text", "seven"]),
        ("seeds", {"seeds": "3-1"}, ["--seeds", "3-1"]),
        ("modes", {"modes": ["cfg", "fancy"]}, ["--modes", "cfg,fancy"]),
        ("steps", {"steps": 0}, ["--steps", "0"]),
        ("pr", {"pr_rescale": "nan"}, ["--pr-rescale", "nan"]),
        ("pr", {"pr_granularity": "sample"}, ["--pr-granularity", "sample"]),
    ],
)
def test_sample_form_shows_the_command_lines_message(field, values, flags, capsys):
    expected = cli_error(capsys, ["sample", "--model", "never-loaded", *TOY_PROMPT, *flags])
    form = SampleForm(**{"prompt": "a pencil sketch of a sks ball", "token": "sks", "class_word": "ball", **values})
    assert field_errors(lambda: sample_settings(form)) == {field: expected}


def test_sample_form_reports_every_bad_field_at_once():
    form = SampleForm(prompt="a ball", token="sks", class_word="ball", seeds="x", w_cons="inf",
                      shaping={"start": "0.9", "stop": "0.1"})
    assert set(field_errors(lambda: sample_settings(form))) == {"prompt", "seeds", "w_cons", "shaping"}


def test_sample_form_reads_numbers_modes_and_switches_like_the_flags():
    form = SampleForm(prompt="a sks ball", token="sks", class_word="ball", seeds="1-2", steps=7.0, w_text="5",
                      w_cons=" 2.5 ", modes=["pr", "cfg"], pr_normalization="clip-negative", pr_rescale="0.5",
                      shaping={"schedule": "linear-increase", "spread_cap": "", "pr_from": "0.25",
                               "floor": "0.3"})
    settings = sample_settings(form)
    assert settings.seeds == (1, 2) and settings.steps == 7 and (settings.w_text, settings.w_cons) == (5.0, 2.5)
    assert settings.modes == ("parallel-rescaled", "cfg") and settings.base_prompt == "a ball"
    assert (settings.pr.normalization, settings.pr.rescale) == ("clip-negative", 0.5)
    assert (settings.shaping.schedule, settings.shaping.spread_cap, settings.shaping.pr_from,
            settings.shaping.floor) == ("linear-increase", None, 0.25, 0.3)
    assert settings.trace


# ---------------------------------------------------------------------------------------------
# Loading adapters and sampling in the toy world


def _lora_for(model_dir, path, seed=0):
    """A random LoRA for the model in ``model_dir`` (another architecture than the toy world's)."""
    from dreamguide.lora_files import add_lora, save_lora
    from dreamguide.models import load_model

    model = load_model(model_dir)
    torch.manual_seed(seed)
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)
    return save_lora(model.unet, path, "subject")


def test_a_wrong_architecture_adapter_is_reported_on_its_field_and_nothing_changes(
        toy, tiny_sd15_dir, tmp_path, capsys):
    lora = _lora_for(tiny_sd15_dir, tmp_path / "sd15-lora.safetensors")
    expected = cli_error(capsys, ["sample", "--model", str(BUNDLED_MODEL_DIR), "--lora", str(lora), *TOY_PROMPT,
                                  "--output", str(tmp_path / "x"), "--no-progress"])
    assert "does not match this UNet" in expected
    before = toy.sampler
    assert field_errors(lambda: toy.load(lora=lora, token="sks", class_word="ball")) == {"lora": expected}
    assert toy.sampler is before and toy.subject.token == "sks"
    # Uploaded files are copied first; the message names the copy, on the same field, and the copy is removed.
    errors = field_errors(lambda: toy.load_uploaded(str(lora), None, "sks", "ball"))
    assert list(errors) == ["lora"] and "does not match this UNet" in errors["lora"]
    assert not any((toy.output / "adapters").glob("*/sd15-lora.safetensors"))


def test_modes_that_need_an_adapter_and_prompts_outside_the_grammar(tmp_path, capsys):
    base = Workspace(output=tmp_path / "ui", device="cpu")
    base.load()  # the base model alone
    settings = sample_settings(SampleForm(prompt="a pencil sketch of a sks ball", token="sks", class_word="ball",
                                          modes=["cfg", "consistency"], steps=2, seeds="0"))
    expected = cli_error(capsys, ["sample", "--model", str(BUNDLED_MODEL_DIR), *TOY_PROMPT,
                                  "--modes", "cfg,consistency", "--output", str(tmp_path / "x")])
    assert field_errors(lambda: base.compare(settings)) == {"modes": expected}
    outside = "a sks ball riding a bicycle"
    expected = cli_error(capsys, ["demo", "--prompts", outside, "--output", str(tmp_path / "demo")])
    settings = sample_settings(SampleForm(prompt=outside, token="sks", class_word="ball", modes=["cfg"], steps=2))
    assert field_errors(lambda: base.compare(settings)) == {"prompt": expected}


def test_toy_comparison_is_the_samplers_images_with_settings_scores_and_plots(toy):
    from dreamguide.toyworld.evaluators import ToyEvaluators
    from dreamguide.toyworld.render import from_pil
    from dreamguide.ui.views import grid_html, summary_html

    settings = sample_settings(SampleForm(prompt="a pencil sketch of a sks ball", token="sks", class_word="ball",
                                          seeds="0,1", steps=3, modes=["dreambooth", "consistency", "pr"]))
    steps = list(toy.compare_steps(settings))
    # Batches of 4 images: the first 4 are shown while the last 2 are sampled.
    assert [len(c.results) for c in steps] == [6, 6] and steps[0] is steps[1]
    comparison = steps[-1]
    direct = toy.sampler.sample(settings, progress=False)
    assert [(r.mode, r.seed) for r in comparison.results] == [(r.mode, r.seed) for r in direct]
    for ours, theirs in zip(comparison.results, direct):
        assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))

    names = {p.name for p in comparison.files}
    for mode in ("dreambooth", "consistency", "parallel-rescaled"):
        assert {f"{mode}-seed0.png", f"{mode}-seed1.png"} <= names
    assert {"grid.png", "settings.json", "trace.json", "scores.csv", "consistency_p.png", "tradeoff.png"} <= names
    for path, result in zip(comparison.images, comparison.results):
        metadata = read_png_metadata(path)
        assert metadata == json.loads(json.dumps(result.metadata))
        assert (metadata["mode"], metadata["seed"], metadata["steps"]) == (result.mode, result.seed, 3)
        assert (metadata["prompt"], metadata["w_cons"], metadata["lora"]) == (
            "a pencil sketch of a sks ball", 3.0, "pytorch_lora_weights.safetensors")
    assert [len(r.trace) for r in comparison.results] == [0, 0, 3, 3, 3, 3]  # dreambooth is not traced

    evaluators = ToyEvaluators.load()
    images = from_pil([r.image for r in comparison.results])
    identity = evaluators.identity(images, from_pil(toy.subject.reference_images()))
    text = evaluators.text_alignment(images, ["a pencil sketch of a ball"] * 6)
    assert [s.identity for s in comparison.scores] == [float(v) for v in identity]
    assert [s.text_alignment for s in comparison.scores] == [float(v) for v in text]
    for plot in (comparison.consistency_p, comparison.tradeoff):
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.width > 300

    html = grid_html(comparison)
    assert [m for m in re.findall(r'<th data-mode="([^"]+)"', html)] == ["dreambooth", "consistency",
                                                                          "parallel-rescaled"]
    assert html.count("<img ") == 6 and 'data-done="1"' in html
    assert all(f'download="{p.name}"' in html for p in comparison.images)
    summary = summary_html(comparison)
    assert summary.count("<tr data-mode=") == 3


def test_tune_sweeps_the_forms_first_mode_and_recommends_the_knee_like_dreamguide_tune(toy, tmp_path):
    from dreamguide.tune import TuneSettings, choose, load_tuned, toyworld_workbench, tune

    form = SampleForm(prompt="", token=toy.subject.token, class_word=toy.subject.class_word, seeds="5,6", steps=2,
                      w_text="6", modes=["pr", "cfg"])
    outcome = toy.tune(form, values=(3.0, 0.0))
    assert (outcome.mode, outcome.knob, outcome.field) == ("parallel-rescaled", "w_cons", "w_cons")
    assert outcome.folder.parent == toy.output / "tune"
    with Image.open(outcome.plot) as image:
        assert outcome.plot.name == "tune.png" and image.format == "PNG"
    # The same sweep through dreamguide.tune directly: the same points and the same choice.
    settings = TuneSettings(mode="parallel-rescaled", values=(0.0, 3.0), w_text=6.0, steps=2, seeds=(5,),
                            prompts_per_set=2)
    direct = tune(toyworld_workbench("sks", "dreambooth", prompts_per_set=2), settings, tmp_path / "direct",
                  progress=False)
    assert outcome.record["points"] == direct["points"] and len(direct["points"]) == 2
    index, rule = choose(direct["points"])
    assert outcome.value == direct["points"][index]["value"] and outcome.tuned["tune"]["chosen_by"] == rule == "knee"
    tuned = load_tuned(outcome.folder / "tuned.json")
    assert tuned["modes"] == ("parallel-rescaled",) and tuned["w_cons"] == outcome.value and tuned["w_text"] == 6.0
    assert f"w_cons = {outcome.value:g}" in outcome.summary()


def test_tune_reports_bad_form_values_on_their_fields_and_subjects_it_cannot_tune(toy, tmp_path):
    runs = set((toy.output / "tune").glob("*"))
    for values in ({"w_cons": "nan"}, {"steps": 0}, {"modes": ["cfg", "fancy"]}):
        form = SampleForm(prompt="a sks ball", token="sks", class_word="ball", **values)
        expected = field_errors(lambda: sample_settings(form))
        assert field_errors(lambda: toy.tune(form)) == expected and len(expected) == 1
    assert set((toy.output / "tune").glob("*")) == runs  # nothing sampled or written
    base = Workspace(output=tmp_path / "ui", device="cpu")
    errors = field_errors(lambda: base.tune(SampleForm(prompt="a ball", steps=2)))
    assert list(errors) == ["general"] and "--toyworld-subject" in errors["general"]
    assert not (tmp_path / "ui" / "tune").exists()


# ---------------------------------------------------------------------------------------------
# Personalize: the same message as `dreamguide train`, background runs


def _train_cli_error(capsys, tmp_path, photos, overrides=()):
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\npretrained = "{BUNDLED_MODEL_DIR}"\n[data]\ninstance_dir = "{photos}"\n'
                      f'token = "ohwx"\nclass_word = "ball"\n[output]\ndir = "{tmp_path / "out"}"\n')
    sets = [arg for key in overrides for arg in ("--set", key)]
    return cli_error(capsys, ["train", "--config", str(config), *sets, "--no-progress"])


def _same_but_folder(ours: str, theirs: str, our_folder: str, their_folder) -> None:
    assert ours.replace(our_folder, "<folder>") == theirs.replace(str(their_folder), "<folder>")


def test_train_form_photo_errors_match_the_trainer(tmp_path, capsys):
    ws = Workspace(output=tmp_path / "ui", device="cpu")
    form = TrainForm(token="ohwx", class_word="ball")
    folder = tmp_path / "photos"
    folder.mkdir()

    ours = field_errors(lambda: ws.start_training(form, photos=[]))
    assert list(ours) == ["photos"]
    our_folder = re.match(r"instance image folder (\S+) has no images", ours["photos"])[1]
    _same_but_folder(ours["photos"], _train_cli_error(capsys, tmp_path, folder), our_folder, folder)

    (folder / "photo-0.png").write_bytes(b"this is not a PNG")
    ours = field_errors(lambda: ws.start_training(form, photos=[folder / "photo-0.png"]))
    assert list(ours) == ["photos"] and ours["photos"].startswith("cannot read image ")
    our_folder = str(re.match(r"cannot read image (\S+)/photo-0.png", ours["photos"])[1])
    _same_but_folder(ours["photos"], _train_cli_error(capsys, tmp_path, folder), our_folder, folder)

    Image.new("RGB", (64, 64), "red").save(folder / "photo-0.png")
    (folder / "photo-0.txt").write_text("a photo of a ball\n")
    ours = field_errors(lambda: ws.start_training(form, photos=[folder / "photo-0.png"],
                                                  captions="a photo of a ball"))
    assert list(ours) == ["captions"] and "does not contain the token 'ohwx'" in ours["captions"]
    our_folder = str(re.match(r"caption of (\S+)/photo-0.png", ours["captions"])[1])
    _same_but_folder(ours["captions"], _train_cli_error(capsys, tmp_path, folder), our_folder, folder)
    assert not any((ws.output / "runs").iterdir())  # nothing is left of runs that did not start


@pytest.mark.parametrize("field,value,key", [("lr", "nan", "train.lr"), ("steps", "ten", "train.steps"),
                                             ("class_word", "", "data.class_word"), ("method", "lora", "train.method")])
def test_train_form_setting_errors_match_set_overrides(field, value, key, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "photo-0.png")
    expected = _train_cli_error(capsys, tmp_path, folder, [f"{key}={value}"])
    form = TrainForm(**{"token": "ohwx", "class_word": "ball", field: value})
    ours = field_errors(lambda: Workspace(output=tmp_path / "ui").start_training(form, [folder / "photo-0.png"]))
    assert list(ours) == [field]
    assert ours[field].split(": ", 1)[1] == expected.split(": ", 1)[1]  # the source: the form, or the TOML file


def test_train_form_blanks_keep_the_worlds_recipe_and_alpha_follows_the_rank(tmp_path):
    from dreamguide.toyworld.personalize import DEFAULTS
    from dreamguide.ui.forms import train_config

    ws = Workspace(output=tmp_path)
    base = ws.train_base(tmp_path / "photos", tmp_path / "adapter")
    config = train_config(TrainForm(token="ohwx", class_word="ball", rank="8", lr=" 1e-3 "), base)
    assert (config.lora.rank, config.lora.alpha, config.train.lr) == (8, 8.0, 1e-3)
    assert (config.train.steps, config.train.batch_size, config.train.method) == (
        DEFAULTS.steps, DEFAULTS.batch_size, "dreambooth")
    assert config.lora.target_modules == list(DEFAULTS.lora_targets) and config.data.resolution == 32
    shown = ws.train_form_defaults()
    assert (shown.steps, shown.lr, shown.rank, shown.batch_size) == (
        str(DEFAULTS.steps), str(DEFAULTS.lr), str(DEFAULTS.rank), str(DEFAULTS.batch_size))


def test_training_runs_in_the_background_stops_on_cancel_and_resumes(tmp_path):
    from dreamguide.filenames import LORA_FILE, kohya_file

    ws = Workspace(output=tmp_path / "ui", device="cpu", training_sample_steps=2)
    form = TrainForm(token="ignored", class_word="ignored", steps="4", lr="2e-3", rank="4", batch_size="2",
                     sample_every="2")
    job = ws.start_training(form, toy_subject="zwx")
    assert job.cancel()  # before the first step ends: the run stops after it
    state = job.wait(600)
    assert (state.status, state.step) == ("stopped", 1) and "checkpoint-1" in state.message
    assert (job.output_dir / "checkpoint-1" / "state.json").is_file() and job.files() == []
    with pytest.raises(ValueError, match="already started"):
        job.start()
    job.resume()
    state = job.wait(600)
    assert (state.status, state.step) == ("done", 4), state.message
    steps, losses = job.losses()
    assert steps == [1, 2, 3, 4] and all(np.isfinite(losses))
    step, images = job.latest_samples()
    assert step == 4 and len(images) == 2 * 2  # two prompts x two modes, one seed
    assert {p.name for p in job.files()} >= {LORA_FILE, kohya_file(job.config.run_name), "config.toml"}
    # The finished adapter is the one the workspace samples with now.
    assert (ws.subject.token, ws.subject.class_word, ws.subject.lora) == ("zwx", "cup", job.output_dir / LORA_FILE)
    assert len(ws.subject.references) == 5
    settings = sample_settings(SampleForm(prompt="a zwx cup in the snow", token="zwx", class_word="cup",
                                          modes=["dreambooth"], seeds="0", steps=2))
    comparison = ws.compare(settings)
    assert read_png_metadata(comparison.images[0])["lora"] == LORA_FILE  # the name, not the local path
    assert comparison.scores is not None and len(comparison.scores) == 1


# ---------------------------------------------------------------------------------------------
# An SDXL-architecture model


def test_the_apps_sampling_works_on_an_sdxl_model(tiny_sdxl_dir, tmp_path):
    from dreamguide.models import load_model
    from dreamguide.sampling import Sampler
    from dreamguide.token_files import add_tokens, save_embeddings

    lora = _lora_for(tiny_sdxl_dir, tmp_path / "lora.safetensors", seed=1)
    model = load_model(tiny_sdxl_dir)
    add_tokens(model, "<sks>", "dog")
    embeddings = save_embeddings(model, "<sks>", tmp_path / "embeddings.safetensors")
    photo = tmp_path / "dog.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photo)

    ws = Workspace(tiny_sdxl_dir, output=tmp_path / "ui", device="cpu", dtype="float32")
    subject = ws.load_uploaded(str(lora), str(embeddings), "<sks>", "dog", references=[str(photo)])
    assert subject.token == "<sks>" and len(subject.references) == 1 and ws.sampler.model.kind == "sdxl"
    settings = sample_settings(SampleForm(prompt="a watercolor painting of <sks> dog", token="<sks>",
                                          class_word="dog", seeds="0", steps=2,
                                          modes=["cfg", "dreambooth", "consistency", "pr"]))
    comparison = ws.compare(settings)
    # The same images `dreamguide sample --lora --embeddings` makes from the same files.
    cli = Sampler.from_pretrained(tiny_sdxl_dir, lora=lora, embeddings=embeddings, token="<sks>", device="cpu",
                                  dtype="float32").sample(settings, progress=False)
    for ours, theirs in zip(comparison.results, cli):
        assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))
    metadata = read_png_metadata(comparison.images[-1])
    assert (metadata["model_kind"], metadata["mode"], metadata["token"]) == ("sdxl", "parallel-rescaled", "<sks>")
    assert metadata["lora"].endswith(".safetensors") and str(ws.output) not in json.dumps(metadata)
    assert comparison.consistency_p is not None and [len(r.trace) for r in comparison.results] == [0, 0, 2, 2]
    # The DINO / CLIP backbones are not in the offline cache: no scores, and a note that says why.
    assert comparison.scores is None and comparison.note.startswith("no scores: cannot load metric backbone")


# ---------------------------------------------------------------------------------------------
# The command


def _run_python(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def test_help_imports_neither_torch_nor_gradio():
    code = ("import sys\nfrom dreamguide.cli import main\nfor args in (['--help'], ['ui', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print('imported:', [m for m in ('torch', 'gradio') if m in sys.modules])")
    printed = _run_python(code)
    assert "ui" in printed and "--host" in printed and "--share" in printed and "--model" in printed
    assert "127.0.0.1" in printed
    assert printed.strip().endswith("imported: []"), printed


def test_ui_without_gradio_says_how_to_install_it():
    # sys.modules[name] = None makes the import machinery report the package as absent.
    code = ("import sys\nsys.modules['gradio'] = None\nfrom dreamguide.cli import main\n"
            "print('exit', main(['ui', '--port', '9']))")
    printed = _run_python(code)
    assert 'error: dreamguide ui needs the web framework Gradio: pip install -e ".[ui]"' in printed
    assert "exit 2" in printed.splitlines()
