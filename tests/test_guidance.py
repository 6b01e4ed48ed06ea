"""The guidance math of SPEC sections 2-3, pinned against independent computations."""

import math

import numpy as np
import pytest
import torch

from dreamguide.guidance import (
    MODES,
    SCHEDULES,
    ConsistencyShaping,
    ParallelRescaling,
    Predictions,
    TRACE_HISTOGRAM_BINS,
    consistency_p_stats,
    decompose,
    get_mode,
    guide,
    magnitude_factor,
    norm_bounded,
    normalize_consistency_p,
    parallel_rescaled,
    parallel_targeted,
    recentred_consistency_p,
    with_knob,
)

CONSISTENCY_MODES = [name for name, mode in MODES.items() if "personalized" in mode.needs and "base" in mode.needs]


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
    with pytest.raises(ValueError, match="PR rescale must be a finite number, got nan"):
        ParallelRescaling(rescale=float("nan"))
    with pytest.raises(ValueError, match="PR eps must be positive and finite, got nan"):
        ParallelRescaling(eps=float("nan"))


def test_stats_survive_non_finite_values():
    k = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0]])
    hist = consistency_p_stats(k)["histogram"][0]
    assert hist.sum() == 4 and hist[0] == 1 and hist[-1] == 1


# ---------------------------------------------------------------------------------------------
# Consistency shaping: the schedule and interval, and the rules beyond PR.


def _old_outputs(p, w_text, w_cons, pr):
    """The existing modes written out with the float operations of their original code."""
    g_text, g_cons = p.base - p.uncond, p.personalized - p.base
    k, parallel, g_orth = decompose(g_cons, g_text, pr.granularity, pr.eps)
    g_pr = g_cons + (normalize_consistency_p(k, pr) - k) * g_text
    return {
        "cfg": p.uncond + w_text * (p.base - p.uncond),
        "dreambooth": p.personalized_uncond + w_text * (p.personalized - p.personalized_uncond),
        "consistency": p.uncond + w_text * g_text + w_cons * g_cons,
        "orthogonal": p.uncond + w_text * g_text + w_cons * g_orth,
        "parallel-rescaled": p.uncond + w_text * g_text + w_cons * g_pr,
    }


@pytest.mark.parametrize(
    "pr",
    [
        ParallelRescaling(),
        ParallelRescaling(rescale=0.6),
        ParallelRescaling(granularity="sample", normalization="clip-negative"),
        ParallelRescaling(normalization="none"),
    ],
)
def test_existing_modes_unchanged_at_every_progress_with_default_shaping(pr):
    p = _predictions(20)
    want = _old_outputs(p, 6.0, 2.5, pr)
    assert set(want) <= set(MODES)
    for name, expected in want.items():
        for progress in (0.0, 0.37, 1.0):
            got = guide(name, p, 6.0, 2.5, pr, shaping=ConsistencyShaping(), progress=progress)
            assert torch.equal(got, expected), (name, progress)


@pytest.mark.parametrize("mode", CONSISTENCY_MODES)
def test_interval_gives_cfg_outside_and_full_mode_inside(mode):
    p = _predictions(21)
    shaping = ConsistencyShaping(start=0.25, stop=0.75, pr_from=0.0)
    cfg = guide("cfg", p, w_text=6.0)
    for progress in (0.0, 0.2, 0.76, 1.0):
        out, stats = guide(mode, p, w_text=6.0, shaping=shaping, progress=progress, return_stats=True)
        assert torch.equal(out, cfg), progress
        assert stats is not None  # Consistency_p is traced on every step, term on or off
    for progress in (0.25, 0.5, 0.75):  # both ends included
        inside = guide(mode, p, w_text=6.0, shaping=shaping, progress=progress)
        assert torch.equal(inside, guide(mode, p, w_text=6.0, shaping=ConsistencyShaping(), progress=progress))
        assert not torch.equal(inside, cfg)


def test_schedules_scale_the_consistency_weight():
    p = _predictions(22)
    shaping = ConsistencyShaping(schedule="linear-increase", start=0.25, stop=0.75)
    # u = 0.5 at progress 0.5: w = 1.5, exactly the consistency mode at w_cons 1.5
    assert torch.equal(guide("consistency", p, w_cons=3.0, shaping=shaping, progress=0.5),
                       guide("consistency", p, w_cons=1.5))
    assert torch.equal(guide("pr", p, w_cons=3.0, shaping=shaping, progress=0.5), guide("pr", p, w_cons=1.5))
    assert torch.equal(guide("consistency", p, shaping=shaping, progress=0.75), guide("consistency", p))
    for u in (0.0, 0.3, 1.0):
        progress = 0.25 + 0.5 * u
        got = {s: ConsistencyShaping(schedule=s, start=0.25, stop=0.75).weight(2.0, progress) for s in SCHEDULES}
        want = {
            "constant": 2.0,
            "linear-increase": 2.0 * u,
            "linear-decrease": 2.0 * (1 - u),
            "cosine-increase": 2.0 * (1 - math.cos(math.pi * u)) / 2,
            "cosine-decrease": 2.0 * (1 + math.cos(math.pi * u)) / 2,
        }
        assert got == pytest.approx(want, abs=1e-12)
    assert ConsistencyShaping(schedule="cosine-decrease", stop=0.5).weight(2.0, 0.51) == 0.0


def test_schedule_floor_keeps_a_share_of_w_cons():
    p = _predictions(24)
    for schedule in SCHEDULES:
        for progress in (0.0, 0.2, 0.45, 0.8, 1.0):
            inside = progress <= 0.9
            # floor 0 is the schedule itself, bit for bit
            assert ConsistencyShaping(schedule=schedule, stop=0.9, floor=0.0).weight(3.0, progress) == (
                3.0 * SCHEDULES[schedule](progress / 0.9) if inside else 0.0)
            if schedule == "constant":
                continue  # a floor needs a schedule that moves (test_bad_shaping_is_rejected)
            # floor 1 is a constant weight inside the interval; between, the share is kept
            assert ConsistencyShaping(schedule=schedule, stop=0.9, floor=1.0).weight(3.0, progress) == (
                3.0 if inside else 0.0)
            want = 3.0 * (0.25 + 0.75 * SCHEDULES[schedule](progress / 0.9)) if inside else 0.0
            assert ConsistencyShaping(schedule=schedule, stop=0.9, floor=0.25).weight(3.0, progress) == \
                pytest.approx(want, abs=1e-12)
    # a decreasing schedule with floor 0.5 ends at half the weight: the last step is consistency at w_cons / 2
    floored = ConsistencyShaping(schedule="linear-decrease", floor=0.5)
    assert torch.equal(guide("consistency", p, w_cons=3.0, shaping=floored, progress=1.0),
                       guide("consistency", p, w_cons=1.5))
    assert torch.equal(guide("pr", p, w_cons=3.0, shaping=floored, progress=0.0), guide("pr", p, w_cons=3.0))


def test_progress_out_of_range_is_rejected():
    p = _predictions(23)
    for progress in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"progress must lie in \[0, 1\].*i / \(steps - 1\)"):
            guide("consistency", p, progress=progress)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "cosine"}, r"schedule 'cosine'.*linear-increase.*e\.g\. schedule="),
        ({"start": 0.6, "stop": 0.6}, r"start \(0\.6\) must be below stop \(0\.6\).*e\.g\. start="),
        ({"start": 0.8, "stop": 0.2}, r"start \(0\.8\) must be below stop"),
        ({"stop": 1.5}, r"ConsistencyShaping\.stop .* \[0, 1\], got 1\.5; e\.g\. stop="),
        ({"start": float("nan")}, r"ConsistencyShaping\.start must be a finite number, got nan; e\.g\. start="),
        ({"spread_cap": -0.1}, r"ConsistencyShaping\.spread_cap .* >= 0 .*got -0\.1; e\.g\. spread_cap="),
        ({"spread_cap": float("inf")}, r"spread_cap must be a finite number or None, got inf; e\.g\."),
        ({"norm_bound": -1.0}, r"ConsistencyShaping\.norm_bound .* >= 0.*e\.g\. norm_bound="),
        ({"magnitude_ratio": 0.0}, r"ConsistencyShaping\.magnitude_ratio .* > 0.*e\.g\. magnitude_ratio="),
        ({"magnitude_power": 0.0}, r"magnitude_power must be > 0, got 0\.0; e\.g\. magnitude_power="),
        ({"parallel_target": float("-inf")}, r"parallel_target must be a finite number, got -inf; e\.g\."),
        ({"parallel_target": "0"}, r"parallel_target must be a finite number, got '0'"),
        ({"pr_from": True}, r"pr_from must be a finite number, got True"),
        ({"pr_from": -0.5}, r"ConsistencyShaping\.pr_from .* \[0, 1\].*e\.g\. pr_from="),
        ({"floor": 1.5}, r"ConsistencyShaping\.floor is a fraction \(of w_cons .*1 = constant\).*got 1\.5; e\.g\. floor="),
        ({"floor": None}, r"ConsistencyShaping\.floor must be a finite number, got None"),
        ({"floor": 0.5}, r"floor \(0\.5\) acts only with a schedule that moves.*e\.g\. schedule='cosine-decrease'"),
    ],
)
def test_bad_shaping_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyShaping(**kwargs)


def test_shaping_serializes_and_rejects_unknown_keys():
    shaping = ConsistencyShaping(schedule="cosine-decrease", start=0.1, spread_cap=0.5, parallel_target=-0.5)
    assert ConsistencyShaping.from_dict(shaping.to_dict()) == shaping
    # the floor is written only when set: records made before it existed read and compare equal
    assert "floor" not in shaping.to_dict()
    floored = ConsistencyShaping(schedule="cosine-decrease", floor=0.25)
    assert floored.to_dict()["floor"] == 0.25 and ConsistencyShaping.from_dict(floored.to_dict()) == floored
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tau'\] in run\.toml \[shaping\]; valid keys: schedule"):
        ConsistencyShaping.from_dict({"tau": 0.5}, "run.toml [shaping]")


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_names_a_knob_that_with_knob_sets(name):
    mode = MODES[name]
    group, _, field = mode.knob.partition(".")
    assert group in ("w_text", "w_cons", "pr", "shaping") and bool(field) == (group in ("pr", "shaping"))
    assert mode.strength
    settings = with_knob(name, 0.25)
    assert (settings[group] if not field else getattr(settings[group], field)) == 0.25
    others = {key: value for key, value in settings.items() if key != group}
    assert others == {key: value for key, value in with_knob(name, 0.5).items() if key != group}
    out = guide(name, _predictions(24), **settings)
    assert torch.isfinite(out).all()


def _split(p):
    g_text, g_cons = (p.base - p.uncond).double(), (p.personalized - p.base).double()
    k = (g_cons * g_text).sum(1, keepdim=True) / (g_text.square().sum(1, keepdim=True) + 1e-6)
    return g_text, g_cons, k


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_recentred_matches_reference(lam):
    p = _predictions(30)
    g_text, g_cons, k = _split(p)
    k_mean = k.mean(dim=(2, 3), keepdim=True)
    want = p.uncond.double() + 6.0 * g_text + 2.5 * (g_cons - k * g_text + lam * (k - k_mean) * g_text)
    got = guide("recentred", p, w_text=6.0, w_cons=2.5, pr=ParallelRescaling(rescale=lam))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if lam == 1.0:  # removes exactly the spatially uniform part of the parallel coefficient
        torch.testing.assert_close(got.double(), p.uncond.double() + 6.0 * g_text + 2.5 * (g_cons - k_mean * g_text),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_spread_cap_reductions_are_exact(lam):
    p = _predictions(31)
    pr = ParallelRescaling(rescale=lam)
    recentred = guide("recentred", p, pr=pr)
    spread = decompose(p.personalized - p.base, p.base - p.uncond).consistency_p.std(dim=(2, 3), correction=0)
    for cap in (None, float(spread.max()) * 1.01, 1e6):  # no cap, or a cap above every sample's spread
        assert torch.equal(guide("spread-capped", p, pr=pr, shaping=ConsistencyShaping(spread_cap=cap)), recentred)
    assert torch.equal(guide("spread-capped", p, pr=pr, shaping=ConsistencyShaping(spread_cap=0.0)),
                       guide("orthogonal", p, pr=pr))
    assert torch.equal(guide("recentred", p, pr=ParallelRescaling(rescale=0.0)), guide("orthogonal", p))


def test_spread_cap_below_every_spread_is_pr_scaled_by_the_cap():
    p = _predictions(32)
    cap = 0.05
    spread = decompose(p.personalized - p.base, p.base - p.uncond).consistency_p.std(dim=(2, 3), correction=0)
    assert spread.min() > cap
    got = guide("spread-capped", p, pr=ParallelRescaling(rescale=0.8), shaping=ConsistencyShaping(spread_cap=cap))
    # PR divides by std + eps, the cap by std: equal up to eps / std
    torch.testing.assert_close(got, guide("pr", p, pr=ParallelRescaling(rescale=0.8 * cap)), rtol=1e-5, atol=1e-5)


def test_recentred_consistency_p_keeps_the_spread_up_to_the_cap():
    g = torch.Generator().manual_seed(33)
    k = torch.randn(3, 1, 6, 7, generator=g).double() * torch.tensor([0.1, 1.0, 3.0]).double().view(3, 1, 1, 1) - 2.0
    spread = k.std(dim=(2, 3), correction=0).flatten()
    for cap, lam in ((0.5, 1.0), (0.5, 2.0), (None, 0.5), (0.0, 1.0)):
        k_new = recentred_consistency_p(k, lam, cap)
        torch.testing.assert_close(k_new.mean(dim=(2, 3)).flatten(), torch.zeros(3, dtype=k.dtype), atol=1e-12, rtol=0)
        want = lam * (spread if cap is None else spread.clamp(max=cap))
        torch.testing.assert_close(k_new.std(dim=(2, 3), correction=0).flatten(), want, atol=1e-12, rtol=1e-12)
    assert torch.equal(recentred_consistency_p(torch.full((2, 1, 3, 3), -1.5), 1.0, 0.0), torch.zeros(2, 1, 3, 3))


@pytest.mark.parametrize("mode", ["recentred", "spread-capped"])
def test_spatial_rules_refuse_sample_granularity(mode):
    pr = ParallelRescaling(granularity="sample", normalization="none")
    for progress in (0.0, 1.0):  # also where the interval leaves the term out
        with pytest.raises(ValueError, match=f"mode '{mode}' .* needs PR granularity 'location', got 'sample'"):
            guide(mode, _predictions(34), pr=pr, shaping=ConsistencyShaping(stop=0.5), progress=progress)


@pytest.mark.parametrize("w_cons, w_text", [(3.0, 7.5), (2.0, 1.0), (-1.5, 4.0)])
def test_norm_bound_holds_per_location(w_cons, w_text):
    p = _predictions(40)
    g_text, g_cons = p.base - p.uncond, p.personalized - p.base
    size = w_cons * g_cons.norm(dim=1)
    limit = w_text * g_text.norm(dim=1)
    bound = float((size.abs() / limit).median())  # about half the locations exceed it
    guided = guide("norm-bounded", p, w_text, w_cons, shaping=ConsistencyShaping(norm_bound=bound))
    term = (guided - guide("cfg", p, w_text)).double()
    bounded = norm_bounded(g_cons, g_text, w_cons, w_text, bound)
    over = size.abs() > bound * limit
    assert 0.3 < over.float().mean() < 0.7
    # the bound holds everywhere (float32 rounding of the rescale: 1e-5 relative)
    assert ((w_cons * bounded).norm(dim=1) <= bound * limit * (1 + 1e-5)).all()
    assert (term.norm(dim=1) <= bound * limit.double() * (1 + 1e-4) + 1e-5).all()  # and through guide()
    # it is met with equality where it was exceeded, the direction kept; elsewhere g_cons is untouched
    torch.testing.assert_close((w_cons * bounded).norm(dim=1)[over], bound * limit[over], rtol=1e-5, atol=0)
    cosine = torch.nn.functional.cosine_similarity(bounded, g_cons, dim=1)
    torch.testing.assert_close(cosine[over], torch.ones_like(cosine[over]))
    assert torch.equal(bounded.permute(0, 2, 3, 1)[~over], g_cons.permute(0, 2, 3, 1)[~over])


def test_norm_bound_reductions():
    p = _predictions(41)
    consistency = guide("consistency", p)
    for bound in (None, 1e6):  # no bound, or one no location reaches: factor exactly 1
        assert torch.equal(guide("norm-bounded", p, shaping=ConsistencyShaping(norm_bound=bound)), consistency)
    # bound 0 scales g_cons by exactly 0: the cfg prediction plus exact zeros
    assert torch.equal(guide("norm-bounded", p, shaping=ConsistencyShaping(norm_bound=0.0)), guide("cfg", p))


@pytest.mark.parametrize("ratio0, power", [(1.0, 2.0), (0.5, 1.0), (3.0, 4.0)])
def test_magnitude_weight_matches_reference(ratio0, power):
    p = _predictions(50)
    scale = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)  # the two samples get different ratios, so weights
    p = p._replace(personalized=p.base + scale * (p.personalized - p.base))
    g_text, g_cons = (p.base - p.uncond).double(), (p.personalized - p.base).double()
    shaping = ConsistencyShaping(magnitude_ratio=ratio0, magnitude_power=power)
    got = guide("magnitude-weighted", p, w_text=6.0, w_cons=2.5, shaping=shaping)
    for i in range(2):
        ratio = float(g_cons[i].norm() / g_text[i].norm())
        w_eff = 2.5 / (1 + (ratio / ratio0) ** power)
        want = p.uncond[i].double() + 6.0 * g_text[i] + w_eff * g_cons[i]
        torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5)
    factor = magnitude_factor(g_cons, g_text, ratio0, power)
    assert factor.shape == (2, 1, 1, 1) and factor[1] < factor[0]


def test_magnitude_weight_reductions():
    p = _predictions(51)
    consistency = guide("consistency", p)
    assert torch.equal(guide("magnitude-weighted", p, shaping=ConsistencyShaping(magnitude_ratio=None)), consistency)
    # a finite ratio0 leaves a factor 1 / (1 + (ratio / ratio0)^p) that is 1 only in the limit
    far = guide("magnitude-weighted", p, shaping=ConsistencyShaping(magnitude_ratio=1e4))
    torch.testing.assert_close(far, consistency, rtol=1e-6, atol=1e-6)
    near_zero = guide("magnitude-weighted", p, shaping=ConsistencyShaping(magnitude_ratio=1e-4))
    torch.testing.assert_close(near_zero, guide("cfg", p), rtol=1e-6, atol=1e-6)
    # where g_text is 0 the ratio is huge but finite: the term is switched off, not blown up
    flat = Predictions(p.uncond, p.uncond.clone(), p.personalized)
    out = guide("magnitude-weighted", flat, shaping=ConsistencyShaping(magnitude_ratio=1.0))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, flat.uncond, rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", [0.0, -0.5, 1.25])
def test_adaptive_parallel_sets_the_net_projection(target):
    p = _predictions(60)
    g_text, g_cons = (p.base - p.uncond).double(), (p.personalized - p.base).double() - 2.0 * (p.base - p.uncond)
    shifted, k_bar = parallel_targeted(g_cons, g_text, target, eps=1e-12)
    net = (shifted * g_text).sum(dim=(1, 2, 3))
    text_energy = g_text.square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(net, target * text_energy, rtol=1e-10, atol=1e-10)
    # k_bar is the ||g_text||^2-weighted mean of the per-location Consistency_p
    k, _, _ = decompose(g_cons, g_text, eps=1e-12)
    n2 = g_text.square().sum(dim=1, keepdim=True)
    torch.testing.assert_close(k_bar.flatten(), (k * n2).sum(dim=(1, 2, 3)) / n2.sum(dim=(1, 2, 3)))
    # every location's coefficient moves by the same amount: the spatial spread is kept
    k_new, _, orthogonal = decompose(shifted, g_text, eps=1e-12)
    torch.testing.assert_close(k_new - k, (target - k_bar).expand_as(k))
    torch.testing.assert_close(orthogonal, g_cons - k * g_text)
    # through guide(), in float32: the consistency term's net projection is w_cons * target ||g_text||^2
    preds = p._replace(personalized=(p.base + g_cons).float())
    shaping = ConsistencyShaping(parallel_target=target)
    term = (guide("adaptive-parallel", preds, w_cons=2.5, shaping=shaping) - guide("cfg", preds)).double()
    g_text32 = (preds.base - preds.uncond).double()
    want = 2.5 * target * g_text32.square().sum(dim=(1, 2, 3))
    torch.testing.assert_close((term * g_text32).sum(dim=(1, 2, 3)), want, rtol=1e-4, atol=1e-2)


def test_adaptive_parallel_reductions():
    p = _predictions(61)
    orthogonal_sample = guide("orthogonal", p, pr=ParallelRescaling(granularity="sample", normalization="none"))
    assert torch.equal(guide("adaptive-parallel", p), orthogonal_sample)
    # a target equal to the sample's own weighted mean coefficient leaves g_cons as it is
    g_text, g_cons = p.base - p.uncond, p.personalized - p.base
    k_bar = decompose(g_cons, g_text, "sample").consistency_p
    same, _ = parallel_targeted(g_cons[:1], g_text[:1], float(k_bar[0]))
    torch.testing.assert_close(same, g_cons[:1], rtol=1e-6, atol=1e-6)


def test_late_pr_switches_rule_at_pr_from():
    p = _predictions(62)
    for progress in (0.0, 0.5, 1.0):
        assert torch.equal(guide("late-pr", p, progress=progress), guide("pr", p))  # default pr_from 0: PR
    shaping = ConsistencyShaping(pr_from=0.6)
    for progress in (0.0, 0.59):
        out, stats = guide("late-pr", p, shaping=shaping, progress=progress, return_stats=True)
        assert torch.equal(out, guide("consistency", p)) and stats is not None
    for progress in (0.6, 1.0):
        out, stats = guide("late-pr", p, shaping=shaping, progress=progress, return_stats=True)
        assert torch.equal(out, guide("pr", p)) and stats is not None
    # with the interval and schedule on top: PR at half weight late, nothing before start
    both = ConsistencyShaping(pr_from=0.6, schedule="linear-decrease", start=0.5, stop=1.0)
    assert torch.equal(guide("late-pr", p, shaping=both, progress=0.75), guide("pr", p, w_cons=1.5))
    assert torch.equal(guide("late-pr", p, shaping=both, progress=0.4), guide("cfg", p))


def test_every_consistency_mode_traces_the_raw_consistency_p():
    p = _predictions(63)
    want = consistency_p_stats(decompose(p.personalized - p.base, p.base - p.uncond).consistency_p)
    shaping = ConsistencyShaping(spread_cap=0.3, norm_bound=0.5, magnitude_ratio=1.0, parallel_target=-0.5, pr_from=0.5)
    for name in CONSISTENCY_MODES:
        for progress in (0.0, 1.0):
            _, stats = guide(name, p, shaping=shaping, progress=progress, return_stats=True)
            for key, value in want.items():
                torch.testing.assert_close(stats[key], value, msg=f"{name} {key}")


@pytest.mark.parametrize("mode", CONSISTENCY_MODES)
def test_shaping_rules_stay_finite_where_text_guidance_vanishes(mode):
    p = _predictions(64)
    shaping = ConsistencyShaping(spread_cap=0.3, norm_bound=0.5, magnitude_ratio=1.0, parallel_target=-0.5)
    base = p.uncond.clone()
    base[:, :, :2] += torch.randn_like(base[:, :, :2])  # g_text = 0 on all other rows
    for preds in (
        Predictions(p.uncond, base, p.personalized),
        Predictions(p.uncond, p.uncond.clone(), p.personalized),  # g_text = 0 everywhere
        Predictions(p.uncond, base, base + 0.5 * (base - p.uncond)),  # constant Consistency_p
    ):
        out, stats = guide(mode, preds, shaping=shaping, return_stats=True)
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(v).all() for v in stats.values())
