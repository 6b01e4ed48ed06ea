"""The benchmark runner on a cheap in-code world: resume after a kill, sharding, tables, figures."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamguide.denoise import NonFiniteError
from dreamguide.evaluation.protocol import Generated, Plan, PromptCase, UnusableAdapter, World
from dreamguide.evaluation.report import (
    NO_DIFFERENCE,
    ReportSettings,
    bootstrap_interval,
    comparisons,
    paired_difference,
    read_rows,
    summarize,
    unit_means,
)
from dreamguide.evaluation.runner import (
    RunMismatch,
    build_jobs,
    group_jobs,
    merge_results,
    rescore,
    run_benchmark,
    run_shard,
    shard,
)
from dreamguide.evaluation.suites.dreambench_data import STYLIZED_PROMPTS, load_dreambench, parse_prompts_and_classes

DREAMBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "dreambench"
needs_dreambench = pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="../shared/dreambench is not present")


class CountingWorld:
    """Images are a pure function of the job; metrics are pixel statistics; pr scores higher text alignment."""

    name = "counting"

    def __init__(self, subjects=("s1", "s2", "s3"), prompts=3):
        self.subjects, self.prompts = subjects, prompts
        self.generated: list[str] = []
        self.prepared = 0

    def prepare(self):
        self.prepared += 1

    def cases(self):
        return [PromptCase(s, "toy", ps, i, f"a sks toy {ps} {i}", f"a toy {ps} {i}")
                for s in self.subjects for ps in ("dreambench", "stylized") for i in range(self.prompts)]

    def metric_backbones(self):
        return {"ident": "pixel-mean", "text": "pixel-std"}

    def metric_kinds(self):
        return {"ident": "identity", "text": "text"}

    def describe(self):
        return {"subjects": list(self.subjects), "prompts": self.prompts}

    def generate(self, jobs):
        out = []
        for job in jobs:
            self.generated.append(job.key)
            seed = int(hashlib.sha256(job.key.encode()).hexdigest()[:8], 16)
            rng = np.random.default_rng(seed)
            pixels = (rng.random((8, 8, 3)) * 255).astype("uint8")
            trace = None
            if job.setting.w_cons is not None:
                trace = [{"step": i, "timestep": 900 - 100 * i, "mean": float(rng.normal(-0.1 * i)),
                          "quantiles": {"0.05": -1.0, "0.25": -0.5, "0.5": 0.0, "0.75": 0.5, "0.95": 1.0},
                          "fraction_negative": 0.1 * i} for i in range(4)]
            out.append(Generated(Image.fromarray(pixels), trace))
        return out

    def score(self, jobs, images):
        rows = []
        for job, image in zip(jobs, images):
            a = np.asarray(image, dtype=np.float64) / 255
            bonus = 0.3 if job.setting.mode == "parallel-rescaled" else 0.0
            rows.append({"ident": float(a.mean()), "text": float(a.std()) + bonus})
        return rows


PLAN = Plan(modes=("cfg", "consistency", "pr"), w_text=(7.5,), w_cons=(1.0, 3.0), seeds=(0, 1))
QUIET = dict(log=lambda message: None)


def _csv(output):
    return (Path(output) / "results.csv").read_text()


def test_world_protocol_and_job_list():
    world = CountingWorld()
    assert isinstance(world, World)
    jobs = build_jobs(world, PLAN)
    # per case: cfg once (no w_cons) + 2 modes x 2 w_cons, each with 2 seeds
    assert len(jobs) == len(world.cases()) * (1 + 2 * 2) * 2
    assert len({j.key for j in jobs}) == len(jobs)
    groups = group_jobs(jobs)
    assert all(len({(j.case, j.setting.w_text, j.setting.w_cons) for j in g}) == 1 for g in groups)
    halves = shard(groups, 0, 2) + shard(groups, 1, 2)
    assert sorted(j.key for g in halves for j in g) == sorted(j.key for j in jobs)
    with pytest.raises(ValueError, match="outside"):
        shard(groups, 2, 2)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight = CountingWorld()
    rows = run_benchmark(straight, PLAN, tmp_path / "straight", ReportSettings(bootstrap_samples=50),
                         process_index=0, num_processes=1, **QUIET)
    assert len(rows) == len(build_jobs(straight, PLAN))

    world = CountingWorld()
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(world, PLAN, tmp_path / "resumed", process_index=0, num_processes=1, stop_after_groups=4,
                      **QUIET)
    assert not (tmp_path / "resumed" / "results.csv").exists()
    done_before = list(world.generated)
    # a kill in the middle of writing a manifest line leaves a torn tail
    manifest = tmp_path / "resumed" / "manifest" / "rank-0.jsonl"
    with open(manifest, "ab") as handle:
        handle.write(b'{"group": "torn')
    resumed = run_benchmark(world, PLAN, tmp_path / "resumed", ReportSettings(bootstrap_samples=50),
                            process_index=0, num_processes=1, **QUIET)
    # nothing generated twice, nothing lost, identical rows and images
    assert len(world.generated) == len(set(world.generated)) == len(straight.generated)
    assert set(done_before) < set(world.generated)
    assert _csv(tmp_path / "resumed") == _csv(tmp_path / "straight")
    assert resumed == rows
    for row in rows:
        assert (tmp_path / "resumed" / row["image"]).read_bytes() == (tmp_path / "straight" / row["image"]).read_bytes()
    lines = manifest.read_text().splitlines()
    assert len(lines) == len(group_jobs(build_jobs(world, PLAN))) and all(json.loads(line) for line in lines)
    # running a finished benchmark again generates nothing
    run_benchmark(world, PLAN, tmp_path / "resumed", ReportSettings(bootstrap_samples=50), 0, 1, **QUIET)
    assert len(world.generated) == len(straight.generated)


def test_two_shards_merge_to_the_single_process_result(tmp_path):
    single = run_benchmark(CountingWorld(), PLAN, tmp_path / "one", ReportSettings(bootstrap_samples=50), 0, 1, **QUIET)
    a, b = CountingWorld(), CountingWorld()
    assert run_benchmark(b, PLAN, tmp_path / "two", ReportSettings(bootstrap_samples=50), 1, 2, **QUIET) is None
    merged = run_benchmark(a, PLAN, tmp_path / "two", ReportSettings(bootstrap_samples=50), 0, 2, **QUIET)
    assert not set(a.generated) & set(b.generated)
    assert merged == single
    assert _csv(tmp_path / "two") == _csv(tmp_path / "one")
    for name in ("overall.csv", "per_subject.csv", "comparisons.csv", "summary.md"):
        assert (tmp_path / "two" / "tables" / name).read_text() == (tmp_path / "one" / "tables" / name).read_text()


def test_batched_groups_time_budget_and_rescoring(tmp_path):
    single = run_benchmark(CountingWorld(), PLAN, tmp_path / "one", ReportSettings(bootstrap_samples=20), 0, 1, **QUIET)
    batched = CountingWorld()
    batched.groups_per_call = 7
    calls = []
    generate = batched.generate
    batched.generate = lambda jobs: calls.append(len(jobs)) or generate(jobs)
    # past its deadline a shard starts nothing and leaves every group for the next run
    counts = run_shard(batched, PLAN, tmp_path / "batched", deadline=0.0, **QUIET)
    assert counts["ran"] == 0 and counts["pending"] == counts["groups"] and not calls
    assert run_benchmark(batched, PLAN, tmp_path / "batched", ReportSettings(bootstrap_samples=20), 0, 1,
                         **QUIET) == single
    groups = group_jobs(build_jobs(batched, PLAN))
    assert calls == [sum(len(g) for g in groups[i : i + 7]) for i in range(0, len(groups), 7)]
    # scoring the stored images again gives the same rows; another scorer replaces the scores
    manifest = (tmp_path / "one" / "manifest" / "rank-0.jsonl").read_text()
    assert rescore([(CountingWorld(), PLAN, tmp_path / "one")], **QUIET) == len(single)
    assert (tmp_path / "one" / "manifest" / "rank-0.jsonl").read_text() == manifest

    class Stricter(CountingWorld):
        def score(self, jobs, images):
            return [{**row, "text": row["text"] - 1} for row in super().score(jobs, images)]

    rescore([(Stricter(), PLAN, tmp_path / "one")], **QUIET)
    rows, missing = merge_results(CountingWorld(), PLAN, tmp_path / "one")
    assert not missing and [r["text"] for r in rows] == pytest.approx([r["text"] - 1 for r in single])


def test_a_different_run_in_the_same_folder_is_refused(tmp_path):
    run_benchmark(CountingWorld(prompts=1), PLAN, tmp_path, ReportSettings(bootstrap_samples=20), 0, 1, **QUIET)
    other = Plan(modes=("pr",), w_cons=(2.0,), seeds=(0,))
    with pytest.raises(RunMismatch, match="plan"):
        run_benchmark(CountingWorld(prompts=1), other, tmp_path, None, 0, 1, **QUIET)


def test_tables_and_figures(tmp_path):
    world = CountingWorld()
    rows = run_benchmark(world, PLAN, tmp_path, ReportSettings(bootstrap_samples=200, identity_metric="ident",
                                                               text_metric="text"), 0, 1, **QUIET)
    assert read_rows(tmp_path / "results.csv") == rows
    summary = (tmp_path / "tables" / "summary.md").read_text()
    assert "pixel-mean" in summary and "pixel-std" in summary and "base prompt" in summary
    overall = read_rows(tmp_path / "tables" / "overall.csv")
    # the mean is the mean over (subject, prompt) units of the seed-averaged values
    cfg_rows = [r for r in rows if r["mode"] == "cfg" and r["prompt_set"] == "stylized"]
    units = {}
    for r in cfg_rows:
        units.setdefault((r["subject"], r["prompt_index"]), []).append(r["ident"])
    expected = np.mean([np.mean(v) for v in units.values()])
    got = next(r for r in overall if r["mode"] == "cfg" and r["prompt_set"] == "stylized")
    assert got["ident"] == pytest.approx(expected) and got["units"] == len(units) == 9
    assert got["ident_low"] <= got["ident"] <= got["ident_high"] and got["ident_backbone"] == "pixel-mean"
    compared = read_rows(tmp_path / "tables" / "comparisons.csv")
    pr_text = [c for c in compared if c["mode"] == "parallel-rescaled" and c["metric"] == "text"]
    assert pr_text
    assert all(c["verdict"] == "higher" and c["difference"] == pytest.approx(0.3, abs=0.05) for c in pr_text)
    for name in ("pareto.png", "consistency_p.png"):
        with Image.open(tmp_path / "figures" / name) as image:
            assert image.size[0] > 100


class BrokenAdapterWorld(CountingWorld):
    """CountingWorld whose subject ``s2`` has an unusable adapter: NaN weights found by ``prepare``
    ("before"), or samples that become non-finite from its second prompt on ("while")."""

    def __init__(self, broken: str | None, named: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.broken, self.named = broken, named

    def unusable_adapters(self):
        if self.broken != "before":
            return []
        return [UnusableAdapter("s2", "", "LoRA file s2.safetensors holds NaN or infinite values: 'unet.x' has 3 of 8")]

    def generate(self, jobs):
        bad = [j for j in jobs if j.case.subject == "s2" and j.case.prompt_index > 0]
        if self.broken == "while" and bad:
            message = f"the sample became non-finite (NaN or inf) at step 2/4 in {bad[0].key}"
            raise UnusableAdapter("s2", "", message) if self.named else NonFiniteError(message)
        return super().generate(jobs)


def _tables(output):
    return {name: (Path(output) / "tables" / name).read_text()
            for name in ("overall.csv", "per_subject.csv", "comparisons.csv")}


@pytest.mark.parametrize("broken", ["before", "while"])
@pytest.mark.parametrize("processes", [1, 2])
def test_a_subject_whose_adapter_fails_is_skipped_reported_and_made_after_the_fix(tmp_path, broken, processes):
    settings = ReportSettings(bootstrap_samples=50)
    everyone = run_benchmark(CountingWorld(), PLAN, tmp_path / "everyone", settings, 0, 1, **QUIET)
    without = run_benchmark(CountingWorld(subjects=("s1", "s3")), PLAN, tmp_path / "without", settings, 0, 1, **QUIET)
    out = tmp_path / "broken"
    worlds = [BrokenAdapterWorld(broken) for _ in range(processes)]
    logged = []
    for rank in reversed(range(processes)):  # the main process last: it merges
        rows = run_benchmark(worlds[rank], PLAN, out, settings, rank, processes, log=logged.append)
    # the others are finished and scored exactly as in a run without s2; s2's rows are left out
    assert rows == without
    assert _csv(out) == _csv(tmp_path / "without") and _tables(out) == _tables(tmp_path / "without")
    made = [key for world in worlds for key in world.generated]
    s2_jobs = [j for j in build_jobs(CountingWorld(), PLAN) if j.case.subject == "s2"]
    # "while": the groups of its first prompt were made before the failure (and stay in the manifest)
    before_failure = {j.key for j in s2_jobs if broken == "while" and j.key.startswith("s2/dreambench-00/")}
    assert {k for k in made if k.startswith("s2/")} == before_failure
    # the report lists it with the reason, in the summary, in skipped.csv and in the log
    (entry,) = read_rows(out / "tables" / "skipped.csv")
    missing = len(s2_jobs) - len(before_failure)
    assert (entry["subject"], entry["adapter"], entry["images"], entry["missing"]) == ("s2", "", len(s2_jobs), missing)
    reason = "holds NaN or infinite values: 'unet.x'" if broken == "before" else "became non-finite (NaN or inf)"
    assert reason in entry["reason"] and entry["found"] == ("before sampling" if broken == "before"
                                                            else "while sampling")
    summary = (out / "tables" / "summary.md").read_text()
    assert "**Skipped: 1 subject; the tables leave it out.**" in summary and reason in summary
    assert summary.replace(summary[summary.index("**Skipped"):summary.index("Metrics and")], "") == \
        (tmp_path / "without" / "tables" / "summary.md").read_text()
    assert any(line.startswith("skipped subject 's2'") and reason in line for line in logged)

    # fixed: the same command makes and scores s2's missing images only; the result is the whole run's
    fixed = [CountingWorld() for _ in range(processes)]
    for rank in reversed(range(processes)):
        rows = run_benchmark(fixed[rank], PLAN, out, settings, rank, processes, **QUIET)
    assert sorted(k for world in fixed for k in world.generated) == sorted(
        j.key for j in s2_jobs if j.key not in before_failure)
    assert rows == everyone and _csv(out) == _csv(tmp_path / "everyone")
    assert (out / "tables" / "summary.md").read_text() == (tmp_path / "everyone" / "tables" / "summary.md").read_text()
    assert not (out / "tables" / "skipped.csv").exists() and not list((out / "skipped").glob("*"))


@pytest.mark.parametrize("named", [False, True])
def test_a_failed_call_of_several_adapters_skips_only_the_failing_one(tmp_path, named):
    without = run_benchmark(CountingWorld(subjects=("s1", "s3")), PLAN, tmp_path / "without",
                            ReportSettings(bootstrap_samples=20), 0, 1, **QUIET)
    world = BrokenAdapterWorld("while", named=named)
    world.groups_per_call = 20  # 18 groups per subject: calls of groups 0-19 (s1, s2), 20-39 (s2, s3), 40-53 (s3)
    calls = []
    generate = world.generate
    world.generate = lambda jobs: calls.append(sorted({j.case.subject for j in jobs})) or generate(jobs)
    counts = run_shard(world, PLAN, tmp_path / "batched", **QUIET)
    # s2's second prompt fails in the call of groups 20-39: an error that names its adapter drops that
    # adapter's groups from the call; a bare non-finite error is located by one call per adapter
    assert calls == [["s1", "s2"], ["s2", "s3"], *([] if named else [["s2"]]), ["s3"], ["s3"]]
    assert counts["skipped"] == 16 and counts["pending"] == 0 and counts["ran"] == 18 + 2 + 18
    rows, missing = merge_results(world, PLAN, tmp_path / "batched")
    assert not missing and rows == without


def test_bootstrap_interval_and_no_measurable_difference():
    assert bootstrap_interval(np.full(10, 0.25), 100, 0) == pytest.approx((0.25, 0.25))
    lo, hi = bootstrap_interval(np.arange(100.0), 2000, 0)
    assert lo < 49.5 < hi and hi - lo == pytest.approx(2 * 1.96 * np.std(np.arange(100.0)) / 10, rel=0.15)
    rows = []
    rng = np.random.default_rng(0)
    for mode in ("consistency", "parallel-rescaled"):
        for s in range(4):
            for p in range(5):
                rows.append({"mode": mode, "w_text": 7.5, "w_cons": 3.0, "subject": f"s{s}", "prompt_set": "stylized",
                             "prompt_index": p, "seed": 0, "m": float(rng.normal())})
    verdicts = {c["prompt_set"]: c["verdict"] for c in comparisons(rows, ["m"], ReportSettings(bootstrap_samples=500))}
    assert verdicts == {"all": NO_DIFFERENCE, "stylized": NO_DIFFERENCE}


def test_units_average_seeds_differences_are_paired_and_row_order_does_not_matter():
    rows = [{"subject": s, "adapter": "dco", "prompt_set": "stylized", "template": t, "prompt_index": i, "mode": m,
             "seed": seed, "x": (1.0 if m == "pr" else 0.0) + (0.5 if s == "b" else 0.0) + 0.25 * seed + 0.125 * i}
            for s in ("b", "a") for i, t in enumerate(("y {}", "x {}")) for m in ("pr", "consistency")
            for seed in range(2)]
    settings = ReportSettings(bootstrap_samples=200)
    units = unit_means([r for r in rows if r["mode"] == "pr"], "x")
    # one value per (subject, adapter, prompt): the mean over seeds; units in the order of their text
    assert list(units) == sorted(units, key=str) and list(units)[0] == ("a", "dco", "stylized", "x {}", 1)
    assert units[("b", "dco", "stylized", "y {}", 0)] == 1.0 + 0.5 + 0.125
    (pr,) = summarize([r for r in rows if r["mode"] == "pr"], ["x"], ("mode",), settings)
    assert pr["images"] == 8 and pr["units"] == 4 and pr["x"] == pytest.approx(np.mean(list(units.values())))
    assert pr["x_low"] < pr["x"] < pr["x_high"]
    diff = paired_difference(rows, "x", {"mode": "pr"}, {"mode": "consistency"}, settings)
    assert diff["units"] == 4 and diff["mean"] == diff["low"] == diff["high"] == 1.0 and diff["verdict"] == "higher"
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    assert summarize([r for r in shuffled if r["mode"] == "pr"], ["x"], ("mode",), settings) == [pr]


@needs_dreambench
def test_dreambench_folder_is_parsed():
    classes, objects, live = parse_prompts_and_classes(DREAMBENCH / "prompts_and_classes.txt")
    assert len(classes) == 30 and classes["bear_plushie"] == "stuffed animal"
    assert len(objects) == len(live) == 25 and len(STYLIZED_PROMPTS) == 15
    assert objects[0] == "a {} in the jungle" and live[14] == "a {} in a chef outfit"
    data = load_dreambench(DREAMBENCH)
    assert [s for s, v in data.subjects.items() if v.live] == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6",
                                                              "dog7", "dog8"]
    assert data.prompts("dog", "dreambench") == live and data.prompts("can", "dreambench") == objects
    assert all(len(s.images) >= 4 for s in data.subjects.values())


@needs_dreambench
def test_broken_dreambench_folders_are_named(tmp_path):
    (tmp_path / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match="prompts_and_classes.txt"):
        load_dreambench(tmp_path)
    shutil.copy(DREAMBENCH / "prompts_and_classes.txt", tmp_path)
    shutil.copy(DREAMBENCH / "dog" / "00.jpg", tmp_path / "dog")
    assert list(load_dreambench(tmp_path, ["dog"]).subjects) == ["dog"]
    with pytest.raises(FileNotFoundError, match="subject 'cat'.*missing"):
        load_dreambench(tmp_path, ["dog", "cat"])
    with pytest.raises(ValueError, match="not in"):
        load_dreambench(tmp_path, ["dragon"])
    (tmp_path / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_dreambench(tmp_path, ["cat"])


def test_bench_subcommands_are_a_registry(capsys):
    from dreamguide.cli import main
    from dreamguide.cli.bench import BENCHMARKS, benchmark

    @benchmark("counting")
    def _add(subparsers):
        parser = subparsers.add_parser("counting")
        parser.add_argument("--prompts", type=int, default=1)
        parser.set_defaults(func=lambda args: print(f"counting {args.prompts}") or 0)
        return parser

    try:
        assert main(["bench", "counting", "--prompts", "3"]) == 0
        assert capsys.readouterr().out == "counting 3\n"
        assert "dreambench" in BENCHMARKS
    finally:
        BENCHMARKS.pop("counting")
