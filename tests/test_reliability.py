"""Bad inputs named, never silently used: long prompts, half LoRA pairs, non-integer seeds,
odd image files, stray captions, file modes (tiny models, offline)."""

from __future__ import annotations

import warnings

import pytest
import torch

TOKEN, CLASS_WORD = "<sks>", "dog"
LONG = " ".join(["photo"] * 80)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    with pytest.raises(ValueError, match=rf"PR {name} must be a finite"):
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
