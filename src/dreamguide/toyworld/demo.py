"""``dreamguide demo``: the method end to end in the miniature world, on a CPU.

1. load the bundled base model and the bundled subject adapter (or fine-tune the subject afresh);
2. sample normal and stylized prompts with ``dreambooth`` (plain sampling of the personalized
   model), ``consistency`` (DCO's consistency guidance) and ``pr`` (parallel rescaling), every
   mode from the same seeds, tracing Consistency_p at every step;
3. score every image with the world's evaluators: text alignment (this world's CLIP, against the
   base prompt), identity (this world's DINO, against the reference photos) and whether the
   image carries the prompt's class, scene and style (attribute classifiers);
4. write ``grid.png`` (rows: prompt x seed, columns: mode), ``metrics.md`` / ``metrics.csv``
   (per mode and prompt set), ``consistency_p.png`` (Consistency_p per step, mean and spread,
   normal vs stylized), ``tradeoff.png`` (each mode's text alignment against identity, the
   consistency modes also at the ``curve_w_cons`` weights: a curve, not one point), ``images/``
   and ``demo.json``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dreamguide.sample_settings import PREVIEW_STEPS
from dreamguide.sampling import SampleSettings

DEMO_MODES: tuple[str, ...] = ("dreambooth", "consistency", "parallel-rescaled")
MODE_LABELS = {"dreambooth": "dreambooth", "consistency": "consistency", "parallel-rescaled": "pr"}
#: Prompt templates ``{}`` = "<token> <class>": two normal (new backgrounds), two stylized.
#: Two backgrounds the references never show and the two styles the overfit DreamBooth adapters
#: ignore most often in the reproduction (docs/RESULTS.md), so the demo shows the effect.
DEMO_TEMPLATES: tuple[str, ...] = (
    "a {} in the snow",
    "a {} under a night sky",
    "a cartoon illustration of a {}",
    "a neon sign of a {}",
)


@dataclass
class DemoSettings:
    """What the demo runs; the guidance weights are the sampling defaults (``SampleSettings``)."""

    subject: str = "sks"
    prompts: Sequence[str] = ()  # token prompts; empty: DEMO_TEMPLATES filled with the subject
    seeds: Sequence[int] = (0, 1)
    steps: int = PREVIEW_STEPS
    w_text: float = SampleSettings.w_text
    w_cons: float = SampleSettings.w_cons
    output: str = "demo-output"
    retrain: bool = False
    retrain_steps: int = 0  # 0: the personalization default
    method: str = "dreambooth"
    device: str = "cpu"
    modes: Sequence[str] = DEMO_MODES
    #: Further w_cons values the consistency modes are sampled at for the trade-off curve (the grid
    #: and the metrics table stay at ``w_cons``); empty: one point per mode.
    curve_w_cons: Sequence[float] = (1.0, 2.0)
    extra: dict = field(default_factory=dict)


def prompt_set(base_prompt: str) -> str:
    """``stylized`` if the prompt names a style other than photo, else ``normal``."""
    from dreamguide.toyworld.world import DEFAULT_STYLE, parse

    style = parse(base_prompt).style
    return "normal" if style in (None, DEFAULT_STYLE) else "stylized"


def check_grammar(prompt: str, base_prompt: str) -> str:
    """The prompt set of ``base_prompt``; a prompt the world's grammar cannot read is a ValueError naming it."""
    try:
        return prompt_set(base_prompt)
    except ValueError as error:
        raise ValueError(f"prompt {prompt!r} is outside the toy world's grammar: {error}") from None


def prompt_case(prompt: str, token: str, class_word: str) -> tuple[str, str, str]:
    """(token prompt, base prompt, prompt set) of a prompt in the world's grammar."""
    from dreamguide.prompts import base_prompt as derive_base_prompt

    base = derive_base_prompt(prompt, token, class_word)
    return prompt, base, check_grammar(prompt, base)


def _log(message: str) -> None:
    print(message, flush=True)


def run_demo(settings: DemoSettings, log=_log, evaluators=None) -> dict:
    """Run the demo; returns the paths written and the metrics.

    ``evaluators``: a :class:`~dreamguide.toyworld.evaluators.ToyEvaluators` (default: the bundled ones).
    """
    from dreamguide.sampling import SampleItem, Sampler, parse_modes
    from dreamguide.toyworld.evaluators import ToyEvaluators
    from dreamguide.toyworld.model import BUNDLED_MODEL_DIR, load_toyworld_model
    from dreamguide.toyworld.personalize import (
        DEFAULTS,
        adapter_dir,
        load_personalized,
        personalize,
        subject_token,
    )
    from dreamguide.toyworld.subjects import get_subject, reference_images

    started = time.time()
    subject = get_subject(settings.subject)
    token = subject_token(subject.token, settings.method)
    prompts = list(settings.prompts) or [t.format(f"{token} {subject.cls}") for t in DEMO_TEMPLATES]
    cases = [prompt_case(prompt, token, subject.cls) for prompt in prompts]
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)

    model = load_toyworld_model(device=settings.device)
    folder = adapter_dir(subject.token, settings.method)
    if settings.retrain or not folder.exists():
        folder = output / "adapter"
        steps = settings.retrain_steps or DEFAULTS.steps
        log(f"fine-tuning {token} {subject.cls} with {settings.method} ({steps} steps) -> {folder}")
        t0 = time.time()
        result = personalize(subject.token, settings.method, folder, DEFAULTS.__class__(
            **{**DEFAULTS.__dict__, "steps": steps}), model=model, device=settings.device)
        model = result.model
        log(f"  done in {time.time() - t0:.0f}s")
    else:
        model, _ = load_personalized(subject.token, settings.method, folder=folder, model=model)
    sampler = Sampler(model, sources={"model": str(BUNDLED_MODEL_DIR), "lora": str(folder)})

    labels = ", ".join(MODE_LABELS.get(m, m) for m in settings.modes)
    log(f"sampling {len(cases)} prompts x {len(settings.seeds)} seeds x modes {labels} "
        f"({settings.steps} steps, w_text {settings.w_text}, w_cons {settings.w_cons})")
    modes = parse_modes(settings.modes)
    keys = [(index, mode, seed) for index in range(len(cases)) for mode in modes for seed in settings.seeds]
    items = [
        SampleItem(prompt=cases[index][0], base_prompt=cases[index][1], mode=mode, seed=seed, w_text=settings.w_text,
                   w_cons=settings.w_cons, token=token, class_word=subject.cls)
        for index, mode, seed in keys
    ]
    # One batch per (prompt, mode): all seeds of it.
    sampled = sampler.sample_items(items, steps=settings.steps, batch_size=len(settings.seeds), trace=True,
                                   progress=False)
    results = [(index, r) for (index, _, _), r in zip(keys, sampled)]  # (case index, SampleResult)
    curve_keys = [(index, mode, seed, w) for w in settings.curve_w_cons if w != settings.w_cons
                  for index in range(len(cases)) for mode in modes if _moves_with_w_cons(mode) for seed in settings.seeds]
    if curve_keys:
        log(f"  and the consistency modes at w_cons {', '.join(f'{w:g}' for w in settings.curve_w_cons)} "
            f"for the trade-off curve")
    curve_items = [
        SampleItem(prompt=cases[index][0], base_prompt=cases[index][1], mode=mode, seed=seed, w_text=settings.w_text,
                   w_cons=w, token=token, class_word=subject.cls)
        for index, mode, seed, w in curve_keys
    ]
    curve_results = [(index, r) for (index, *_), r in zip(curve_keys, sampler.sample_items(
        curve_items, steps=settings.steps, batch_size=len(settings.seeds), progress=False))] if curve_items else []
    sampling_s = time.time() - started

    evaluators = evaluators or ToyEvaluators.load()
    from dreamguide.toyworld.render import from_pil

    scored = results + curve_results
    images = from_pil([r.image for _, r in scored])
    bases = [cases[i][1] for i, _ in scored]
    text = evaluators.text_alignment(images, bases)
    identity = evaluators.identity(images, reference_images(subject))
    carries = evaluators.judge(images, bases).all.float()
    all_rows = []
    for j, (i, r) in enumerate(scored):
        all_rows.append({
            "mode": MODE_LABELS.get(r.mode, r.mode), "prompt_set": cases[i][2], "prompt": r.prompt,
            "base_prompt": r.base_prompt, "seed": r.seed, "w_cons": r.metadata["w_cons"],
            "text_alignment": float(text[j]), "identity": float(identity[j]), "carries_prompt": float(carries[j]),
        })
    rows, curve_rows = all_rows[: len(results)], all_rows[len(results):]

    paths = {
        "grid": _write_grid(results, cases, settings, output / "grid.png"),
        "images": _write_images(results, output / "images"),
        "metrics_md": output / "metrics.md",
        "metrics_csv": output / "metrics.csv",
        "consistency_p": _plot_consistency_p(results, cases, output / "consistency_p.png"),
        "tradeoff": plot_mode_curves(rows + curve_rows, output / "tradeoff.png", settings.w_text),
    }
    summary = _summarize(rows)
    _write_metrics(rows, summary, settings, paths["metrics_md"], paths["metrics_csv"])
    record = {
        "subject": subject.token, "class_word": subject.cls, "method": settings.method, "token": token,
        "adapter": str(folder), "retrained": bool(settings.retrain or folder.parent == output),
        "prompts": [{"prompt": p, "base_prompt": b, "set": s} for p, b, s in cases],
        "seeds": list(settings.seeds), "steps": settings.steps, "w_text": settings.w_text,
        "w_cons": settings.w_cons, "summary": summary, "rows": rows, "curve_w_cons": list(settings.curve_w_cons),
        "curve": tradeoff_points(rows + curve_rows), "curve_rows": curve_rows,
        "seconds": {"sampling": round(sampling_s, 1), "total": round(time.time() - started, 1)},
        "files": {k: str(v) for k, v in paths.items()},
    }
    (output / "demo.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    paths["record"] = output / "demo.json"
    return {"paths": paths, "summary": summary, "record": record}


def _moves_with_w_cons(mode: str) -> bool:
    """Whether ``mode`` has a consistency term, so w_cons moves it along a curve."""
    from dreamguide.guidance import get_mode

    return get_mode(mode).has_consistency


def tradeoff_points(rows: list[dict]) -> list[dict]:
    """Mean text alignment and identity per (prompt set, mode, w_cons): the points of the trade-off plot."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        w = row["w_cons"] if row["mode"] != MODE_LABELS["dreambooth"] else None
        groups.setdefault((row["prompt_set"], row["mode"], w), []).append(row)
    return [{"prompt_set": s, "mode": m, "w_cons": w, "images": len(items),
             "text_alignment": round(sum(r["text_alignment"] for r in items) / len(items), 4),
             "identity": round(sum(r["identity"] for r in items) / len(items), 4)}
            for (s, m, w), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0))]


def plot_mode_curves(rows: list[dict], path: Path, w_text: float) -> Path:
    """Per prompt set, each mode's (text alignment, identity) points, joined in w_cons order and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = tradeoff_points(rows)
    sets = list(dict.fromkeys(p["prompt_set"] for p in points))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        for mode in dict.fromkeys(p["mode"] for p in points):
            curve = [p for p in points if p["prompt_set"] == set_name and p["mode"] == mode]
            if not curve:
                continue
            xs, ys = [p["text_alignment"] for p in curve], [p["identity"] for p in curve]
            ax.plot(xs, ys, "o-", label=mode)
            for p, x, y in zip(curve, xs, ys):
                if p["w_cons"] is not None:
                    ax.annotate(f"{p['w_cons']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(f"{set_name} prompts (w_text {w_text:g}; labels: w_cons)")
        ax.set_xlabel("text alignment")
        ax.set_ylabel("identity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    from dreamguide.atomic import atomic_open

    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return path


def _summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["prompt_set"]), []).append(row)
    out = []
    for (mode, set_name), items in groups.items():
        out.append({
            "mode": mode, "prompt_set": set_name, "images": len(items),
            **{k: round(sum(r[k] for r in items) / len(items), 4)
               for k in ("text_alignment", "identity", "carries_prompt")},
        })
    order = {m: i for i, m in enumerate(MODE_LABELS.values())}
    return sorted(out, key=lambda r: (r["prompt_set"], order.get(r["mode"], 99)))


def _write_metrics(rows, summary, settings, md_path: Path, csv_path: Path) -> None:
    lines = [
        "# Demo metrics",
        "",
        "Text alignment: cosine of the toy world's CLIP between the image and the **base prompt** (token "
        "replaced by the class word). Identity: mean cosine of the toy world's DINO to the subject's reference "
        "photos. Carries prompt: fraction of images whose class, scene and style the attribute classifiers "
        "read as the prompt's.",
        "",
        f"w_text {settings.w_text}, w_cons {settings.w_cons}, {settings.steps} steps, seeds "
        f"{', '.join(map(str, settings.seeds))}.",
        "",
        "| prompt set | mode | images | text alignment | identity | carries prompt |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['prompt_set']} | {s['mode']} | {s['images']} | {s['text_alignment']:.3f} | "
                     f"{s['identity']:.3f} | {s['carries_prompt']:.2f} |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    csv_path.write_text(buffer.getvalue(), encoding="utf-8")


def _write_images(results, folder: Path) -> Path:
    from dreamguide.images import save_png
    from dreamguide.sampling import image_filename

    folder.mkdir(parents=True, exist_ok=True)
    for index, r in results:
        save_png(r.image, folder / f"p{index}-{image_filename(r)}", r.metadata)
    return folder


def _write_grid(results, cases, settings, path: Path, scale: int = 3) -> Path:
    from dreamguide.images import image_grid, save_png

    modes = [m for m in dict.fromkeys(r.mode for _, r in results)]
    by_key = {(i, r.seed, r.mode): r.image for i, r in results}
    rows, labels = [], []
    for i, (prompt, _, set_name) in enumerate(cases):
        for seed in settings.seeds:
            rows.append([by_key[(i, seed, m)].resize((32 * scale, 32 * scale), resample=0) for m in modes])
            labels.append(f"{prompt}  (seed {seed})")
    grid = image_grid(rows, [MODE_LABELS.get(m, m) for m in modes], labels)
    return save_png(grid, path, {"steps": settings.steps, "w_text": settings.w_text, "w_cons": settings.w_cons})


def consistency_p_by_prompt_set(results, cases, mode: str = "consistency") -> dict[str, dict[str, list[float]]]:
    """Per prompt set: per step, the mean over images of Consistency_p's spatial mean, its spread
    (mean spatial std) and the fraction of negative locations, for one guidance mode's images."""
    curves: dict[str, dict[str, list[float]]] = {}
    for set_name in ("normal", "stylized"):
        traces = [r.trace for i, r in results if r.mode == mode and cases[i][2] == set_name and r.trace]
        if not traces:
            continue
        steps = len(traces[0])
        curves[set_name] = {
            "timestep": [traces[0][s]["timestep"] for s in range(steps)],
            "mean": [sum(t[s]["mean"] for t in traces) / len(traces) for s in range(steps)],
            "std": [sum(t[s]["std"] for t in traces) / len(traces) for s in range(steps)],
            "fraction_negative": [sum(t[s]["fraction_negative"] for t in traces) / len(traces) for s in range(steps)],
        }
    return curves


def _plot_consistency_p(results, cases, path: Path) -> Path:
    curves = {
        (MODE_LABELS[mode], set_name): curve
        for mode in ("consistency", "parallel-rescaled")
        for set_name, curve in consistency_p_by_prompt_set(results, cases, mode).items()
    }
    return plot_consistency_p_by_prompt_set(curves, path, "Consistency_p per step: mean, band = mean spatial std")


def plot_consistency_p_by_prompt_set(curves: dict[tuple[str, str], dict], path: Path, title: str) -> Path:
    """Consistency_p per step, one curve per (mode, prompt set): mean (band: spatial std) and fraction < 0.

    Solid lines for consistency guidance, dotted for the others; the band is drawn for consistency only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"normal": "tab:blue", "stylized": "tab:red"}
    for (mode, set_name), c in curves.items():
        x = list(range(1, len(c["mean"]) + 1))
        style, label = ("-" if mode == "consistency" else ":"), f"{set_name} ({mode})"
        axes[0].plot(x, c["mean"], style, color=colors[set_name], label=label)
        if mode == "consistency":
            lo = [m - s for m, s in zip(c["mean"], c["std"])]
            hi = [m + s for m, s in zip(c["mean"], c["std"])]
            axes[0].fill_between(x, lo, hi, color=colors[set_name], alpha=0.15)
        axes[1].plot(x, c["fraction_negative"], style, color=colors[set_name], label=label)
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set_title(title)
    axes[1].set_title("fraction of locations with Consistency_p < 0")
    for ax in axes:
        ax.set_xlabel("denoising step (noisy -> clean)")
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
