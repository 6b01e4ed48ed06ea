"""``dreamguide toyworld reproduce``: the PR paper's experiments in the miniature world.

Two stages, so the heavy one can run on a GPU and the scoring anywhere:

``generate`` (GPU minutes): for every subject, fine-tune adapters with ``dreambooth-ti`` and ``dco``
(:mod:`~dreamguide.toyworld.personalize` defaults) and sample

* ``main``: normal and stylized prompts x seeds x modes {dreambooth, consistency, pr, orthogonal}
  at the SPEC default weights (w_text 7.5, w_cons 3), tracing Consistency_p at every step;
* ``sweep`` (dco adapters, stylized prompts): w_text {5, 7.5, 10} x w_cons {1.5, 3, 4.5} (the paper's
  grid) and w_text {1.5, 2, 3} x w_cons {0.5, 1, 2} (low weights) for consistency and pr;
* ``variants`` (dco adapters, stylized prompts): the PR switches of SPEC section 3
  (granularity ``sample``, normalization ``clip-negative``, ``rescale`` 0.5 and 2);
* ``base``: the base model alone on random normal and stylized prompts (the prompt-fidelity bar).

Images are stored as uint8 arrays with one JSON row each (``images.npz`` + ``rows.json``), the
per-step Consistency_p statistics in ``traces.json``. A time budget skips the later parts
(recorded) rather than overrun.

``score`` (CPU seconds): the world's evaluators score every image; results are averaged per
(subject, prompt) unit and given percentile-bootstrap 95% intervals over those units; writes
``results.md``/``results.json``, ``pareto.png`` and ``timesteps.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

MAIN_MODES: tuple[str, ...] = ("dreambooth", "consistency", "parallel-rescaled", "orthogonal")
METHODS: tuple[str, ...] = ("dreambooth-ti", "dco")
SWEEP_W_TEXT: tuple[float, ...] = (5.0, 7.5, 10.0)
SWEEP_W_CONS: tuple[float, ...] = (1.5, 3.0, 4.5)
#: The same sweep at low weights, where the personalized models overfit most visibly.
LOW_SWEEP_W_TEXT: tuple[float, ...] = (1.5, 2.0, 3.0)
LOW_SWEEP_W_CONS: tuple[float, ...] = (0.5, 1.0, 2.0)
#: Guidance weights of the base-model bar (covering both sweeps) ...
BASE_BAR_W_TEXT: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
#: ... and those also drawn with diffusers' default DDIM update (noise not recomputed from the clipped x0).
UNCLIPPED_BAR_W_TEXT: tuple[float, ...] = (2.0, 5.0, 7.5)
#: (name, granularity, normalization, rescale): PR variants besides the default (location, standardize, 1).
PR_VARIANTS: tuple[tuple[str, str, str, float], ...] = (
    ("clip-negative", "location", "clip-negative", 1.0),
    ("sample-clip-negative", "sample", "clip-negative", 1.0),
    ("sample-zero", "sample", "zero", 1.0),
    ("standardize-x0.5", "location", "standardize", 0.5),
    ("standardize-x2", "location", "standardize", 2.0),
)
#: Normal prompts: backgrounds the references never show, a recolouring, an edit.
NORMAL_TEMPLATES: tuple[str, ...] = (
    "a {} in the snow", "a {} in the jungle", "a {} under a night sky",
    "a {} with a city in the background", "a red {}", "a shiny {}",
)
#: Weights of the main comparison and the variants: the SPEC (and PR paper) defaults.
TOY_W_TEXT = 7.5
TOY_W_CONS = 3.0
PARTS: tuple[str, ...] = ("base", "main", "sweep", "variants")
MODE_LABELS = {"dreambooth": "dreambooth", "consistency": "consistency", "parallel-rescaled": "pr",
               "orthogonal": "orthogonal"}


def stylized_templates() -> tuple[str, ...]:
    from dreamguide.toyworld.prompts import STYLIZED_TEMPLATES

    return tuple(STYLIZED_TEMPLATES)


class _Store:
    """Collects images (uint8) with their rows and traces."""

    def __init__(self):
        self.images: list[np.ndarray] = []
        self.rows: list[dict] = []
        self.traces: list[dict] = []

    def add(self, results, **row) -> None:
        for r in results:
            self.images.append(np.asarray(r.image.convert("RGB"), dtype=np.uint8))
            index = len(self.rows)
            self.rows.append({**row, "mode": MODE_LABELS.get(r.mode, r.mode), "seed": r.seed,
                              "prompt": r.prompt, "base_prompt": r.base_prompt})
            if r.trace:
                self.traces.append({"row": index, "timestep": [s["timestep"] for s in r.trace],
                                    "mean": [s["mean"] for s in r.trace], "std": [s["std"] for s in r.trace],
                                    "fraction_negative": [s["fraction_negative"] for s in r.trace]})

    def add_tensor(self, images: torch.Tensor, rows: list[dict]) -> None:
        arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.images.extend(list(arrays))
        self.rows.extend(rows)

    def save(self, out: Path, record: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        images = np.stack(self.images) if self.images else np.zeros((0, 0, 0, 3), dtype=np.uint8)
        np.savez_compressed(out / "images.npz", images=images)
        (out / "rows.json").write_text(json.dumps(self.rows) + "\n", encoding="utf-8")
        (out / "traces.json").write_text(json.dumps(self.traces) + "\n", encoding="utf-8")
        (out / "generate.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _sample(sampler, store, prompt, token, subject, template, set_name, modes, seeds, steps, w_text, w_cons,
            pr=None, **row):
    from dreamguide.guidance import ParallelRescaling
    from dreamguide.prompts import base_prompt
    from dreamguide.sampling import SampleSettings

    settings = SampleSettings(
        prompt=prompt, token=token, class_word=subject.cls, base_prompt=base_prompt(prompt, token, subject.cls),
        modes=tuple(modes), seeds=tuple(seeds), batch_size=len(seeds), steps=steps, w_text=w_text, w_cons=w_cons,
        pr=pr or ParallelRescaling(), trace=True,
    )
    store.add(sampler.sample(settings, progress=False), subject=subject.token, template=template,
              prompt_set=set_name, w_text=w_text, w_cons=w_cons, **row)


def base_prompts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` random normal prompts (photo, said or unsaid) and ``n`` stylized ones, from the grammar."""
    import dataclasses

    from dreamguide.toyworld.subjects import sample_base_labels
    from dreamguide.toyworld.world import caption

    generator = torch.Generator().manual_seed(seed)
    labels = sample_base_labels(2 * n, generator)
    normal = [caption(dataclasses.replace(lab, style="photo"), style=i % 2 == 0, material=False, pattern=i % 3 == 0)
              for i, lab in enumerate(labels[:n])]
    stylized = [caption(lab if lab.style != "photo" else dataclasses.replace(lab, style="sketch"), material=False,
                        pattern=False) for lab in labels[n:]]
    return normal, stylized


def default_workers(device: str | None, subjects: int, methods: int = len(METHODS)) -> int:
    """Processes for :func:`generate`: one per (subject, method) on a GPU (each is launch-bound), one on a CPU."""
    import os

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(device).startswith("cuda"):
        return 1
    return max(1, min(subjects * methods + 1, (os.cpu_count() or 2) - 1))


def generate(out, subjects: Sequence[str] | None = None, methods: Sequence[str] = METHODS,
             seeds: Sequence[int] = (0, 1, 2, 3), steps: int = 20, budget_s: float = 420.0,
             device: str | None = None, base_prompt_count: int = 256, bundle: str | None = None, log=print,
             personalize_settings=None, parts: Sequence[str] = PARTS, adapters_from=None, workers: int = 1,
             adapters_out=None) -> dict:
    """Stage 1 (see the module docstring). ``bundle``: also train ``sks`` with this method and keep it.

    ``parts``: which of ``base``, ``main``, ``sweep``, ``variants`` to run. ``adapters_from``: a folder of
    adapters from an earlier run (``<token>-<method>/``) to reuse instead of fine-tuning.
    ``workers`` > 1: every (subject, method) becomes a job for a pool of that many processes (each
    writes a shard under ``out/shards/``, merged at the end; the images are those of a one-process
    run). Fine-tuned adapters go to ``adapters_out`` (default ``out/adapters``).
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown reproduce parts {unknown}; choose from {', '.join(PARTS)}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers > 1:
        return _generate_sharded(out, subjects or _all_subject_tokens(), methods, seeds, steps, budget_s, device,
                                 base_prompt_count, bundle, log, personalize_settings, parts, adapters_from,
                                 workers)
    from dreamguide.guidance import ParallelRescaling
    from dreamguide.sampling import Sampler
    from dreamguide.toyworld.model import load_toyworld_model, sample_cfg
    from dreamguide.toyworld.personalize import DEFAULTS, load_personalized, personalize, subject_token
    from dreamguide.toyworld.subjects import get_subject
    from dreamguide.toyworld.world import SUBJECTS

    started = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    subjects = [get_subject(s) for s in (subjects or [s.token for s in SUBJECTS])]
    store = _Store()
    skipped: list[str] = []
    timings: dict[str, float] = {}
    stylized = stylized_templates()

    def over() -> bool:
        return time.time() - started > budget_s

    # base-model bar
    t0 = time.time()
    if "base" in parts:
        model = load_toyworld_model(device=device)
        normal, styl = base_prompts(base_prompt_count)
        for w, clipped in [(w, True) for w in BASE_BAR_W_TEXT] + [(w, False) for w in UNCLIPPED_BAR_W_TEXT]:
            for set_name, prompts in (("normal", normal), ("stylized", styl)):
                images = sample_cfg(model, prompts, list(range(len(prompts))), steps=steps, w_text=w,
                                    clipped_model_output=clipped)
                store.add_tensor(images, [{"part": "base", "prompt_set": set_name, "prompt": p, "base_prompt": p,
                                           "mode": "cfg", "w_text": w, "w_cons": None, "seed": i,
                                           "clipped_model_output": clipped}
                                          for i, p in enumerate(prompts)])
    timings["base"] = round(time.time() - t0, 1)

    adapters: dict[tuple[str, str], object] = {}
    runs = [(s, m) for s in subjects for m in methods]
    if bundle:
        runs.insert(0, (get_subject("sks"), bundle))
    t0 = time.time()
    for subject, method in runs:
        if over():
            skipped.append(f"main {subject.token} {method}")
            continue
        token = subject_token(subject.token, method)
        if adapters_from is not None:
            trained, _ = load_personalized(subject.token, method, folder=Path(adapters_from) / f"{subject.token}-{method}",
                                           model=load_toyworld_model(device=device), device=device)
        else:
            folder = Path(adapters_out or out / "adapters") / f"{subject.token}-{method}"
            trained = personalize(subject.token, method, folder, personalize_settings or DEFAULTS,
                                  model=load_toyworld_model(device=device), device=device).model
        sampler = Sampler(trained, adapter_name="subject")
        adapters[(subject.token, method)] = sampler
        if "main" not in parts or (bundle and (subject.token, method) == ("sks", bundle) and method not in methods):
            continue
        for set_name, templates in (("normal", NORMAL_TEMPLATES), ("stylized", stylized)):
            for template in templates:
                prompt = template.format(f"{token} {subject.cls}")
                _sample(sampler, store, prompt, token, subject, template, set_name, MAIN_MODES, seeds, steps,
                        TOY_W_TEXT, TOY_W_CONS, part="main", method=method, variant="default")
        log(f"main {subject.token} {method}: {time.time() - started:.0f}s")
    timings["main"] = round(time.time() - t0, 1)

    t0 = time.time()
    for subject in subjects:
        sampler = adapters.get((subject.token, "dco"))
        if sampler is None or "sweep" not in parts:
            continue
        for template in stylized[:4]:
            prompt = template.format(f"{subject.token} {subject.cls}")
            for grid, w_texts, w_conses in (("low", LOW_SWEEP_W_TEXT, LOW_SWEEP_W_CONS),
                                            ("paper", SWEEP_W_TEXT, SWEEP_W_CONS)):
                for w_text in w_texts:
                    for w_cons in w_conses:
                        if over():
                            skipped.append(f"sweep {subject.token} {template} {w_text} {w_cons}")
                            continue
                        _sample(sampler, store, prompt, subject.token, subject, template, "stylized",
                                ("consistency", "parallel-rescaled"), seeds, steps, w_text, w_cons,
                                part="sweep", method="dco", variant="default", grid=grid)
        log(f"sweep {subject.token}: {time.time() - started:.0f}s")
    timings["sweep"] = round(time.time() - t0, 1)

    t0 = time.time()
    for subject in subjects:
        sampler = adapters.get((subject.token, "dco"))
        if sampler is None or "variants" not in parts:
            continue
        for template in stylized[:4]:
            prompt = template.format(f"{subject.token} {subject.cls}")
            # reference rows (consistency and default PR, same prompts, seeds and weights) unless main has them
            if "main" not in parts and not over():
                _sample(sampler, store, prompt, subject.token, subject, template, "stylized",
                        ("consistency", "parallel-rescaled"), seeds, steps, TOY_W_TEXT, TOY_W_CONS,
                        part="variants", method="dco", variant="reference")
            for name, granularity, normalization, rescale in PR_VARIANTS:
                if over():
                    skipped.append(f"variant {subject.token} {template} {name}")
                    continue
                _sample(sampler, store, prompt, subject.token, subject, template, "stylized",
                        ("parallel-rescaled",), seeds, steps, TOY_W_TEXT, TOY_W_CONS,
                        pr=ParallelRescaling(granularity=granularity, normalization=normalization, rescale=rescale),
                        part="variants", method="dco", variant=name)
        log(f"variants {subject.token}: {time.time() - started:.0f}s")
    timings["variants"] = round(time.time() - t0, 1)

    record = {
        "subjects": [s.token for s in subjects], "methods": list(methods), "seeds": list(seeds), "steps": steps,
        "toy_w_text": TOY_W_TEXT, "toy_w_cons": TOY_W_CONS, "sweep_w_text": list(SWEEP_W_TEXT),
        "sweep_w_cons": list(SWEEP_W_CONS), "low_sweep_w_text": list(LOW_SWEEP_W_TEXT),
        "low_sweep_w_cons": list(LOW_SWEEP_W_CONS), "base_bar_w_text": list(BASE_BAR_W_TEXT),
        "unclipped_bar_w_text": list(UNCLIPPED_BAR_W_TEXT), "pr_variants": [list(v) for v in PR_VARIANTS],
        "normal_templates": list(NORMAL_TEMPLATES), "stylized_templates": list(stylized),
        "parts": list(parts), "adapters_from": None if adapters_from is None else str(adapters_from),
        "images": len(store.rows), "skipped": skipped, "timings_s": timings,
        "seconds": round(time.time() - started, 1), "device": _device_name(device), "budget_s": budget_s,
    }
    store.save(out, record)
    log(f"generated {len(store.rows)} images in {record['seconds']}s; skipped {len(skipped)} parts")
    return record


def _all_subject_tokens() -> list[str]:
    from dreamguide.toyworld.world import SUBJECTS

    return [s.token for s in SUBJECTS]


def _shard_job(kwargs: dict) -> dict:
    """One worker process of :func:`_generate_sharded`: :func:`generate` for one (subject, method)."""
    torch.set_num_threads(1)
    return generate(**kwargs)


def _generate_sharded(out, subjects, methods, seeds, steps, budget_s, device, base_prompt_count, bundle, log,
                      personalize_settings, parts, adapters_from, workers) -> dict:
    import multiprocessing

    started = time.time()
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shard_parts = [p for p in parts if p != "base"]
    common = {"seeds": list(seeds), "steps": steps, "budget_s": budget_s, "device": device, "log": print,
              "personalize_settings": personalize_settings, "adapters_from": adapters_from,
              "adapters_out": str(out / "adapters")}
    jobs = []
    if bundle and not ("sks" in subjects and bundle in methods):  # train the bundled adapter only
        jobs.append({"out": str(out / "shards" / f"sks-{bundle}"), "subjects": ["sks"], "methods": [bundle],
                     "parts": [], **common})
    for token in subjects:
        for method in methods:
            # the sweep and the variants use the dco adapters only
            parts_ = [p for p in shard_parts if p == "main" or method == "dco"]
            jobs.append({"out": str(out / "shards" / f"{token}-{method}"), "subjects": [token], "methods": [method],
                         "parts": parts_, **common})
    shards = [out / "shards" / "base"] if "base" in parts else []
    shards += [Path(j["out"]) for j in jobs]
    workers = min(workers, len(jobs)) if jobs else 1
    log(f"generating {len(jobs)} (subject, method) jobs in {workers} processes")
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = pool.map_async(_shard_job, jobs, chunksize=1) if jobs else None
        if "base" in parts:  # the parent draws the base-model bar meanwhile
            generate(out / "shards" / "base", subjects=[subjects[0]], methods=(), seeds=seeds, steps=steps,
                     budget_s=budget_s, device=device, base_prompt_count=base_prompt_count, log=log, parts=["base"])
        if pending is not None:
            pending.get()
    return merge_shards(out, shards, extra={"workers": workers,
                                            "seconds": round(time.time() - started, 1), "budget_s": budget_s},
                        log=log)


def merge_shards(out, shards: Sequence[Path], extra: dict | None = None, log=print) -> dict:
    """Concatenate the ``generate`` outputs in ``shards`` into ``out`` (images, rows, traces, record)."""
    out = Path(out)
    store = _Store()
    records = []
    for shard in shards:
        shard = Path(shard)
        offset = len(store.rows)
        rows = json.loads((shard / "rows.json").read_text())
        traces = json.loads((shard / "traces.json").read_text())
        if rows:
            store.images.extend(np.load(shard / "images.npz")["images"])
        store.rows.extend(rows)
        store.traces.extend({**t, "row": t["row"] + offset} for t in traces)
        records.append(json.loads((shard / "generate.json").read_text()))
    subject_records = [r for r in records if set(r["parts"]) - {"base"}]
    first = subject_records[0] if subject_records else records[0]
    record = {**first,
              "subjects": list(dict.fromkeys(t for r in subject_records for t in r["subjects"])),
              "methods": list(dict.fromkeys(m for r in subject_records for m in r["methods"])),
              "parts": sorted({p for r in records for p in r["parts"]}, key=PARTS.index),
              "images": len(store.rows),
              "skipped": [s for r in records for s in r["skipped"]],
              "timings_s": {p: max(r["timings_s"].get(p, 0.0) for r in records) for p in PARTS},
              "shard_seconds": {Path(s).name: r["seconds"] for s, r in zip(shards, records)},
              **(extra or {})}
    store.save(out, record)
    log(f"generated {len(store.rows)} images in {record['seconds']}s; skipped {len(record['skipped'])} parts")
    return record


def _device_name(device) -> str:
    import os
    import platform

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# Stage 2: scoring


def _units(rows: list[dict], values: np.ndarray, keys=("subject", "template")) -> np.ndarray:
    """Mean of ``values`` per (subject, prompt) unit (seeds averaged), in a fixed unit order."""
    groups: dict[tuple, list[float]] = {}
    for row, v in zip(rows, values):
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(float(v))
    return np.array([np.mean(groups[k]) for k in sorted(groups, key=str)])


def _summary(rows, metrics: dict[str, np.ndarray], group_keys, seed: int = 0, samples: int = 2000) -> list[dict]:
    from dreamguide.evaluation.report import bootstrap_interval

    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row.get(k) for k in group_keys), []).append(i)
    out = []
    for key, idx in groups.items():
        entry = dict(zip(group_keys, key))
        entry["images"] = len(idx)
        sub = [rows[i] for i in idx]
        for name, values in metrics.items():
            units = _units(sub, values[idx])
            lo, hi = bootstrap_interval(units, samples, seed)
            entry[name] = round(float(units.mean()), 4)
            entry[f"{name}_low"], entry[f"{name}_high"] = round(lo, 4), round(hi, 4)
            entry["units"] = len(units)
        out.append(entry)
    return out


def _paired_difference(rows, values, a: dict, b: dict, seed: int = 0, samples: int = 2000) -> dict:
    """Mean over units of (a - b) with a bootstrap 95% interval; a and b select rows by their fields."""
    from dreamguide.evaluation.report import bootstrap_interval

    def select(sel):
        idx = [i for i, r in enumerate(rows) if all(r.get(k) == v for k, v in sel.items())]
        groups: dict[tuple, list[float]] = {}
        for i in idx:
            groups.setdefault((rows[i]["subject"], rows[i].get("method"), rows[i]["template"]), []).append(values[i])
        return {k: float(np.mean(v)) for k, v in groups.items()}

    ua, ub = select(a), select(b)
    common = sorted(set(ua) & set(ub), key=str)
    diff = np.array([ua[k] - ub[k] for k in common])
    if len(diff) == 0:
        return {"mean": None, "low": None, "high": None, "units": 0}
    lo, hi = bootstrap_interval(diff, samples, seed)
    return {"mean": round(float(diff.mean()), 4), "low": round(lo, 4), "high": round(hi, 4), "units": len(diff)}


def score(folder, evaluators=None, log=print) -> dict:
    """Stage 2: score ``generate``'s images; write results.md/json, pareto.png, timesteps.png into ``folder``."""
    from dreamguide.toyworld.evaluators import ToyEvaluators
    from dreamguide.toyworld.subjects import reference_images

    folder = Path(folder)
    rows = json.loads((folder / "rows.json").read_text())
    traces = json.loads((folder / "traces.json").read_text())
    record = json.loads((folder / "generate.json").read_text())
    images = torch.from_numpy(np.load(folder / "images.npz")["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    evaluators = evaluators or ToyEvaluators.load()
    bases = [r["base_prompt"] for r in rows]
    text = evaluators.text_alignment(images, bases).numpy()
    judged = evaluators.judge(images, bases)
    carries = judged.all.float().numpy()
    identity = np.full(len(rows), np.nan)
    refs = {}
    for i, r in enumerate(rows):
        if r.get("subject"):
            refs.setdefault(r["subject"], []).append(i)
    for token, idx in refs.items():
        identity[idx] = evaluators.identity(images[idx], reference_images(token)).numpy()
    metrics = {"text_alignment": text, "identity": identity, "carries_prompt": carries,
               "follows_style": judged.style.float().numpy()}

    def part(name):
        idx = [i for i, r in enumerate(rows) if r["part"] == name]
        return [rows[i] for i in idx], {k: v[idx] for k, v in metrics.items()}, idx

    results: dict = {"generate": record}
    # base-model bar
    base_rows, _, base_idx = part("base")
    bar = []
    for w, clipped in sorted({(r["w_text"], r.get("clipped_model_output", False)) for r in base_rows},
                             key=lambda k: (not k[1], k[0])):
        for set_name in ("normal", "stylized"):
            idx = [i for i in base_idx if rows[i]["w_text"] == w and rows[i]["prompt_set"] == set_name
                   and rows[i].get("clipped_model_output", False) == clipped]
            if idx:
                bar.append({"w_text": w, "clipped_model_output": clipped, "prompt_set": set_name,
                            "images": len(idx),
                            "class": float(judged.cls[idx].float().mean()),
                            "scene": float(judged.scene[idx].float().mean()),
                            "style": float(judged.style[idx].float().mean()),
                            "all_three": float(judged.all[idx].float().mean())})
    results["base_bar"] = bar
    main_rows, main_metrics, main_idx = part("main")
    results["main"] = _summary(main_rows, main_metrics, ("method", "prompt_set", "mode"))
    sweep_rows, sweep_metrics, _ = part("sweep")
    results["sweep"] = _summary(sweep_rows, sweep_metrics, ("grid", "mode", "w_text", "w_cons")) if sweep_rows else []
    results["sweep_pr_vs_consistency"] = [
        {"w_text": w_text, "w_cons": w_cons,
         **{name: _paired_difference(sweep_rows, sweep_metrics[name],
                                     {"mode": "pr", "w_text": w_text, "w_cons": w_cons},
                                     {"mode": "consistency", "w_text": w_text, "w_cons": w_cons})
            for name in metrics}}
        for w_text, w_cons in sorted({(r["w_text"], r["w_cons"]) for r in sweep_rows})
    ]
    var_rows, var_metrics, _ = part("variants")
    results["variants"] = _summary(var_rows, var_metrics, ("variant", "mode")) if var_rows else []
    # PR vs consistency on stylized prompts (paired over subject x method x prompt units)
    results["pr_vs_consistency"] = {
        name: _paired_difference(main_rows, main_metrics[name], {"mode": "pr", "prompt_set": "stylized"},
                                 {"mode": "consistency", "prompt_set": "stylized"})
        for name in metrics
    }
    results["pr_vs_consistency_normal"] = {
        name: _paired_difference(main_rows, main_metrics[name], {"mode": "pr", "prompt_set": "normal"},
                                 {"mode": "consistency", "prompt_set": "normal"})
        for name in metrics
    }
    # variants against default PR and consistency on the same dco stylized units
    dco_sty = [i for i in main_idx if rows[i]["method"] == "dco" and rows[i]["prompt_set"] == "stylized"
               and rows[i]["template"] in {r["template"] for r in var_rows}]
    results["variant_reference"] = _summary([rows[i] for i in dco_sty], {k: v[dco_sty] for k, v in metrics.items()},
                                            ("mode",)) if dco_sty else []
    results["timesteps"] = _timestep_curves(rows, traces)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    _pareto_plot(results, folder / "pareto.png")
    _timestep_plot(results["timesteps"], folder / "timesteps.png")
    (folder / "results.md").write_text(results_markdown(results), encoding="utf-8")
    log(f"scored {len(rows)} images -> {folder / 'results.md'}")
    return results


def _timestep_curves(rows, traces) -> dict:
    curves: dict = {}
    for t in traces:
        r = rows[t["row"]]
        if r["part"] != "main" or r["mode"] not in ("consistency", "pr"):
            continue
        key = f"{r['mode']}|{r['prompt_set']}"
        c = curves.setdefault(key, {"n": 0, "mean": None, "std": None, "fraction_negative": None,
                                    "timestep": t["timestep"]})
        for name in ("mean", "std", "fraction_negative"):
            c[name] = t[name] if c[name] is None else [a + b for a, b in zip(c[name], t[name])]
        c["n"] += 1
    for c in curves.values():
        for name in ("mean", "std", "fraction_negative"):
            c[name] = [round(v / c["n"], 5) for v in c[name]]
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pareto_plot(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5))
    markers = {"dreambooth": "s", "consistency": "o", "pr": "^", "orthogonal": "v"}
    for method, color in (("dreambooth-ti", "tab:blue"), ("dco", "tab:red")):
        for r in results["main"]:
            if r["method"] != method or r["prompt_set"] != "stylized":
                continue
            ax.errorbar(r["text_alignment"], r["identity"],
                        xerr=[[r["text_alignment"] - r["text_alignment_low"]], [r["text_alignment_high"] - r["text_alignment"]]],
                        yerr=[[r["identity"] - r["identity_low"]], [r["identity_high"] - r["identity"]]],
                        marker=markers.get(r["mode"], "o"), color=color, capsize=2, ls="none",
                        label=f"{method} / {r['mode']}")
    for grid, ls in (("paper", ":"), ("low", "--")):
        for mode, color in (("consistency", "gray"), ("pr", "black")):
            cells = [r for r in results["sweep"] if r["mode"] == mode and r.get("grid", "paper") == grid]
            for i, w_text in enumerate(sorted({r["w_text"] for r in cells})):
                pts = sorted([r for r in cells if r["w_text"] == w_text], key=lambda r: r["w_cons"])
                ax.plot([p["text_alignment"] for p in pts], [p["identity"] for p in pts], marker=markers[mode],
                        color=color, ls=ls, lw=0.8, ms=4, alpha=0.8 if grid == "paper" else 0.35,
                        label=None if i else f"dco / {mode}, {grid} sweep (a line per w_text, over w_cons)")
    ax.set_xlabel("text alignment (toy CLIP cosine to the base prompt)")
    ax.set_ylabel("identity (toy DINO cosine to the references)")
    ax.set_title("stylized prompts: identity vs text alignment (95% bootstrap CIs)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _timestep_plot(curves: dict, path: Path) -> None:
    from dreamguide.toyworld.demo import plot_consistency_p

    by_mode_and_set = {tuple(key.split("|")): curve for key, curve in sorted(curves.items())}
    plot_consistency_p(by_mode_and_set, path, "Consistency_p: mean over images (band: mean spatial std)")


def _fmt(r: dict, name: str) -> str:
    return f"{r[name]:.3f} [{r[name + '_low']:.3f}, {r[name + '_high']:.3f}]"


def results_markdown(results: dict) -> str:
    g = results["generate"]
    lines = ["## Results tables", ""]
    lines += ["### Base model: prompt fidelity (attribute classifiers)", "",
              "| w_text | DDIM noise from clipped x0 | prompts | images | class | scene | style | all three |",
              "|---|---|---|---|---|---|---|---|"]
    for b in results["base_bar"]:
        lines.append(f"| {b['w_text']:g} | {'yes' if b.get('clipped_model_output') else 'no'} | {b['prompt_set']} | "
                     f"{b['images']} | {b['class']:.3f} | {b['scene']:.3f} | {b['style']:.3f} | {b['all_three']:.3f} |")
    lines += ["", f"### Main comparison (w_text {g['toy_w_text']:g}, w_cons {g['toy_w_cons']:g}; means over "
              "(subject, prompt) units with 95% bootstrap intervals)", "",
              "| adapter | prompts | mode | text alignment | identity | carries prompt | follows style |",
              "|---|---|---|---|---|---|---|"]
    order = {"dreambooth": 0, "consistency": 1, "pr": 2, "orthogonal": 3}
    for r in sorted(results["main"], key=lambda r: (r["method"], r["prompt_set"], order.get(r["mode"], 9))):
        lines.append(f"| {r['method']} | {r['prompt_set']} | {r['mode']} | {_fmt(r, 'text_alignment')} | "
                     f"{_fmt(r, 'identity')} | {_fmt(r, 'carries_prompt')} | {r['follows_style']:.2f} |")
    for key, title in (("pr_vs_consistency", "stylized"), ("pr_vs_consistency_normal", "normal")):
        lines += ["", f"### PR minus consistency, {title} prompts (paired over subject x adapter x prompt)", "",
                  "| metric | difference | 95% interval | units |", "|---|---|---|---|"]
        for name, d in results[key].items():
            if d["mean"] is not None:
                lines.append(f"| {name} | {d['mean']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | {d['units']} |")
    if results["sweep"]:
        lines += ["", "### Weight sweep (dco adapters, stylized prompts)", "",
                  "| grid | mode | w_text | w_cons | text alignment | identity | carries prompt |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(results["sweep"], key=lambda r: (r.get("grid", ""), r["mode"], r["w_text"], r["w_cons"])):
            lines.append(f"| {r.get('grid', '')} | {r['mode']} | {r['w_text']:g} | {r['w_cons']:g} | "
                         f"{_fmt(r, 'text_alignment')} | {_fmt(r, 'identity')} | {_fmt(r, 'carries_prompt')} |")
        lines += ["", "### Weight sweep: PR minus consistency (paired over subject x prompt)", "",
                  "| w_text | w_cons | text alignment | identity | carries prompt | units |", "|---|---|---|---|---|---|"]
        for d in results.get("sweep_pr_vs_consistency", []):
            cells = [f"{d[n]['mean']:+.3f} [{d[n]['low']:+.3f}, {d[n]['high']:+.3f}]"
                     if d[n]["mean"] is not None else "-" for n in ("text_alignment", "identity", "carries_prompt")]
            lines.append(f"| {d['w_text']:g} | {d['w_cons']:g} | {' | '.join(cells)} | {d['text_alignment']['units']} |")
    if results["variants"]:
        lines += ["", "### PR variants (dco adapters, stylized prompts; 'main' rows: the main comparison on the same "
                  "prompts; consistency / pr rows without 'main': references sampled with the variants)", "", "| variant | text alignment | identity | carries prompt |", "|---|---|---|---|"]
        for r in results["variant_reference"]:
            lines.append(f"| {r['mode']} (main) | {_fmt(r, 'text_alignment')} | {_fmt(r, 'identity')} | "
                         f"{_fmt(r, 'carries_prompt')} |")
        for r in results["variants"]:
            name = r["mode"] if r["variant"] == "reference" else f"pr {r['variant']}"
            lines.append(f"| {name} | {_fmt(r, 'text_alignment')} | {_fmt(r, 'identity')} | "
                         f"{_fmt(r, 'carries_prompt')} |")
    return "\n".join(lines) + "\n"
