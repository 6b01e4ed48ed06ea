"""The fast path of the UNet rows (sliced routing, CUDA-graph replay) computes what PEFT's per-row routing computes."""

from __future__ import annotations

import pytest
import torch

from dreamguide.unet_rows import (
    BASE_ROUTE,
    fast_routing,
    fast_routing_unsupported,
    install_fast_routing,
    plan_rows,
    routed_adapters,
    uninstall_fast_routing,
)

ROWS_PER_PROMPT = 2


def _tiny_unet(seed: int = 0, **lora):
    from dreamguide.lora_files import add_lora
    from dreamguide.testing import tiny_sdxl_pipeline

    unet = tiny_sdxl_pipeline(seed).unet
    add_lora(unet, rank=4, adapter_name="subject", init=False, **lora)
    add_lora(unet, rank=2, alpha=3.0, adapter_name="other", init=False)
    unet.set_adapter("subject")
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet()


def _inputs(rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 4, 16, 16, generator=g),
        torch.tensor(400.0),
        {
            "encoder_hidden_states": torch.randn(rows, 77, 64, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(rows, 32, generator=g),
                "time_ids": torch.randn(rows, 6, generator=g),
            },
        },
    )


def _forward(unet, inputs, context=None):
    sample, t, kwargs = inputs
    with torch.no_grad(), (context if context is not None else torch.enable_grad()):
        return unet(sample, t, return_dict=False, **kwargs)[0]


def _close(a, b):
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), float((a - b).abs().max())


@pytest.mark.parametrize(
    "names",
    [
        [BASE_ROUTE] * 4 + ["subject"] * 2,  # the sampler's layout: one block of adapter rows (static slice)
        ["subject", BASE_ROUTE, "subject", BASE_ROUTE],  # scattered rows: per-row 0/1 scale
        [BASE_ROUTE, "other", "subject", "subject", BASE_ROUTE],  # two adapters with different ranks and scaling
        ["subject"] * 3,  # dreambooth: every row personalized
    ],
)
def test_fast_routing_matches_peft_routing(unet, names):
    inputs = _inputs(len(names))
    reference = _forward(unet, inputs, routed_adapters(unet, names))
    fast = _forward(unet, inputs, fast_routing(unet, names))
    _close(fast, reference)
    base_rows = [i for i, name in enumerate(names) if name == BASE_ROUTE]
    # Rows without an adapter never see a LoRA term: bit for bit the base layers' output.
    assert torch.equal(fast[base_rows], reference[base_rows])


def test_fast_routing_matches_separate_forwards(unet):
    names = [BASE_ROUTE] * ROWS_PER_PROMPT * 2 + ["subject"] * ROWS_PER_PROMPT
    inputs = _inputs(len(names))
    fast = _forward(unet, inputs, fast_routing(unet, names))
    sample, t, kwargs = inputs
    unet.disable_adapters()
    try:
        base_only = _forward(unet, inputs)
    finally:
        unet.enable_adapters()
    personalized = _forward(unet, inputs)  # plain PEFT forward, "subject" active on every row
    _close(fast[:4], base_only[:4])
    _close(fast[4:], personalized[4:])
    # and the adapter matters, so the comparison above can fail
    assert (fast[4:] - base_only[4:]).abs().max() > 1e-2


def test_all_base_rows_skip_the_adapters_exactly(unet):
    names = [BASE_ROUTE] * 3
    inputs = _inputs(3)
    fast = _forward(unet, inputs, fast_routing(unet, names))
    unet.disable_adapters()
    try:
        assert torch.equal(fast, _forward(unet, inputs))
    finally:
        unet.enable_adapters()


def test_outside_the_block_layers_behave_as_peft_and_uninstall_restores():
    unet = _tiny_unet(seed=3)
    inputs = _inputs(2)
    before = _forward(unet, inputs)
    install_fast_routing(unet)
    with fast_routing(unet, [BASE_ROUTE, "subject"]):
        pass
    assert torch.equal(_forward(unet, inputs), before)
    uninstall_fast_routing(unet)
    assert not any("forward" in vars(m) for m in unet.modules())
    assert torch.equal(_forward(unet, inputs), before)


def test_plan_is_cached_per_layout(unet):
    state = install_fast_routing(unet)
    with fast_routing(unet, [BASE_ROUTE, "subject"]):
        first = state.plan
    with fast_routing(unet, [BASE_ROUTE, "subject"]):
        assert state.plan is first  # stable object: no new device tensors, stable compile guards
    assert state.plan is None


def test_plan_rows_blocks_and_scales():
    plan = plan_rows([BASE_ROUTE, BASE_ROUTE, "a", "a", "b", BASE_ROUTE, "b"])
    assert plan.rows == 7
    a, b = plan.routes
    assert (a.adapter, a.start, a.stop, a.row_scale) == ("a", 2, 4, None)
    assert b.adapter == "b" and (b.start, b.stop) == (0, 7)
    assert b.row_scale.tolist() == [0, 0, 0, 0, 1, 0, 1]
    assert plan_rows([BASE_ROUTE, BASE_ROUTE]).routes == ()


def test_wrong_row_count_is_an_error(unet):
    inputs = _inputs(3)
    with pytest.raises(ValueError, match="2 adapter names but a LoRA layer got a batch of 3"):
        _forward(unet, inputs, fast_routing(unet, [BASE_ROUTE, "subject"]))


def test_unknown_adapter_is_an_error(unet):
    with pytest.raises(ValueError, match="not loaded"):
        with fast_routing(unet, [BASE_ROUTE, "nobody"]):
            pass


def test_unsupported_adapters_are_reported():
    from peft import LoraConfig

    from dreamguide.testing import tiny_sdxl_pipeline

    unet = tiny_sdxl_pipeline(5).unet
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True), adapter_name="dora")
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_k"], lora_dropout=0.1), adapter_name="dropout")
    unet.eval()
    assert "DoRA" in fast_routing_unsupported(unet, [BASE_ROUTE, "dora"])
    assert fast_routing_unsupported(unet, [BASE_ROUTE, "dropout"]) is None  # eval: dropout is the identity
    unet.train()
    assert "dropout" in fast_routing_unsupported(unet, [BASE_ROUTE, "dropout"])
    assert fast_routing_unsupported(unet, [BASE_ROUTE, BASE_ROUTE]) is None
    with pytest.raises(ValueError, match="active dropout.*routed_adapters"):
        with fast_routing(unet, [BASE_ROUTE, "dropout"]):
            pass


def test_fast_routing_traces_into_one_graph(unet):
    """No graph break and the same numbers under torch.compile (one transformer block, CPU)."""
    torch._dynamo.reset()
    block = unet.down_blocks[1].attentions[0]
    names = [BASE_ROUTE, BASE_ROUTE, "subject"]
    g = torch.Generator().manual_seed(2)
    hidden, context = torch.randn(3, 64, 8, 8, generator=g), torch.randn(3, 77, 64, generator=g)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), fast_routing(unet, names):
        eager = block(hidden, encoder_hidden_states=context, return_dict=False)[0]
        traced = compiled(hidden, encoder_hidden_states=context, return_dict=False)[0]
    with torch.no_grad(), routed_adapters(unet, names):
        reference = block(hidden, encoder_hidden_states=context, return_dict=False)[0]
    _close(traced, eager)
    _close(eager, reference)
    torch._dynamo.reset()


@pytest.mark.parametrize("modes", ["pr", "dreambooth,cfg"])
def test_sampler_fast_path_gives_the_same_images(modes):
    """The sampler's default fast path and PEFT routing (``fast=False``) sample the same images."""
    import numpy as np

    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.sampling import SampleSettings, Sampler
    from dreamguide.testing import tiny_sdxl_pipeline

    model = DiffusionModel.from_pipeline(tiny_sdxl_pipeline(seed=0))
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)
    settings = SampleSettings(
        prompt="a photo of sks dog", token="sks", class_word="dog", modes=modes, seeds="0,1", batch_size=2, steps=3,
        height=32, width=32,
    )
    fast = Sampler(model).sample(settings, progress=False)  # the UNet's one adapter
    peft = Sampler(model, fast=False).sample(settings, progress=False)
    assert len(fast) == len(peft) == 2 * len(modes.split(","))
    for a, b in zip(fast, peft):
        assert (a.mode, a.seed) == (b.mode, b.seed)
        diff = np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int)).max()
        assert diff <= 1, (a.mode, a.seed, diff)


def test_fast_unet_call_matches_predict_rows(unet):
    from dreamguide.models import TextConditioning
    from dreamguide.unet_rows import FastUNetCall, predict_rows

    names = [BASE_ROUTE] * 2 + ["subject"]
    sample, t, kwargs = _inputs(3)
    added = kwargs["added_cond_kwargs"]
    cond = TextConditioning(kwargs["encoder_hidden_states"], added["text_embeds"], added["time_ids"])
    call = FastUNetCall.create(unet, names)
    with torch.no_grad():
        fast = call(sample, t, cond)
        again = call(sample, t, cond)
        reference = predict_rows(unet, sample, t, cond, names)
    _close(fast, reference)
    assert torch.equal(fast, again)
    assert install_fast_routing(unet).plan is None  # the plan is on only during a call
    with pytest.raises(ValueError, match="3 row routes for a batch of 2"):
        call(sample[:2], t, cond.select([0, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_is_bitwise_eager():
    from dreamguide.unet_rows import FastUNetCall

    unet = _tiny_unet(seed=6).cuda()
    names = [BASE_ROUTE] * 2 + ["subject"]
    sample, t, kwargs = _inputs(3)
    sample, t = sample.cuda(), t.cuda()
    kwargs = {"encoder_hidden_states": kwargs["encoder_hidden_states"].cuda(),
              "added_cond_kwargs": {k: v.cuda() for k, v in kwargs["added_cond_kwargs"].items()}}
    graphed = FastUNetCall.create(unet, names)
    eager = FastUNetCall.create(unet, names, cuda_graph=False)
    with torch.no_grad():
        outputs = [graphed(sample * s, t * s, kwargs) for s in (1.0, 0.5, 1.0)]
        references = [eager(sample * s, t * s, kwargs) for s in (1.0, 0.5, 1.0)]
    assert graphed._graph is not None
    for out, ref in zip(outputs, references):
        assert torch.equal(out, ref)
    assert not torch.equal(outputs[0], outputs[1])
