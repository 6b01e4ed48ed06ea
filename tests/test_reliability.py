"""Bad inputs named, never silently used: long prompts, half LoRA pairs, non-integer seeds,
odd image files, stray captions, file modes (tiny models, offline)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

TOKEN, CLASS_WORD = "<sks>", "dog"
LONG = " ".join(["photo"] * 80)


@pytest.fixture(scope="module")
def sd15():
    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sd15_pipeline

    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline(seed=0))
    add_lora(model.unet, rank=2, adapter_name="subject", init=False)
    return model


# ---------------------------------------------------------------------------------------------
# Prompts past the text encoder's limit


def test_check_prompt_length_counts_and_names_the_cut(sd15):
    from dreamguide.models import PromptTooLongError, check_prompt_length

    tokenizer = sd15.tokenizers[0]
    prompt = f"a {TOKEN} {CLASS_WORD} {LONG}"
    count = len(tokenizer.tokenize(prompt)) + 2
    assert count > 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompt_length(sd15, f"a {TOKEN} {CLASS_WORD}", (TOKEN,))  # short: silent
    with pytest.warns(UserWarning, match=rf"is {count} tokens long.*reads only 77, so 'photo photo.*' is cut off"):
        check_prompt_length(sd15, prompt, (TOKEN,))  # token near the start: kept, the tail is cut
    late = f"a {LONG} {TOKEN} {CLASS_WORD}"
    late_count = len(tokenizer.tokenize(late)) + 2
    with pytest.raises(PromptTooLongError, match=rf"is {late_count} tokens long.*'<sks>' is cut off"):
        check_prompt_length(sd15, late, (TOKEN,))


def test_sampler_refuses_a_token_past_the_limit_before_sampling(sd15, monkeypatch):
    from dreamguide.models import PromptTooLongError
    from dreamguide.sampling import Sampler, SampleSettings

    sampler = Sampler(sd15, adapter_name="subject")
    monkeypatch.setattr(sampler, "_sample_batch", lambda *a: pytest.fail("sampled a cut-off prompt"))
    settings = SampleSettings(prompt=f"a photo of {LONG} {TOKEN} {CLASS_WORD}", token=TOKEN, class_word=CLASS_WORD,
                              modes="consistency", seeds=0, steps=2, height=32, width=32)
    with pytest.raises(PromptTooLongError, match=r"the prompt 'a photo of photo.* tokens long.*'<sks>' is cut off"):
        sampler.sample(settings, progress=False)
    # the base prompt's class word past the limit (the token prompt itself fits)
    base = SampleSettings(prompt=f"a {TOKEN}", token=TOKEN, base_prompt=f"a {LONG} {CLASS_WORD}",
                          class_word=CLASS_WORD, modes="consistency", seeds=0, steps=2, height=32, width=32)
    with pytest.raises(PromptTooLongError, match=r"the base prompt .*'dog' is cut off"):
        sampler.sample(base, progress=False)


def test_training_refuses_a_caption_whose_token_is_cut(tmp_path):
    import numpy as np
    from PIL import Image

    from dreamguide.testing import tiny_pixel_model
    from dreamguide.training import train, train_config_from_dict
    from dreamguide.training.data import DataError

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(folder / "a.png")
    (folder / "a.txt").write_text(f"a photo of {LONG} {TOKEN} {CLASS_WORD}", encoding="utf-8")
    config = train_config_from_dict(
        {"data": {"instance_dir": str(folder), "token": TOKEN, "class_word": CLASS_WORD},
         "train": {"steps": 1, "lr": 1e-2}, "lora": {"rank": 2},
         "output": {"dir": str(tmp_path / "out"), "checkpoint_every": 0}}
    )
    with pytest.raises(DataError, match=r"caption of .*a\.png.*tokens long.*'<sks>' is cut off"):
        train(config, model=tiny_pixel_model(seed=0), progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Incomplete LoRA files


@pytest.fixture(scope="module")
def lora_files(sd15, tmp_path_factory):
    from dreamguide.lora_files import save_kohya_lora, save_lora

    folder = tmp_path_factory.mktemp("lora")
    return save_lora(sd15.unet, folder / "lora.safetensors"), save_kohya_lora(sd15.unet, folder / "kohya.safetensors")


def _without(path, out, drop):
    from safetensors.torch import load_file

    from dreamguide.atomic import save_safetensors

    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith(drop))[0]
    del tensors[key]
    save_safetensors(tensors, out)
    return key


@pytest.mark.parametrize("layout, drop", [("diffusers", ".lora_B.weight"), ("diffusers", ".lora_A.weight"),
                                          ("kohya", ".lora_up.weight"), ("kohya", ".alpha")])
def test_a_lora_file_with_half_a_pair_is_refused(lora_files, layout, drop, tmp_path):
    from dreamguide.lora_files import load_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sd15_pipeline

    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline(seed=0))
    source = lora_files[0] if layout == "diffusers" else lora_files[1]
    load_lora(model, source, adapter_name="whole")  # the complete file loads
    key = _without(source, tmp_path / "half.safetensors", drop)
    layer = key[: -len(drop)]
    with pytest.raises(ValueError, match=rf"half\.safetensors .*{layer}.*re-export"):
        load_lora(model, tmp_path / "half.safetensors", adapter_name="half")
    assert "half" not in model.unet.peft_config


def test_from_kohya_refuses_half_pairs(sd15):
    from dreamguide.lora_files import from_kohya, lora_state_dict, to_kohya

    kohya = to_kohya({f"unet.{k}": v for k, v in lora_state_dict(sd15.unet).items()}, alpha=2.0)
    names = [name for name, _ in sd15.unet.named_modules()]
    assert len(from_kohya(kohya, names)[0]) == len([k for k in kohya if not k.endswith(".alpha")])
    down = sorted(k for k in kohya if k.endswith(".lora_down.weight"))[0]
    with pytest.raises(ValueError, match=rf"has {down!r} but not '.*lora_up.weight'"):
        from_kohya({k: v for k, v in kohya.items() if k != down.replace("lora_down", "lora_up")}, names)


@pytest.mark.parametrize("layout, poison", [("diffusers", ".lora_B.weight"), ("kohya", ".lora_down.weight"),
                                            ("kohya", ".alpha")])
def test_a_lora_file_with_nan_or_inf_is_refused_naming_the_tensor(lora_files, layout, poison, tmp_path):
    from safetensors.torch import load_file

    from dreamguide.atomic import save_safetensors
    from dreamguide.lora_files import NonFiniteWeights, load_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sd15_pipeline

    tensors = load_file(str(lora_files[0] if layout == "diffusers" else lora_files[1]))
    keys = sorted(k for k in tensors if k.endswith(poison))
    tensors[keys[1]] = tensors[keys[1]].clone()
    count = min(2, tensors[keys[1]].numel())  # an alpha is a single number
    tensors[keys[1]].view(-1)[:count] = float("nan")
    tensors[keys[3]] = torch.full_like(tensors[keys[3]], float("-inf"))
    save_safetensors(tensors, tmp_path / "bad.safetensors")
    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline(seed=0))
    with pytest.raises(NonFiniteWeights, match=(
            rf"LoRA file .*bad\.safetensors holds NaN or infinite values: {re.escape(repr(keys[1]))} has {count} of "
            rf"{tensors[keys[1]].numel()} values non-finite \(and 1 more tensor\(s\): {re.escape(repr(keys[3]))}\); "
            r"did the training that wrote it diverge")) as caught:
        load_lora(model, tmp_path / "bad.safetensors", adapter_name="bad")
    assert caught.value.bad == [(keys[1], count, tensors[keys[1]].numel()), (keys[3], tensors[keys[3]].numel(),
                                                                             tensors[keys[3]].numel())]
    assert "bad" not in (getattr(model.unet, "peft_config", None) or {})


def test_an_embeddings_file_with_nan_is_refused_naming_the_tensor(sd15, tmp_path):
    from dreamguide.lora_files import NonFiniteWeights
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sd15_pipeline
    from dreamguide.token_files import add_tokens, load_embeddings, save_embeddings

    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline(seed=0))
    add_tokens(model, [TOKEN], CLASS_WORD)
    vectors = [torch.zeros(1, model.text_encoders[0].get_input_embeddings().weight.shape[1])]
    vectors[0][0, 3] = float("nan")
    save_embeddings(model, [TOKEN], tmp_path / "embeddings.safetensors", vectors=vectors)
    fresh = DiffusionModel.from_pipeline(tiny_sd15_pipeline(seed=0))
    with pytest.raises(NonFiniteWeights, match=rf"embeddings file .*embeddings\.safetensors holds NaN or infinite "
                                               rf"values: 'emb_params' has 1 of {vectors[0].numel()} values non-finite;"):
        load_embeddings(fresh, tmp_path / "embeddings.safetensors")
    assert TOKEN not in fresh.tokenizers[0].get_vocab()


# ---------------------------------------------------------------------------------------------
# Numbers that would silently become other numbers


@pytest.mark.parametrize("seeds", [[1.9, 2.2], [0, True], 1.0, False, (3, 4.0)])
def test_seeds_must_be_integers(seeds):
    from dreamguide.sampling import SampleItem, SampleSettings, parse_seeds

    with pytest.raises(ValueError, match="seeds must be integers"):
        parse_seeds(seeds)
    with pytest.raises(ValueError, match="seeds must be integers"):
        SampleSettings(prompt="a dog", seeds=seeds)
    if not isinstance(seeds, (list, tuple)):
        with pytest.raises(ValueError, match="seed must be an integer"):
            SampleItem(prompt="a dog", seed=seeds)


def test_integer_seeds_still_parse():
    import numpy as np

    from dreamguide.sampling import parse_seeds

    assert parse_seeds([np.int64(3), 1]) == (3, 1) and parse_seeds(np.int32(5)) == (5,)
    assert all(type(s) is int for s in parse_seeds([np.int64(3)]))


@pytest.mark.parametrize("kwargs", [dict(eps=float("inf")), dict(eps=float("nan")), dict(eps=0.0), dict(eps=True),
                                    dict(rescale=float("nan")), dict(rescale=float("-inf"))])
def test_parallel_rescaling_refuses_non_finite_numbers(kwargs):
    from dreamguide.guidance import ParallelRescaling

    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"PR {name} must be (a finite|positive and finite)"):
        ParallelRescaling(**kwargs)


@pytest.mark.parametrize("name", ["start", "stop", "spread_cap", "norm_bound", "magnitude_ratio", "magnitude_power",
                                  "parallel_target", "pr_from"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_consistency_shaping_refuses_non_finite_numbers(name, value):
    from dreamguide.guidance import ConsistencyShaping

    with pytest.raises(ValueError, match=rf"ConsistencyShaping\.{name} must be a finite number"):
        ConsistencyShaping(**{name: value})


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_training_config_refuses_a_non_finite_lora_alpha(tmp_path, text):
    from dreamguide.training import ConfigError, load_train_config, train_config_from_dict

    path = tmp_path / "run.toml"
    path.write_text(f'[data]\ninstance_dir = "x"\nclass_word = "dog"\n[lora]\nalpha = {text}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"lora\.alpha"):
        load_train_config(path)
    with pytest.raises(ConfigError, match=r"lora\.alpha"):
        train_config_from_dict({"data": {"instance_dir": "x", "class_word": "dog"}, "lora": {"alpha": float(text)}})


# ---------------------------------------------------------------------------------------------
# One image loader: every mode and bit depth


def _gradient():
    import numpy as np

    return (np.arange(24 * 32) % 256).reshape(24, 32).astype(np.uint8)


def test_open_rgb_converts_every_mode_by_its_range(tmp_path):
    import numpy as np
    from PIL import Image

    from dreamguide.images import open_rgb

    gray = _gradient()
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    expected_gray = np.repeat(gray[..., None], 3, axis=-1)
    cases = {
        "g16.png": (Image.fromarray(gray.astype(np.uint16) * 257), expected_gray),
        "g16.tif": (Image.fromarray(gray.astype(np.uint16) * 257), expected_gray),
        "i32.tif": (Image.fromarray(gray.astype(np.int32) * 257), expected_gray),
        "f.tif": (Image.fromarray(gray.astype(np.float32) / 255), expected_gray),
        "rgb.tif": (Image.fromarray(rgb), rgb),
        "l.png": (Image.fromarray(gray), expected_gray),
        "p.png": (Image.fromarray(rgb).quantize(256), None),
    }
    # transparent pixels on white: alpha 0 -> 255, alpha 255 -> the colour
    alpha = np.where(np.arange(32) < 16, 0, 255).astype(np.uint8)[None, :].repeat(24, 0)
    on_white = np.where(alpha[..., None] == 0, 255, rgb).astype(np.uint8)
    cases["rgba.png"] = (Image.fromarray(np.dstack([rgb, alpha])), on_white)
    cases["la.png"] = (Image.fromarray(np.dstack([gray, alpha]), mode="LA"),
                       np.repeat(np.where(alpha == 0, 255, gray)[..., None], 3, axis=-1))
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        out = np.asarray(open_rgb(tmp_path / name))
        assert out.shape == (24, 32, 3) and out.dtype == np.uint8, name
        if expected is None:
            expected = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(out, expected, err_msg=name)
    # the 16-bit PNG's mean is the 8-bit one's, not near-white
    assert np.asarray(open_rgb(tmp_path / "g16.png")).mean() == pytest.approx(expected_gray.mean())


def test_read_images_lists_or_refuses_unreadable_files(tmp_path):
    from PIL import Image

    from dreamguide.images import ImageReadError, read_images

    Image.fromarray(_gradient()).save(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("not an image")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    paths = [tmp_path / "good.png", tmp_path / "notes.png", tmp_path / "cut.png"]
    images, kept, skipped = read_images(paths, skip_unreadable=True)
    assert kept == [tmp_path / "good.png"] and len(images) == 1
    assert [path for path, _ in skipped] == paths[1:]
    with pytest.raises(ImageReadError, match=r"2 image file\(s\) cannot be read:\n  .*notes\.png\n  .*cut\.png"):
        read_images(paths)


def test_training_data_reads_a_16_bit_png_like_its_8_bit_twin(tmp_path):
    import numpy as np
    from PIL import Image

    from dreamguide.training.data import DataError, open_training_image

    gray = (_gradient() // 4).astype(np.uint16)  # a dark image: every 16-bit value below 256 * 257
    Image.fromarray(gray * 257).save(tmp_path / "dark16.png")
    assert np.asarray(open_training_image(tmp_path / "dark16.png"))[..., 0].tolist() == gray.tolist()
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=r"bad\.tif"):
        open_training_image(tmp_path / "bad.tif")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    from dreamguide.evaluation.tiny_backbones import save_tiny_backbones

    return save_tiny_backbones(tmp_path_factory.mktemp("backbones"))


def test_eval_scores_16_bit_and_tiff_like_8_bit_and_lists_unreadable_files(backbones, tmp_path, capsys):
    import csv

    import numpy as np
    from PIL import Image

    from dreamguide.cli import main

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(gray).convert("RGB").save(folder / "a8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "b16.png")
    Image.fromarray(gray).convert("RGB").save(folder / "c.tif")
    (folder / "d.png").write_text("a text file")
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(refs / "r.jpg")
    b = backbones
    common = ["--references", str(refs), "--base-prompt", "a dog", "--dino", b.dino, "--dinov2", b.dinov2,
              "--clip", b.clip, "--siglip", b.siglip, "--metrics", "dino,clip_t", "--batch-size", "2"]
    scores = tmp_path / "scores.csv"
    assert main(["eval", str(folder), *common, "--output", str(scores)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 image file(s) that cannot be read" in err and "d.png" in err
    rows = {Path(r["image"]).name: r for r in csv.DictReader(scores.open())}
    assert sorted(rows) == ["a8.png", "b16.png", "c.tif"]
    for name in ("b16.png", "c.tif"):
        for metric in ("dino", "clip_t"):
            assert float(rows[name][metric]) == pytest.approx(float(rows["a8.png"][metric]), abs=1e-5)
    assert main(["eval", str(folder), *common, "--unreadable", "stop"]) == 2
    assert "d.png" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Caption files no image uses


def test_orphan_caption_files_are_listed_and_shared_ones_refused(tmp_path):
    from PIL import Image

    from dreamguide.training.data import CaptionWarning, DataError, scan_class_folder, scan_instance_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("A.png", "b.jpg", "c.png"):
        Image.new("RGB", (20, 20)).save(folder / name)
    (folder / "a.txt").write_text(f"a {TOKEN} {CLASS_WORD} by a lake")
    (folder / "b.jpg.txt").write_text(f"a {TOKEN} {CLASS_WORD} on a bed")
    (folder / "zebra.txt").write_text(f"a {TOKEN} {CLASS_WORD}")
    (folder / "c.txt").write_text(f"a {TOKEN} {CLASS_WORD} in the snow")
    with pytest.warns(CaptionWarning) as caught:
        entries = scan_instance_folder(folder, TOKEN, CLASS_WORD, "a photo of {token} {class_word}")
    message = str(caught[0].message)
    assert "3 caption file(s) in the instance folder" in message
    assert "a.txt (differs from A.png in case only: rename it to A.txt)" in message
    assert "b.jpg.txt (a double suffix: rename it to b.txt to caption b.jpg)" in message
    assert "zebra.txt (no image has this name)" in message and "c.txt" not in message
    assert [e.token_caption for e in entries] == [f"a photo of {TOKEN} {CLASS_WORD}"] * 2 + [
        f"a {TOKEN} {CLASS_WORD} in the snow"]
    with warnings.catch_warnings():  # every caption used: silent
        warnings.simplefilter("error")
        for name in ("a.txt", "b.jpg.txt", "zebra.txt"):
            (folder / name).unlink()
        scan_instance_folder(folder, TOKEN, CLASS_WORD, "a photo of {token} {class_word}")
    Image.new("RGB", (20, 20)).save(folder / "c.jpg")
    with pytest.raises(DataError, match=r"c\.txt would caption 2 images \(c\.jpg, c\.png\); it is ambiguous"):
        scan_instance_folder(folder, TOKEN, CLASS_WORD, "a photo of {token} {class_word}")
    with pytest.raises(DataError, match=r"c\.txt would caption 2 images"):
        scan_class_folder(folder, CLASS_WORD, "a photo of a {class_word}")


# ---------------------------------------------------------------------------------------------
# File modes


@pytest.fixture()
def umask_022():
    import os

    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_outputs_respect_the_umask(tmp_path, umask_022, sd15):
    import os
    import stat

    from PIL import Image

    from dreamguide.atomic import atomic_directory, atomic_write_text, current_umask
    from dreamguide.images import save_png, write_json
    from dreamguide.lora_files import save_lora

    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert current_umask() == 0o022
    save_png(Image.new("RGB", (4, 4)), tmp_path / "out" / "a.png", {"seed": 0})
    write_json(tmp_path / "out" / "a.json", {"seed": 0})
    atomic_write_text(tmp_path / "out" / "a.toml", "x = 1\n")
    save_lora(sd15.unet, tmp_path / "out" / "lora.safetensors", "subject")
    for name in ("a.png", "a.json", "a.toml", "lora.safetensors"):
        assert mode(tmp_path / "out" / name) == 0o644, name
    with atomic_directory(tmp_path / "folder") as folder:
        (folder / "f.txt").write_text("x")
    assert mode(tmp_path / "folder") == 0o755
    os.umask(0o077)
    write_json(tmp_path / "out" / "b.json", {})
    assert mode(tmp_path / "out" / "b.json") == 0o600
    os.chmod(tmp_path / "out" / "a.json", 0o640)  # a file replaced keeps its mode
    write_json(tmp_path / "out" / "a.json", {"seed": 1})
    assert mode(tmp_path / "out" / "a.json") == 0o640


# ---------------------------------------------------------------------------------------------
# Values that hang or surprise


def test_a_huge_seed_range_is_refused_at_once():
    from dreamguide.sample_settings import MAX_SEEDS
    from dreamguide.sampling import parse_seeds

    with pytest.raises(ValueError, match=r"seed range '0-100000000' makes 100000001 images.*at most 100000 seeds"):
        parse_seeds("0-100000000")
    with pytest.raises(ValueError, match=r"makes 2 images.*split the range"):
        parse_seeds(f"0-{MAX_SEEDS - 2},{MAX_SEEDS}-{MAX_SEEDS + 1}")
    with pytest.raises(ValueError, match=rf"{MAX_SEEDS + 1} seeds given"):
        parse_seeds(range(MAX_SEEDS + 1))
    assert parse_seeds(f"0-{MAX_SEEDS - 1}") == tuple(range(MAX_SEEDS))  # the cap itself, with the duplicate check
    with pytest.raises(ValueError, match=r"seeds \[5\] are given more than once"):
        parse_seeds(f"0-{MAX_SEEDS - 2},5")


def test_huge_guidance_weights_are_warned_about_when_parsed():
    from dreamguide.sampling import SampleSettings

    with pytest.warns(UserWarning, match=r"w_text 1e\+09 \(--w-text\) is far outside the usual range"):
        SampleSettings(prompt="a dog", w_text=1e9)
    with pytest.warns(UserWarning, match=r"w_cons -100 \(--w-cons\)"):
        SampleSettings(prompt="a dog", w_cons=-100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SampleSettings(prompt="a dog", w_text=15.0, w_cons=7.5)


def test_sdxl_prompts_are_checked_against_both_tokenizers():
    from dreamguide.models import DiffusionModel, PromptTooLongError, check_prompt_length
    from dreamguide.testing import tiny_sdxl_pipeline

    sdxl = DiffusionModel.from_pipeline(tiny_sdxl_pipeline(seed=0))
    sdxl.tokenizers[1].model_max_length = 40  # the second encoder reads fewer tokens: its cut decides
    prompt = f"a {LONG} {TOKEN} {CLASS_WORD}"
    prompt_fits_first = f"a {' '.join(['photo'] * 45)} {TOKEN} {CLASS_WORD}"
    with pytest.raises(PromptTooLongError, match="reads only 77"):
        check_prompt_length(sdxl, prompt, (TOKEN,))
    with pytest.raises(PromptTooLongError, match="reads only 40"):
        check_prompt_length(sdxl, prompt_fits_first, (TOKEN,))
    with pytest.warns(UserWarning) as caught:
        check_prompt_length(sdxl, f"a {TOKEN} {CLASS_WORD} {LONG}", (TOKEN,))
    assert len(caught) == 1


# ---------------------------------------------------------------------------------------------
# Leftovers of killed runs (item 10): damaged newest checkpoint, half-done pruning, torn log line


def _checkpoint(folder, step, keep=5):
    import torch

    from dreamguide.training.checkpoints import save_checkpoint

    return save_checkpoint(folder, step, {"w": torch.ones(2)}, {"state": {}, "param_groups": []}, {"last": step},
                           keep=keep)


def test_resume_latest_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path):
    from dreamguide.training.checkpoints import resolve_checkpoint

    _checkpoint(tmp_path, 1)
    newest = _checkpoint(tmp_path, 2)
    (newest / "adapter.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # torn file
    with pytest.warns(UserWarning, match=r"skipping .*checkpoint-2: adapter\.safetensors is unreadable"):
        assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-1"
    (tmp_path / "checkpoint-1" / "optimizer.pt").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="no checkpoint .* is readable"):
        resolve_checkpoint(tmp_path, "latest")


def test_pruning_renames_before_deleting_and_clears_leftover_trash(tmp_path):
    from dreamguide.training.checkpoints import TRASH_PREFIX, list_checkpoints

    (tmp_path / f"{TRASH_PREFIX}checkpoint-0-123").mkdir(parents=True)  # a run killed mid-delete
    for step in (1, 2, 3):
        _checkpoint(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, caplog):
    from dreamguide.training.trainer import _truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo', encoding="utf-8")
    with caplog.at_level("WARNING"):
        _truncate_log(log, 2)
    assert log.read_text().splitlines() == ['{"step": 1, "loss": 0.5}', '{"step": 2, "loss": 0.4}']
    assert "dropping an unreadable line" in caplog.text


@pytest.mark.parametrize("override, message", [
    ("train.adam_beta1=2", r"train\.adam_beta1 must be in \[0, 1\), got 2\.0"),
    ("train.adam_epsilon=-1", r"train\.adam_epsilon must be positive, got -1\.0"),
    ("train.lr_scheduler=bogus", r"train\.lr_scheduler is 'bogus'; choose one of linear, cosine"),
    ("train.seed=-1", r"train\.seed must be a non-negative integer, got -1"),
    ("sample.w_text=nan", r"sample\.w_text must be a finite number, got nan"),
])
def test_training_config_values_are_checked_when_the_config_is_read(tmp_path, override, message):
    """Before any model loads: named key, value and what would fix it (reliability item 12)."""
    from dreamguide.config import ConfigError
    from dreamguide.training import load_train_config

    path = tmp_path / "run.toml"
    path.write_text('[model]\npretrained = "m"\n[data]\ninstance_dir = "photos"\nclass_word = "dog"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_train_config(path, [override])


def test_devices_and_thread_counts_are_named_when_wrong(tiny_sd15_dir, tmp_path, capsys):
    import torch

    from dreamguide.cli import main
    from dreamguide.cpu_threads import use_idle_cores
    from dreamguide.models import parse_device

    with pytest.raises(ValueError, match=r"--device 'tpu9' is not a device torch knows; use cpu, cuda"):
        parse_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            parse_device("cuda")
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--threads must be 0 \(the idle cores\) or a positive number of threads, got -3"):
        use_idle_cores(-3)
    assert main(["sample", "--model", str(tiny_sd15_dir), "--prompt", "a dog", "--modes", "cfg", "--device", "tpu9",
                 "--output", str(tmp_path / "out")]) == 2
    assert "--device 'tpu9' is not a device torch knows" in capsys.readouterr().err


def test_a_missing_model_folder_and_unknown_lora_targets_are_named(tmp_path, monkeypatch):
    from dreamguide.lora_files import add_lora
    from dreamguide.models import load_model
    from dreamguide.testing import tiny_sd15_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'mymodel' is not a folder in .*\./mymodel does not exist"):
        load_model("mymodel")
    with pytest.raises(ValueError, match=r"lora\.target_modules \['nope'\]: some match no layer of this UNet"):
        add_lora(tiny_sd15_pipeline().unet, 4, target_modules=["nope"])


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x80\x04\x95\x10\x00\x00", "is a pickle"),
    (b"PK\x03\x04rest-of-a-zip", "is a pickle"),
    (b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": ", "not a complete safetensors file"),
])
def test_a_lora_or_embeddings_file_that_is_no_safetensors_file_is_named(tmp_path, content, message):
    from dreamguide.lora_files import load_lora
    from dreamguide.models import DiffusionModel  # noqa: F401 (only the file check runs)
    from dreamguide.testing import tiny_sd15_pipeline
    from dreamguide.token_files import load_embeddings

    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline())
    path = tmp_path / "lora.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"LoRA file .*lora\.safetensors.*{message}"):
        load_lora(model, path)
    with pytest.raises(ValueError, match=rf"embeddings file .*{message}"):
        load_embeddings(model, path, "<sks>")


def test_a_full_disk_says_no_space_left_and_where_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    from dreamguide import atomic

    target = tmp_path / "settings.json"
    target.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(atomic.DiskFull, match=rf"no space left on the device holding {tmp_path} \(writing settings"):
        atomic.atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]


def test_other_errors_leave_the_atomic_writers_unchanged_with_their_cause(tmp_path):
    from dreamguide import atomic

    for writer in (lambda: atomic.atomic_open(tmp_path / "a.json", "w"), lambda: atomic.atomic_directory(tmp_path / "d")):
        cause = KeyError("which")
        with pytest.raises(FileNotFoundError) as raised:
            with writer():
                raise FileNotFoundError("missing input") from cause
        assert raised.value.__cause__ is cause
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_weight_file_in_a_model_folder_is_named(tmp_path):
    import shutil

    from dreamguide.models import load_model, save_model
    from dreamguide.testing import tiny_sd15_pipeline
    from dreamguide.models import DiffusionModel

    folder = save_model(DiffusionModel.from_pipeline(tiny_sd15_pipeline()), tmp_path / "model")
    weights = next(iter(sorted((folder / "unet").glob("*.safetensors"))))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model weight file .*unet.*not a complete safetensors file"):
        load_model(folder)
    shutil.rmtree(folder)
