"""DreamBench end to end on tiny models: reduced benchmark, kill + resume over 2 shards, bad inputs, CLIs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from dreamguide.config import ConfigError
from dreamguide.evaluation.runner import run_benchmark, skipped_adapters
from dreamguide.evaluation.suites.dreambench import DreamBenchWorld
from dreamguide.evaluation.suites.dreambench_config import dreambench_config_from_dict, load_dreambench_config
from dreamguide.cli import main
from dreamguide.metrics import Scorer

DREAMBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "dreambench"
pytestmark = pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="../shared/dreambench is not present")
QUIET = dict(log=lambda message: None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_sd15_dir):
    """Tiny SD 1.5 base, a LoRA + embeddings for it, a LoRA for tiny SDXL, tiny metric backbones."""
    from dreamguide import models
    from dreamguide.evaluation.tiny_backbones import save_tiny_backbones
    from dreamguide.lora_files import add_lora, save_lora
    from dreamguide.testing import tiny_sdxl_pipeline
    from dreamguide.token_files import add_tokens, save_embeddings

    root = tmp_path_factory.mktemp("bench-assets")
    model = models.load_model(tiny_sd15_dir)
    add_lora(model.unet, rank=2, adapter_name="subject")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    save_lora(model.unet, root / "lora.safetensors", "subject")
    add_tokens(model, ["sks"], "dog")
    save_embeddings(model, ["sks"], root / "embeddings.safetensors")
    sdxl = models.DiffusionModel.from_pipeline(tiny_sdxl_pipeline(0))
    add_lora(sdxl.unet, rank=2, adapter_name="subject")
    save_lora(sdxl.unet, root / "sdxl_lora.safetensors", "subject")
    backbones = save_tiny_backbones(root / "backbones")
    return {"base": str(tiny_sd15_dir), "root": root, "backbones": backbones}


def _config(assets, **changes):
    adapters = {"subjects": {
        "dog": {"lora": str(assets["root"] / "lora.safetensors"),
                "embeddings": str(assets["root"] / "embeddings.safetensors")},
        "backpack": {"lora": str(assets["root"] / "lora.safetensors")},
    }}
    data = {
        "dreambench": str(DREAMBENCH), "subjects": ["dog", "backpack"], "prompts_per_set": 1,
        "model": {"base": assets["base"]},
        "sampling": {"modes": ["pr"], "seeds": [0], "w_cons": [3.0], "steps": 2, "batch_size": 2},
        "adapters": adapters,
        "metrics": {"backbones": assets["backbones"].to_dict()},
        "report": {"bootstrap_samples": 50},
    }
    for key, value in changes.items():
        data[key] = value
    return dreambench_config_from_dict(data, assets["root"], "test.toml")


def test_reduced_dreambench_run_kill_resume_and_shards(tmp_path, assets):
    config = _config(assets)
    world = DreamBenchWorld(config)
    cases = world.cases()
    # 2 subjects x (1 DreamBench + 1 stylized prompt); the dog is live, the backpack an object
    assert [(c.subject, c.prompt_set, c.token_prompt, c.base_prompt) for c in cases] == [
        ("dog", "dreambench", "a sks dog in the jungle", "a dog in the jungle"),
        ("dog", "stylized", "a watercolor painting of sks dog", "a watercolor painting of dog"),
        ("backpack", "dreambench", "a sks backpack in the jungle", "a backpack in the jungle"),
        ("backpack", "stylized", "a watercolor painting of sks backpack", "a watercolor painting of backpack"),
    ]
    straight = run_benchmark(world, config.plan, tmp_path / "straight", config.report, 0, 1, **QUIET)
    assert len(straight) == 4
    for row in straight:
        assert 0 < row["siglip"] < 1 and -1 <= row["dino"] <= 1 and row["w_cons"] == 3.0
        assert row["trace"] and (tmp_path / "straight" / row["trace"]).is_file()
    # the scores are the Scorer's on the saved images and the base prompts
    from PIL import Image

    scorer = Scorer(assets["backbones"])
    row = straight[0]
    refs = [Image.open(p).convert("RGB") for p in sorted((DREAMBENCH / "dog").glob("*.jpg"))]
    image = Image.open(tmp_path / "straight" / row["image"]).convert("RGB")
    again = scorer.score([image], [row["base_prompt"]], scorer.embed_references(refs))[0]
    for metric, value in again.items():
        assert row[metric] == pytest.approx(value, abs=1e-5)
    summary = (tmp_path / "straight" / "tables" / "summary.md").read_text()
    assert str(assets["backbones"].siglip) in summary and "base prompt" in summary
    assert (tmp_path / "straight" / "figures" / "consistency_p.png").is_file()

    # killed after one sampler call, then finished by two processes: same rows, same images
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(DreamBenchWorld(config), config.plan, tmp_path / "resumed", config.report, 0, 1,
                      stop_after_groups=1, **QUIET)
    assert run_benchmark(DreamBenchWorld(config), config.plan, tmp_path / "resumed", config.report, 1, 2,
                         **QUIET) is None
    merged = run_benchmark(DreamBenchWorld(config), config.plan, tmp_path / "resumed", config.report, 0, 2, **QUIET)
    assert merged == straight
    assert (tmp_path / "resumed" / "results.csv").read_text() == (tmp_path / "straight" / "results.csv").read_text()
    for row in straight:
        assert (tmp_path / "resumed" / row["image"]).read_bytes() == (tmp_path / "straight" / row["image"]).read_bytes()


def _no_generation(output: Path):
    return not (output / "images").exists()


def test_bad_inputs_fail_before_generation(tmp_path, assets):
    output = tmp_path / "out"
    root = assets["root"]
    wrong_base = _config(assets, adapters={"subjects": {"dog": {"lora": str(root / "sdxl_lora.safetensors")},
                                                        "backpack": {"lora": str(root / "lora.safetensors")}}})
    with pytest.raises(ValueError, match="subject 'dog': adapter does not fit base model.*different base model"):
        run_benchmark(DreamBenchWorld(wrong_base), wrong_base.plan, output, None, 0, 1, **QUIET)
    missing = _config(assets, adapters={"subjects": {"dog": {"lora": str(root / "lora.safetensors")}}})
    with pytest.raises(FileNotFoundError, match="subject 'backpack' has no adapter"):
        run_benchmark(DreamBenchWorld(missing), missing.plan, output, None, 0, 1, **QUIET)
    no_backbone = _config(assets, metrics={"backbones": {"dino": "nobody/missing-dino"}})
    with pytest.raises(FileNotFoundError, match="nobody/missing-dino"):
        run_benchmark(DreamBenchWorld(no_backbone), no_backbone.plan, output, None, 0, 1, **QUIET)
    no_subject = _config(assets, subjects=["dog", "dragon"])
    with pytest.raises(ValueError, match="dragon"):
        run_benchmark(DreamBenchWorld(no_subject), no_subject.plan, output, None, 0, 1, **QUIET)
    assert _no_generation(output)
    with pytest.raises(ValueError, match="unknown key 'sampling.stepz'"):
        _config(assets, sampling={"stepz": 3})
    with pytest.raises(ValueError, match="unknown guidance mode"):
        _config(assets, sampling={"modes": ["nope"]})


def test_cli_check_and_eval(tmp_path, assets, capsys):
    b = assets["backbones"]
    config = tmp_path / "bench.toml"
    config.write_text(f"""
dreambench = "{DREAMBENCH}"
subjects = ["dog"]
prompts_per_set = 2
[model]
base = "{assets['base']}"
[sampling]
modes = ["cfg", "consistency", "pr"]
w_cons = [1.0, 3.0]
[adapters.subjects.dog]
lora = "{assets['root'] / 'lora.safetensors'}"
[metrics.backbones]
dino = "{b.dino}"
dinov2 = "{b.dinov2}"
clip = "{b.clip}"
siglip = "{b.siglip}"
""")
    assert main(["bench", "dreambench", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    # 4 prompts x (cfg + 2 modes x 2 w_cons) x 4 seeds; one sampler call per (prompt, weights)
    assert "1 subjects, 4 prompts, 5 guidance settings, 4 seeds: 80 images in 12 sampler calls" in out
    assert f"siglip: {b.siglip}" in out
    assert load_dreambench_config(config, ["sampling.w_cons=[2.0]"]).plan.w_cons == (2.0,)

    images = sorted((DREAMBENCH / "backpack").glob("*.jpg"))[:2]
    scores = tmp_path / "scores.csv"
    args = ["eval", *map(str, images), "--references", str(DREAMBENCH / "dog"), "--base-prompt", "a backpack",
            "--dino", b.dino, "--dinov2", b.dinov2, "--clip", b.clip, "--siglip", b.siglip, "--output", str(scores)]
    assert main(args) == 0
    rows = list(csv.DictReader(scores.open()))
    from PIL import Image

    scorer = Scorer(b)
    refs = scorer.embed_references([Image.open(p).convert("RGB") for p in sorted((DREAMBENCH / "dog").glob("*.jpg"))])
    expected = scorer.score([Image.open(p).convert("RGB") for p in images], ["a backpack"] * 2, refs)
    for row, values in zip(rows, expected):
        for metric, value in values.items():
            assert float(row[metric]) == pytest.approx(value, abs=1e-5)
    assert main(["eval", str(images[0]), "--metrics", "dino"]) == 2
    assert "--references" in capsys.readouterr().err


def test_train_section_trains_missing_subjects_once(tmp_path, assets):
    train_toml = tmp_path / "train.toml"
    train_toml.write_text("""
[data]
token = "<dog>"
resolution = 32
[train]
method = "dco"
steps = 1
[ti]
enabled = true
[lora]
rank = 2
alpha = 2
[output]
checkpoint_every = 0
""")
    config = _config(assets, subjects=["dog"], adapters={}, prompt_sets=["stylized"],
                     train={"config": str(train_toml), "output": str(tmp_path / "adapters")})
    world = DreamBenchWorld(config)
    assert world.untrained_subjects() == ["dog"]
    assert world.cases()[0].token_prompt == "a watercolor painting of <dog> dog"
    rows = run_benchmark(world, config.plan, tmp_path / "out", config.report, 0, 1, **QUIET)
    adapter = world.adapter("dog")
    assert adapter.lora == tmp_path / "adapters" / "dog" / "pytorch_lora_weights.safetensors"
    assert adapter.lora.is_file() and adapter.embeddings.is_file() and adapter.token == "<dog>"
    assert len(rows) == 1 and rows[0]["prompt"] == "a watercolor painting of <dog> dog"
    assert DreamBenchWorld(config).untrained_subjects() == []

    # [adapters] folder pointed at the training outputs: the files `dreamguide train` wrote, and the
    # token recorded in them
    folder = _config(assets, subjects=["dog"], adapters={"folder": str(tmp_path / "adapters")},
                     prompt_sets=["stylized"])
    world = DreamBenchWorld(folder)
    assert world.adapter("dog") == adapter
    again = run_benchmark(world, folder.plan, tmp_path / "from-folder", folder.report, 0, 1, **QUIET)
    assert [(r["prompt"], r["siglip"], r["dino"]) for r in again] == [(r["prompt"], r["siglip"], r["dino"])
                                                                       for r in rows]


def _poisoned(source: Path, out: Path, value: float, every: bool = False) -> str:
    """``source`` written to ``out`` with ``value`` in the first lora_B tensor's first entry (``every``: in
    every entry of every tensor); returns that first key."""
    from safetensors.torch import load_file

    from dreamguide.atomic import save_safetensors

    tensors = load_file(str(source))
    key = sorted(k for k in tensors if k.endswith(".lora_B.weight"))[0]
    for name in (sorted(tensors) if every else [key]):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[: None if every else 1] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out)
    return key


def test_a_subject_with_a_nan_adapter_is_skipped_and_scored_once_fixed(tmp_path, assets, capsys):
    """dog, backpack, cat; backpack's LoRA holds a NaN: the run finishes the others, lists backpack, exits 3."""
    root, b = assets["root"], assets["backbones"]
    bad = tmp_path / "adapters" / "backpack.safetensors"
    key = _poisoned(root / "lora.safetensors", bad, float("nan"))
    config = tmp_path / "bench.toml"
    config.write_text(f"""
dreambench = "{DREAMBENCH}"
subjects = ["dog", "backpack", "cat"]
prompts_per_set = 1
[model]
base = "{assets['base']}"
[sampling]
modes = ["pr"]
seeds = [0]
w_cons = [3.0]
steps = 2
[adapters.subjects.dog]
lora = "{root / 'lora.safetensors'}"
embeddings = "{root / 'embeddings.safetensors'}"
[adapters.subjects.backpack]
lora = "{bad}"
[adapters.subjects.cat]
lora = "{root / 'lora.safetensors'}"
[metrics.backbones]
dino = "{b.dino}"
dinov2 = "{b.dinov2}"
clip = "{b.clip}"
siglip = "{b.siglip}"
[report]
bootstrap_samples = 50
""")
    out, without, clean = tmp_path / "out", tmp_path / "without", tmp_path / "clean"
    command = ["bench", "dreambench", str(config), "--output", str(out)]
    assert main([*command, "--check"]) == 3  # --check names it too
    assert f"warning: subject 'backpack': LoRA file {bad} holds NaN" in capsys.readouterr().err
    assert main(command) == 3
    err = capsys.readouterr().err
    assert "not every subject was scored; 1 skipped" in err
    assert (f"subject 'backpack': 2 of 2 images not made: LoRA file {bad} holds NaN or infinite values: {key!r} "
            "has 1 of") in err
    assert main(["bench", "dreambench", str(config), "--output", str(without), "--subjects", "dog,cat"]) == 0
    # the others are scored exactly as in a run without backpack, which the report lists with the reason
    assert (out / "results.csv").read_text() == (without / "results.csv").read_text()
    assert (out / "tables" / "per_subject.csv").read_text() == (without / "tables" / "per_subject.csv").read_text()
    assert not (out / "images" / "backpack").exists()
    summary = (out / "tables" / "summary.md").read_text()
    assert "**Skipped: 1 subject; the tables leave it out.**" in summary
    assert f"| backpack | before sampling | 2 of 2 | LoRA file {bad} holds NaN or infinite values: {key!r}" in summary
    (skipped,) = list(csv.DictReader((out / "tables" / "skipped.csv").open()))
    assert skipped["subject"] == "backpack" and key in skipped["reason"] and skipped["missing"] == "2"
    # --report-only says the same
    assert main([*command, "--report-only"]) == 3 and "1 skipped" in capsys.readouterr().err

    # fixed adapter, same command: backpack's images are made and scored, nothing else is redone
    bad.write_bytes((root / "lora.safetensors").read_bytes())
    assert main(command) == 0
    assert "6 groups in this shard, 4 already done, 2 to run" in capsys.readouterr().out
    assert not (out / "tables" / "skipped.csv").exists() and "Skipped" not in (out / "tables" / "summary.md").read_text()
    assert main(["bench", "dreambench", str(config), "--output", str(clean)]) == 0
    assert (out / "results.csv").read_text() == (clean / "results.csv").read_text()


def test_a_subject_whose_samples_become_non_finite_is_skipped_naming_its_files(tmp_path, assets):
    """Finite but huge LoRA weights pass the file check; the sample overflows, and that subject is skipped."""
    huge = tmp_path / "huge.safetensors"
    _poisoned(assets["root"] / "lora.safetensors", huge, 1e30, every=True)
    config = _config(assets, adapters={"subjects": {"dog": {"lora": str(huge)},
                                                    "backpack": {"lora": str(assets["root"] / "lora.safetensors")}}})
    world = DreamBenchWorld(config)
    rows = run_benchmark(world, config.plan, tmp_path / "out", config.report, 0, 1, **QUIET)
    assert [r["subject"] for r in rows] == ["backpack", "backpack"]
    (entry,) = skipped_adapters(world, config.plan, tmp_path / "out")
    assert entry["subject"] == "dog" and entry["found"] == "while sampling" and entry["missing"] == 2
    assert "became non-finite (NaN or inf)" in entry["reason"] and f"adapter: LoRA {huge}" in entry["reason"]


@pytest.mark.parametrize("changes, message", [
    ({"model": {"base": "x", "dtype": "fp8"}}, "model.dtype must be one of 'auto'"),
    ({"model": {"dtype": "auto"}}, r"missing \[model\] base"),
    ({"sampling": {"scheduler": "heun"}}, "sampling.scheduler 'heun'"),
    ({"sampling": {"seeds": [-1]}}, "non-negative"),
    ({"sampling": {"steps": "10"}}, "sampling.steps must be an integer"),
    ({"sampling": {"w_cons": 3.0}}, "sampling.w_cons must be a list of a number"),
    ({"sampling": {"pr": {"granularity": "pixel"}}}, "sampling.pr.granularity must be one of"),
    ({"prompt_sets": ["weird"]}, "prompt_sets"),
    ({"train": {"output": "x"}}, r"\[train\] needs 'config'"),
    ({"adapters": {"subjects": {"dog": {"lorra": "x"}}}}, "unknown key 'adapters.subjects.dog.lorra'; did you mean 'lora'"),
    ({"metrics": {"backbones": {"dinov3": "x"}}}, "unknown key 'metrics.backbones.dinov3'"),
    ({"report": {"bootstrap_samples": 2}}, "report: bootstrap_samples must be at least 10"),
])
def test_config_errors_name_the_key_and_the_file(assets, changes, message):
    with pytest.raises(ConfigError, match=message) as error:
        _config(assets, **changes)
    assert str(error.value).startswith("test.toml")
