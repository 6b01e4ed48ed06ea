"""The evaluation runner: jobs -> shards -> generate + score -> manifest -> merged results.

Output folder layout:

    run.json                    world description + plan; a resumed run must match it
    manifest/rank-<r>.jsonl     one line per finished group: its result rows (written last)
    skipped/rank-<r>.json       the (subject, adapter)s this process skipped, and why (only when it skipped any)
    images/<subject>/*.png      one image per job
    traces/<subject>/*.json     Consistency_p per step, when the world traces
    results.csv                 one row per image, every metric (results.parquet if pyarrow is present)
    tables/, figures/           written by ``evaluation.report`` once every group is done

Resuming: a group counts as done when its manifest line is complete; images are written
(atomically) before that line, so a run killed anywhere leaves either a finished group or
one that is redone from scratch. With several processes each takes every n-th group of the
canonical group list and appends only to its own manifest file; the merge reads all of them,
so the merged rows do not depend on the number of processes or on interruptions. A time budget
(``deadline``) stops a shard between groups; running it again continues.

A subject whose adapter cannot make images (NaN weights found by ``world.prepare()``, or a sample
that became non-finite) is skipped: the other subjects are finished and reported, and the skipped
ones are listed with the reason (:func:`skipped_adapters`). Its missing groups are never recorded as
done, so running the same command again after fixing the adapter makes and scores them.

:func:`rescore` scores the stored images again (a new scorer, or the same one to check a run).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

from dreamguide.atomic import atomic_write_bytes, atomic_write_text
from dreamguide.evaluation.protocol import Job, Plan, UnusableAdapter, World


class RunMismatch(ValueError):
    """The output folder holds a different run."""


def save_image_atomic(image, path: str | Path, metadata: dict | None = None) -> None:
    """PNG written under a temporary name and moved into place, with dreamguide metadata when given."""
    from dreamguide.images import save_png

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(image, path, metadata)


def build_jobs(world: World, plan: Plan) -> list[Job]:
    """Every job of the run, in canonical order (case, setting, seed)."""
    return [Job(case, setting, seed) for case in world.cases() for setting in plan.settings() for seed in plan.seeds]


def group_jobs(jobs: Sequence[Job]) -> list[list[Job]]:
    groups: OrderedDict[tuple, list[Job]] = OrderedDict()
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return list(groups.values())


def shard(groups: Sequence[list[Job]], process_index: int, num_processes: int) -> list[list[Job]]:
    """This process's groups: every ``num_processes``-th, starting at ``process_index``."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process index {process_index} is outside 0..{num_processes - 1}")
    return list(groups[process_index::num_processes])


def group_id(group: Sequence[Job]) -> str:
    return "|".join(job.key for job in group)


def _read_manifest(path: Path) -> tuple[list[dict], int]:
    """Complete records of one manifest file and the byte length they span (a torn tail is dropped)."""
    records, good = [], 0
    data = path.read_bytes()
    position = 0
    for line in data.splitlines(keepends=True):
        position += len(line)
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good = position
    return records, good


def read_manifests(output: Path) -> dict[str, dict]:
    """group id -> record, over every process's manifest file."""
    done: dict[str, dict] = {}
    for path in sorted((output / "manifest").glob("rank-*.jsonl")):
        records, _ = _read_manifest(path)
        for record in records:
            done[record["group"]] = record
    return done


def _repair_manifest(path: Path) -> None:
    """Cut a line torn by a kill so that new records start on a fresh line."""
    if path.exists():
        _, good = _read_manifest(path)
        if good != path.stat().st_size:
            atomic_write_bytes(path, path.read_bytes()[:good])


def _append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        handle.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _adapter_key(group: Sequence[Job]) -> tuple[str, str]:
    return group[0].case.adapter_key


def _skipped_file(output: Path, process_index: int) -> Path:
    return output / "skipped" / f"rank-{process_index}.json"


def _write_skipped(output: Path, process_index: int, skipped: dict[tuple[str, str], dict]) -> None:
    """This process's skipped adapters; no file when it skipped none (and none left from an earlier run)."""
    path = _skipped_file(output, process_index)
    if skipped:
        atomic_write_text(path, json.dumps(list(skipped.values()), indent=2, sort_keys=True) + "\n")
    elif path.exists():
        path.unlink()


def _skip(skipped: dict[tuple[str, str], dict], error: UnusableAdapter, found: str, log: Callable[[str], None]) -> None:
    key = (error.subject, error.adapter)
    if key not in skipped:
        skipped[key] = {"subject": error.subject, "adapter": error.adapter, "reason": error.reason, "found": found}
        log(f"skipping {error} (the other subjects go on)")


def _generate_groups(world: World, chunk: list[list[Job]], skipped: dict[tuple[str, str], dict],
                     log: Callable[[str], None]) -> tuple[list[list[Job]], list]:
    """(groups made, their images): the chunk less the groups of adapters whose sampling failed, which are
    added to ``skipped``. A non-finite sample of a call that mixes adapters is found by one call per adapter."""
    from dreamguide.denoise import NonFiniteError

    while chunk:
        try:
            return chunk, world.generate([job for group in chunk for job in group])
        except UnusableAdapter as error:
            if (error.subject, error.adapter) not in {_adapter_key(g) for g in chunk}:
                raise
            failed = error
        except NonFiniteError as error:
            keys = list(dict.fromkeys(_adapter_key(g) for g in chunk))
            if len(keys) > 1:
                made, images = [], []
                for key in keys:
                    groups, generated = _generate_groups(world, [g for g in chunk if _adapter_key(g) == key],
                                                         skipped, log)
                    made += groups
                    images += generated
                return made, images
            failed = UnusableAdapter(*keys[0], str(error))
        _skip(skipped, failed, "while sampling", log)
        chunk = [g for g in chunk if _adapter_key(g) != (failed.subject, failed.adapter)]
    return [], []


def check_run_file(output: Path, description: dict, write: bool = True, what: str = "run",
                   fix: str = "choose a new output folder") -> None:
    """Refuse an output folder whose run.json describes another run (naming the keys that differ); write
    run.json for a new one when ``write`` (the main process)."""
    path = output / "run.json"
    text = json.dumps(description, indent=2, sort_keys=True) + "\n"
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != json.loads(text):
            changed = sorted(k for k in set(existing) | set(description) if existing.get(k) != description.get(k))
            raise RunMismatch(
                f"{output} holds a different {what} (changed: {', '.join(changed)}); "
                f"resume with the same settings or {fix}"
            )
    elif write:
        atomic_write_text(path, text)


def process_info() -> tuple[int, int, Callable[[], None]]:
    """(process index, number of processes, barrier) from accelerate; (0, 1, no-op) when not launched.

    Works under ``accelerate launch`` and ``torchrun`` (on CPU-only machines too, over gloo).
    """
    import torch

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from accelerate import PartialState
    except ImportError:
        if launched > 1:
            raise RuntimeError("launched as several processes, but accelerate is not installed")
        return 0, 1, lambda: None
    state = PartialState(cpu=not torch.cuda.is_available())
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes but accelerate sees {state.num_processes}; every process "
            f"would run the whole benchmark. Launch with `accelerate launch` or `torchrun`"
        )
    return state.process_index, state.num_processes, state.wait_for_everyone


def ordered_rows(jobs: Sequence[Job], done: dict[str, dict]) -> list[dict]:
    """Rows of every finished job in canonical job order (one row per job, never duplicated)."""
    by_key = {}
    for record in done.values():
        for row in record["rows"]:
            by_key[row["key"]] = row
    return [by_key[job.key] for job in jobs if job.key in by_key]


def run_shard(
    world: World,
    plan: Plan,
    output: str | Path,
    process_index: int = 0,
    num_processes: int = 1,
    stop_after_groups: int | None = None,
    log: Callable[[str], None] = print,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Generate and score this process's pending groups; returns counts. ``world.prepare()`` runs first.

    ``deadline`` (a ``time.time()`` value): start no group after it; the rest stays pending
    (``"pending"`` in the returned counts) for the next run. ``"skipped"`` counts the groups not
    made because their adapter is unusable (``skipped/rank-<r>.json`` says why).
    """
    output = Path(output)
    world.prepare()  # every input check and every backbone load happens before generation
    description = {"world": world.name, "world_config": world.describe(), "plan": plan.to_dict()}
    output.mkdir(parents=True, exist_ok=True)
    check_run_file(output, description, write=process_index == 0)
    jobs = build_jobs(world, plan)
    groups = shard(group_jobs(jobs), process_index, num_processes)
    manifest = output / "manifest" / f"rank-{process_index}.jsonl"
    _repair_manifest(manifest)
    done = read_manifests(output)
    pending = [g for g in groups if group_id(g) not in done]
    skipped: dict[tuple[str, str], dict] = {}
    for error in getattr(world, "unusable_adapters", list)():
        _skip(skipped, error, "before sampling", log)
    if process_index == 0:  # files of processes a launch with more processes left
        for path in (output / "skipped").glob("rank-*.json"):
            rank = path.stem.removeprefix("rank-")
            if not rank.isdigit() or int(rank) >= num_processes:
                path.unlink()
    _write_skipped(output, process_index, skipped)
    runnable = [g for g in pending if _adapter_key(g) not in skipped]
    log(f"[rank {process_index}/{num_processes}] {len(groups)} groups in this shard, "
        f"{len(groups) - len(pending)} already done, {len(runnable)} to run"
        + (f", {len(pending) - len(runnable)} skipped" if len(runnable) < len(pending) else ""))
    per_call = max(1, int(getattr(world, "groups_per_call", 1)))
    finished, images, started, position = 0, 0, time.perf_counter(), 0
    made: set[str] = set()
    while position < len(runnable):
        if stop_after_groups is not None and finished >= stop_after_groups:
            raise KeyboardInterrupt(f"stopped after {finished} groups (stop_after_groups)")
        if deadline is not None and time.time() > deadline:
            left = sum(_adapter_key(g) not in skipped for g in runnable[position:])
            log(f"[rank {process_index}] time budget reached: {left} groups left for the next run")
            break
        count = per_call if stop_after_groups is None else min(per_call, stop_after_groups - finished)
        chunk = [g for g in runnable[position : position + count] if _adapter_key(g) not in skipped]
        position += count
        if not chunk:
            continue
        before = len(skipped)
        chunk, generated = _generate_groups(world, chunk, skipped, log)
        if len(skipped) != before:
            _write_skipped(output, process_index, skipped)
        batch = [job for group in chunk for job in group]
        if len(generated) != len(batch):
            raise RuntimeError(f"world {world.name!r} returned {len(generated)} images for {len(batch)} jobs")
        if not chunk:
            continue
        scores = world.score(batch, [g.image for g in generated])
        offset = 0
        for group in chunk:
            items = generated[offset : offset + len(group)]
            values = scores[offset : offset + len(group)]
            offset += len(group)
            rows = [_store(output, world, job, item, value) for job, item, value in zip(group, items, values)]
            _append_record(manifest, {"group": group_id(group), "rank": process_index, "rows": rows})
            made.add(group_id(group))
        finished += len(chunk)
        images += len(batch)
        elapsed = time.perf_counter() - started
        log(f"[rank {process_index}] {finished}/{len(runnable)} groups ({len(batch)} images, "
            f"{elapsed / finished:.2f} s/group)")
    left = [g for g in runnable if group_id(g) not in made and _adapter_key(g) not in skipped]
    not_made = [g for g in pending if group_id(g) not in made and _adapter_key(g) in skipped]
    return {"groups": len(groups), "ran": finished, "images": images, "pending": len(left),
            "skipped": len(not_made), "seconds": time.perf_counter() - started}


def _store(output: Path, world: World, job: Job, item, values: dict) -> dict:
    """Write one job's image (and trace) atomically; returns its result row."""
    subject = job.case.subject
    image_path = Path("images") / subject / f"{job.file_stem}.png"
    save_image_atomic(item.image, output / image_path, item.metadata)
    trace_path = None
    if item.trace is not None:
        trace_path = str(Path("traces") / subject / f"{job.file_stem}.json")
        atomic_write_text(output / trace_path, json.dumps(item.trace))
    return {"key": job.key, "world": world.name, **job.row(), **values, "image": str(image_path),
            "trace": trace_path}


def rescore(runs: Sequence[tuple[World, Plan, str | Path]], log: Callable[[str], None] = print) -> int:
    """Score every stored image of the ``(world, plan, output)`` runs again and rewrite their manifests.

    All images go to the first world's ``score`` in one call (runs scored together share a scorer;
    one batch gives the same numbers whatever the runs' shards were). Returns the number of images.
    """
    from PIL import Image

    if not runs:
        return 0
    scorer = runs[0][0]
    scorer.prepare()
    manifests, all_jobs, images = [], [], []
    for world, plan, output in runs:
        output = Path(output)
        jobs = {job.key: job for job in build_jobs(world, plan)}
        for path in sorted((output / "manifest").glob("rank-*.jsonl")):
            records, _ = _read_manifest(path)
            rows = [row for record in records for row in record["rows"]]
            unknown = [row["key"] for row in rows if row["key"] not in jobs]
            if unknown:
                raise RunMismatch(f"{path} holds images of another plan (e.g. {unknown[0]}); rescore with its plan")
            for row in rows:
                all_jobs.append(jobs[row["key"]])
                with Image.open(output / row["image"]) as image:
                    images.append(image.convert("RGB"))
            manifests.append((path, records, rows, list(world.metric_backbones())))
    scores = iter(scorer.score(all_jobs, images) if all_jobs else [])
    for path, records, rows, metrics in manifests:
        for row in rows:
            for metric in metrics:
                row.pop(metric, None)
            row.update(next(scores))
        atomic_write_text(path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
    log(f"scored {len(all_jobs)} stored images of {len(runs)} run(s)")
    return len(all_jobs)


def skipped_adapters(world: World, plan: Plan, output: str | Path) -> list[dict]:
    """The (subject, adapter)s a process skipped that still lack images, in case order: each its
    ``subject``, ``adapter``, ``reason``, ``found`` ("before sampling" / "while sampling"), ``images``
    (its jobs) and ``missing`` (those not made). An adapter whose images are all there since is not listed."""
    output = Path(output)
    records: dict[tuple[str, str], dict] = {}
    for path in sorted((output / "skipped").glob("rank-*.json"), key=lambda p: (len(p.name), p.name)):
        for record in json.loads(path.read_text()):
            records.setdefault((record["subject"], record["adapter"]), record)
    if not records:
        return []
    jobs = build_jobs(world, plan)
    done = {row["key"] for row in ordered_rows(jobs, read_manifests(output))}
    counts: dict[tuple[str, str], list[int]] = {}
    for job in jobs:
        if job.case.adapter_key in records:
            count = counts.setdefault(job.case.adapter_key, [0, 0])
            count[0] += 1
            count[1] += job.key not in done
    return [{**records[key], "images": total, "missing": missing}
            for key, (total, missing) in counts.items() if missing]


def merge_results(world: World, plan: Plan, output: str | Path) -> tuple[list[dict], int]:
    """All rows in canonical order and the number of jobs still missing; writes results.csv when complete.

    The jobs of skipped adapters (:func:`skipped_adapters`) count as neither: their rows are left out,
    so a subject is in the results with all of its images or not at all.
    """
    from dreamguide.evaluation.report import write_rows

    output = Path(output)
    jobs = build_jobs(world, plan)
    skipped = {(s["subject"], s["adapter"]) for s in skipped_adapters(world, plan, output)}
    if skipped:
        jobs = [job for job in jobs if job.case.adapter_key not in skipped]
    rows = ordered_rows(jobs, read_manifests(output))
    missing = len(jobs) - len(rows)
    if not missing:
        write_rows(rows, output, metrics=list(world.metric_backbones()))
    return rows, missing


def run_benchmark(
    world: World,
    plan: Plan,
    output: str | Path,
    report: "ReportSettings | None" = None,  # noqa: F821 (evaluation.report)
    process_index: int | None = None,
    num_processes: int | None = None,
    stop_after_groups: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict] | None:
    """Run this process's shard, then (main process, all shards done) merge and write tables and figures.

    Without explicit ``process_index``/``num_processes`` they come from accelerate (``accelerate
    launch``); a plain ``python`` process is a single shard. Returns the merged rows, or None
    when other shards are still missing. Rows of skipped subjects are not among them; the report
    lists those (:func:`skipped_adapters`).
    """
    from dreamguide.evaluation.report import ReportSettings, write_report

    barrier = lambda: None  # noqa: E731
    if process_index is None or num_processes is None:
        process_index, num_processes, barrier = process_info()
    run_shard(world, plan, output, process_index, num_processes, stop_after_groups, log)
    barrier()
    if process_index != 0:
        return None
    rows, missing = merge_results(world, plan, output)
    if missing:
        log(f"{missing} images of other shards are not done yet; run again (or finish the other "
            f"processes) to merge results")
        return None
    write_report(rows, world, plan, Path(output), report or ReportSettings(), log=log,
                 skipped=skipped_adapters(world, plan, output))
    return rows

