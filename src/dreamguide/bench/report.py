"""Result tables and figures from the per-image rows (SPEC section 5).

* ``results.csv``: one row per image (``results.parquet`` too when pyarrow is installed).
* ``tables/overall.csv``, ``tables/per_subject.csv``: mean of every metric per guidance
  setting and prompt set, with a bootstrap 95% interval over (subject, prompt) units (seeds
  are averaged inside a unit first; per subject, the units are that subject's prompts).
* ``tables/comparisons.csv``: each setting against the baseline mode at the same weights, a
  paired bootstrap interval of the difference; an interval that contains 0 is reported as
  "no measurable difference".
* ``tables/summary.md``: the same in Markdown, headed by each metric's backbone and the note
  that text metrics use the base prompt.
* ``figures/pareto.png``: identity vs text alignment across the w_cons sweep, one line per mode.
* ``figures/consistency_p.png``: Consistency_p per denoising step from the traces.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dreamguide.bench.world import Plan, World

BASE_FIELDS = ("key", "world", "subject", "class_word", "prompt_set", "prompt_index", "prompt", "base_prompt",
               "seed", "mode", "w_text", "w_cons")
NO_DIFFERENCE = "no measurable difference"


@dataclass(frozen=True)
class ReportSettings:
    baseline_mode: str = "consistency"
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    identity_metric: str = "dino"
    text_metric: str = "siglip"
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.bootstrap_samples < 10:
            raise ValueError(f"bootstrap_samples must be at least 10, got {self.bootstrap_samples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


# ---------------------------------------------------------------------------------------------
# Files


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def rows_to_csv(rows: Sequence[dict], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow([_cell(row.get(f)) for f in fields])
    return buffer.getvalue()


def write_rows(rows: Sequence[dict], output: Path, metrics: Sequence[str]) -> Path:
    """results.csv (and results.parquet with pyarrow), written atomically."""
    from dreamguide.atomic import atomic_write_bytes, atomic_write_text

    fields = [*BASE_FIELDS, *metrics, "image", "trace"]
    path = Path(output) / "results.csv"
    atomic_write_text(path, rows_to_csv(rows, fields))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return path
    table = pa.Table.from_pylist([{f: row.get(f) for f in fields} for row in rows])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(Path(output) / "results.parquet", buffer.getvalue())
    return path


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a results.csv with numbers parsed (empty cells -> None)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                if value == "":
                    parsed[key] = None
                elif key in ("prompt_index", "seed"):
                    parsed[key] = int(value)
                else:
                    try:
                        parsed[key] = float(value) if key not in ("prompt", "base_prompt", "subject", "mode",
                                                                  "prompt_set", "class_word", "world", "key",
                                                                  "image", "trace") else value
                    except ValueError:
                        parsed[key] = value
            rows.append(parsed)
    return rows


# ---------------------------------------------------------------------------------------------
# Statistics


def bootstrap_interval(values: np.ndarray, samples: int, seed: int, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per unit)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def setting_key(row: dict) -> tuple:
    return (row["mode"], float(row["w_text"]), None if row["w_cons"] is None else float(row["w_cons"]))


def unit_means(rows: Sequence[dict], metric: str) -> dict[tuple, dict[tuple, float]]:
    """setting -> {(subject, prompt_set, prompt_index): mean over seeds of ``metric``}."""
    acc: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        value = row.get(metric)
        if value is None:
            continue
        acc[setting_key(row)][(row["subject"], row["prompt_set"], row["prompt_index"])].append(float(value))
    return {s: {u: float(np.mean(v)) for u, v in units.items()} for s, units in acc.items()}


def prompt_scopes(rows: Sequence[dict]) -> list[str]:
    """"all" and then every prompt set of the rows, in order of appearance (each world names its own)."""
    return ["all", *dict.fromkeys(r["prompt_set"] for r in rows)]


def _in_scope(unit: tuple, scope: str) -> bool:
    return scope == "all" or unit[1] == scope


def _fmt_w(value) -> str:
    return "" if value is None else f"{value:g}"


def summary_tables(rows: Sequence[dict], metrics: Sequence[str], settings: ReportSettings):
    """(overall rows, per-subject rows): mean, low, high for every metric, setting and prompt set."""
    per_metric = {m: unit_means(rows, m) for m in metrics}
    setting_order = list(dict.fromkeys(setting_key(r) for r in rows))
    scopes = prompt_scopes(rows)
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    overall, per_subject = [], []
    for setting in setting_order:
        for scope in scopes:
            for subject in [None, *subjects]:
                out = {"mode": setting[0], "w_text": setting[1], "w_cons": setting[2], "prompt_set": scope}
                if subject is not None:
                    out = {"subject": subject, **out}
                n_units = 0
                for metric in metrics:
                    units = per_metric[metric].get(setting, {})
                    values = np.array([v for u, v in units.items()
                                       if _in_scope(u, scope) and (subject is None or u[0] == subject)])
                    n_units = max(n_units, len(values))
                    if len(values) == 0:
                        out.update({metric: None, f"{metric}_low": None, f"{metric}_high": None})
                        continue
                    lo, hi = bootstrap_interval(values, settings.bootstrap_samples, settings.bootstrap_seed,
                                                settings.confidence)
                    out.update({metric: float(values.mean()), f"{metric}_low": lo, f"{metric}_high": hi})
                out["units"] = n_units
                if n_units:
                    (overall if subject is None else per_subject).append(out)
    return overall, per_subject


def comparisons(rows: Sequence[dict], metrics: Sequence[str], settings: ReportSettings) -> list[dict]:
    """Each setting minus the baseline mode at the same (w_text, w_cons), paired over units."""
    from dreamguide.guidance import get_mode

    baseline = get_mode(settings.baseline_mode).name
    per_metric = {m: unit_means(rows, m) for m in metrics}
    setting_order = list(dict.fromkeys(setting_key(r) for r in rows))
    scopes = prompt_scopes(rows)
    out = []
    for setting in setting_order:
        mode, w_text, w_cons = setting
        base = (baseline, w_text, w_cons)
        if mode == baseline or base not in setting_order:
            continue
        for scope in scopes:
            for metric in metrics:
                a, b = per_metric[metric].get(setting, {}), per_metric[metric].get(base, {})
                units = [u for u in a if u in b and _in_scope(u, scope)]
                if not units:
                    continue
                diff = np.array([a[u] - b[u] for u in units])
                lo, hi = bootstrap_interval(diff, settings.bootstrap_samples, settings.bootstrap_seed,
                                            settings.confidence)
                mean = float(diff.mean())
                if math.isnan(lo) or lo <= 0 <= hi:
                    verdict = NO_DIFFERENCE
                else:
                    verdict = "higher" if mean > 0 else "lower"
                out.append({"mode": mode, "baseline": baseline, "w_text": w_text, "w_cons": w_cons,
                            "prompt_set": scope, "metric": metric,
                            "baseline_mean": float(np.mean([b[u] for u in units])),
                            "mean": float(np.mean([a[u] for u in units])), "difference": mean,
                            "difference_low": lo, "difference_high": hi, "units": len(units), "verdict": verdict})
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


def _ci(row: dict, metric: str) -> str:
    if row.get(metric) is None:
        return "-"
    lo, hi = row[f"{metric}_low"], row[f"{metric}_high"]
    if lo is None or math.isnan(lo):
        return f"{row[metric]:.4f}"
    return f"{row[metric]:.4f} [{lo:.4f}, {hi:.4f}]"


def backbone_header(backbones: dict[str, str], kinds: dict[str, str]) -> str:
    lines = ["| metric | kind | backbone |", "|---|---|---|"]
    lines += [f"| {m} | {kinds.get(m, '')} | `{b}` |" for m, b in backbones.items()]
    return "\n".join(lines)


def markdown_summary(overall, per_subject, compared, backbones, kinds, settings: ReportSettings, world: str) -> str:
    metrics = list(backbones)
    pct = f"{settings.confidence:.0%}"
    parts = [
        f"# Benchmark summary ({world})",
        "",
        "Metrics and the backbones that compute them. Text metrics score the **base prompt** "
        "(identifier token replaced by the class word).",
        "",
        backbone_header(backbones, kinds),
        "",
        f"Means with bootstrap {pct} intervals over (subject, prompt) units "
        f"({settings.bootstrap_samples} resamples, seed {settings.bootstrap_seed}); seeds averaged within a unit.",
        "",
        "## Overall",
        "",
        "| mode | w_text | w_cons | prompts | units | " + " | ".join(metrics) + " |",
        "|---|---|---|---|---|" + "---|" * len(metrics),
    ]
    for row in overall:
        parts.append(f"| {row['mode']} | {_fmt_w(row['w_text'])} | {_fmt_w(row['w_cons'])} | {row['prompt_set']} | "
                     f"{row['units']} | " + " | ".join(_ci(row, m) for m in metrics) + " |")
    if compared:
        parts += ["", f"## Against {settings.baseline_mode} at the same weights",
                  "", f"Paired bootstrap {pct} interval of the difference; an interval containing 0 reads "
                  f"\"{NO_DIFFERENCE}\".", "",
                  "| mode | w_text | w_cons | prompts | metric | baseline | mode | difference [interval] | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in compared:
            parts.append(f"| {c['mode']} | {_fmt_w(c['w_text'])} | {_fmt_w(c['w_cons'])} | {c['prompt_set']} | "
                         f"{c['metric']} | {c['baseline_mean']:.4f} | {c['mean']:.4f} | {c['difference']:+.4f} "
                         f"[{c['difference_low']:+.4f}, {c['difference_high']:+.4f}] | {c['verdict']} |")
    parts += ["", "## Per subject (all prompts)", "",
              "| subject | mode | w_text | w_cons | units | " + " | ".join(metrics) + " |",
              "|---|---|---|---|---|" + "---|" * len(metrics)]
    for row in per_subject:
        if row["prompt_set"] == "all":
            parts.append(f"| {row['subject']} | {row['mode']} | {_fmt_w(row['w_text'])} | {_fmt_w(row['w_cons'])} | "
                         f"{row['units']} | " + " | ".join(_ci(row, m) for m in metrics) + " |")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(
    overall: Sequence[dict], identity: str, text: str, backbones: dict[str, str], path: Path
) -> Path | None:
    """Identity (y) against text alignment (x), one line per mode across its w_cons values."""

    rows = [r for r in overall if r["prompt_set"] == "all" and r.get(identity) is not None and r.get(text) is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        lines[(row["mode"], row["w_text"])].append(row)
    for (mode, w_text), points in lines.items():
        points.sort(key=lambda r: -1 if r["w_cons"] is None else r["w_cons"])
        x = np.array([p[text] for p in points])
        y = np.array([p[identity] for p in points])
        xerr = np.abs(np.array([[p[f"{text}_low"], p[f"{text}_high"]] for p in points]).T - x)
        yerr = np.abs(np.array([[p[f"{identity}_low"], p[f"{identity}_high"]] for p in points]).T - y)
        xerr, yerr = np.nan_to_num(xerr), np.nan_to_num(yerr)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=f"{mode} (w_text={w_text:g})")
        for p in points:
            if p["w_cons"] is not None:
                ax.annotate(f"{p['w_cons']:g}", (p[text], p[identity]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_xlabel(f"text alignment: {text} ({backbones.get(text, '?')}), base prompt")
    ax.set_ylabel(f"identity: {identity} ({backbones.get(identity, '?')})")
    ax.set_title("identity vs text alignment across w_cons (labels)")
    ax.legend(fontsize=7)
    return _save_figure(fig, path)


def _pick(value, quantile: float | None) -> float:
    """A trace field: a number, or one quantile of {"0.25": v, ...} (or a list in TRACE_QUANTILES order)."""
    if quantile is None:
        return float(value)
    if isinstance(value, dict):
        return float(value[f"{quantile:g}"])
    from dreamguide.guidance import TRACE_QUANTILES

    return float(value[TRACE_QUANTILES.index(quantile)])


def load_trace_curves(rows: Sequence[dict], output: Path) -> dict[tuple, dict[str, np.ndarray]]:
    """(mode, prompt_set) -> per-step arrays (mean of the per-image mean, q25, q75, fraction negative)."""
    acc: dict[tuple, list[list[dict]]] = defaultdict(list)
    for row in rows:
        if row.get("trace"):
            path = output / row["trace"]
            if path.is_file():
                acc[(row["mode"], row["prompt_set"])].append(json.loads(path.read_text()))
    curves = {}
    for key, traces in acc.items():
        steps = min(len(t) for t in traces)
        if steps == 0:
            continue
        def stat(name, index=None):
            values = [[_pick(s[name], index) for s in t[:steps]] for t in traces]
            return np.mean(np.array(values, dtype=np.float64), axis=0)
        curve = {"timestep": np.array([s.get("timestep", i) for i, s in enumerate(traces[0][:steps])], dtype=float),
                 "mean": stat("mean")}
        if "quantiles" in traces[0][0]:
            curve["q25"], curve["q75"] = stat("quantiles", 0.25), stat("quantiles", 0.75)
        if "fraction_negative" in traces[0][0]:
            curve["fraction_negative"] = stat("fraction_negative")
        curves[key] = curve
    return curves


def consistency_p_plot(rows: Sequence[dict], output: Path, path: Path) -> Path | None:
    """Consistency_p (mean and interquartile band) and its negative fraction per step, by mode and prompt set."""

    curves = load_trace_curves(rows, output)
    if not curves:
        return None
    plt = _pyplot()
    fig, (ax_k, ax_neg) = plt.subplots(1, 2, figsize=(10, 4))
    for (mode, prompt_set), curve in sorted(curves.items()):
        step = np.arange(len(curve["mean"]))
        line, = ax_k.plot(step, curve["mean"], label=f"{mode} / {prompt_set}")
        if "q25" in curve:
            ax_k.fill_between(step, curve["q25"], curve["q75"], alpha=0.15, color=line.get_color())
        if "fraction_negative" in curve:
            ax_neg.plot(step, curve["fraction_negative"], color=line.get_color(), label=f"{mode} / {prompt_set}")
    ax_k.axhline(0, color="grey", lw=0.5)
    ax_k.set_xlabel("denoising step (0 = noisiest)")
    ax_k.set_ylabel("Consistency_p k: mean, band q25-q75")
    ax_neg.set_xlabel("denoising step (0 = noisiest)")
    ax_neg.set_ylabel("fraction of locations with k < 0")
    ax_k.legend(fontsize=7)
    return _save_figure(fig, path)


def write_report(rows: Sequence[dict], world: World, plan: Plan, output: Path, settings: ReportSettings,
                 log: Callable[[str], None] = print) -> dict[str, Path]:
    """Tables and figures for merged rows; returns the written paths."""
    from dreamguide.atomic import atomic_write_text

    backbones, kinds = world.metric_backbones(), world.metric_kinds()
    metrics = list(backbones)
    overall, per_subject = summary_tables(rows, metrics, settings)
    compared = comparisons(rows, metrics, settings)
    tables = output / "tables"
    # Every table names the backbone of each metric (and text metrics score the base prompt).
    for row in [*overall, *per_subject]:
        row.update({f"{m}_backbone": backbones[m] for m in metrics})
    for row in compared:
        row["backbone"] = backbones[row["metric"]]
    ci_fields = [f for m in metrics for f in (m, f"{m}_low", f"{m}_high", f"{m}_backbone")]
    head = ["mode", "w_text", "w_cons", "prompt_set", "units"]
    written = {
        "overall": tables / "overall.csv",
        "per_subject": tables / "per_subject.csv",
        "comparisons": tables / "comparisons.csv",
        "backbones": tables / "backbones.csv",
        "summary": tables / "summary.md",
    }
    atomic_write_text(written["overall"], rows_to_csv(overall, [*head, *ci_fields]))
    atomic_write_text(written["per_subject"], rows_to_csv(per_subject, ["subject", *head, *ci_fields]))
    atomic_write_text(written["comparisons"], rows_to_csv(compared, [
        "mode", "baseline", "w_text", "w_cons", "prompt_set", "metric", "backbone", "baseline_mean", "mean",
        "difference", "difference_low", "difference_high", "units", "verdict"]))
    atomic_write_text(written["backbones"], rows_to_csv(
        [{"metric": m, "kind": kinds.get(m, ""), "backbone": b,
          "prompt": "base prompt" if kinds.get(m) == "text" else "reference photos"} for m, b in backbones.items()],
        ["metric", "kind", "backbone", "prompt"]))
    atomic_write_text(written["summary"], markdown_summary(overall, per_subject, compared, backbones, kinds,
                                                           settings, world.name))
    identity = settings.identity_metric if settings.identity_metric in metrics else next(
        (m for m in metrics if kinds.get(m) == "identity"), None)
    text = settings.text_metric if settings.text_metric in metrics else next(
        (m for m in metrics if kinds.get(m) == "text"), None)
    if identity and text:
        path = pareto_plot(overall, identity, text, backbones, output / "figures" / "pareto.png")
        if path:
            written["pareto"] = path
    path = consistency_p_plot(rows, output, output / "figures" / "consistency_p.png")
    if path:
        written["consistency_p"] = path
    log(f"wrote {', '.join(str(p.relative_to(output)) for p in written.values())} under {output}")
    return written


def _save_figure(fig, path: Path) -> Path:
    """Render ``fig`` to PNG, write it atomically and close it."""
    import matplotlib.pyplot as plt

    from dreamguide.atomic import atomic_write_bytes

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
