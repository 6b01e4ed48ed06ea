"""Result tables and figures from the per-image rows (SPEC section 5).

Statistics (used by every suite): a *unit* is one (subject, adapter, prompt); its value is the mean
over its seeds. :func:`summarize` gives the mean over units with a percentile-bootstrap interval,
:func:`paired_difference` the mean difference of two selections over their shared units.

A run of the runner gets:

* ``results.csv``: one row per image (``results.parquet`` too when pyarrow is installed).
* ``tables/overall.csv``, ``tables/per_subject.csv``: mean of every metric per guidance
  setting and prompt set, with a bootstrap 95% interval over units (per subject, the units
  are that subject's prompts).
* ``tables/comparisons.csv``: each setting against the baseline mode at the same weights, a
  paired bootstrap interval of the difference; an interval that contains 0 is reported as
  "no measurable difference".
* ``tables/summary.md``: the same in Markdown, headed by each metric's backbone and the note
  that text metrics use the base prompt, and by the skipped subjects when there are any.
* ``tables/skipped.csv``: only when subjects were skipped (an unusable adapter): each with the
  reason and the number of its images not made.
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

from dreamguide.evaluation.protocol import Plan, World, adapter_label

BASE_FIELDS = ("key", "world", "subject", "class_word", "adapter", "prompt_set", "prompt_index", "template",
               "prompt", "base_prompt", "seed", "mode", "w_text", "w_cons", "variant")
TEXT_FIELDS = ("key", "world", "subject", "class_word", "adapter", "prompt_set", "template", "prompt",
               "base_prompt", "mode", "variant", "image", "trace")
NO_DIFFERENCE = "no measurable difference"
SKIPPED_FIELDS = ("subject", "adapter", "found", "images", "missing", "reason")


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
    """Rows of a results.csv with numbers parsed (empty cells -> None; empty text columns -> "")."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                if key in ("adapter", "template", "variant"):
                    parsed[key] = value
                elif value == "":
                    parsed[key] = None
                elif key in ("prompt_index", "seed"):
                    parsed[key] = int(value)
                elif key in TEXT_FIELDS:
                    parsed[key] = value
                else:
                    try:
                        parsed[key] = float(value)
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
    return (row["mode"], float(row["w_text"]), None if row["w_cons"] is None else float(row["w_cons"]),
            row.get("variant") or "")


def row_unit(row: dict) -> tuple:
    """The bootstrap unit of a row: (subject, adapter, prompt set, template, prompt index); seeds share it."""
    return (row["subject"], row.get("adapter") or "", row["prompt_set"], row.get("template") or "",
            row["prompt_index"])


def unit_means(rows: Sequence[dict], metric: str) -> dict[tuple, float]:
    """Unit -> mean over its rows (seeds) of ``metric``, in a fixed order: by the unit's text.

    The order fixes which unit each bootstrap draw picks, so intervals do not depend on the order of
    the rows (shards, resumed runs).
    """
    acc: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        value = row.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            acc[row_unit(row)].append(float(value))
    return {unit: float(np.mean(acc[unit])) for unit in sorted(acc, key=str)}


def mean_interval(values: np.ndarray, settings: "ReportSettings") -> tuple[float, float, float]:
    """(mean, low, high): the mean over units and its bootstrap interval."""
    lo, hi = bootstrap_interval(values, settings.bootstrap_samples, settings.bootstrap_seed, settings.confidence)
    return float(np.mean(values)), lo, hi


def select(rows: Sequence[dict], **fields) -> list[dict]:
    """The rows whose fields equal every given value."""
    return [row for row in rows if all(row.get(k) == v for k, v in fields.items())]


def summarize(rows: Sequence[dict], metrics: Sequence[str], by: Sequence[str],
              settings: "ReportSettings") -> list[dict]:
    """One entry per distinct value of the ``by`` fields (in order of appearance): per metric the mean
    over (subject, adapter, prompt) units of the seed-averaged values, with its bootstrap interval."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        entry = {**dict(zip(by, key)), "images": len(members), "units": 0}
        for metric in metrics:
            units = np.array(list(unit_means(members, metric).values()))
            if len(units) == 0:
                entry.update({metric: None, f"{metric}_low": None, f"{metric}_high": None})
                continue
            entry[metric], entry[f"{metric}_low"], entry[f"{metric}_high"] = mean_interval(units, settings)
            entry["units"] = max(entry["units"], len(units))
        out.append(entry)
    return out


def paired_difference(rows: Sequence[dict], metric: str, a: dict, b: dict, settings: "ReportSettings") -> dict:
    """Mean over shared units of (rows matching ``a``) - (rows matching ``b``), with a bootstrap interval.

    The verdict is "higher"/"lower", or "no measurable difference" when the interval contains 0.
    """
    ua, ub = unit_means(select(rows, **a), metric), unit_means(select(rows, **b), metric)
    units = [u for u in ua if u in ub]
    if not units:
        return {"mean": None, "low": None, "high": None, "units": 0, "verdict": None,
                "mean_a": None, "mean_b": None}
    diff = np.array([ua[u] - ub[u] for u in units])
    mean, lo, hi = mean_interval(diff, settings)
    verdict = NO_DIFFERENCE if math.isnan(lo) or lo <= 0 <= hi else ("higher" if mean > 0 else "lower")
    return {"mean": mean, "low": lo, "high": hi, "units": len(units), "verdict": verdict,
            "mean_a": float(np.mean([ua[u] for u in units])), "mean_b": float(np.mean([ub[u] for u in units]))}


def prompt_scopes(rows: Sequence[dict]) -> list[str]:
    """"all" and then every prompt set of the rows, in order of appearance (each world names its own)."""
    return ["all", *dict.fromkeys(r["prompt_set"] for r in rows)]


def _fmt_w(value) -> str:
    return "" if value is None else f"{value:g}"


def _setting_fields(setting: tuple) -> dict:
    mode, w_text, w_cons, variant = setting
    return {"mode": mode, "w_text": w_text, "w_cons": w_cons, "variant": variant}


def summary_tables(rows: Sequence[dict], metrics: Sequence[str], settings: ReportSettings):
    """(overall rows, per-subject rows): mean, low, high for every metric, setting and prompt set."""
    setting_order = list(dict.fromkeys(setting_key(r) for r in rows))
    by_setting = {s: [r for r in rows if setting_key(r) == s] for s in setting_order}
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    overall, per_subject = [], []
    for setting in setting_order:
        for scope in prompt_scopes(rows):
            in_scope = [r for r in by_setting[setting] if scope == "all" or r["prompt_set"] == scope]
            for subject in [None, *subjects]:
                members = in_scope if subject is None else [r for r in in_scope if r["subject"] == subject]
                if not members:
                    continue
                entry = summarize(members, metrics, (), settings)[0]
                if not entry["units"]:
                    continue
                entry.pop("images")
                out = {**_setting_fields(setting), "prompt_set": scope, **entry}
                (overall if subject is None else per_subject).append(out if subject is None
                                                                     else {"subject": subject, **out})
    return overall, per_subject


def comparisons(rows: Sequence[dict], metrics: Sequence[str], settings: ReportSettings) -> list[dict]:
    """Each setting minus the baseline mode at the same (w_text, w_cons, variant), paired over units."""
    from dreamguide.guidance import get_mode

    baseline = get_mode(settings.baseline_mode).name
    setting_order = list(dict.fromkeys(setting_key(r) for r in rows))
    out = []
    for setting in setting_order:
        mode, w_text, w_cons, variant = setting
        base = (baseline, w_text, w_cons, variant)
        if mode == baseline or base not in setting_order:
            continue
        for scope in prompt_scopes(rows):
            in_scope = [r for r in rows if scope == "all" or r["prompt_set"] == scope]
            a = [r for r in in_scope if setting_key(r) == setting]
            b = [r for r in in_scope if setting_key(r) == base]
            for metric in metrics:
                d = paired_difference([*a, *b], metric, {"mode": mode}, {"mode": baseline}, settings)
                if not d["units"]:
                    continue
                out.append({**_setting_fields(setting), "baseline": baseline, "prompt_set": scope, "metric": metric,
                            "baseline_mean": d["mean_b"], "mean": d["mean_a"], "difference": d["mean"],
                            "difference_low": d["low"], "difference_high": d["high"], "units": d["units"],
                            "verdict": d["verdict"]})
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


def format_interval(row: dict, metric: str, digits: int = 4) -> str:
    """"mean [low, high]" of ``metric`` in a summary entry ("-" when missing)."""
    if row.get(metric) is None:
        return "-"
    lo, hi = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if lo is None or math.isnan(lo):
        return f"{row[metric]:.{digits}f}"
    return f"{row[metric]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_difference(d: dict, digits: int = 4) -> str:
    """"+mean [+low, +high]" of a paired difference ("-" without shared units)."""
    if d.get("mean") is None:
        return "-"
    if d["low"] is None or math.isnan(d["low"]):
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table as lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in line) + " |" for line in lines)]


def backbone_header(backbones: dict[str, str], kinds: dict[str, str]) -> str:
    return "\n".join(markdown_table(["metric", "kind", "backbone"],
                                    [[m, kinds.get(m, ""), f"`{b}`"] for m, b in backbones.items()]))


def _setting_cells(row: dict, variants: bool) -> list[str]:
    cells = [row["mode"], _fmt_w(row["w_text"]), _fmt_w(row["w_cons"])]
    return cells + [row.get("variant") or ""] if variants else cells


def _skipped_lines(skipped: Sequence[dict]) -> list[str]:
    """The Markdown paragraph and table of skipped subjects (none: no lines)."""
    if not skipped:
        return []
    adapters = any(s.get("adapter") for s in skipped)
    count = f"{len(skipped)} subject{'s' if len(skipped) > 1 else ''}"
    several = len(skipped) > 1
    return [f"**Skipped: {count}; the tables leave {'them' if several else 'it'} out.** Fix "
            f"{'their adapters' if several else 'the adapter'} and run the same command again: the missing images "
            "are made and scored, the others are kept.", "",
            *markdown_table(["subject", *(["adapter"] if adapters else []), "found", "images not made", "reason"],
                            [[s["subject"], *([s["adapter"]] if adapters else []), s["found"],
                              f"{s['missing']} of {s['images']}",
                              " ".join(str(s["reason"]).split()).replace("|", "\\|")] for s in skipped]), ""]


def markdown_summary(overall, per_subject, compared, backbones, kinds, settings: ReportSettings, world: str,
                     skipped: Sequence[dict] = ()) -> str:
    metrics = list(backbones)
    pct = f"{settings.confidence:.0%}"
    variants = any(r.get("variant") for r in overall)
    setting_head = ["mode", "w_text", "w_cons", *(["variant"] if variants else [])]
    parts = [
        f"# Benchmark summary ({world})",
        "",
        *_skipped_lines(skipped),
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
        *markdown_table([*setting_head, "prompts", "units", *metrics],
                        [[*_setting_cells(r, variants), r["prompt_set"], r["units"],
                          *(format_interval(r, m) for m in metrics)] for r in overall]),
    ]
    if compared:
        parts += ["", f"## Against {settings.baseline_mode} at the same weights",
                  "", f"Paired bootstrap {pct} interval of the difference; an interval containing 0 reads "
                  f"\"{NO_DIFFERENCE}\".", "",
                  *markdown_table([*setting_head, "prompts", "metric", "baseline", "mode", "difference [interval]",
                                   "verdict"],
                                  [[*_setting_cells(c, variants), c["prompt_set"], c["metric"],
                                    f"{c['baseline_mean']:.4f}", f"{c['mean']:.4f}",
                                    format_difference({"mean": c["difference"], "low": c["difference_low"],
                                                       "high": c["difference_high"]}), c["verdict"]]
                                   for c in compared])]
    parts += ["", "## Per subject (all prompts)", "",
              *markdown_table(["subject", *setting_head, "units", *metrics],
                              [[r["subject"], *_setting_cells(r, variants), r["units"],
                                *(format_interval(r, m) for m in metrics)]
                               for r in per_subject if r["prompt_set"] == "all"])]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = {"cfg": "D", "dreambooth": "s", "consistency": "o", "parallel-rescaled": "^", "orthogonal": "v"}


def pareto_plot(points: Sequence[dict], identity: str, text: str, path: Path,
                line_keys: Sequence[str] = ("mode", "w_text"), x_label: str | None = None,
                y_label: str | None = None, title: str = "identity vs text alignment across w_cons (labels)",
                line_intervals: bool = True) -> Path | None:
    """Identity (y) against text alignment (x) of summary entries, with their intervals.

    Entries that share the ``line_keys`` values are joined across their w_cons values (each point
    labelled with its w_cons); an entry alone is a single point. ``line_intervals`` False draws the
    intervals of single points only (for plots with many lines).
    """
    rows = [r for r in points if r.get(identity) is not None and r.get(text) is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6 if len(line_keys) <= 2 else 9.5, 4.5))
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        lines[tuple(row.get(k) for k in line_keys)].append(row)
    colors = plt.get_cmap("tab20").colors
    for index, (key, members) in enumerate(lines.items()):
        members.sort(key=lambda r: -1 if r.get("w_cons") is None else r["w_cons"])
        x = np.array([p[text] for p in members])
        y = np.array([p[identity] for p in members])
        xerr = np.abs(np.array([[p[f"{text}_low"], p[f"{text}_high"]] for p in members], dtype=float).T - x)
        yerr = np.abs(np.array([[p[f"{identity}_low"], p[f"{identity}_high"]] for p in members], dtype=float).T - y)
        xerr, yerr = np.nan_to_num(xerr), np.nan_to_num(yerr)
        if len(members) > 1 and not line_intervals:
            xerr = yerr = None
        label = " / ".join(f"w_text={v:g}" if k == "w_text" else str(v) for k, v in zip(line_keys, key) if v != "")
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker=_MARKERS.get(members[0].get("mode"), "o"), capsize=2, lw=1,
                    ms=4, color=colors[index % len(colors)], ls="-" if len(members) > 1 else "none", label=label)
        if len(members) > 1:
            for p in members:
                if p.get("w_cons") is not None:
                    ax.annotate(f"{p['w_cons']:g}", (p[text], p[identity]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
    ax.set_xlabel(x_label or text)
    ax.set_ylabel(y_label or identity)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save_figure(fig, path)


def _pick(value, quantile: float | None) -> float:
    """A trace field: a number, or one quantile of {"0.25": v, ...} (or a list in TRACE_QUANTILES order)."""
    if quantile is None:
        return float(value)
    if isinstance(value, dict):
        return float(value[f"{quantile:g}"])
    from dreamguide.guidance import TRACE_QUANTILES

    return float(value[TRACE_QUANTILES.index(quantile)])


def read_traces(rows: Sequence[dict], output: Path, by: Sequence[str] = ("mode", "prompt_set"),
                ) -> dict[tuple, list[list[dict]]]:
    """The stored traces of ``rows`` (paths relative to ``output``), grouped by the ``by`` fields."""
    acc: dict[tuple, list[list[dict]]] = defaultdict(list)
    for row in rows:
        if row.get("trace"):
            path = Path(output) / row["trace"]
            if path.is_file():
                acc[tuple(row[k] for k in by)].append(json.loads(path.read_text()))
    return dict(acc)


def trace_curves(traces: dict[tuple, list[list[dict]]]) -> dict[tuple, dict[str, np.ndarray]]:
    """Key -> per-step means over images of the traced statistics (mean, std, q25, q75, fraction negative)."""
    curves = {}
    for key, group in traces.items():
        steps = min(len(t) for t in group)
        if steps == 0:
            continue

        def stat(name, index=None):
            values = [[_pick(s[name], index) for s in t[:steps]] for t in group]
            return np.mean(np.array(values, dtype=np.float64), axis=0)

        curve = {"timestep": np.array([s.get("timestep", i) for i, s in enumerate(group[0][:steps])], dtype=float),
                 "mean": stat("mean"), "images": len(group)}
        for name in ("std", "fraction_negative"):
            if name in group[0][0]:
                curve[name] = stat(name)
        if "quantiles" in group[0][0]:
            curve["q25"], curve["q75"] = stat("quantiles", 0.25), stat("quantiles", 0.75)
        curves[key] = curve
    return curves


def load_trace_curves(rows: Sequence[dict], output: Path) -> dict[tuple, dict[str, np.ndarray]]:
    """(mode, prompt_set) -> per-step curves of the rows' traces."""
    return trace_curves(read_traces(rows, output))


def consistency_p_plot(curves: dict[tuple, dict[str, np.ndarray]], path: Path,
                       title: str = "Consistency_p k: mean over images") -> Path | None:
    """Consistency_p per step (mean; band: q25-q75, else +-the mean spatial std) and its negative fraction."""
    if not curves:
        return None
    plt = _pyplot()
    fig, (ax_k, ax_neg) = plt.subplots(1, 2, figsize=(10, 4))
    for key, curve in sorted(curves.items(), key=lambda item: str(item[0])):
        step = np.arange(len(curve["mean"]))
        label = " / ".join(str(k) for k in key)
        line, = ax_k.plot(step, curve["mean"], label=label)
        if "q25" in curve:
            ax_k.fill_between(step, curve["q25"], curve["q75"], alpha=0.15, color=line.get_color())
        elif "std" in curve:
            ax_k.fill_between(step, curve["mean"] - curve["std"], curve["mean"] + curve["std"], alpha=0.15,
                              color=line.get_color())
        if "fraction_negative" in curve:
            ax_neg.plot(step, curve["fraction_negative"], color=line.get_color(), label=label)
    ax_k.axhline(0, color="grey", lw=0.5)
    ax_k.set_xlabel("denoising step (0 = noisiest)")
    quartiles, spread = (any(name in c for c in curves.values()) for name in ("q25", "std"))
    ax_k.set_ylabel("Consistency_p k" + (": band q25-q75" if quartiles else ": band +-spatial std" if spread else ""))
    ax_k.set_title(title, fontsize=9)
    ax_neg.set_xlabel("denoising step (0 = noisiest)")
    ax_neg.set_ylabel("fraction of locations with k < 0")
    ax_k.legend(fontsize=7)
    return _save_figure(fig, path)


def write_report(rows: Sequence[dict], world: World, plan: Plan, output: Path, settings: ReportSettings,
                 log: Callable[[str], None] = print, skipped: Sequence[dict] = ()) -> dict[str, Path]:
    """Tables and figures for merged rows; returns the written paths.

    ``skipped``: the subjects left out (``runner.skipped_adapters``), listed in ``summary.md``,
    ``skipped.csv`` and the log.
    """
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
    head = ["mode", "w_text", "w_cons", "variant", "prompt_set", "units"]
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
        "mode", "baseline", "w_text", "w_cons", "variant", "prompt_set", "metric", "backbone", "baseline_mean",
        "mean", "difference", "difference_low", "difference_high", "units", "verdict"]))
    atomic_write_text(written["backbones"], rows_to_csv(
        [{"metric": m, "kind": kinds.get(m, ""), "backbone": b,
          "prompt": "base prompt" if kinds.get(m) == "text" else "reference photos"} for m, b in backbones.items()],
        ["metric", "kind", "backbone", "prompt"]))
    atomic_write_text(written["summary"], markdown_summary(overall, per_subject, compared, backbones, kinds,
                                                           settings, world.name, skipped))
    if skipped:
        written["skipped"] = tables / "skipped.csv"
        atomic_write_text(written["skipped"], rows_to_csv(skipped, SKIPPED_FIELDS))
    elif (tables / "skipped.csv").exists():  # left by an earlier report of this folder
        (tables / "skipped.csv").unlink()
    identity = settings.identity_metric if settings.identity_metric in metrics else next(
        (m for m in metrics if kinds.get(m) == "identity"), None)
    text = settings.text_metric if settings.text_metric in metrics else next(
        (m for m in metrics if kinds.get(m) == "text"), None)
    if identity and text:
        path = pareto_plot([r for r in overall if r["prompt_set"] == "all"], identity, text,
                           output / "figures" / "pareto.png", line_keys=("mode", "w_text", "variant"),
                           x_label=f"text alignment: {text} ({backbones.get(text, '?')}), base prompt",
                           y_label=f"identity: {identity} ({backbones.get(identity, '?')})")
        if path:
            written["pareto"] = path
    path = consistency_p_plot(load_trace_curves(rows, output), output / "figures" / "consistency_p.png")
    if path:
        written["consistency_p"] = path
    log(f"wrote {', '.join(str(p.relative_to(output)) for p in written.values())} under {output}")
    for entry in skipped:
        log(f"skipped {adapter_label(entry['subject'], entry['adapter'])} ({entry['missing']} of {entry['images']} "
            f"images not made; the tables leave it out): {entry['reason']}")
    return written


def _save_figure(fig, path: Path) -> Path:
    """Render ``fig`` to PNG, write it atomically and close it."""
    import matplotlib.pyplot as plt

    from dreamguide.atomic import atomic_write_bytes

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
