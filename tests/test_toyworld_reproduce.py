"""Toy-world experiments as plans on the shared runner: the config, the runs, and scoring stored runs."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dreamguide.config import ConfigError
from dreamguide.toyworld.experiment import ToyExperiment, load_toy_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EARLIER_RUN = Path(__file__).resolve().parent / "data" / "toyworld-earlier-run"


def test_the_shipped_config_is_the_default_experiment():
    assert load_toy_experiment(CONFIGS / "toyworld-reproduce.toml") == load_toy_experiment() == ToyExperiment()
    experiment = ToyExperiment()
    main = experiment.world(next(p for p in experiment.plans if p.name == "main"), steps=None)
    # today's reproduction: 6 normal prompts (not the 20 of PROMPT_SETS["normal"]) and 7 stylized
    assert {name: len(t) for name, t in main.prompt_sets.items()} == {"normal": 6, "stylized": 7}
    assert len(main.cases()) == 6 * 2 * (6 + 7)
    plan = experiment.plan(next(p for p in experiment.plans if p.name == "variants"))
    assert [(s.mode, s.variant.name, s.variant.pr.normalization) for s in plan.settings()][:2] == [
        ("parallel-rescaled", "clip-negative", "clip-negative"), ("parallel-rescaled", "sample-clip-negative",
                                                                  "clip-negative")]


def test_an_experiment_is_a_config(tmp_path):
    config = tmp_path / "heldout.toml"
    config.write_text("""
subjects = ["sks"]
[[prompt_sets]]
name = "normal"                 # all 20 of PROMPT_SETS["normal"]
[[prompt_sets]]
name = "heldout"
templates = ["a {} on top of green grass", "a purple {}"]
[[variants]]
name = "half"
pr = { rescale = 0.5 }
[[plans]]
name = "sweep"
adapters = ["dco"]
prompt_sets = ["normal", "heldout"]
modes = ["consistency", "pr"]
w_text = [5.0, 7.5]
w_cons = [1.0, 2.0]
variants = ["half"]
[report]
pareto_plans = ["sweep"]
trace_plans = ["sweep"]
""")
    experiment = load_toy_experiment(config, ["steps=8"])
    (plan,) = experiment.plans
    world, run = experiment.world(plan, steps=experiment.steps), experiment.plan(plan)
    assert world.steps == 8 and len(world.cases()) == 20 + 2
    assert world.cases()[-1].token_prompt == "a purple sks ball"
    assert len(run.settings()) == 2 * 2 * 2 and {s.variant.pr.rescale for s in run.settings()} == {0.5}


@pytest.mark.parametrize("text, message", [
    ('[[plans]]\nname = "a"\nmodez = ["pr"]', r"x.toml: unknown key 'plans\[0\].modez'; did you mean 'modes'"),
    ('[[plans]]\nname = "a"\nprompt_sets = ["nope"]', "x.toml: plan 'a': unknown prompt set 'nope'"),
    ('[[plans]]\nname = "a"\nvariants = ["nope"]', "x.toml: plan 'a': unknown variant 'nope'"),
    ('[[plans]]\nname = "a"\nadapters = ["lora"]', "x.toml: plan 'a': adapter 'lora'"),
    ('[[plans]]\nname = "a"\nmodes = ["nope"]', "x.toml: unknown guidance mode 'nope'"),
    ('[[plans]]\nname = "a"\nw_text = ["7.5"]', r"x.toml: plans\[0\].w_text\[0\] must be a number"),
    ('[[plans]]\nname = "a"\nadapters = ["base"]', "x.toml: prompt set 'normal' has templates with '{}'"),
    ('[[plans]]\nname = "a"\n[report]\ntrace_plans = ["main"]', "x.toml: report names plan 'main'"),
    ('[[variants]]\nname = "v"\npr = { granularity = "sample" }', "x.toml: .*standardize.*needs granularity"),
    ('[[prompt_sets]]\nname = "mine"', "x.toml: prompt set 'mine' has no templates"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, text, message):
    (tmp_path / "x.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_toy_experiment(tmp_path / "x.toml")


def _tiny_experiment(subjects, adapters=("dco",)):
    """The default experiment at test size: 1 step, seed 0, 2-step adapters, 2 random base prompts."""
    import dataclasses

    from dreamguide.toyworld.experiment import load_toy_experiment

    experiment = load_toy_experiment(None, [f"subjects={list(subjects)!r}", "seeds=[0]", "steps=1",
                                            "personalize.steps=2", "personalize.batch_size=2"])
    return dataclasses.replace(
        experiment, prompt_sets=tuple(dataclasses.replace(s, count=2) if s.random else s for s in experiment.prompt_sets),
        plans=tuple(dataclasses.replace(p, adapters=adapters) if p.name == "main" else p for p in experiment.plans))


def test_reproduce_in_worker_processes_equals_one_process(tmp_path):
    import numpy as np
    from PIL import Image

    from dreamguide.toyworld.reproduce import generate, score

    experiment = _tiny_experiment(["sks", "zwx"])
    quiet = dict(log=lambda *a: None)
    serial = generate(experiment, tmp_path / "serial", plans=["main"], device="cpu", **quiet)
    sharded = generate(experiment, tmp_path / "sharded", workers=2, device="cpu", **quiet)
    # base ((6 + 3 with the default DDIM update) weights x 2 prompt sets x 2 prompts) + main (2 subjects x
    # 13 prompts x 4 modes) + the two sweeps (2 x 4 prompts x 9 weight pairs x 2 modes) + variants (2 x 4 x 5)
    assert sharded["images"] == 9 * 2 * 2 + 2 * 13 * 4 + 2 * (2 * 4 * 9 * 2) + 2 * 4 * 5
    assert serial["images"] == 2 * 13 * 4
    assert sharded["workers"] == 2 and not sharded["pending_groups"]
    assert (tmp_path / "sharded" / "adapters" / "zwx-dco" / "pytorch_lora_weights.safetensors").exists()

    def images(folder):
        rows = [row for line in (folder / "main" / "manifest").glob("*.jsonl")
                for record in map(json.loads, line.read_text().splitlines()) for row in record["rows"]]
        return {r["key"]: np.asarray(Image.open(folder / "main" / r["image"]), dtype=int) for r in rows}

    a, b = images(tmp_path / "serial"), images(tmp_path / "sharded")
    assert a.keys() == b.keys() and len(a) == 2 * 13 * 4
    assert all(np.abs(a[k] - b[k]).max() <= 1 for k in a)
    results = score(experiment, tmp_path / "sharded", **quiet)
    plans = results["plans"]
    assert list(plans) == ["base", "base-unclipped", "main", "sweep-low", "sweep-paper", "variants"]
    assert [(e["prompt_set"], e["mode"]) for e in plans["main"]["summary"]] == [
        (s, m) for s in ("normal", "stylized") for m in ("dreambooth", "consistency", "parallel-rescaled", "orthogonal")]
    assert all(e["units"] == 2 * (6 if e["prompt_set"] == "normal" else 7) for e in plans["main"]["summary"])
    assert [d["prompt_set"] for d in plans["main"]["differences"]] == ["normal", "stylized"]
    for name in ("sweep-low", "sweep-paper"):
        assert len(plans[name]["summary"]) == 2 * 9 and len(plans[name]["differences"]) == 9
        assert all(d["identity"]["units"] == 2 * 4 for d in plans[name]["differences"])
    assert [e["variant"] for e in plans["variants"]["summary"]] == [v for v in experiment.plans[-1].variants]
    assert [e["mode"] for e in plans["variants"]["reference"]] == ["dreambooth", "consistency", "parallel-rescaled",
                                                                   "orthogonal"]
    assert len(plans["base"]["summary"]) == 6 * 2 and len(plans["base-unclipped"]["summary"]) == 3 * 2
    assert set(results["timesteps"]) == {f"{m}|{s}" for m in ("consistency", "parallel-rescaled")
                                         for s in ("normal", "stylized")}
    for name in ("results.md", "pareto.png", "timesteps.png"):
        assert (tmp_path / "sharded" / name).is_file()




def test_an_adapter_with_nan_weights_is_skipped_and_listed_in_the_results(tmp_path, capsys):
    from safetensors.torch import load_file

    from dreamguide.atomic import save_safetensors
    from dreamguide.cli import main
    from dreamguide.filenames import LORA_FILE
    from dreamguide.toyworld.personalize import adapter_dir
    from dreamguide.toyworld.reproduce import generate, score

    adapters = tmp_path / "adapters"
    for subject in ("sks", "zwx"):
        shutil.copytree(adapter_dir("sks", "dreambooth"), adapters / f"{subject}-dreambooth")
    tensors = load_file(str(adapters / "zwx-dreambooth" / LORA_FILE))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_safetensors(tensors, adapters / "zwx-dreambooth" / LORA_FILE)
    quiet = dict(log=lambda *a: None)
    experiment = _tiny_experiment(["sks", "zwx"], adapters=("dreambooth",))
    record = generate(experiment, tmp_path / "out", plans=["main"], device="cpu", adapters_from=adapters, **quiet)
    assert record["skipped_groups"] == {"main": 13 * 2} and not record["pending_groups"]  # 13 prompts x 2 calls
    results = score(experiment, tmp_path / "out", **quiet)
    (entry,) = results["plans"]["main"]["skipped"]
    assert (entry["subject"], entry["adapter"], entry["found"], entry["missing"]) == ("zwx", "dreambooth",
                                                                                      "before sampling", 13 * 4)
    assert f"LoRA file {adapters / 'zwx-dreambooth' / LORA_FILE} holds NaN or infinite values: {key!r}" \
        in entry["reason"]
    assert "**Skipped adapters**" in (tmp_path / "out" / "results.md").read_text()
    # the other subject's numbers are those of an experiment without zwx
    alone = _tiny_experiment(["sks"], adapters=("dreambooth",))
    generate(alone, tmp_path / "alone", plans=["main"], device="cpu", adapters_from=adapters, **quiet)
    assert score(alone, tmp_path / "alone", **quiet)["plans"]["main"]["summary"] == results["plans"]["main"]["summary"]
    assert main(["toyworld", "reproduce", "--output", str(tmp_path / "out"), "--score-only"]) == 3
    assert "subject 'zwx' (dreambooth adapter) in plan main: 52 of 52 images not made" in capsys.readouterr().err

    # finite but huge weights pass the file check; the overflowing samples skip the adapter, naming its folder
    from dreamguide.evaluation.protocol import Plan
    from dreamguide.evaluation.runner import run_shard, skipped_adapters
    from dreamguide.toyworld.bench_world import ToyBenchWorld

    save_safetensors({k: torch.full_like(v, 1e30) for k, v in tensors.items()}, adapters / "zwx-dreambooth" / LORA_FILE)
    world = ToyBenchWorld(subjects=["sks", "zwx"], adapters=("dreambooth",), prompt_sets={"p": ("a {} on the beach",)},
                          steps=1, adapters_dir=adapters, device="cpu")
    plan = Plan(modes=("pr",), seeds=(0,))
    counts = run_shard(world, plan, tmp_path / "huge", **quiet)
    assert (counts["ran"], counts["skipped"]) == (1, 1)
    (entry,) = skipped_adapters(world, plan, tmp_path / "huge")
    assert (entry["subject"], entry["adapter"], entry["found"]) == ("zwx", "dreambooth", "while sampling")
    assert "became non-finite" in entry["reason"] and f"(adapter {adapters / 'zwx-dreambooth'})" in entry["reason"]


def test_score_only_on_a_run_of_the_earlier_layout_gives_the_earlier_numbers(tmp_path):
    from dreamguide.toyworld.reproduce import score

    folder = tmp_path / "run"
    shutil.copytree(EARLIER_RUN, folder)
    experiment = load_toy_experiment(None, ["subjects=['sks', 'zwx']", "seeds=[0]", "steps=4"])
    experiment = dataclasses.replace(experiment, prompt_sets=tuple(
        dataclasses.replace(s, count=8) if s.random else s for s in experiment.prompt_sets))
    results = score(experiment, folder, log=lambda message: None)
    earlier = json.loads((EARLIER_RUN / "earlier-results.json").read_text())
    compared, mismatches = compare_with_earlier_results(earlier, results)
    assert compared == 716 and mismatches == []
    # the run is now in per-plan runner folders: scoring it again gives the same results
    assert not (folder / "results.csv").exists() and (folder / "main" / "run.json").is_file()
    again = score(experiment, folder, log=lambda message: None)
    assert again["plans"] == results["plans"] and again["timesteps"] == results["timesteps"]
    markdown = (folder / "results.md").read_text()
    cell = next(e for e in results["plans"]["main"]["summary"] if e["prompt_set"] == "stylized"
                and e["adapter"] == "dco" and e["mode"] == "parallel-rescaled")
    assert f"{cell['identity']:.3f} [{cell['identity_low']:.3f}, {cell['identity_high']:.3f}]" in markdown


def compare_with_earlier_results(old: dict, new: dict) -> tuple[int, list]:
    """Every figure of an earlier ``results.json`` against the same figure of ours: (compared, mismatches).

    Earlier figures were rounded to 4 decimals (the base-model bar not at all: compared at 4 too).
    """
    from dreamguide.guidance import get_mode

    plans, compared, mismatches = new["plans"], 0, []
    metrics = ("text_alignment", "identity", "carries_prompt", "follows_style")

    def check(where, a, b):
        nonlocal compared
        compared += 1
        if a is None or b is None or not (round(a, 4) == round(b, 4) or math.isnan(a) and math.isnan(b)):
            mismatches.append((where, a, b))

    def entry(plan, **fields):
        found = [e for e in plans[plan]["summary"] if all(e[k] == v for k, v in fields.items())]
        assert len(found) == 1, (plan, fields, found)
        return found[0]

    def same_summary(where, a, b):
        check(f"{where} images", a["images"], b["images"])
        check(f"{where} units", a["units"], b["units"])
        for m in metrics:
            for suffix in ("", "_low", "_high"):
                check(f"{where} {m}{suffix}", a[m + suffix], b[m + suffix])

    def same_difference(where, a, b):
        for m in metrics:
            for k in ("mean", "low", "high", "units"):
                check(f"{where} {m} {k}", a[m][k], b[m][k])

    for e in old["main"]:
        same_summary(f"main {e['method']} {e['prompt_set']} {e['mode']}", e,
                     entry("main", adapter=e["method"], prompt_set=e["prompt_set"], mode=get_mode(e["mode"]).name))
    for e in old["sweep"]:
        same_summary(f"sweep {e['grid']} {e['mode']} {e['w_text']} {e['w_cons']}", e,
                     entry(f"sweep-{e['grid']}", mode=get_mode(e["mode"]).name, w_text=e["w_text"], w_cons=e["w_cons"]))
    for e in old["variants"]:
        same_summary(f"variant {e['variant']}", e, entry("variants", variant=e["variant"]))
    for e in old["variant_reference"]:
        (ours,) = [r for r in plans["variants"]["reference"] if r["mode"] == get_mode(e["mode"]).name]
        same_summary(f"variant reference {e['mode']}", e, ours)
    for key, prompt_set in (("pr_vs_consistency", "stylized"), ("pr_vs_consistency_normal", "normal")):
        (ours,) = [d for d in plans["main"]["differences"] if d["prompt_set"] == prompt_set]
        same_difference(key, old[key], ours)
    for d in old["sweep_pr_vs_consistency"]:
        (ours,) = [o for name in ("sweep-low", "sweep-paper") for o in plans[name]["differences"]
                   if (o["w_text"], o["w_cons"]) == (d["w_text"], d["w_cons"])]
        same_difference(f"sweep difference {d['w_text']} {d['w_cons']}", d, ours)
    for b in old["base_bar"]:
        ours = entry("base" if b["clipped_model_output"] else "base-unclipped", prompt_set=f"random-{b['prompt_set']}",
                     w_text=b["w_text"])
        check(f"base bar {b['w_text']} {b['prompt_set']} images", b["images"], ours["images"])
        for a, m in (("class", "carries_class"), ("scene", "carries_scene"), ("style", "follows_style"),
                     ("all_three", "carries_prompt")):
            check(f"base bar {b['w_text']} {b['prompt_set']} {a}", b[a], ours[m])
    for key, curve in old["timesteps"].items():
        mode, prompt_set = key.split("|")
        ours = new["timesteps"][f"{get_mode(mode).name}|{prompt_set}"]
        check(f"timesteps {key} images", curve["n"], ours["images"])
        for name in ("timestep", "mean", "std", "fraction_negative"):
            for step, (a, b) in enumerate(zip(curve[name], ours[name], strict=True)):
                check(f"timesteps {key} {name} step {step}", a, b)
    return compared, mismatches


def test_adapters_from_with_several_workers_starts_no_empty_pool(tmp_path, monkeypatch):
    # with adapters_from nothing is fine-tuned: several workers must not ask for a pool of 0 processes.
    # The pools run in this process here (a stand-in that refuses 0 processes, as multiprocessing does).
    import multiprocessing

    from dreamguide.toyworld.personalize import adapter_dir
    from dreamguide.toyworld.reproduce import generate

    pools = []

    class InlinePool:
        def __init__(self, processes):
            if processes < 1:
                raise ValueError("Number of processes must be at least 1")
            pools.append(processes)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, function, jobs, chunksize=1):
            return [function(job) for job in jobs]

    class InlineContext:
        Pool = InlinePool

    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: InlineContext())
    adapters = tmp_path / "adapters"
    shutil.copytree(adapter_dir("sks", "dreambooth"), adapters / "sks-dreambooth")
    experiment = _tiny_experiment(["sks"], adapters=("dreambooth",))
    record = generate(experiment, tmp_path / "out", plans=["main"], workers=2, device="cpu", adapters_from=adapters,
                      log=lambda *a: None)
    assert pools == [2]  # the sampling shards only: no pool for the fine-tuning of no adapter
    assert record["images"] > 0 and not record["pending_groups"]
