"""Sampler, sample settings and image writing, on tiny random SD 1.x / SDXL / pixel models (offline)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dreamguide import images
from dreamguide.guidance import ParallelRescaling
from dreamguide.sampling import SampleSettings, parse_modes, parse_seeds

# ---------------------------------------------------------------------------------------------
# Settings


def test_parse_seeds_and_modes():
    assert parse_seeds("0,1,2,3") == (0, 1, 2, 3)
    assert parse_seeds("0-3") == (0, 1, 2, 3)
    assert parse_seeds("5, 0-1") == (5, 0, 1)
    assert parse_seeds(7) == (7,)
    assert parse_modes("cfg, pr,consistency,parallel-rescaled") == ("cfg", "parallel-rescaled", "consistency")
    with pytest.raises(ValueError, match=r"bad seed 'x'.*0,1,2,3 or 0-3"):
        parse_seeds("0,x")
    with pytest.raises(ValueError, match=r"seed range '3-1' runs backwards; write it as 1-3"):
        parse_seeds("3-1")
    with pytest.raises(ValueError, match=r"seeds \[1\] are given more than once"):
        parse_seeds("0-2,1")


def test_settings_derive_base_prompt_and_canonical_modes():
    s = SampleSettings(prompt="a <sks> dog in the snow", token="<sks>", class_word="dog", modes="cfg,pr", seeds="0-1")
    assert s.base_prompt == "a dog in the snow"
    assert s.modes == ("cfg", "parallel-rescaled")
    assert s.seeds == (0, 1)
    assert s.needs_personalized
    assert not SampleSettings(prompt="a dog", modes="cfg").needs_personalized
    assert SampleSettings(prompt="a dog", modes="cfg").base_prompt == "a dog"
    given = SampleSettings(prompt="a <sks> dog", token="<sks>", base_prompt="a puppy")
    assert given.base_prompt == "a puppy"
    # replace() re-derives a derived base prompt, and keeps a given one
    assert replace(s, prompt="a <sks> dog on the beach").base_prompt == "a dog on the beach"
    assert replace(s, base_prompt="a puppy").base_prompt == "a puppy"
    assert replace(given, prompt="the <sks> dog").base_prompt == "a puppy"
    assert replace(SampleSettings(prompt="a dog"), prompt="a cat").base_prompt == "a cat"
    data = s.to_dict()
    assert data["pr"] == ParallelRescaling().to_dict() and data["modes"] == ["cfg", "parallel-rescaled"]
    assert data["base_prompt"] == "a dog in the snow" and "derived_base_prompt" not in data
    assert SampleSettings.from_dict(json.loads(json.dumps(data))) == s
    with pytest.raises(ValueError, match=r"unknown sample setting\(s\) \['stpes'\]; valid keys: base_prompt"):
        SampleSettings.from_dict({**data, "stpes": 3})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(modes="cfg,fancy"), r"unknown guidance mode 'fancy'; choose one of cfg, dreambooth, consistency, "
                                  r"parallel-rescaled, orthogonal, recentred, spread-capped, norm-bounded, "
                                  r"magnitude-weighted, adaptive-parallel, late-pr, pr"),
        (dict(prompt="a dog in the snow"), r"the prompt 'a dog in the snow' does not contain the token '<sks>'; "
                                           r"write it into the prompt, e\.g\. 'a photo of <sks> dog'"),
        (dict(class_word=None), r"without a class word; pass class_word \(--class-word"),
        (dict(steps=0), r"steps must be a positive integer, got 0"),
        (dict(steps=-3), r"steps must be a positive integer, got -3"),
        (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
        (dict(height=-8), r"height must be a positive integer"),
        (dict(w_cons=float("nan")), r"w_cons must be a finite number"),
        (dict(scheduler="heun"), r"unknown scheduler 'heun'; choose one of default, euler, euler-a, ddim, dpm\+\+"),
        (dict(prompt="  "), r"the prompt is empty"),
    ],
)
def test_settings_errors_name_value_and_fix(kwargs, message):
    base = dict(prompt="a <sks> dog", token="<sks>", class_word="dog")
    with pytest.raises(ValueError, match=message):
        SampleSettings(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------------
# Images: PNG metadata, grid, atomic writes


def test_png_metadata_roundtrip_and_a1111_parameters(tmp_path):
    meta = {
        "prompt": "a <sks> dog, in the snow",
        "base_prompt": "a dog, in the snow",
        "negative_prompt": "blurry",
        "mode": "parallel-rescaled",
        "w_text": 7.5,
        "w_cons": 3.0,
        "pr": ParallelRescaling().to_dict(),
        "seed": 3,
        "steps": 30,
        "scheduler": "default",
        "scheduler_class": "EulerDiscreteScheduler",
        "model": "stabilityai/stable-diffusion-xl-base-1.0",
        "height": 64,
        "width": 96,
    }
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    path = images.save_png(image, tmp_path / "sub" / "x.png", meta)
    assert images.read_png_metadata(path) == meta
    params = images.read_png_parameters(path).splitlines()
    assert params[0] == "a <sks> dog, in the snow"
    assert params[1] == "Negative prompt: blurry"
    # Sampler: the scheduler's class, not the "default" the settings name it by.
    assert "Steps: 30, Sampler: EulerDiscreteScheduler, CFG scale: 7.5, Seed: 3, Size: 96x64" in params[2]
    assert 'Base prompt: "a dog, in the snow"' in params[2]
    assert "Guidance: parallel-rescaled" in params[2] and "PR normalization: standardize" in params[2]
    with Image.open(path) as back:
        assert back.size == (96, 64) and back.getpixel((5, 5)) == (10, 20, 30)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary file left behind


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with images.atomic_open(tmp_path / "a.json", "w") as handle:
            handle.write("{")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_image_grid_layout():
    red, green = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "green")
    grid = images.image_grid([[red, green], [green, red]], ["cfg", "parallel-rescaled"], ["seed 0", "seed 1"])
    pixels = np.asarray(grid)
    assert grid.width > 2 * 16 and grid.height > 2 * 16
    # Each image appears exactly once per cell: 4 blocks of 16x16 pixels of pure colour.
    assert (pixels == [255, 0, 0]).all(axis=-1).sum() == 2 * 256
    assert (pixels == [0, 128, 0]).all(axis=-1).sum() == 2 * 256
    assert (pixels < 128).all(axis=-1).any()  # labels drawn in black
    with pytest.raises(ValueError, match="every grid row needs 2 images"):
        images.image_grid([[red, green], [red]])


# ---------------------------------------------------------------------------------------------
# The sampler on tiny random models (in memory; 16 px images, 2-3 steps)

TOKEN_KW = dict(prompt="a sks dog in the snow", token="sks", class_word="dog")


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module")
def sd15():
    """Tiny SD 1.x with a random (non-identity) LoRA "subject" and an identity LoRA "identity"."""
    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sd15_pipeline

    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline(seed=0))
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)
    add_lora(model.unet, rank=4, adapter_name="identity")  # B = 0: exactly the base model
    return model


@pytest.fixture(scope="module")
def sdxl():
    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sdxl_pipeline

    model = DiffusionModel.from_pipeline(tiny_sdxl_pipeline(seed=0))
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)
    return model


def test_same_seed_same_image_whatever_the_batch(sd15):
    from dreamguide.sampling import Sampler

    sampler = Sampler(sd15, adapter_name="subject")
    settings = SampleSettings(**TOKEN_KW, modes="pr", seeds="0-2", steps=2, height=16, width=16, batch_size=3)
    batched = sampler.sample(settings, progress=False)
    again = sampler.sample(settings, progress=False)
    single = sampler.sample(replace(settings, batch_size=1), progress=False)
    assert [r.seed for r in batched] == [0, 1, 2] and all(r.image.size == (16, 16) for r in batched)
    assert all(max_diff(a, b) == 0 for a, b in zip(batched, again))  # deterministic
    assert all(max_diff(a, b) <= 1 for a, b in zip(batched, single))  # batch size does not change an image
    assert max_diff(batched[0], batched[1]) > 50  # different seeds, different images


def test_stochastic_scheduler_is_reproducible_per_image(sd15):
    from dreamguide.sampling import Sampler

    sampler = Sampler(sd15, adapter_name="subject")
    settings = SampleSettings(
        **TOKEN_KW, modes="consistency", seeds="3-4", steps=2, height=16, width=16, scheduler="euler-a", batch_size=2
    )
    batched = sampler.sample(settings, progress=False)
    single = sampler.sample(replace(settings, batch_size=1), progress=False)
    assert all(max_diff(a, b) <= 1 for a, b in zip(batched, single))
    assert batched[0].metadata["scheduler_class"] == "EulerAncestralDiscreteScheduler"


def test_consistency_with_zero_weight_is_cfg_and_modes_share_noise(sd15):
    from dreamguide.sampling import Sampler

    sampler = Sampler(sd15, adapter_name="subject")
    common = dict(**TOKEN_KW, seeds="0-1", steps=3, height=16, width=16, batch_size=2)
    zero = SampleSettings(**common, modes="cfg,consistency,pr", w_cons=0.0)
    cfg, cons0, pr0 = sampler.sample(zero, progress=False)[::2]
    assert max_diff(cfg, cons0) <= 1 and max_diff(cfg, pr0) <= 1
    cfg, cons = sampler.sample(SampleSettings(**common, modes="cfg,consistency"), progress=False)[::2]
    assert max_diff(cfg, cons) > 10  # the adapter row really goes through the LoRA
    # An identity adapter and no token: plain dreambooth sampling is exactly cfg from the same noise.
    identity = Sampler(sd15, adapter_name="identity")
    cfg, dreambooth = identity.sample(
        SampleSettings(prompt="a dog", modes="cfg,dreambooth", seeds=0, steps=3, height=16, width=16), progress=False
    )
    assert max_diff(cfg, dreambooth) == 0


def test_personalized_unet_rows(sd15):
    """dreambooth with a separate personalized UNet = cfg of a model whose UNet is that UNet."""
    import copy

    from dreamguide.sampling import Sampler
    from dreamguide.testing import tiny_sd15_pipeline

    other_unet = tiny_sd15_pipeline(seed=1).unet
    settings = dict(prompt="a dog", seeds=0, steps=2, height=16, width=16)
    dreambooth = Sampler(sd15, personalized_unet=other_unet).sample(
        SampleSettings(**settings, modes="dreambooth"), progress=False
    )[0]
    swapped = copy.copy(sd15)
    swapped.unet = other_unet
    cfg = Sampler(swapped).sample(SampleSettings(**settings, modes="cfg"), progress=False)[0]
    assert max_diff(dreambooth, cfg) == 0


def test_sdxl_trace_and_metadata(sdxl):
    from dreamguide.guidance import TRACE_HISTOGRAM_BINS, TRACE_QUANTILES
    from dreamguide.sampling import Sampler

    sampler = Sampler(sdxl, adapter_name="subject")
    settings = SampleSettings(**TOKEN_KW, modes="cfg,pr", seeds="0-1", steps=2, height=16, width=24, trace=True,
                              batch_size=2, negative_prompt="blurry")
    results = sampler.sample(settings, progress=False)
    assert [(r.mode, r.seed) for r in results] == [("cfg", 0), ("cfg", 1), ("parallel-rescaled", 0),
                                                   ("parallel-rescaled", 1)]
    assert results[0].trace == []  # cfg has no consistency term
    trace = results[2].trace
    timesteps = make_scheduler_timesteps(sdxl, 2)
    assert [s["step"] for s in trace] == [0, 1] and [s["timestep"] for s in trace] == timesteps
    for step in trace:
        counts = step["histogram"]["counts"]
        assert len(counts) == TRACE_HISTOGRAM_BINS and len(step["histogram"]["edges"]) == TRACE_HISTOGRAM_BINS + 1
        assert sum(counts) == 8 * 12  # one k per latent location (16x24 px, VAE factor 2)
        quantiles = [step["quantiles"][f"{q:g}"] for q in TRACE_QUANTILES]
        assert quantiles == sorted(quantiles) and 0 <= step["fraction_negative"] <= 1 and step["std"] > 0
    assert results[2].trace != results[3].trace
    meta = results[3].metadata
    assert meta["mode"] == "parallel-rescaled" and meta["seed"] == 1 and meta["model_kind"] == "sdxl"
    assert (meta["height"], meta["width"], meta["steps"]) == (16, 24, 2)
    assert meta["base_prompt"] == "a dog in the snow" and meta["negative_prompt"] == "blurry"
    assert results[3].image.size == (24, 16)


def make_scheduler_timesteps(model, steps):
    from dreamguide.denoise import make_scheduler

    scheduler = make_scheduler(model.scheduler)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def test_pixel_model():
    from dreamguide.sampling import Sampler
    from dreamguide.testing import tiny_pixel_model

    sampler = Sampler(tiny_pixel_model(seed=0))
    assert sampler.native_size == (16, 16) and sampler.size_multiple == 2
    settings = SampleSettings(prompt="a red cube", modes="cfg", seeds="0-1", steps=2, batch_size=2)
    first, second = sampler.sample(settings, progress=False)
    assert first.image.size == (16, 16) and first.image.mode == "RGB"
    assert max_diff(first, sampler.sample(replace(settings, seeds=(0,)), progress=False)[0]) <= 1
    assert max_diff(first, second) > 0
    with pytest.raises(ValueError, match=r"width 17 is not divisible by 2 \(the UNet's downsampling factor"):
        sampler.sample(replace(settings, width=17), progress=False)


def test_clipping_ddim_steps_with_the_noise_of_the_clipped_x0():
    import torch
    from diffusers import DDIMScheduler

    from dreamguide.denoise import clipped_step_kwargs
    from dreamguide.sampling import Sampler
    from dreamguide.testing import tiny_pixel_model
    from dreamguide.toyworld.model import encode_text

    model = tiny_pixel_model(seed=0)
    model.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    assert clipped_step_kwargs(model.scheduler) == {"use_clipped_model_output": True}
    assert clipped_step_kwargs(DDIMScheduler(clip_sample=False)) == {}
    sampler = Sampler(model, fast=False)
    settings = SampleSettings(prompt="a red cube", modes="cfg", seeds=(3,), steps=3, w_text=9.0)

    def manual(**step_kwargs):  # the same loop written out, with or without the clipped noise
        scheduler = DDIMScheduler.from_config(model.scheduler.config)
        scheduler.set_timesteps(3)
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        context = encode_text(model.tokenizers[0], model.text_encoders[0], ["", "a red cube"])
        with torch.no_grad():
            for t in scheduler.timesteps:
                uncond, cond = model.unet(torch.cat([x, x]), t, context).sample.chunk(2)
                x = scheduler.step(uncond + 9.0 * (cond - uncond), t, x, **step_kwargs).prev_sample
        return np.asarray(Image.fromarray(((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()))

    clipped = sampler.sample(settings, progress=False)[0]
    plain = sampler.sample(replace(settings, clipped_model_output=False), progress=False)[0]
    assert np.abs(pixels(clipped).astype(int) - manual(use_clipped_model_output=True)).max() <= 1
    assert np.abs(pixels(plain).astype(int) - manual()).max() <= 1
    assert max_diff(clipped, plain) > 8  # the random model's guided noise is far off its clipped x0
    assert clipped.metadata["clipped_model_output"] is True and plain.metadata["clipped_model_output"] is False


def test_errors_before_sampling(sd15):
    from dreamguide.sampling import Sampler

    plain = Sampler(sd15, adapter_name=None)  # no adapter routed: the base model alone
    with pytest.raises(ValueError, match=r"mode\(s\) consistency, dreambooth need a personalized model.*--lora"):
        plain.sample(SampleSettings(**TOKEN_KW, modes="cfg,consistency,dreambooth"), progress=False)
    with pytest.raises(ValueError, match=r"height 15 is not divisible by 2 \(the VAE downsampling factor.*14 or 16"):
        Sampler(sd15, adapter_name="subject").sample(SampleSettings(**TOKEN_KW, height=15), progress=False)
    with pytest.raises(ValueError, match=r"no adapter named 'nope' \(adapters: subject, identity\)"):
        Sampler(sd15, adapter_name="nope")


@pytest.mark.parametrize(
    "trace, check_every, steps, calls_made", [(False, 10, 4, 4), (False, 2, 6, 4), (True, 10, 4, 3)]
)
def test_nonfinite_prediction_names_the_step(sd15, monkeypatch, trace, check_every, steps, calls_made):
    from dreamguide import denoise, sampling

    monkeypatch.setattr(denoise, "NONFINITE_CHECK_EVERY", check_every)
    calls = []

    def poison_third_call(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            return (output[0] * float("nan"),) if isinstance(output, tuple) else output * float("nan")
        return output

    handle = sd15.unet.register_forward_hook(poison_third_call)
    try:
        settings = SampleSettings(**TOKEN_KW, modes="pr", seeds="5", steps=steps, height=16, width=16, trace=trace)
        with pytest.raises(sampling.NonFiniteError, match=rf"non-finite \(NaN or inf\) at step 3/{steps} "
                                                          r"\(timestep \d+\) in mode 'parallel-rescaled' for seed 5; "
                                                          r"lower the guidance weights, or check the adapter"):
            sampling.Sampler(sd15, adapter_name="subject").sample(settings, progress=False)
    finally:
        handle.remove()
    # Traced runs stop at once; untraced ones read the device-side flag every `check_every` steps and at the end.
    assert len(calls) == calls_made


def test_float16_vae_decodes_in_float32(sd15):
    import copy

    import torch

    from dreamguide.sampling import Sampler

    half = copy.copy(sd15)
    half.vae = copy.deepcopy(sd15.vae).half()
    half.kind = "sdxl"  # the SDXL VAE overflows in float16
    decoder = Sampler(half, adapter_name=None)._decoder()
    assert decoder.dtype == torch.float32 and half.vae.dtype == torch.float16


def test_learned_variance_is_kept_only_for_schedulers_that_use_it():
    import torch
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    from dreamguide.sampling import _split_variance

    output = torch.arange(2 * 6 * 2 * 2, dtype=torch.float32).view(2, 6, 2, 2)
    prediction, variance = _split_variance(output, 3, DDPMScheduler(variance_type="learned_range"))
    assert torch.equal(prediction, output[:, :3]) and torch.equal(variance, output[:, 3:])
    prediction, variance = _split_variance(output, 3, EulerDiscreteScheduler())
    assert torch.equal(prediction, output[:, :3]) and variance is None
    assert _split_variance(output, 6, EulerDiscreteScheduler())[0] is output


# ---------------------------------------------------------------------------------------------
# Items: many prompts, modes, weights and seeds in one call


def test_sample_item_is_validated_and_takes_the_settings_defaults():
    from dreamguide.sampling import SampleItem

    item = SampleItem(prompt="a sks dog", mode="pr", seed=3)
    assert item.mode == "parallel-rescaled" and item.base_prompt == "a sks dog"
    assert (item.w_text, item.w_cons, item.pr) == (SampleSettings.w_text, SampleSettings.w_cons, ParallelRescaling())
    assert SampleItem(prompt="a dog").mode == SampleSettings.modes[0]
    for kwargs, message in [
        (dict(prompt=" "), r"the prompt is empty"),
        (dict(prompt="a dog", mode="fancy"), r"unknown guidance mode 'fancy'"),
        (dict(prompt="a dog", seed=-1), r"seed -1 is out of range"),
        (dict(prompt="a dog", seed="1"), r"seed must be an integer, got '1'"),
        (dict(prompt="a dog", w_cons=float("inf")), r"w_cons must be a finite number"),
        (dict(prompt="a dog", pr={"rescale": 2}), r"pr must be a guidance.ParallelRescaling"),
    ]:
        with pytest.raises(ValueError, match=message):
            SampleItem(**kwargs)
    settings = SampleSettings(**TOKEN_KW, modes="cfg,pr", seeds="4,5", w_cons=2.0)
    assert [(i.mode, i.seed, i.base_prompt, i.w_cons) for i in settings.items()] == [
        ("cfg", 4, "a dog in the snow", 2.0), ("cfg", 5, "a dog in the snow", 2.0),
        ("parallel-rescaled", 4, "a dog in the snow", 2.0), ("parallel-rescaled", 5, "a dog in the snow", 2.0)]


def _count_unet_rows(unet):
    rows = []
    handle = unet.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    return rows, handle


def test_mixed_batch_equals_each_image_alone(sd15, monkeypatch):
    """Prompts, modes, weights and seeds in one batch: each image as when sampled alone, in item order."""
    from dreamguide.sampling import SampleItem, Sampler

    sampler = Sampler(sd15, adapter_name="subject")
    items = [
        SampleItem(prompt="a sks dog in the snow", base_prompt="a dog in the snow", mode="pr", seed=0),
        SampleItem(prompt="a red cube", mode="cfg", seed=1, w_text=5.0),
        SampleItem(prompt="a sks dog on a beach", base_prompt="a dog on a beach", mode="dreambooth", seed=2,
                   negative_prompt="blurry"),
        SampleItem(prompt="a sks dog in the snow", base_prompt="a dog in the snow", mode="consistency", seed=3,
                   w_cons=1.5),
        SampleItem(prompt="a sks dog in the snow", base_prompt="a dog in the snow", mode="pr", seed=4, w_cons=1.5),
    ]
    encoded = []
    encode = sampler._encode
    monkeypatch.setattr(sampler, "_encode", lambda texts, h, w: encoded.append(list(texts)) or encode(texts, h, w))
    rows, handle = _count_unet_rows(sd15.unet)
    try:
        together = sampler.sample_items(items, steps=2, batch_size=len(items), height=16, width=16, progress=False)
    finally:
        handle.remove()
    # One forward per step with the rows each image needs (3 + 2 + 2 + 3 + 3); each prompt encoded once.
    assert rows == [13, 13]
    assert encoded == [["", "a dog in the snow", "a sks dog in the snow", "a red cube", "blurry", "a dog on a beach",
                        "a sks dog on a beach"]]
    assert [(r.mode, r.seed, r.prompt) for r in together] == [(i.mode, i.seed, i.prompt) for i in items]
    assert together[1].metadata["w_text"] == 5.0 and together[3].metadata["w_cons"] == 1.5
    assert together[2].metadata["negative_prompt"] == "blurry" and together[2].metadata["steps"] == 2
    for item, result in zip(items, together):
        alone = sampler.sample_items([item], steps=2, height=16, width=16, progress=False)[0]
        assert max_diff(result, alone) <= 1, item
        assert result.metadata == alone.metadata


def test_items_pack_into_batches_of_batch_size_images(sd15):
    from dreamguide.sampling import Sampler

    sampler = Sampler(sd15, adapter_name="subject")
    settings = SampleSettings(**TOKEN_KW, modes="cfg,pr", seeds="0-2", steps=2, height=16, width=16)
    assert settings.batch_size == SampleSettings.batch_size > 1  # seeds are not sampled one by one by default
    rows, handle = _count_unet_rows(sd15.unet)
    try:
        packed = sampler.sample(settings, progress=False)
        single = sampler.sample(replace(settings, batch_size=1), progress=False)
    finally:
        handle.remove()
    packed_rows = rows[: 2 * 2]  # 6 images in batches of 4 and 2: (cfg x3 + pr x1), (pr x2); 2 steps each
    assert packed_rows == [3 * 2 + 3, 3 * 2 + 3, 2 * 3, 2 * 3]
    assert rows[4:] == [2] * 2 * 3 + [3] * 2 * 3
    assert [(r.mode, r.seed) for r in packed] == [(r.mode, r.seed) for r in single]
    assert all(max_diff(a, b) <= 1 for a, b in zip(packed, single))


def test_mixed_batch_traces_only_consistency_modes(sdxl):
    from dreamguide.sampling import SampleItem, Sampler

    sampler = Sampler(sdxl)  # its one adapter, found without naming it
    assert sampler.adapter_name == "subject"
    items = [SampleItem(**{**dict(prompt="a sks dog", base_prompt="a dog"), "mode": mode, "seed": 0})
             for mode in ("cfg", "orthogonal", "dreambooth")]
    traced = sampler.sample_items(items, steps=2, trace=True, height=16, width=16, progress=False)
    assert traced[0].trace == [] and traced[2].trace == [] and len(traced[1].trace) == 2
    alone = sampler.sample_items(items[1:2], steps=2, trace=True, height=16, width=16, progress=False)[0]
    for a, b in zip(traced[1].trace, alone.trace):
        assert a["step"] == b["step"] and a["histogram"]["counts"] == b["histogram"]["counts"]
        assert a["mean"] == pytest.approx(b["mean"], abs=1e-5)


def test_adapter_is_found_without_its_name(sd15):
    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.sampling import Sampler
    from dreamguide.testing import tiny_sd15_pipeline

    with pytest.raises(ValueError, match=r"several LoRA adapters \(subject, identity\); pass adapter_name="):
        Sampler(sd15)
    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline(seed=0))
    assert Sampler(model).adapter_name is None and not Sampler(model).is_personalized()
    add_lora(model.unet, rank=2, adapter_name="whatever")
    assert Sampler(model).adapter_name == "whatever"
    assert Sampler(model, personalized_unet=sd15.unet).adapter_name is None


def test_sample_items_errors(sd15):
    from dreamguide.sampling import SampleItem, Sampler

    sampler = Sampler(sd15, adapter_name="subject")
    with pytest.raises(TypeError, match="SampleItem objects, got SampleSettings"):
        sampler.sample_items([SampleSettings(prompt="a dog")])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        sampler.sample_items([SampleItem(prompt="a dog")], batch_size=0)
    with pytest.raises(ValueError, match=r"mode\(s\) dreambooth need a personalized model"):
        Sampler(sd15, adapter_name=None).sample_items([SampleItem(prompt="a dog", mode="dreambooth")])
    assert sampler.sample_items([]) == []


def test_learned_variance_comes_from_each_image_last_row():
    """With a scheduler that uses a learned variance, each image keeps the variance of its last prediction."""
    import torch
    from diffusers import DDPMScheduler

    from dreamguide.guidance import get_mode
    from dreamguide.sampling import SampleItem, _combine, _rules
    from dreamguide.unet_rows import RowLayout

    items = [SampleItem(prompt="a", mode="cfg"), SampleItem(prompt="a", mode="pr", seed=1)]
    layout = RowLayout.of([get_mode(i.mode).needs for i in items])
    assert layout.rows == [("uncond", 0), ("uncond", 1), ("base", 0), ("base", 1), ("personalized", 1)]
    output = torch.randn(len(layout), 6, 4, 4)
    guided = _combine(layout, _rules(items), 3, DDPMScheduler(variance_type="learned_range"), output, 0, 1)
    assert guided.shape == (2, 6, 4, 4)
    assert torch.equal(guided[0, 3:], output[2, 3:]) and torch.equal(guided[1, 3:], output[4, 3:])
    cfg = output[0, :3] + SampleSettings.w_text * (output[2, :3] - output[0, :3])
    torch.testing.assert_close(guided[0, :3], cfg)
    assert _combine(layout, _rules(items), 3, DDPMScheduler(), output, 0, 1).shape == (2, 3, 4, 4)
