"""``dreamguide toyworld reproduce``: run an experiment's plans on the shared runner, and report them.

An experiment (:mod:`~dreamguide.toyworld.experiment`) is a config of a few plans; each plan is a
:class:`~dreamguide.toyworld.bench_world.ToyBenchWorld` and a
:class:`~dreamguide.evaluation.protocol.Plan`, run by :mod:`dreamguide.evaluation.runner` into its
own folder. A weight sweep, held-out prompts or a new PR variant is a config, not code.

``generate`` (GPU minutes): fine-tune every (subject, adapter kind) the plans need
(:func:`~dreamguide.toyworld.personalize.personalize`; ``OUT/adapters/<token>-<kind>/``), then run
each plan's groups (one shard per worker process, resumable, within a time budget).

``score`` (CPU seconds): score every stored image again with the world's evaluators and write, from
:mod:`dreamguide.evaluation.report`: ``results.json`` and ``results.md`` (per plan the means over
(subject, adapter, prompt) units with bootstrap intervals, and paired differences of each compared
mode minus the baseline mode), ``pareto.png`` and ``timesteps.png`` (Consistency_p per step).

An adapter whose files hold NaN, or whose samples become non-finite, is skipped by the runner: the
others are run and scored, and ``results.json``/``results.md`` list the skipped ones per plan.

Output folder: ``experiment.json`` (the resolved config), ``generate.json`` (timings, device),
``adapters/``, one runner folder per plan, and the files above. A folder written by earlier versions
(``images.npz`` + ``rows.json``) is converted to this layout by :func:`import_stored_run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dreamguide.toyworld.bench_world import BASE_MODEL
from dreamguide.toyworld.experiment import EXPERIMENT_FILE, PlanConfig, ToyExperiment, stored_experiment


# ---------------------------------------------------------------------------------------------
# Generation


def needed_adapters(experiment: ToyExperiment, plans: Sequence[PlanConfig]) -> list[tuple[str, str]]:
    """(subject, kind) of every adapter the plans sample with."""
    from dreamguide.toyworld.world import SUBJECTS

    subjects = experiment.subjects or tuple(s.token for s in SUBJECTS)
    kinds = dict.fromkeys(k for p in plans for k in p.adapters if k != BASE_MODEL)
    return [(s, k) for s in subjects for k in kinds]


def default_workers(device: str | None, jobs: int) -> int:
    """Processes for :func:`generate`: one per adapter on a GPU (each is launch-bound), one on a CPU."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(device).startswith("cuda"):
        return 1
    return max(1, min(jobs + 1, (os.cpu_count() or 2) - 1))


def _train_adapter(job: dict) -> str:
    """One worker process: fine-tune one (subject, kind) adapter unless it is there already."""
    from dreamguide.toyworld.model import load_toyworld_model
    from dreamguide.filenames import PERSONALIZATION_RECORD
    from dreamguide.toyworld.personalize import personalize

    folder = Path(job["folder"])
    if not (folder / PERSONALIZATION_RECORD).is_file():
        if job["single_thread"]:
            import torch

            torch.set_num_threads(1)
        personalize(job["subject"], job["kind"], folder, job["settings"],
                    model=load_toyworld_model(device=job["device"]), device=job["device"])
    return f"{job['subject']}-{job['kind']}"


def _run_shard(job: dict) -> list[dict]:
    """One worker process: this shard of every plan's groups."""
    from dreamguide.evaluation.runner import run_shard

    if job["single_thread"]:
        import torch

        torch.set_num_threads(1)
    experiment, out = job["experiment"], Path(job["out"])
    counts = []
    for plan in experiment.chosen(job["plans"]):
        world = experiment.world(plan, experiment.steps, job["adapters_dir"], job["device"])
        counts.append(run_shard(world, experiment.plan(plan), out / plan.name, job["index"], job["workers"],
                                log=job["log"], deadline=job["deadline"]))
    return counts


def _pool_map(function, jobs: list[dict], workers: int) -> list:
    if not jobs:  # e.g. no adapter to fine-tune with adapters_from: a pool of 0 processes is an error
        return []
    if workers <= 1:
        return [function(job) for job in jobs]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return pool.map(function, jobs, chunksize=1)


def generate(experiment: ToyExperiment, out, plans: Sequence[str] | None = None, workers: int = 1,
             device: str | None = None, budget_s: float | None = None, adapters_from=None, bundle: str | None = None,
             log=print) -> dict:
    """Fine-tune the adapters the plans need, then run the plans' shards; returns the run record.

    ``workers`` processes train one adapter each at a time, then each takes every ``workers``-th
    group of every plan (:func:`dreamguide.evaluation.runner.run_shard`). Past ``budget_s`` no new
    group starts; a second run continues where the first stopped. ``adapters_from``: a folder of
    adapters (``<token>-<kind>/``) to sample with instead of fine-tuning. ``bundle``: also fine-tune
    ``sks`` with this method (how the demo's adapter is made).
    """
    import torch

    from dreamguide.evaluation.runner import RunMismatch

    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = experiment.chosen(plans)
    stored = stored_experiment(out)
    if stored is not None and stored != experiment:
        raise RunMismatch(f"{out} holds a run of another experiment ({EXPERIMENT_FILE}); resume with the same "
                          f"config or choose a new output folder")
    _write_json(out / EXPERIMENT_FILE, dataclasses.asdict(experiment))
    adapters_dir = Path(adapters_from) if adapters_from is not None else out / "adapters"
    single_thread = workers > 1
    train = [] if adapters_from is not None else needed_adapters(experiment, chosen)
    if bundle and ("sks", bundle) not in train:
        train.insert(0, ("sks", bundle))
    jobs = [{"subject": s, "kind": k, "folder": str(out / "adapters" / f"{s}-{k}"), "settings": experiment.personalize,
             "device": device, "single_thread": single_thread} for s, k in train]
    log(f"fine-tuning {len(jobs)} adapters in {min(workers, max(len(jobs), 1))} processes")
    t0 = time.time()
    _pool_map(_train_adapter, jobs, workers)
    timings = {"adapters": round(time.time() - t0, 1)}
    t0 = time.time()
    deadline = None if budget_s is None else started + budget_s
    shards = [{"experiment": experiment, "out": str(out), "plans": [p.name for p in chosen], "index": r,
               "workers": workers, "adapters_dir": str(adapters_dir), "device": device, "deadline": deadline,
               "single_thread": single_thread, "log": print if workers > 1 else log} for r in range(workers)]
    counts = _pool_map(_run_shard, shards, workers)
    timings["sampling"] = round(time.time() - t0, 1)
    pending = {p.name: sum(c[i]["pending"] for c in counts) for i, p in enumerate(chosen)}
    skipped = {p.name: sum(c[i]["skipped"] for c in counts) for i, p in enumerate(chosen)}
    record = {"plans": [p.name for p in chosen], "workers": workers, "device": _device_name(device),
              "adapters_from": None if adapters_from is None else str(adapters_from), "budget_s": budget_s,
              "images": sum(c[i]["images"] for c in counts for i in range(len(chosen))),
              "pending_groups": {k: v for k, v in pending.items() if v}, "timings_s": timings,
              "seconds": round(time.time() - started, 1)}
    if any(skipped.values()):  # groups of unusable adapters (the plans' skipped/ folders say why)
        record["skipped_groups"] = {k: v for k, v in skipped.items() if v}
    _write_json(out / "generate.json", record)
    log(f"generated {record['images']} images in {record['seconds']}s"
        + (f"; groups left for the next run: {record['pending_groups']}" if record["pending_groups"] else "")
        + (f"; groups of unusable adapters skipped: {record['skipped_groups']}" if "skipped_groups" in record else ""))
    return record


def _device_name(device) -> str:
    import platform

    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _write_text(path: Path, text: str) -> None:
    from dreamguide.atomic import atomic_write_text

    atomic_write_text(path, text)


def _write_json(path: Path, data) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Scoring and the results


def score(experiment: ToyExperiment, out, evaluators=None, log=print) -> dict:
    """Score every stored image of ``out`` again (one batch) and write results.json/md, pareto.png, timesteps.png.

    Adapters the runner skipped are left out of the tables and listed under ``"skipped"`` of their plan.
    """
    from dreamguide.evaluation.runner import merge_results, rescore, skipped_adapters

    out = Path(out)
    if (out / "rows.json").is_file() and not any((out / p.name / "manifest").is_dir() for p in experiment.plans):
        import_stored_run(out, experiment, log=log)
    runs = []
    for plan in experiment.plans:
        if (out / plan.name / "manifest").is_dir():
            world = experiment.world(plan, steps=None, evaluators=evaluators)
            evaluators = world.evaluators  # one set of evaluators for every plan
            runs.append((plan, world, experiment.plan(plan)))
    if not runs:
        raise FileNotFoundError(f"{out} holds no plan of this experiment ({', '.join(p.name for p in experiment.plans)})")
    rescore([(world, plan, out / p.name) for p, world, plan in runs], log=log)
    rows, skipped = {}, {}
    for p, world, plan in runs:
        rows[p.name], missing = merge_results(world, plan, out / p.name)
        if missing:
            log(f"plan {p.name}: {missing} images not generated (reported without them)")
        skipped[p.name] = skipped_adapters(world, plan, out / p.name)
        for entry in skipped[p.name]:
            log(f"plan {p.name}: skipped subject {entry['subject']!r} ({entry['adapter']} adapter; "
                f"{entry['missing']} of {entry['images']} images not made): {entry['reason']}")
    record_path = out / "generate.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    results = experiment_results(experiment, rows, out, record, skipped)
    _write_json(out / "results.json", results)
    write_figures(experiment, results, out)
    _write_text(out / "results.md", results_markdown(experiment, results))
    log(f"scored {sum(len(r) for r in rows.values())} images -> {out / 'results.md'}")
    return results


def _report_settings(experiment: ToyExperiment):
    from dreamguide.evaluation.report import ReportSettings

    r = experiment.report
    return ReportSettings(baseline_mode=r.baseline_mode, bootstrap_samples=r.bootstrap_samples,
                          bootstrap_seed=r.bootstrap_seed, confidence=r.confidence)


_DIMS = ("adapter", "prompt_set", "mode", "w_text", "w_cons", "variant")


def _order(plan: PlanConfig, experiment: ToyExperiment):
    """Sort key of summary entries: the config's order of adapters, prompt sets, modes, weights, variants."""
    p = experiment.plan(plan)
    orders = {"adapter": plan.adapters, "prompt_set": plan.prompt_sets, "mode": p.modes, "w_text": p.w_text,
              "w_cons": (None, *p.w_cons), "variant": ("", *plan.variants)}
    return lambda entry: tuple(orders[d].index(entry[d]) if entry[d] in orders[d] else -1 for d in _DIMS)


def _rounded(entry: dict, digits: int = 4) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in entry.items()}


def experiment_results(experiment: ToyExperiment, rows: dict[str, list[dict]], out: Path, record: dict,
                       skipped: dict[str, list[dict]] | None = None) -> dict:
    """Per plan: summary entries and paired differences (rounded to 4 decimals), and the adapters it
    skipped (``runner.skipped_adapters``) when there are any; Consistency_p per step."""
    from dreamguide.evaluation.report import paired_difference, summarize
    from dreamguide.guidance import get_mode

    settings = _report_settings(experiment)
    metrics = list(dict.fromkeys([*experiment.report.metrics, *(m for p in experiment.plans for m in p.metrics)]))
    baseline = get_mode(experiment.report.baseline_mode).name
    compared = [get_mode(m).name for m in experiment.report.compare]
    plans = {}
    for plan in experiment.plans:
        if plan.name not in rows:
            continue
        plan_rows = rows[plan.name]
        summary = sorted(summarize(plan_rows, metrics, _DIMS, settings), key=_order(plan, experiment))
        differences = []
        cells = dict.fromkeys((r["prompt_set"], r["w_text"], r["w_cons"], r["variant"]) for r in plan_rows
                              if r["mode"] in compared)
        for mode in compared:
            for prompt_set, w_text, w_cons, variant in cells:
                a = {"mode": mode, "prompt_set": prompt_set, "w_text": w_text, "w_cons": w_cons, "variant": variant}
                b = {**a, "mode": baseline}
                if not any(r["variant"] == variant and r["mode"] == baseline for r in plan_rows):
                    b["variant"] = ""
                entry = {"mode": mode, "baseline": baseline, "prompt_set": prompt_set, "w_text": w_text,
                         "w_cons": w_cons, "variant": variant}
                for metric in metrics:
                    d = paired_difference(plan_rows, metric, a, b, settings)
                    if d["units"]:
                        entry[metric] = _rounded({k: d[k] for k in ("mean", "low", "high", "units", "verdict")})
                if len(entry) > 6:
                    differences.append(entry)
        reference = []
        if plan.reference in rows:
            units = {(r["subject"], r["adapter"], r["prompt_set"], r["template"]) for r in plan_rows}
            shared = [r for r in rows[plan.reference]
                      if (r["subject"], r["adapter"], r["prompt_set"], r["template"]) in units]
            reference = [_rounded(e) for e in summarize(shared, metrics, _DIMS, settings)]
        plans[plan.name] = {"title": plan.title or plan.name, "images": len(plan_rows),
                            "summary": [_rounded(e) for e in summary], "differences": differences,
                            "reference": reference}
        if (skipped or {}).get(plan.name):
            plans[plan.name]["skipped"] = skipped[plan.name]
    return {"experiment": dataclasses.asdict(experiment), "generate": record, "plans": plans,
            "timesteps": _timesteps(experiment, rows, out)}


def _timesteps(experiment: ToyExperiment, rows: dict[str, list[dict]], out: Path) -> dict:
    from dreamguide.evaluation.report import read_traces, trace_curves
    from dreamguide.guidance import get_mode

    modes = {get_mode(m).name for m in experiment.report.trace_modes}
    traces: dict[tuple, list] = {}
    for name in experiment.report.trace_plans:
        chosen = [r for r in rows.get(name, []) if r["mode"] in modes]
        for key, group in read_traces(chosen, out / name).items():
            traces.setdefault(key, []).extend(group)
    return {"|".join(key): {k: (int(v) if k == "images" else [round(float(x), 5) for x in v])
                            for k, v in curve.items()}
            for key, curve in trace_curves(traces).items()}


def write_figures(experiment: ToyExperiment, results: dict, out: Path) -> None:
    """pareto.png (identity vs text alignment on the report's prompt set) and timesteps.png."""
    from dreamguide.evaluation.report import consistency_p_plot, pareto_plot

    r = experiment.report
    points = [{**e, "plan": name} for name in r.pareto_plans if name in results["plans"]
              for e in results["plans"][name]["summary"] if e["prompt_set"] == r.pareto_prompt_set]
    pareto_plot(points, "identity", "text_alignment", out / "pareto.png",
                line_keys=("plan", "adapter", "mode", "w_text", "variant"), line_intervals=False,
                x_label="text alignment (toy CLIP cosine to the base prompt)",
                y_label="identity (toy DINO cosine to the references)",
                title=f"{r.pareto_prompt_set} prompts: identity vs text alignment "
                      f"({r.confidence:.0%} bootstrap intervals; lines over w_cons)")
    curves = {tuple(key.split("|")): {k: np.array(v) for k, v in c.items() if k != "images"}
              for key, c in results["timesteps"].items()}
    consistency_p_plot(curves, out / "timesteps.png", f"Consistency_p per step ({', '.join(r.trace_plans)})")


def results_markdown(experiment: ToyExperiment, results: dict) -> str:
    """The results tables: per plan its summary, its reference rows and its paired differences."""
    from dreamguide.evaluation.report import format_difference, format_interval, markdown_table

    r = experiment.report
    digits, pct = r.digits, f"{r.confidence:.0%}"
    lines = ["## Results tables", "",
             f"Means over (subject, adapter, prompt) units (seeds averaged within a unit) with {pct} percentile-"
             f"bootstrap intervals ({r.bootstrap_samples} resamples); differences are paired over the same units."]
    skipped = [(name, entry) for name, result in results["plans"].items() for entry in result.get("skipped", [])]
    if skipped:
        lines += ["", "**Skipped adapters** (the tables leave them out; fix the adapter and run the same command "
                  "again to make and score their images):", "",
                  *(f"- plan `{name}`: subject `{e['subject']}`, {e['adapter']} adapter: {e['missing']} of "
                    f"{e['images']} images not made ({e['found']}): {' '.join(str(e['reason']).split())}"
                    for name, e in skipped)]
    for plan in experiment.plans:
        if plan.name not in results["plans"]:
            continue
        result = results["plans"][plan.name]
        metrics = list(plan.metrics or r.metrics)
        entries = [*({**e, "reference": plan.reference} for e in result["reference"]), *result["summary"]]
        varying = [d for d in _DIMS if len({_cell(e[d]) for e in entries}) > 1]
        fixed = [f"{d} {_cell(result['summary'][0][d])}" for d in _DIMS
                 if d not in varying and result["summary"] and _cell(result["summary"][0][d])]
        if not result["summary"]:
            continue
        lines += ["", f"### {result['title']}", "", f"Plan `{plan.name}`: {result['images']} images; "
                  + "; ".join(fixed) + ".", ""]
        head = [*(["rows"] if result["reference"] else []), *varying, "images", *metrics]
        lines += markdown_table(head, [[*([e.get("reference") or plan.name] if result["reference"] else []),
                                        *(_cell(e[d]) for d in varying), e["images"],
                                        *(format_interval(e, m, digits) for m in metrics)] for e in entries])
        for mode in dict.fromkeys(d["mode"] for d in result["differences"]):
            diffs = [d for d in result["differences"] if d["mode"] == mode]
            cells = [k for k in ("prompt_set", "w_text", "w_cons", "variant") if len({_cell(d[k]) for d in diffs}) > 1]
            lines += ["", f"#### {mode} minus {r.baseline_mode} (paired over subject x adapter x prompt)", "",
                      *markdown_table([*cells, *metrics, "units"],
                                      [[*(_cell(d[k]) for k in cells),
                                        *(format_difference(d.get(m, {}), digits + 1) for m in metrics),
                                        max((d[m]["units"] for m in metrics if m in d), default=0)] for d in diffs])]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# Runs stored by earlier versions (images.npz + rows.json)


def import_stored_run(folder, experiment: ToyExperiment, log=print) -> int:
    """Convert a folder of the earlier layout (``images.npz``, ``rows.json``, ``traces.json``,
    ``generate.json``) into this module's: one runner folder per plan, images as PNGs, traces as
    per-image step records. Rows map onto the plans of ``experiment`` (parts ``base``/``main``/
    ``variants`` and ``sweep`` grids onto the plans of those names, the base bar's default DDIM update
    onto ``base-unclipped``); returns the number of images imported.
    """
    from PIL import Image

    from dreamguide.evaluation.protocol import Generated, uses_consistency
    from dreamguide.evaluation.runner import _append_record, _store, check_run_file, build_jobs, group_id, group_jobs
    from dreamguide.guidance import get_mode

    folder = Path(folder)
    rows = json.loads((folder / "rows.json").read_text())
    stored_traces = {t["row"]: t for t in json.loads((folder / "traces.json").read_text())}
    record = json.loads((folder / "generate.json").read_text())
    images = np.load(folder / "images.npz")["images"]

    def plan_of(row: dict) -> str:
        if row["part"] == "base":
            return "base" if row.get("clipped_model_output", True) else "base-unclipped"
        return f"sweep-{row.get('grid', 'paper')}" if row["part"] == "sweep" else row["part"]

    def key(plan: str, adapter: str, prompt_set: str, prompt: str, mode: str, w_text, w_cons, variant: str, seed):
        return (plan, adapter, prompt_set, prompt, mode, float(w_text), None if w_cons is None else float(w_cons),
                variant, seed)

    stored = {}
    for index, row in enumerate(rows):
        mode = get_mode(row["mode"]).name
        if row["part"] == "base":
            k = key(plan_of(row), BASE_MODEL, f"random-{row['prompt_set']}", row["prompt"], mode, row["w_text"], None,
                    "" if row.get("clipped_model_output", True) else "unclipped", row["seed"])
        else:
            variant = "" if row.get("variant") in (None, "default", "reference") else row["variant"]
            w_cons = row["w_cons"] if uses_consistency(mode) else None
            k = key(plan_of(row), row["method"], row["prompt_set"], row["prompt"], mode, row["w_text"], w_cons,
                    variant, row["seed"])
        stored[k] = index
    steps = record.get("steps", experiment.steps)
    imported = 0
    for plan in experiment.plans:
        world = experiment.world(plan, steps=steps)
        run = experiment.plan(plan)
        out = folder / plan.name
        done = []
        for group in group_jobs(build_jobs(world, run)):
            indices = []
            for job in group:
                c, s = job.case, job.setting
                seed = job.seed + (c.prompt_index if c.adapter == BASE_MODEL else 0)
                indices.append(stored.get(key(plan.name, c.adapter, c.prompt_set, c.token_prompt, s.mode, s.w_text,
                                              s.w_cons, s.variant_name, seed)))
            if None not in indices:
                done.append((group, indices))
        if not done:
            continue
        out.mkdir(parents=True, exist_ok=True)
        check_run_file(out, {"world": world.name, "world_config": world.describe(), "plan": run.to_dict()}, True)
        for group, indices in done:
            stored_rows = []
            for job, index in zip(group, indices):
                trace = stored_traces.get(index)
                steps_ = None if trace is None else [
                    {"step": i, "timestep": t, "mean": m, "std": s, "fraction_negative": f}
                    for i, (t, m, s, f) in enumerate(zip(trace["timestep"], trace["mean"], trace["std"],
                                                         trace["fraction_negative"]))]
                item = Generated(Image.fromarray(images[index]), steps_, {"imported_from": str(folder / "images.npz"),
                                                                          "index": index})
                stored_rows.append(_store(out, world, job, item, {}))
            _append_record(out / "manifest" / "rank-0.jsonl", {"group": group_id(group), "rank": 0,
                                                               "rows": stored_rows})
            imported += len(group)
    log(f"imported {imported} of the {len(rows)} stored images into per-plan folders under {folder}")
    return imported
