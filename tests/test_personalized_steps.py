"""The personalized row on a subset of the steps: the schedule, the reuse math, the sampler's rows."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from dreamguide import guidance
from dreamguide.personalized_steps import EVALUATE, EVERY_STEP, OFF, REUSE, Carried, PersonalizedSteps

E, R, O = EVALUATE, REUSE, OFF

# ---------------------------------------------------------------------------------------------
# The schedule


def test_plan_every_interval_and_fraction():
    assert EVERY_STEP.plan(5) == (E,) * 5 and EVERY_STEP.every_step and EVERY_STEP.describe() == "every step"
    assert PersonalizedSteps(every=3).plan(7) == (E, R, R, E, R, R, E)
    assert PersonalizedSteps(every=3).evaluated_fraction(30) == pytest.approx(1 / 3)
    assert PersonalizedSteps(every=4).evaluated_fraction(20) == 0.25
    # progress of step i is i / (steps - 1): with 11 steps, step i is at i / 10
    assert PersonalizedSteps(stop=0.3).plan(11) == (E, E, E, E) + (O,) * 7
    assert PersonalizedSteps(start=0.5).plan(11) == (O,) * 5 + (E,) * 6
    # every N counts from the interval's first step
    assert PersonalizedSteps(every=2, start=0.35, stop=0.8).plan(11) == (O,) * 4 + (E, R, E, R, E) + (O, O)
    assert PersonalizedSteps().plan(1) == (E,)
    assert not PersonalizedSteps(stop=0.9).every_step
    assert PersonalizedSteps(every=4, stop=0.6, reuse="extrapolate", carry="parts").describe() == (
        "every 4 steps in [0, 0.6], extrapolate parts")
    assert PersonalizedSteps(stop=0.5).describe() == "every step in [0, 0.5]"


@pytest.mark.parametrize("kwargs, message", [
    (dict(every=0), r"every must be a positive integer .* got 0"),
    (dict(every=1.5), r"every must be a positive integer .* got 1.5"),
    (dict(every=True), r"every must be a positive integer .* got True"),
    (dict(stop=float("nan")), r"stop is a fraction of the trajectory .* got nan"),
    (dict(start=1.2), r"start is a fraction .* must lie in \[0, 1\], got 1.2"),
    (dict(start=0.6, stop=0.4), r"start \(0.6\) must be below stop \(0.4\)"),
    (dict(reuse="cache"), r"unknown PersonalizedSteps.reuse 'cache'; choose one of hold, extrapolate"),
    (dict(carry="k"), r"unknown PersonalizedSteps.carry 'k'; choose one of g_cons, parts"),
])
def test_bad_schedules_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PersonalizedSteps(**kwargs)


def test_parse_and_dict_round_trip():
    assert PersonalizedSteps.parse("every") == EVERY_STEP
    assert PersonalizedSteps.parse("3") == PersonalizedSteps(every=3)
    parsed = PersonalizedSteps.parse("every=4, stop=0.7, reuse=extrapolate, carry=parts")
    assert parsed == PersonalizedSteps(every=4, stop=0.7, reuse="extrapolate", carry="parts")
    assert PersonalizedSteps.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed
    with pytest.raises(ValueError, match=r"unknown personalized-steps key 'evry' in 'evry=3'; valid keys: every, "
                                         r"start, stop, reuse, carry, e\.g\. every=3,reuse=hold"):
        PersonalizedSteps.parse("evry=3")
    with pytest.raises(ValueError, match=r"personalized-steps key 'every' has no value in 'stop=0.5,every'; write every=VALUE"):
        PersonalizedSteps.parse("stop=0.5,every")
    with pytest.raises(ValueError, match=r"every='x' must be a positive integer"):
        PersonalizedSteps.parse("every=x")
    with pytest.raises(ValueError, match=r"stop='late' must be a number"):
        PersonalizedSteps.parse("stop=late")
    with pytest.raises(ValueError, match=r"'every' is given twice in 'every=2,every=3'"):
        PersonalizedSteps.parse("every=2,every=3")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['often'\] in cfg.toml; valid keys: every"):
        PersonalizedSteps.from_dict({"often": 2}, "cfg.toml")


# ---------------------------------------------------------------------------------------------
# Reuse


def _pair(seed: int, shape=(2, 4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_hold_returns_the_last_evaluation_exactly():
    carried = Carried(PersonalizedSteps(every=3))
    (a, text_a), (b, text_b) = _pair(0), _pair(1)
    carried.remember(0, a, text_a)
    assert torch.equal(carried.recall(1, text_b), a)
    carried.remember(3, b, text_b)
    assert torch.equal(carried.recall(4, text_a), b)


def test_extrapolate_follows_the_line_through_the_last_two():
    carried = Carried(PersonalizedSteps(every=2, reuse="extrapolate"))
    (a, text), (b, _) = _pair(0), _pair(1)
    carried.remember(0, a, text)
    assert torch.equal(carried.recall(1, text), a)  # one evaluation: held
    carried.remember(2, b, text)
    torch.testing.assert_close(carried.recall(3, text), b + (b - a) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(carried.recall(6, text), b + 2 * (b - a), rtol=0, atol=1e-6)


def test_parts_keep_k_and_the_orthogonal_part_on_the_new_text_guidance():
    carried = Carried(PersonalizedSteps(every=2, carry="parts"))
    (g_cons, g_text), (_, new_text) = _pair(0), _pair(1)
    carried.remember(0, g_cons, g_text)
    k, _, g_orth = guidance.decompose(g_cons, g_text, "location", 1e-6)
    torch.testing.assert_close(carried.recall(1, new_text), k * new_text + g_orth, rtol=0, atol=1e-6)
    # with the same text guidance, the parts give g_cons back
    torch.testing.assert_close(carried.recall(1, g_text), g_cons, rtol=0, atol=1e-5)
    # extrapolated parts: k and g_orth on their own lines
    line = Carried(PersonalizedSteps(every=2, carry="parts", reuse="extrapolate"))
    (g2, t2) = _pair(2)
    line.remember(0, g_cons, g_text)
    line.remember(2, g2, t2)
    k2, _, orth2 = guidance.decompose(g2, t2, "location", 1e-6)
    expected = (k2 + (k2 - k) / 2) * new_text + orth2 + (orth2 - g_orth) / 2
    torch.testing.assert_close(line.recall(3, new_text), expected, rtol=0, atol=1e-5)


def test_recall_before_any_evaluation_is_an_error():
    with pytest.raises(RuntimeError, match="step 2 reuses the consistency guidance, but no step evaluated it"):
        Carried(PersonalizedSteps(every=2)).recall(2, torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------------
# The sampler


@pytest.fixture(scope="module")
def sampler():
    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.sampling import Sampler
    from dreamguide.testing import tiny_sd15_pipeline

    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline(0))
    torch.manual_seed(0)
    add_lora(model.unet, rank=4, init=False)
    return Sampler(model)


SETTINGS = dict(prompt="a photo of sks dog", token="sks", class_word="dog", seeds=(0, 1), steps=7)


def _rows_per_forward(sampler, run):
    """The batch size of every UNet forward while ``run()`` samples."""
    sizes = []
    handle = sampler.model.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        results = run()
    finally:
        handle.remove()
    return sizes, results


def _pixels(result):
    return np.asarray(result.image).astype(int)


def test_the_row_runs_exactly_where_the_schedule_says(sampler):
    from dreamguide.sampling import SampleSettings

    schedule = PersonalizedSteps(every=3, stop=0.8)
    settings = SampleSettings(**SETTINGS, modes=("pr",), personalized_steps=schedule)
    sizes, _ = _rows_per_forward(sampler, lambda: sampler.sample(settings, progress=False))
    # 2 images: 6 rows (uncond, base, personalized) where evaluated, 4 elsewhere; step 6 (progress 1) is off
    assert schedule.plan(7) == (E, R, R, E, R, O, O)
    assert sizes == [6, 4, 4, 6, 4, 4, 4]
    every, _ = _rows_per_forward(sampler, lambda: sampler.sample(dataclasses.replace(
        settings, personalized_steps=EVERY_STEP), progress=False))
    assert every == [6] * 7


def test_every_step_is_todays_sampler_bit_for_bit(sampler, monkeypatch):
    """The default takes the sampler's own path (tests/test_regression_images.py pins its images); the
    schedule's row function, made to evaluate every step, gives the same images bit for bit."""
    from dreamguide.sampling import SampleSettings

    settings = SampleSettings(**SETTINGS, modes=("cfg", "consistency", "pr", "dreambooth"), batch_size=8)
    default = sampler.sample(settings, progress=False)
    assert default[0].metadata["personalized_steps"] == EVERY_STEP.to_dict()
    monkeypatch.setattr(PersonalizedSteps, "every_step", property(lambda self: False))
    wrapped, _ = _rows_per_forward(sampler, lambda: sampler.sample(settings, progress=False))
    assert wrapped == [20] * 7  # through the schedule's row function: every row at every step
    forced = sampler.sample(settings, progress=False)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(default, forced))


def _seen_predictions(sampler, settings, monkeypatch) -> list:
    """The predictions the guidance rule got at every step (one call of ``guide`` per step)."""
    seen = []
    original = guidance.guide

    def spy(mode, predictions, *args, **kwargs):
        seen.append(predictions)
        return original(mode, predictions, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(guidance, "guide", spy)
        sampler.sample(settings, progress=False)
    return seen


def test_reused_steps_guide_with_the_held_consistency_term(sampler, monkeypatch):
    """A step that reuses g_cons hands the rule e_c + g_cons(last evaluation): checked on the combined rows."""
    from dreamguide.sampling import SampleSettings

    schedule = PersonalizedSteps(every=2)
    settings = SampleSettings(**{**SETTINGS, "steps": 4}, modes=("consistency",), personalized_steps=schedule)
    g_cons = [p.personalized - p.base for p in _seen_predictions(sampler, settings, monkeypatch)]
    torch.testing.assert_close(g_cons[1], g_cons[0], rtol=0, atol=1e-5)  # step 1 holds step 0's
    torch.testing.assert_close(g_cons[3], g_cons[2], rtol=0, atol=1e-5)
    assert (g_cons[2] - g_cons[0]).abs().max() > 1e-3  # step 2 evaluated anew


def test_extrapolated_and_parts_steps_hand_the_rule_what_carried_computes(sampler, monkeypatch):
    from dreamguide.sampling import SampleSettings

    base = SampleSettings(**{**SETTINGS, "steps": 4}, modes=("consistency",))
    line = [p.personalized - p.base for p in _seen_predictions(sampler, dataclasses.replace(
        base, personalized_steps=PersonalizedSteps(every=2, reuse="extrapolate")), monkeypatch)]
    torch.testing.assert_close(line[3], line[2] + (line[2] - line[0]) / 2, rtol=0, atol=1e-4)
    seen = _seen_predictions(sampler, dataclasses.replace(
        base, personalized_steps=PersonalizedSteps(every=2, carry="parts")), monkeypatch)
    g_cons, g_text = seen[0].personalized - seen[0].base, seen[0].base - seen[0].uncond
    k, _, g_orth = guidance.decompose(g_cons, g_text, "location", 1e-6)
    new_text = seen[1].base - seen[1].uncond
    torch.testing.assert_close(seen[1].personalized - seen[1].base, k * new_text + g_orth, rtol=0, atol=1e-4)


def test_learned_tokens_only_skip_the_token_rows_too(sampler):
    """Without an adapter (routes None) the reduced rows are their own forward too, not the full one's."""
    from dreamguide.sampling import SampleSettings, Sampler

    tokens_only = Sampler(sampler.model, adapter_name=None, sources={"embeddings": "tokens.safetensors"})
    settings = SampleSettings(**SETTINGS, modes=("pr",), personalized_steps=PersonalizedSteps(every=3))
    sizes, _ = _rows_per_forward(tokens_only, lambda: tokens_only.sample(settings, progress=False))
    assert sizes == [6, 4, 4, 6, 4, 4, 6]


def test_routed_forwards_live_for_one_call_unless_kept(sampler):
    from dreamguide.sampling import ROW_CALLS_KEPT, SampleSettings, Sampler

    settings = SampleSettings(**SETTINGS, modes=("pr",), personalized_steps=PersonalizedSteps(every=3))
    sampler.sample(settings, progress=False)
    assert sampler._row_calls == {}
    kept = Sampler(sampler.model, keep_graphs=True)
    kept.sample(settings, progress=False)
    assert len(kept._row_calls) == 2  # the full and the reduced rows
    calls = dict(kept._row_calls)
    kept.sample(dataclasses.replace(settings, seeds=(5, 6)), progress=False)
    assert all(kept._row_calls[key] is call for key, call in calls.items())  # reused by the next call
    kept.sample(dataclasses.replace(settings, seeds=(7,), modes=("consistency", "cfg")), progress=False)
    assert len(kept._row_calls) == ROW_CALLS_KEPT  # other shapes pushed the oldest out
    kept.forget_graphs()
    assert kept._row_calls == {}

    def fail(*args, **kwargs):
        raise RuntimeError("decode failed")

    sampler._to_image, original = fail, sampler._to_image
    try:
        with pytest.raises(RuntimeError, match="decode failed"):
            sampler.sample(settings, progress=False)
    finally:
        sampler._to_image = original
    assert sampler._row_calls == {}  # freed on errors too


def test_a_schedule_without_a_consistency_mode_is_named():
    from dreamguide.sampling import SampleSettings
    from dreamguide.toyworld.frontier import FrontierRule

    with pytest.warns(UserWarning, match=r"personalized_steps \(every 3 steps, hold g_cons\) changes only modes"):
        SampleSettings(**SETTINGS, modes=("cfg", "dreambooth"), personalized_steps=PersonalizedSteps(every=3))
    with pytest.raises(ValueError, match="rule 'fast-cfg': personalized_steps changes only modes with a consistency"):
        FrontierRule("fast-cfg", mode="cfg", knob="w_text", values=(5.0, 7.5),
                     personalized_steps=PersonalizedSteps(every=3))


def test_an_interval_every_step_is_the_shaping_interval(sampler):
    """Outside [start, stop] the consistency term is left out, as ConsistencyShaping's interval does
    (here without running the row: the images agree up to the rounding of a smaller batch)."""
    from dreamguide.sampling import SampleSettings

    settings = SampleSettings(**SETTINGS, modes=("consistency", "pr"))
    by_rows = sampler.sample(dataclasses.replace(settings, personalized_steps=PersonalizedSteps(stop=0.5)),
                             progress=False)
    by_shaping = sampler.sample(dataclasses.replace(settings, shaping=guidance.ConsistencyShaping(stop=0.5)),
                                progress=False)
    for a, b in zip(by_rows, by_shaping):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_other_modes_of_the_batch_keep_their_rows(sampler):
    from dreamguide.sampling import SampleSettings

    settings = SampleSettings(**SETTINGS, modes=("cfg", "dreambooth", "pr"), batch_size=6)
    every = sampler.sample(settings, progress=False)
    skipped = sampler.sample(dataclasses.replace(settings, personalized_steps=PersonalizedSteps(every=3)),
                             progress=False)
    for a, b in zip(every, skipped):
        if a.mode != "parallel-rescaled":
            assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
    pr_images = [(a, b) for a, b in zip(every, skipped) if a.mode == "parallel-rescaled"]
    assert max(np.abs(_pixels(a) - _pixels(b)).max() for a, b in pr_images) > 0  # the schedule changed them


def test_items_of_different_schedules_never_share_a_batch(sampler):
    from dreamguide.sampling import SampleItem, _batches

    items = [SampleItem(prompt="a photo of sks dog", base_prompt="a photo of dog", mode="pr", seed=s, token="sks",
                        personalized_steps=PersonalizedSteps(every=1 + s % 2)) for s in range(5)]
    batches = _batches(items, 4)
    assert batches == [[0, 2, 4], [1, 3]]
    results = sampler.sample_items(items, steps=3, batch_size=4, progress=False)
    assert [r.seed for r in results] == [0, 1, 2, 3, 4]
    assert [r.metadata["personalized_steps"]["every"] for r in results] == [1, 2, 1, 2, 1]


def test_trace_marks_evaluated_and_reused_steps_and_leaves_out_the_off_ones(sampler):
    from dreamguide.sampling import SampleSettings

    schedule = PersonalizedSteps(every=2, stop=0.7)
    settings = SampleSettings(**SETTINGS, modes=("pr",), personalized_steps=schedule, trace=True)
    records = sampler.sample(settings, progress=False)[0].trace
    assert [(r["step"], r["personalized_row"]) for r in records] == [(0, E), (1, R), (2, E), (3, R), (4, E)]
    every = sampler.sample(dataclasses.replace(settings, personalized_steps=EVERY_STEP), progress=False)[0].trace
    assert len(every) == 7 and "personalized_row" not in every[0]


def test_settings_carry_the_schedule():
    from dreamguide.sampling import SampleSettings

    settings = SampleSettings(**SETTINGS, personalized_steps=PersonalizedSteps(every=3, carry="parts"))
    data = json.loads(json.dumps(settings.to_dict()))
    assert data["personalized_steps"] == {"every": 3, "start": 0.0, "stop": 1.0, "reuse": "hold", "carry": "parts"}
    assert SampleSettings.from_dict(data) == settings
    assert settings.items()[0].personalized_steps == settings.personalized_steps
    with pytest.raises(ValueError, match=r"personalized_steps must be a PersonalizedSteps, got dict; build it with .*from_dict"):
        SampleSettings(**SETTINGS, personalized_steps={"every": 3})


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_flags(tiny_sd15_dir, tmp_path):
    from dreamguide.cli import main
    from dreamguide.images import read_png_metadata

    import torch as _torch

    from dreamguide.lora_files import add_lora, save_lora
    from dreamguide.models import load_model

    model = load_model(tiny_sd15_dir)
    _torch.manual_seed(3)
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)
    lora = save_lora(model.unet, tmp_path / "lora.safetensors", "subject")
    common = ["sample", "--model", str(tiny_sd15_dir), "--lora", str(lora), "--token", "sks", "--class-word", "dog",
              "--prompt", "a sks dog", "--modes", "pr", "--steps", "4", "--height", "16", "--width", "16",
              "--no-progress"]
    assert main([*common, "--personalized-steps", "every=2,reuse=extrapolate", "--output", str(tmp_path / "a")]) == 0
    meta = read_png_metadata(tmp_path / "a" / "parallel-rescaled-seed0.png")
    assert meta["personalized_steps"] == {"every": 2, "start": 0.0, "stop": 1.0, "reuse": "extrapolate",
                                          "carry": "g_cons"}
    record = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert record["settings"]["personalized_steps"]["every"] == 2
    assert main([*common, "--every-step", "--output", str(tmp_path / "b")]) == 0
    assert read_png_metadata(tmp_path / "b" / "parallel-rescaled-seed0.png")["personalized_steps"]["every"] == 1
    assert main([*common, "--personalized-steps", "every=0", "--output", str(tmp_path / "c")]) == 2
    with pytest.raises(SystemExit):
        main([*common, "--personalized-steps", "3", "--every-step", "--output", str(tmp_path / "d")])
