"""UNet rows: one batched UNet forward with per-row adapters equals separate forwards (dreamguide.unet_rows)."""

from __future__ import annotations

import pytest
import torch

from dreamguide.lora_files import add_lora
from dreamguide.models import TextConditioning
from dreamguide.unet_rows import BASE_ROUTE, lora_layers, predict_rows, routed_adapters
from dreamguide.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

TOLERANCE = 1e-5


def _randomize_lora(unet, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module", params=["sdxl", "sd"])
def unet_and_conditioning(request):
    """A tiny UNet with two LoRA adapters (non-zero B), and random conditioning for 4 rows."""
    pipe = tiny_sdxl_pipeline(seed=0) if request.param == "sdxl" else tiny_sd15_pipeline(seed=0)
    unet = pipe.unet
    add_lora(unet, rank=4, alpha=8, adapter_name="subject")
    add_lora(unet, rank=2, alpha=2, adapter_name="other")
    _randomize_lora(unet, seed=1)
    generator = torch.Generator().manual_seed(2)
    width = unet.config.cross_attention_dim
    embeds = torch.randn(4, 8, width, generator=generator)
    if request.param == "sdxl":
        pooled = torch.randn(4, pipe.text_encoder_2.config.projection_dim, generator=generator)
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).expand(4, 6)
        conditioning = TextConditioning(embeds, pooled, time_ids)
    else:
        conditioning = TextConditioning(embeds)
    sample = torch.randn(4, 4, 16, 16, generator=generator)
    return unet, conditioning, sample


def _reference(unet, sample, timestep, conditioning) -> dict:
    """Separate forwards of the whole batch: adapters off, then each adapter alone."""
    kwargs = conditioning.unet_kwargs()
    unet.disable_adapters()
    outputs = {BASE_ROUTE: unet(sample, timestep, **kwargs).sample}
    unet.enable_adapters()
    for name in ("subject", "other"):
        unet.set_adapters(name)
        outputs[name] = unet(sample, timestep, **kwargs).sample
    unet.set_adapters(["subject", "other"])
    return outputs


@torch.no_grad()
def test_routed_forward_equals_separate_forwards(unet_and_conditioning):
    unet, conditioning, sample = unet_and_conditioning
    timestep = torch.tensor(500)
    reference = _reference(unet, sample, timestep, conditioning)
    # The adapters change the prediction, so the equalities below are not trivially base == base.
    assert (reference["subject"] - reference[BASE_ROUTE]).abs().max() > 1e-3
    assert (reference["other"] - reference[BASE_ROUTE]).abs().max() > 1e-3
    layouts = ([BASE_ROUTE, BASE_ROUTE, "subject", "subject"], ["subject", BASE_ROUTE, "other", BASE_ROUTE],
               [BASE_ROUTE] * 4)
    for names in layouts:
        routed = predict_rows(unet, sample, timestep, conditioning, routes=names)
        expected = torch.cat([reference[name][i : i + 1] for i, name in enumerate(names)])
        torch.testing.assert_close(routed, expected, rtol=0, atol=TOLERANCE)
    assert all(not layer._forward_pre_hooks for layer in lora_layers(unet))


@torch.no_grad()
def test_hooks_are_removed_when_the_block_raises(unet_and_conditioning):
    unet, conditioning, sample = unet_and_conditioning
    with pytest.raises(RuntimeError, match="boom"):
        with routed_adapters(unet, [BASE_ROUTE, "subject"]):
            raise RuntimeError("boom")
    assert all(not layer._forward_pre_hooks for layer in lora_layers(unet))
    # A forward that fails inside the UNet (3 names for 4 rows) also leaves no hooks behind.
    with pytest.raises(ValueError):
        with routed_adapters(unet, [BASE_ROUTE, BASE_ROUTE, "subject"]):
            unet(sample, 10, **conditioning.unet_kwargs())
    assert all(not layer._forward_pre_hooks for layer in lora_layers(unet))
    unet(sample[:2], 10, **conditioning.select([0, 1]).unet_kwargs())  # plain forwards still work


def test_unknown_merged_and_dora_adapters_are_refused():
    unet = tiny_sd15_pipeline(seed=0).unet
    add_lora(unet, rank=2, adapter_name="subject")
    with pytest.raises(ValueError, match="'missing'.*not loaded"):
        with routed_adapters(unet, [BASE_ROUTE, "missing"]):
            pass
    for layer in lora_layers(unet):
        layer.merge(adapter_names=["subject"])
    with pytest.raises(ValueError, match="merged.*unfuse"):
        with routed_adapters(unet, [BASE_ROUTE, "subject"]):
            pass
    for layer in lora_layers(unet):
        layer.unmerge()
    add_lora(unet, rank=2, adapter_name="dora", target_modules=("to_q",), dora=True)
    with pytest.raises(ValueError, match="DoRA.*non-DoRA"):
        with routed_adapters(unet, [BASE_ROUTE, "dora"]):
            pass
    with routed_adapters(unet, [BASE_ROUTE, "subject"]):  # a plain LoRA beside the DoRA one still routes
        pass


@torch.no_grad()
def test_separate_personalized_unet_rows_come_back_in_order(unet_and_conditioning):
    unet, conditioning, sample = unet_and_conditioning
    builder = tiny_sdxl_pipeline if unet.config.addition_embed_type else tiny_sd15_pipeline
    personalized = builder(seed=5).unet
    names = ["personalized", BASE_ROUTE, "personalized", BASE_ROUTE]
    timestep = torch.tensor([100, 200, 300, 400])
    # The base UNet still carries LoRA adapters (enabled): its rows must not use them.
    routed = predict_rows(unet, sample, timestep, conditioning, names, personalized_unet=personalized)
    unet.disable_adapters()
    try:
        base = unet(sample, timestep, **conditioning.unet_kwargs()).sample
    finally:
        unet.enable_adapters()
    other = personalized(sample, timestep, **conditioning.unet_kwargs()).sample
    expected = torch.cat([other[0:1], base[1:2], other[2:3], base[3:4]])
    torch.testing.assert_close(routed, expected, rtol=0, atol=TOLERANCE)
    only_base = predict_rows(unet, sample, timestep, conditioning, [BASE_ROUTE] * 4, personalized_unet=personalized)
    torch.testing.assert_close(only_base, base, rtol=0, atol=TOLERANCE)
    only_personalized = predict_rows(unet, sample, timestep, conditioning, ["p"] * 4, personalized_unet=personalized)
    torch.testing.assert_close(only_personalized, other, rtol=0, atol=TOLERANCE)


def test_row_layout_is_need_major_with_the_personalized_rows_last():
    from dreamguide.unet_rows import RowLayout

    layout = RowLayout.of([("uncond", "base"), ("personalized_uncond", "personalized"),
                           ("uncond", "base", "personalized")])
    assert layout.rows == [("uncond", 0), ("uncond", 2), ("base", 0), ("base", 2), ("personalized_uncond", 1),
                           ("personalized", 1), ("personalized", 2)]
    assert len(layout) == 7 and layout.routes(None) is None
    assert layout.routes("subject") == [BASE_ROUTE] * 4 + ["subject"] * 3
    x = torch.arange(3.0).view(3, 1, 1, 1)
    rows = layout.gather(x)
    assert rows.flatten().tolist() == [0, 2, 0, 2, 1, 1, 2]
    assert layout.take(rows, "base", [0, 2]).flatten().tolist() == [0, 2]
    taken = layout.take(rows, "personalized", [1, 2])
    assert taken.flatten().tolist() == [1, 2] and taken.data_ptr() == rows[5].data_ptr()  # a view, no copy
    with pytest.raises(ValueError, match="no image of this batch reads the 'base' prediction"):
        RowLayout.of([("uncond",)]).take(x, "base", [0])
    with pytest.raises(ValueError, match=r"unknown prediction\(s\) \['nope'\]"):
        RowLayout.of([("uncond", "nope")])
    same = RowLayout.of([("uncond", "base")] * 3)
    assert torch.equal(same.gather(x), x.repeat(2, 1, 1, 1))


@torch.no_grad()
def test_row_function_takes_the_fast_path_where_it_is_exact(unet_and_conditioning):
    from dreamguide.unet_rows import FastUNetCall, row_function

    unet, conditioning, sample = unet_and_conditioning
    timestep = torch.tensor(500)
    routes = [BASE_ROUTE, BASE_ROUTE, "subject", "subject"]
    fast = row_function(unet, routes)
    assert isinstance(fast, FastUNetCall)
    peft = row_function(unet, routes, fast=False)
    assert not isinstance(peft, FastUNetCall)
    reference = predict_rows(unet, sample, timestep, conditioning, routes)
    torch.testing.assert_close(peft(sample, timestep, conditioning), reference, rtol=0, atol=0)
    torch.testing.assert_close(fast(sample, timestep, conditioning), reference, rtol=0, atol=TOLERANCE)
    separate = row_function(unet, ["personalized", BASE_ROUTE, "personalized", BASE_ROUTE], personalized_unet=unet)
    assert not isinstance(separate, FastUNetCall)
