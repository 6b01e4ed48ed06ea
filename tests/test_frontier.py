"""Frontier analysis: curves, identity at matched text alignment, paired bootstrap intervals."""

import dataclasses

import numpy as np
import pytest

from dreamguide.evaluation import frontier


def _rows(rule, knobs, text_fn, identity_fn, units=12, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for knob in knobs:
        for u in range(units):
            rows.append({"rule": rule, "knob": knob, "subject": f"s{u % 3}", "method": "dco", "template": f"t{u}",
                         "text": text_fn(knob) + noise * rng.standard_normal(),
                         "identity": identity_fn(knob) + noise * rng.standard_normal()})
    return rows


def test_identity_at_interpolates_along_text_and_is_nan_outside():
    c = frontier.Curve(np.array([0.0, 1.0, 2.0]), np.array([0.8, 0.6, 0.4]), np.array([0.2, 0.4, 0.6]))
    got = frontier.identity_at(c, np.array([0.7, 0.5, 0.3, 0.9]))
    np.testing.assert_allclose(got[:2], [0.3, 0.5])
    assert np.isnan(got[2]) and np.isnan(got[3])


def test_a_curve_shifted_up_by_a_constant_gains_that_constant_everywhere():
    base = _rows("cons", [0.0, 1.0, 2.0, 3.0], lambda k: 0.8 - 0.1 * k, lambda k: 0.3 + 0.1 * k)
    better = _rows("new", [0.0, 1.0, 2.0, 3.0], lambda k: 0.8 - 0.1 * k, lambda k: 0.35 + 0.1 * k)
    units, table = frontier.unit_table(base + better)
    result = frontier.compare(table, len(units), "new", "cons", samples=200)
    np.testing.assert_allclose(result["identity_difference"], 0.05, atol=1e-4)
    assert result["mean_gain"] == pytest.approx(0.05, abs=1e-4)
    assert result["dominates"] and not result["measurably_lower_somewhere"]


def test_the_same_curve_is_not_a_gain_and_a_worse_one_is_measurably_lower():
    base = _rows("cons", [0.0, 1.0, 2.0], lambda k: 0.8 - 0.1 * k, lambda k: 0.3 + 0.1 * k, noise=0.01)
    same = [{**r, "rule": "copy"} for r in base]
    worse = _rows("worse", [0.0, 1.0, 2.0], lambda k: 0.8 - 0.1 * k, lambda k: 0.25 + 0.1 * k, noise=0.01, seed=1)
    units, table = frontier.unit_table(base + same + worse)
    same_result = frontier.compare(table, len(units), "copy", "cons", samples=200)
    assert same_result["mean_gain"] == 0.0 and not same_result["dominates"]
    worse_result = frontier.compare(table, len(units), "worse", "cons", samples=200)
    assert worse_result["measurably_lower_somewhere"] and worse_result["mean_gain_high"] < 0


def test_curves_without_a_common_text_range_are_reported_as_such():
    base = _rows("cons", [0.0, 1.0], lambda k: 0.8 - 0.1 * k, lambda k: 0.3 + 0.1 * k)
    other = _rows("far", [0.0, 1.0], lambda k: 0.3 - 0.1 * k, lambda k: 0.3 + 0.1 * k)
    units, table = frontier.unit_table(base + other)
    assert frontier.compare(table, len(units), "far", "cons", samples=50)["common_text_range"] is None


def test_units_missing_from_a_point_are_dropped_everywhere():
    rows = _rows("cons", [0.0, 1.0], lambda k: 0.5, lambda k: 0.5, units=4)
    rows = [r for r in rows if not (r["knob"] == 1.0 and r["template"] == "t0")]
    units, table = frontier.unit_table(rows)
    assert len(units) == 3 and all(len(t) == 3 for t, _ in table.values())


def test_paired_at_knob_gives_the_mean_difference_and_calls_a_tie_non_inferior():
    ref = _rows("pr", [1.5, 3.0], lambda k: 0.6, lambda k: 0.5, noise=0.02)
    same = [{**r, "rule": "fast"} for r in ref]
    worse = [{**r, "rule": "worse", "identity": r["identity"] - 0.05} for r in ref]
    units, table = frontier.unit_table(ref + same + worse)
    tie = frontier.paired_at_knob(table, len(units), "fast", "pr", samples=100)
    assert tie["non_inferior"] and [p["knob"] for p in tie["points"]] == [1.5, 3.0]
    assert all(p["text"] == p["identity"] == p["identity_low"] == p["identity_high"] == 0.0 for p in tie["points"])
    lower = frontier.paired_at_knob(table, len(units), "worse", "pr", samples=100)
    assert not lower["non_inferior"]
    assert all(p["identity"] == pytest.approx(-0.05) and p["identity_high"] == pytest.approx(-0.05)
               for p in lower["points"])
    with pytest.raises(KeyError, match="share no knob value"):
        frontier.paired_at_knob({("a", 1.0): table[("pr", 1.5)], ("b", 2.0): table[("pr", 3.0)]}, len(units), "a", "b")


# ---------------------------------------------------------------------------------------------
# The experiment: rules become plans and variants; a stored run reads back to its recorded analysis

from pathlib import Path  # noqa: E402

from dreamguide.config import ConfigError  # noqa: E402
from dreamguide.guidance import ConsistencyShaping  # noqa: E402
from dreamguide.toyworld import frontier as toy_frontier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_config_spells_out_the_defaults():
    assert toy_frontier.load_frontier_experiment(ROOT / "configs" / "toyworld-frontier.toml") == \
        toy_frontier.load_frontier_experiment()


def test_rules_become_one_plan_each_with_their_knob_as_weights_or_variants():
    rules = (
        toy_frontier.FrontierRule("consistency", values=(0.0, 3.0)),
        toy_frontier.FrontierRule("late", values=(1.0, 2.0), shaping=ConsistencyShaping(start=0.4)),
        toy_frontier.FrontierRule("bound", "norm-bounded", "shaping.norm_bound", (0.1, 0.2), w_cons=6.0),
        toy_frontier.FrontierRule("text", knob="w_text", values=(3.0, 5.0)),
    )
    experiment = toy_frontier.FrontierExperiment(rules=rules).experiment()
    plans = {p.name: p for p in experiment.plans}
    variants = {v.name: v for v in experiment.variants}
    assert plans["consistency"].w_cons == (0.0, 3.0) and plans["consistency"].variants == ()
    assert plans["late"].w_cons == (1.0, 2.0) and variants[plans["late"].variants[0]].shaping.start == 0.4
    assert plans["bound"].w_cons == (6.0,) and plans["bound"].modes == ("norm-bounded",)
    assert [variants[n].shaping.norm_bound for n in plans["bound"].variants] == [0.1, 0.2]
    assert plans["text"].w_text == (3.0, 5.0)
    rule = rules[2]
    assert rule.knob_value({"variant": rule.variant_name(0.2)}) == 0.2
    assert rules[3].knob_value({"w_text": 5.0, "w_cons": 3.0}) == 5.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="a/b", values=(1.0, 2.0)), "plain name"),
    (dict(name="r", values=(1.0,)), "at least two different knob values"),
    (dict(name="r", knob="shaping.nope", values=(1.0, 2.0)), "names no field of ConsistencyShaping"),
    (dict(name="r", knob="shaping.stop", values=(0.5, 1.5)), "stop"),
    (dict(name="r", knob="speed", values=(1.0, 2.0)), "must be w_cons, w_text"),
    (dict(name="r", mode="nope", values=(1.0, 2.0)), "unknown guidance mode 'nope'; choose one of cfg"),
])
def test_bad_rules_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        toy_frontier.FrontierRule(**kwargs)


def test_unfinished_rules_are_compared_on_shared_units_or_finished_points_only():
    from dreamguide.toyworld.frontier import FrontierExperiment, FrontierRule, _complete_rules

    rules = (FrontierRule("consistency", values=(0.0, 1.0)), FrontierRule("late", values=(0.0, 1.0)),
             FrontierRule("barely", values=(0.0, 1.0)))
    unit = {"adapter": "dco", "template": "t", "prompt_set": "normal"}
    rows = [{**unit, "rule": r, "knob": k, "subject": f"s{u}", "prompt_index": 0}
            for r in ("consistency", "late") for k in (0.0, 1.0) for u in range(4)]
    rows = [r for r in rows if not (r["rule"] == "late" and r["knob"] == 1.0 and r["subject"] == "s3")]
    rows += [{**unit, "rule": "barely", "knob": 0.0, "subject": "s0", "prompt_index": 0}]
    shared = FrontierExperiment(seeds=(0,), rules=rules)
    kept, incomplete = _complete_rules(shared, rows)
    assert {r["rule"] for r in kept} == {"consistency", "late"}  # 'late' covers 3 of 4 units, 'barely' 0
    assert incomplete == {"late": {"done": 0.875, "values_kept": [0.0, 1.0]},
                          "barely": {"done": 0.125, "values_kept": []}}
    finished = dataclasses.replace(shared, unfinished="finished-points")
    kept, incomplete = _complete_rules(finished, rows)
    assert {r["rule"] for r in kept} == {"consistency"} and incomplete["late"]["values_kept"] == []
    with pytest.raises(ConfigError, match="unfinished = 'some'; choose one of shared-units, finished-points"):
        dataclasses.replace(shared, unfinished="some").validate("x.toml")


def test_a_reference_must_be_another_rule_with_the_same_knob(tmp_path):
    from dreamguide.toyworld.frontier import FrontierExperiment, FrontierRule

    base = FrontierRule("consistency", values=(0.0, 1.5, 3.0))
    with pytest.raises(ConfigError, match="rule 'fast' has reference 'nope', which is not another rule"):
        FrontierExperiment(rules=(base, FrontierRule("fast", values=(1.5, 3.0), reference="nope"))).validate("f")
    with pytest.raises(ConfigError, match="must sweep the same knob over shared values"):
        FrontierExperiment(rules=(base, FrontierRule("fast", knob="w_text", values=(5.0, 7.5),
                                                     reference="consistency"))).validate("f")


def test_a_config_without_its_baseline_is_refused(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('baseline = "nope"\n[[rules]]\nname = "consistency"\nvalues = [0.0, 1.0]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="baseline 'nope' is not one of the rules"):
        toy_frontier.load_frontier_experiment(path)


@pytest.mark.parametrize("run, config", [("run2", "toyworld-frontier-adaptive.toml"),
                                         ("run3", "toyworld-frontier-steps.toml"),
                                         ("run4", "toyworld-frontier-4.toml"),
                                         ("heldout", "toyworld-frontier-heldout.toml")])
def test_a_stored_gpu_run_reads_back_to_its_recorded_analysis(tmp_path, run, config):
    """docs/results/frontier/run2 to run4 and heldout (unfinished rules, per-knob pairs with PR on every
    step, floored schedules, held-out prompts and seeds): the manifests the GPU run wrote give the
    recorded frontier.json."""
    import json
    import tarfile

    stored = ROOT / "docs" / "results" / "frontier" / run
    with tarfile.open(stored / "manifests.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    experiment = toy_frontier.load_frontier_experiment(ROOT / "configs" / config)
    if (stored / "generate.json").is_file():
        (tmp_path / "generate.json").write_text((stored / "generate.json").read_text(), encoding="utf-8")
    results = toy_frontier.write_frontier_results(experiment, tmp_path, log=lambda _: None)
    recorded = json.loads((stored / "frontier.json").read_text())
    assert results["slices"] == recorded["slices"]
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_frontier_command_samples_every_rule_on_the_toy_world(tmp_path, capsys):
    """Tiny end to end: the bundled adapter, two rules (one with a shaping switch), one prompt per set."""
    import json

    import numpy as np
    from PIL import Image

    from dreamguide.cli import main
    from dreamguide.toyworld.personalize import adapter_dir

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "sks-dreambooth").symlink_to(adapter_dir("sks", "dreambooth"), target_is_directory=True)
    config = tmp_path / "frontier.toml"
    config.write_text(
        'subjects = ["sks"]\nadapters = ["dreambooth"]\nseeds = [0]\nsteps = 2\nbootstrap_samples = 20\n'
        'prompt_sets = [{name = "normal", templates = ["a red {}"]}, '
        '{name = "stylized", templates = ["a pencil sketch of a {}"]}]\n'
        '[[rules]]\nname = "consistency"\nvalues = [0.0, 3.0]\n'
        '[[rules]]\nname = "late"\nvalues = [3.0, 6.0]\nshaping = {start = 0.5}\n', encoding="utf-8")
    out = tmp_path / "run"
    assert main(["toyworld", "frontier", "--config", str(config), "--output", str(out), "--adapters-from",
                 str(adapters), "--workers", "1", "--device", "cpu"]) == 0
    results = json.loads((out / "frontier.json").read_text())
    assert [s["prompt_set"] for s in results["slices"]] == ["normal", "stylized"]
    assert set(results["slices"][0]["curves"]) == {"consistency", "late"}
    assert results["slices"][0]["compared"][0]["rule"] == "late"
    rows = toy_frontier.rule_rows(toy_frontier.load_frontier_experiment(config), out)
    assert sorted(r["knob"] for r in rows["late"]) == [3.0, 3.0, 6.0, 6.0]

    def pixels(rule, knob, prompt_set):
        row = next(r for r in rows[rule] if r["knob"] == knob and r["prompt_set"] == prompt_set)
        return np.asarray(Image.open(out / rule / row["image"]))

    # consistency only in the second half of the two steps: not the same image as at every step
    assert not np.array_equal(pixels("late", 3.0, "normal"), pixels("consistency", 3.0, "normal"))


def test_frontier_command_skips_an_adapter_with_nan_weights_and_lists_it(tmp_path, capsys):
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    from dreamguide.atomic import save_safetensors
    from dreamguide.cli import main
    from dreamguide.filenames import LORA_FILE
    from dreamguide.toyworld.personalize import adapter_dir

    adapters = tmp_path / "adapters"
    for subject in ("sks", "zwx"):
        shutil.copytree(adapter_dir("sks", "dreambooth"), adapters / f"{subject}-dreambooth")
    tensors = load_file(str(adapters / "zwx-dreambooth" / LORA_FILE))
    save_safetensors({k: torch.full_like(v, float("inf")) for k, v in tensors.items()},
                     adapters / "zwx-dreambooth" / LORA_FILE)
    config = tmp_path / "frontier.toml"
    config.write_text(
        'subjects = ["sks", "zwx"]\nadapters = ["dreambooth"]\nseeds = [0]\nsteps = 1\nbootstrap_samples = 20\n'
        'prompt_sets = [{name = "normal", templates = ["a red {}"]}]\n'
        '[[rules]]\nname = "consistency"\nvalues = [0.0, 3.0]\n', encoding="utf-8")
    out = tmp_path / "run"
    assert main(["toyworld", "frontier", "--config", str(config), "--output", str(out), "--adapters-from",
                 str(adapters), "--workers", "1", "--device", "cpu"]) == 3
    assert "subject 'zwx' (dreambooth adapter) in plan consistency: 2 of 2 images not made: LoRA file" \
        in capsys.readouterr().err
    results = json.loads((out / "frontier.json").read_text())
    ((rule, (entry,)),) = results["skipped"].items()
    assert rule == "consistency" and (entry["subject"], entry["found"]) == ("zwx", "before sampling")
    rows = toy_frontier.rule_rows(toy_frontier.load_frontier_experiment(config), out)
    assert {r["subject"] for r in rows["consistency"]} == {"sks"} and results["slices"][0]["units"] == 1
