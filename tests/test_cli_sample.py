"""``dreamguide sample`` end to end on saved tiny SDXL / SD 1.x / pixel models (offline)."""

from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamguide.cli import main
from dreamguide.images import read_png_metadata, read_png_parameters


def _personal_files(model_dir, out_dir, seed: int) -> dict[str, str]:
    """A random LoRA and a learned "<sks>" token for the model in ``model_dir``, saved as safetensors."""
    import torch

    from dreamguide.lora_files import add_lora, save_lora
    from dreamguide.models import load_model
    from dreamguide.token_files import add_tokens, save_embeddings

    model = load_model(model_dir)
    torch.manual_seed(seed)
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)
    add_tokens(model, "<sks>", "dog")
    for encoder, tokenizer in zip(model.text_encoders, model.tokenizers):
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[tokenizer.convert_tokens_to_ids("<sks>")] += torch.randn(weight.shape[1])
    lora = save_lora(model.unet, out_dir / "lora.safetensors", "subject")
    embeddings = save_embeddings(model, "<sks>", out_dir / "embeddings.safetensors")
    return {"lora": str(lora), "embeddings": str(embeddings)}


@pytest.fixture(scope="module")
def sdxl_personal(tiny_sdxl_dir, tmp_path_factory):
    return _personal_files(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl-personal"), seed=1)


@pytest.fixture(scope="module")
def sd15_personal(tiny_sd15_dir, tmp_path_factory):
    return _personal_files(tiny_sd15_dir, tmp_path_factory.mktemp("sd15-personal"), seed=2)


PROMPT = ["--token", "<sks>", "--class-word", "dog", "--prompt", "a <sks> dog in the snow"]
SMALL = ["--steps", "2", "--height", "16", "--width", "16", "--no-progress"]


def test_sdxl_end_to_end(tiny_sdxl_dir, sdxl_personal, tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["sample", "--model", str(tiny_sdxl_dir), "--lora", sdxl_personal["lora"],
            "--embeddings", sdxl_personal["embeddings"], *PROMPT, "--modes", "cfg,consistency,pr",
            "--seeds", "0-1", "--batch-size", "2", "--w-cons", "2.5", "--pr-rescale", "0.5", "--trace",
            "--output", str(out), *SMALL]
    assert main(args) == 0
    printed = capsys.readouterr().out
    names = ["cfg-seed0.png", "cfg-seed1.png", "consistency-seed0.png", "consistency-seed1.png",
             "parallel-rescaled-seed0.png", "parallel-rescaled-seed1.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "grid.png", "trace.json", "settings.json"])
    for name in [*names, "grid.png", "trace.json", "settings.json"]:
        assert str(out / name) in printed

    meta = read_png_metadata(out / "parallel-rescaled-seed1.png")
    assert meta["prompt"] == "a <sks> dog in the snow" and meta["base_prompt"] == "a dog in the snow"
    assert (meta["mode"], meta["seed"], meta["steps"], meta["w_text"], meta["w_cons"]) == (
        "parallel-rescaled", 1, 2, 7.5, 2.5)
    assert meta["pr"] == {"granularity": "location", "normalization": "standardize", "rescale": 0.5, "eps": 1e-6}
    # Sources by base name and content hash, no local paths (dreamguide.provenance).
    lora, embeddings = Path(sdxl_personal["lora"]), Path(sdxl_personal["embeddings"])
    unet_weights = tiny_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert (meta["model"], meta["model_sha256"]) == (tiny_sdxl_dir.name, sha256(unet_weights.read_bytes()).hexdigest())
    assert (meta["lora"], meta["lora_sha256"]) == (lora.name, sha256(lora.read_bytes()).hexdigest())
    assert (meta["embeddings"], meta["embeddings_sha256"]) == (embeddings.name, sha256(embeddings.read_bytes()).hexdigest())
    assert str(tmp_path.parent) not in (out / "cfg-seed0.png").read_bytes().decode("latin-1")
    assert meta["scheduler_class"] == "EulerDiscreteScheduler"
    assert (meta["height"], meta["width"], meta["model_kind"]) == (16, 16, "sdxl")
    parameters = read_png_parameters(out / "cfg-seed0.png")
    assert parameters.startswith(
        "a <sks> dog in the snow\nSteps: 2, Sampler: EulerDiscreteScheduler, CFG scale: 7.5, Seed: 0, Size: 16x16, "
        f"Model hash: {meta['model_sha256'][:10]}, Model: {tiny_sdxl_dir.name}, "
    )
    # A1111's infotext reader (modules/infotext_utils.py parse_generation_parameters, from memory):
    # "key: value" pairs by this pattern, a quoted value unquoted with json.loads.
    pairs = {k: (json.loads(v) if v.startswith('"') else v)
             for k, v in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', parameters.splitlines()[-1])}
    data = lora.read_bytes()
    tensors = data[8 + int.from_bytes(data[:8], "little"):]  # A1111's addnet hash: the bytes after the header
    assert pairs["Lora hashes"] == f"{lora.stem}: {sha256(tensors).hexdigest()[:12]}"
    assert pairs["TI hashes"] == f"<sks>: {meta['embeddings_sha256'][:12]}"
    assert pairs["Model hash"] == meta["model_sha256"][:10] and pairs["Sampler"] == "EulerDiscreteScheduler"
    grid_meta = read_png_metadata(out / "grid.png")
    assert grid_meta["grid_modes"] == ["cfg", "consistency", "parallel-rescaled"] and grid_meta["grid_seeds"] == [0, 1]
    assert "seed" not in grid_meta and "mode" not in grid_meta and grid_meta["hashes"] == meta["hashes"]
    assert 'Grid modes: "cfg, consistency, parallel-rescaled", Grid seeds: "0, 1"' in read_png_parameters(out / "grid.png")

    with Image.open(out / "grid.png") as grid:
        assert grid.width > 3 * 16 and grid.height > 2 * 16  # 3 mode columns, 2 seed rows, labels

    trace = json.loads((out / "trace.json").read_text())
    assert [(i["file"], i["mode"], i["seed"]) for i in trace["images"]] == [
        (n, n.rsplit("-seed", 1)[0], int(n[-5])) for n in names]
    assert trace["images"][0]["steps"] == []  # cfg: no consistency term
    step = trace["images"][4]["steps"][1]
    assert step["step"] == 1 and set(step) >= {"timestep", "mean", "std", "quantiles", "fraction_negative", "histogram"}
    assert sum(step["histogram"]["counts"]) == 8 * 8 and len(step["histogram"]["edges"]) == trace["histogram_bins"] + 1

    record = json.loads((out / "settings.json").read_text())
    assert record["settings"]["modes"] == ["cfg", "consistency", "parallel-rescaled"] and record["files"] == names

    # The same seed gives the same image in a later run, whatever the batch size.
    again = tmp_path / "again"
    rerun = {"--seeds": "1", "--modes": "pr", "--batch-size": "1", "--output": str(again)}
    assert main([rerun.get(args[i - 1], a) for i, a in enumerate(args)]) == 0
    first = np.asarray(Image.open(out / "parallel-rescaled-seed1.png")).astype(int)
    second = np.asarray(Image.open(again / "parallel-rescaled-seed1.png")).astype(int)
    assert np.abs(first - second).max() <= 1
    assert read_png_metadata(again / "parallel-rescaled-seed1.png") == meta


def test_sd15_lora_and_token_and_scheduler(tiny_sd15_dir, sd15_personal, tmp_path, capsys):
    out = tmp_path / "sd15"
    assert main(["sample", "--model", str(tiny_sd15_dir), "--lora", sd15_personal["lora"],
                 "--embeddings", sd15_personal["embeddings"], *PROMPT, "--modes", "dreambooth,orthogonal",
                 "--seeds", "4", "--scheduler", "dpm++", "--negative-prompt", "blurry", "--output", str(out),
                 *SMALL]) == 0
    meta = read_png_metadata(out / "orthogonal-seed4.png")
    assert meta["scheduler_class"] == "DPMSolverMultistepScheduler" and meta["negative_prompt"] == "blurry"
    assert meta["model_kind"] == "sd" and (out / "dreambooth-seed4.png").exists() and (out / "grid.png").exists()
    assert not (out / "trace.json").exists()


def test_pixel_model_and_personalized_unet(tiny_pixel_dir, tmp_path):
    """A pixel model, personalized by a full UNet folder (here: the base UNet itself)."""
    out = tmp_path / "pixel"
    unet_dir = tiny_pixel_dir / "unet"
    assert main(["sample", "--model", str(tiny_pixel_dir), "--personalized-unet", str(unet_dir),
                 "--prompt", "a red cube", "--modes", "cfg,dreambooth", "--steps", "2", "--no-progress",
                 "--output", str(out)]) == 0
    cfg = np.asarray(Image.open(out / "cfg-seed0.png"))
    dreambooth = np.asarray(Image.open(out / "dreambooth-seed0.png"))
    assert cfg.shape == (16, 16, 3)
    assert np.array_equal(cfg, dreambooth)  # same weights, same (null, prompt) rows, same noise


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--modes", "cfg,fancy"], "unknown guidance mode 'fancy'; choose one of cfg, dreambooth, consistency"),
        (["--prompt", "a dog in the snow"], "the prompt 'a dog in the snow' does not contain the token '<sks>'"),
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--seeds", "a-b"], "bad seed 'a-b'"),
        (["--lora", "missing/lora.safetensors"], "LoRA file missing/lora.safetensors does not exist"),
        (["--height", "17"], "height 17 is not divisible by 2 (the VAE downsampling factor of this model)"),
        (["--model", "someone/not-downloaded"], "'someone/not-downloaded' is not a folder in"),
        (["--model", "./no/such/folder"], "model folder ./no/such/folder does not exist"),
    ],
)
def test_errors_name_the_value_and_the_fix(tiny_sd15_dir, sd15_personal, tmp_path, capsys, extra, message):
    args = ["sample", "--model", str(tiny_sd15_dir), "--lora", sd15_personal["lora"], *PROMPT, "--modes", "pr",
            "--output", str(tmp_path / "x"), *SMALL]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert any(line.startswith("error: ") and message in line for line in err.splitlines()), err
    assert not (tmp_path / "x").exists()


def test_adapter_for_another_model_and_missing_personalization(tiny_sdxl_dir, tiny_sd15_dir, sd15_personal, tmp_path,
                                                               capsys):
    out = str(tmp_path / "x")
    assert main(["sample", "--model", str(tiny_sdxl_dir), "--lora", sd15_personal["lora"], *PROMPT,
                 "--output", out, *SMALL]) == 2
    assert "does not match this UNet" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_sd15_dir), *PROMPT, "--modes", "cfg,pr", "--output", out, *SMALL]) == 2
    assert "mode(s) parallel-rescaled need a personalized model" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_sd15_dir), "--personalized-unet", str(tiny_sdxl_dir / "unet"),
                 *PROMPT, "--output", out, *SMALL]) == 2
    assert "does not match the model's UNet: cross_attention_dim is 64, the model has 32" in capsys.readouterr().err


def test_help_lists_what_the_library_accepts(capsys):
    from dreamguide import guidance
    from dreamguide.sampling import SCHEDULERS, SampleSettings

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    assert f"{', '.join([*guidance.MODES, *guidance.ALIASES])} (default: parallel-rescaled)" in text
    assert "{" + ",".join(SCHEDULERS) + "}" in text and "{" + ",".join(guidance.NORMALIZATIONS) + "}" in text
    assert f"text guidance weight (default {SampleSettings.w_text})" in text
    assert f"consistency guidance weight (default {SampleSettings.w_cons})" in text
    assert f"denoising steps (default {SampleSettings.steps})" in text
    assert f"(default {SampleSettings.batch_size})" in text


def test_flags_left_out_take_the_library_defaults_and_given_ones_override():
    import argparse

    from dreamguide.cli import sample
    from dreamguide.guidance import ParallelRescaling
    from dreamguide.sampling import SampleSettings

    parser = argparse.ArgumentParser()
    sample.add_parser(parser.add_subparsers())
    plain = parser.parse_args(["sample", "--model", "m", "--prompt", "a dog"])
    assert plain.w_text is plain.w_cons is plain.steps is plain.batch_size is plain.pr_rescale is plain.trace is None
    assert sample.settings_from_args(plain) == SampleSettings(prompt="a dog")
    given = parser.parse_args(["sample", "--model", "m", "--prompt", "a dog", "--w-cons", "2", "--steps", "7",
                               "--pr-rescale", "0.5", "--seeds", "1-2", "--trace"])
    assert sample.settings_from_args(given) == SampleSettings(
        prompt="a dog", w_cons=2.0, steps=7, pr=ParallelRescaling(rescale=0.5), seeds=(1, 2), trace=True)


def test_top_level_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom dreamguide.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "sample" in done.stdout and "train" in done.stdout and "eval" in done.stdout
    assert done.stdout.strip().endswith("torch not imported"), done.stdout + done.stderr


def test_embeddings_need_their_token(tiny_sd15_dir, sd15_personal, tmp_path, capsys):
    assert main(["sample", "--model", str(tiny_sd15_dir), "--embeddings", sd15_personal["embeddings"],
                 "--prompt", "a <sks> dog", "--output", str(tmp_path / "x"), *SMALL]) == 2
    assert "need the token they were learned for; pass token='<sks>' (--token)" in capsys.readouterr().err


def test_images_are_kept_as_each_batch_finishes(tiny_sd15_dir, sd15_personal, tmp_path, capsys, monkeypatch):
    """A failure in a later batch loses nothing sampled before it: those PNGs and settings.json are on disk."""
    from dreamguide.sampling import Sampler

    calls = {"n": 0}
    original = Sampler._sample_batch

    def fail_second_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("the sample became non-finite (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "_sample_batch", fail_second_batch)
    out = tmp_path / "kept"
    with pytest.raises(FloatingPointError):
        main(["sample", "--model", str(tiny_sd15_dir), "--lora", sd15_personal["lora"],
              "--embeddings", sd15_personal["embeddings"], *PROMPT, "--modes", "consistency", "--seeds", "0,1",
              "--batch-size", "1", "--output", str(out), *SMALL])
    assert (out / "consistency-seed0.png").is_file() and not (out / "consistency-seed1.png").exists()
    assert json.loads((out / "settings.json").read_text())["files"] == ["consistency-seed0.png"]
    assert not (out / ".dreamguide.lock").exists()


def test_output_folder_is_checked_before_sampling_and_another_run_is_not_mixed_in(tiny_sd15_dir, sd15_personal,
                                                                                   tmp_path, capsys):
    args = ["sample", "--model", str(tiny_sd15_dir), "--lora", sd15_personal["lora"],
            "--embeddings", sd15_personal["embeddings"], *PROMPT, "--modes", "consistency", *SMALL]
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    assert main([*args, "--output", str(a_file)]) == 2
    assert f"the output folder {a_file} is a file; give a folder for the images" in capsys.readouterr().err
    assert main([*args, "--output", str(a_file / "below")]) == 2
    assert f"the output folder {a_file / 'below'} is below {a_file}, which is a file" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main([*args, "--seeds", "0-2", "--output", str(out)]) == 0
    assert main([*args, "--seeds", "0-2", "--output", str(out)]) == 0  # the same run again: allowed
    # a record written before a setting existed (here personalized_steps) reads its default: the same run
    record = json.loads((out / "settings.json").read_text())
    del record["settings"]["personalized_steps"]
    (out / "settings.json").write_text(json.dumps(record))
    assert main([*args, "--seeds", "0-2", "--output", str(out)]) == 0
    assert main([*args, "--seeds", "5", "--output", str(out)]) == 2
    assert "holds the images of another run (settings.json differs in seeds)" in capsys.readouterr().err
    assert main([*args, "--seeds", "5", "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["consistency-seed5.png"]  # no stale seed 0-2 images
