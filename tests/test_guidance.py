"""The guidance math of SPEC sections 2-3, pinned against independent computations."""

import numpy as np
import pytest
import torch

from dreamguide.guidance import (
    MODES,
    ParallelRescaling,
    Predictions,
    TRACE_HISTOGRAM_BINS,
    consistency_p_stats,
    decompose,
    get_mode,
    guide,
    normalize_consistency_p,
    parallel_rescaled,
)


def _predictions(seed=0, shape=(2, 4, 5, 6), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return Predictions(*(torch.randn(shape, generator=g).to(dtype) for _ in range(4)))


def _reference_pr(e_u, e_c, e_ft, w_text, w_cons, lam=1.0, eps=1e-6):
    """PR written out location by location in float64, independent of the module's code."""
    e_u, e_c, e_ft = (np.asarray(x, dtype=np.float64) for x in (e_u, e_c, e_ft))
    g_text, g_cons = e_c - e_u, e_ft - e_c
    b, c, h, w = g_text.shape
    out = np.empty_like(g_text)
    for i in range(b):
        k = np.empty((h, w))
        for y in range(h):
            for x in range(w):
                t, s = g_text[i, :, y, x], g_cons[i, :, y, x]
                k[y, x] = float(np.dot(s, t)) / (float(np.dot(t, t)) + eps)
        k_hat = (k - k.mean()) / (k.std() + eps)
        for y in range(h):
            for x in range(w):
                t, s = g_text[i, :, y, x], g_cons[i, :, y, x]
                g_pr = (s - k[y, x] * t) + lam * k_hat[y, x] * t
                out[i, :, y, x] = e_u[i, :, y, x] + w_text * t + w_cons * g_pr
    return out


@pytest.mark.parametrize("lam", [1.0, 0.5, 2.0])
def test_parallel_rescaled_matches_reference(lam):
    p = _predictions(1)
    got = guide("pr", p, w_text=7.5, w_cons=3.0, pr=ParallelRescaling(rescale=lam))
    want = _reference_pr(p.uncond, p.base, p.personalized, 7.5, 3.0, lam=lam)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_orthogonal_part_is_orthogonal_per_location():
    p = _predictions(2)
    g_text, g_cons = p.base - p.uncond, p.personalized - p.base
    k, parallel, orthogonal = decompose(g_cons.double(), g_text.double(), eps=1e-12)
    assert k.shape == (2, 1, 5, 6)
    inner = (orthogonal * g_text.double()).sum(dim=1)
    assert inner.abs().max() < 1e-9
    torch.testing.assert_close(parallel + orthogonal, g_cons.double())


def test_sample_granularity_projects_whole_latent():
    p = _predictions(3)
    g_text, g_cons = p.base - p.uncond, p.personalized - p.base
    k, _, orthogonal = decompose(g_cons.double(), g_text.double(), granularity="sample", eps=1e-12)
    assert k.shape == (2, 1, 1, 1)
    assert (orthogonal * g_text.double()).sum(dim=(1, 2, 3)).abs().max() < 1e-9
    assert (orthogonal * g_text.double()).sum(dim=1).abs().max() > 1e-3  # not orthogonal per location


def test_normalization_none_is_consistency_exactly():
    p = _predictions(4)
    for granularity in ("location", "sample"):
        pr = ParallelRescaling(granularity=granularity, normalization="none")
        assert torch.equal(guide("pr", p, pr=pr), guide("consistency", p))


def test_normalization_zero_is_orthogonal_exactly():
    p = _predictions(5)
    for granularity in ("location", "sample"):
        pr = ParallelRescaling(granularity=granularity, normalization="zero")
        assert torch.equal(guide("pr", p, pr=pr), guide("orthogonal", p, pr=pr))


def test_clip_negative_keeps_only_positive_parallel_part():
    p = _predictions(6)
    pr = ParallelRescaling(normalization="clip-negative")
    g_text, g_cons = p.base - p.uncond, p.personalized - p.base
    k = (g_cons * g_text).sum(1, keepdim=True) / (g_text.square().sum(1, keepdim=True) + 1e-6)
    want = p.uncond + 7.5 * g_text + 3.0 * (g_cons - k * g_text + k.clamp(min=0) * g_text)
    torch.testing.assert_close(guide("pr", p, pr=pr), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["consistency", "pr", "orthogonal"])
def test_zero_consistency_weight_is_cfg(mode):
    p = _predictions(7)
    torch.testing.assert_close(guide(mode, p, w_cons=0.0), guide("cfg", p), rtol=0, atol=1e-6)


def test_cfg_and_dreambooth_formulas():
    p = _predictions(8)
    torch.testing.assert_close(guide("cfg", p, w_text=5.0), p.uncond + 5.0 * (p.base - p.uncond))
    torch.testing.assert_close(
        guide("dreambooth", p, w_text=5.0),
        p.personalized_uncond + 5.0 * (p.personalized - p.personalized_uncond),
    )


def test_consistency_formula():
    p = _predictions(9)
    want = p.uncond + 7.5 * (p.base - p.uncond) + 3.0 * (p.personalized - p.base)
    torch.testing.assert_close(guide("consistency", p), want)


def test_zero_text_guidance_and_constant_k_stay_finite():
    p = _predictions(10)
    uncond = p.uncond.clone()
    base = uncond.clone()
    base[:, :, :2] += torch.randn_like(base[:, :, :2])  # g_text = 0 on all other rows
    personalized = base + 0.5 * (base - uncond)  # g_cons = 0.5 g_text: k constant where g_text != 0
    for preds in (
        Predictions(uncond, base, personalized),
        Predictions(uncond, uncond.clone(), personalized),  # g_text = 0 everywhere
        Predictions(uncond, base, base + 0.5 * (base - uncond)),
    ):
        out, stats = guide("pr", preds, return_stats=True)
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(v).all() for v in stats.values())


def test_constant_k_gives_zero_standardized_parallel_part():
    pr = ParallelRescaling()
    constant = torch.full((2, 1, 5, 6), 0.7)
    assert torch.equal(normalize_consistency_p(constant, pr), torch.zeros_like(constant))
    # a spread far below eps is damped, not blown up to unit variance
    tiny_spread = constant + 1e-9 * torch.randn(constant.shape, generator=torch.Generator().manual_seed(0))
    assert normalize_consistency_p(tiny_spread, pr).abs().max() < 0.02
    p = _predictions(11)
    g_text = p.base - p.uncond
    g_pr, k = parallel_rescaled(0.7 * g_text, g_text)
    torch.testing.assert_close(k, torch.full_like(k, 0.7), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(g_pr).all() and g_pr.abs().max() < g_text.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_use_float32_math(dtype):
    p = _predictions(12, dtype=dtype)
    out = guide("pr", p)
    assert out.dtype == dtype
    want = guide("pr", Predictions(*(x.float() for x in p)))
    torch.testing.assert_close(out, want.to(dtype))


def test_stats_match_direct_computation():
    p = _predictions(13)
    _, stats = guide("pr", p, return_stats=True)
    g_text, g_cons = p.base - p.uncond, p.personalized - p.base
    k = decompose(g_cons, g_text).consistency_p.flatten(1)
    torch.testing.assert_close(stats["mean"], k.mean(1))
    torch.testing.assert_close(stats["std"], k.std(1, correction=0))
    torch.testing.assert_close(stats["fraction_negative"], (k < 0).float().mean(1))
    want_q = np.quantile(k.numpy(), [0.05, 0.25, 0.5, 0.75, 0.95], axis=1).T
    np.testing.assert_allclose(stats["quantiles"].numpy(), want_q, rtol=1e-5, atol=1e-5)
    assert stats["histogram"].shape == (2, TRACE_HISTOGRAM_BINS)
    torch.testing.assert_close(stats["histogram"].sum(1), torch.full((2,), float(k.shape[1])))


def test_stats_for_each_consistency_mode_and_none_for_others():
    p = _predictions(14)
    for name in ("consistency", "orthogonal", "pr"):
        assert guide(name, p, return_stats=True)[1] is not None
    for name in ("cfg", "dreambooth"):
        assert guide(name, p, return_stats=True)[1] is None


def test_histogram_clamps_out_of_range_values():
    k = torch.tensor([[-100.0, -4.0, 0.0, 3.99, 100.0]])
    hist = consistency_p_stats(k)["histogram"][0]
    assert hist[0] == 2 and hist[-1] == 2 and hist[TRACE_HISTOGRAM_BINS // 2] == 1


def test_registry_and_aliases():
    assert get_mode("pr") is MODES["parallel-rescaled"]
    assert get_mode("cfg").model_calls == 2 and get_mode("pr").model_calls == 3
    with pytest.raises(ValueError, match="unknown guidance mode 'prr'.*parallel-rescaled"):
        get_mode("prr")


def test_missing_prediction_is_named():
    p = _predictions(15)
    with pytest.raises(ValueError, match="personalized"):
        guide("pr", Predictions(p.uncond, p.base))


def test_bad_switches_are_rejected():
    with pytest.raises(ValueError, match="granularity 'pixel'"):
        ParallelRescaling(granularity="pixel")
    with pytest.raises(ValueError, match="normalization 'l2'"):
        ParallelRescaling(normalization="l2")
    with pytest.raises(ValueError, match="needs granularity 'location'"):
        ParallelRescaling(granularity="sample")
    with pytest.raises(ValueError, match="eps must be positive"):
        ParallelRescaling(eps=0.0)


def test_stats_survive_non_finite_values():
    k = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0]])
    hist = consistency_p_stats(k)["histogram"][0]
    assert hist.sum() == 4 and hist[0] == 1 and hist[-1] == 1
