"""Frontier analysis: each rule's (text alignment, identity) curve against a baseline curve.

A *curve* is one guidance rule with its strength knob swept: one point per knob value, each the mean
over units (subject, adapter, prompt; seeds averaged within a unit). Rules are compared where a
user would compare them, at matched text alignment: on a grid of text values inside the range both
curves reach, identity is read off each curve by linear interpolation (points ordered by text) and
differenced. Intervals come from a paired percentile bootstrap over units: one resample of units is
applied to every rule and knob at once, so the two curves of a difference see the same units.

The summary number of a rule is the mean identity gain over the common text range (the area
between the curves divided by the width of that range), with its bootstrap interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID_POINTS = 21


@dataclass(frozen=True)
class Curve:
    """Mean text alignment and identity per knob value, knobs ascending."""

    knobs: np.ndarray
    text: np.ndarray
    identity: np.ndarray


def unit_table(rows, rules_key="rule", knob_key="knob", unit_keys=("subject", "method", "template"),
               text_key="text", identity_key="identity"):
    """Rows -> (units, {(rule, knob): (text[units], identity[units])}); units present in every (rule, knob)."""
    cells: dict[tuple, dict[tuple, tuple[list, list]]] = {}
    for row in rows:
        unit = tuple(row[k] for k in unit_keys)
        cell = cells.setdefault((row[rules_key], float(row[knob_key])), {})
        t, i = cell.setdefault(unit, ([], []))
        t.append(float(row[text_key]))
        i.append(float(row[identity_key]))
    common = set.intersection(*(set(c) for c in cells.values())) if cells else set()
    units = sorted(common, key=str)
    table = {key: (np.array([np.mean(c[u][0]) for u in units]), np.array([np.mean(c[u][1]) for u in units]))
             for key, c in cells.items()}
    return units, table


def curve(table, rule: str, weights: np.ndarray | None = None) -> Curve:
    """The rule's curve; ``weights`` (one per unit, e.g. bootstrap counts) weight the unit means."""
    knobs = np.array(sorted(k for r, k in table if r == rule))
    if len(knobs) == 0:
        raise KeyError(f"no points for rule {rule!r}")
    text = np.array([np.average(table[(rule, k)][0], weights=weights) for k in knobs])
    identity = np.array([np.average(table[(rule, k)][1], weights=weights) for k in knobs])
    return Curve(knobs, text, identity)


def identity_at(c: Curve, text: np.ndarray) -> np.ndarray:
    """Identity on curve ``c`` at each text value (linear between points ordered by text; NaN outside)."""
    order = np.argsort(c.text, kind="stable")
    x, y = c.text[order], c.identity[order]
    out = np.interp(text, x, y)
    out[(text < x[0]) | (text > x[-1])] = np.nan
    return out


def common_range(a: Curve, b: Curve) -> tuple[float, float] | None:
    lo, hi = max(a.text.min(), b.text.min()), min(a.text.max(), b.text.max())
    return (float(lo), float(hi)) if hi > lo else None


def compare(table, n_units: int, rule: str, baseline: str, samples: int = 2000, seed: int = 0,
            points: int = GRID_POINTS, confidence: float = 0.95) -> dict:
    """Identity of ``rule`` minus ``baseline`` at matched text alignment, with paired bootstrap intervals."""
    a, b = curve(table, rule), curve(table, baseline)
    span = common_range(a, b)
    if span is None:
        return {"rule": rule, "baseline": baseline, "common_text_range": None}
    grid = np.linspace(span[0], span[1], points)
    diff = identity_at(a, grid) - identity_at(b, grid)
    rng = np.random.default_rng(seed)
    boot_diff = np.full((samples, points), np.nan)
    boot_gain = np.full(samples, np.nan)
    for s in range(samples):
        w = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units).astype(float)
        ra, rb = curve(table, rule, w), curve(table, baseline, w)
        # the grid stays where the full-data curves put it; a resample that does not reach a grid
        # point leaves it NaN there (excluded from that point's interval)
        d = identity_at(ra, grid) - identity_at(rb, grid)
        boot_diff[s] = d
        boot_gain[s] = np.nanmean(d) if np.isfinite(d).any() else np.nan
    alpha = (1 - confidence) / 2
    low = np.nanquantile(boot_diff, alpha, axis=0)
    high = np.nanquantile(boot_diff, 1 - alpha, axis=0)
    gain = float(np.nanmean(diff))
    g_low, g_high = (float(v) for v in np.nanquantile(boot_gain, [alpha, 1 - alpha]))
    never_lower = bool(np.all(diff >= 0) or np.all(high >= 0))
    return {
        "rule": rule, "baseline": baseline, "common_text_range": [round(span[0], 4), round(span[1], 4)],
        "text_grid": [round(float(v), 4) for v in grid],
        "identity_difference": [round(float(v), 4) for v in diff],
        "low": [round(float(v), 4) for v in low], "high": [round(float(v), 4) for v in high],
        "mean_gain": round(gain, 4), "mean_gain_low": round(g_low, 4), "mean_gain_high": round(g_high, 4),
        "measurably_lower_somewhere": bool(np.any(high < 0)),
        "measurably_higher_somewhere": bool(np.any(low > 0)),
        "dominates": bool(not np.any(high < 0) and np.all(diff >= 0) and np.any(low > 0)),
        "never_measurably_lower": never_lower,
    }


#: Non-inferiority margin of ``paired_at_knob``: a rule is non-inferior to its reference on a metric
#: when the lower end of the paired interval of (rule - reference) lies above minus this.
NON_INFERIORITY_MARGIN = 0.01


def paired_at_knob(table, n_units: int, rule: str, reference: str, samples: int = 2000, seed: int = 0,
                   confidence: float = 0.95, margin: float = NON_INFERIORITY_MARGIN) -> dict:
    """``rule`` minus ``reference`` at each knob value both have (text alignment and identity), paired
    over units, with percentile-bootstrap intervals; ``non_inferior`` where both lower ends are above -margin.

    For a rule that computes the same thing another way (e.g. the personalized row on fewer steps):
    the question is not where its curve lies but whether each of its points is as good as the reference's.
    """
    knobs = sorted({k for r, k in table if r == rule} & {k for r, k in table if r == reference})
    if not knobs:
        raise KeyError(f"rules {rule!r} and {reference!r} share no knob value")
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n_units, n_units), minlength=n_units) for _ in range(samples)])
    alpha = (1 - confidence) / 2
    points = []
    for knob in knobs:
        point = {"knob": float(knob)}
        for m, metric in enumerate(("text", "identity")):
            diff = table[(rule, knob)][m] - table[(reference, knob)][m]
            boot = counts @ diff / n_units
            low, high = np.quantile(boot, [alpha, 1 - alpha])
            point[metric] = round(float(diff.mean()), 4)
            point[f"{metric}_low"], point[f"{metric}_high"] = round(float(low), 4), round(float(high), 4)
        point["non_inferior"] = bool(point["text_low"] > -margin and point["identity_low"] > -margin)
        points.append(point)
    return {"rule": rule, "reference": reference, "margin": margin, "points": points,
            "non_inferior": all(p["non_inferior"] for p in points)}


def curve_summary(table, n_units: int, rule: str, samples: int = 1000, seed: int = 0,
                  confidence: float = 0.95) -> dict:
    """The rule's points (knob, text, identity) with percentile-bootstrap intervals over units."""
    c = curve(table, rule)
    rng = np.random.default_rng(seed)
    boot_t = np.empty((samples, len(c.knobs)))
    boot_i = np.empty((samples, len(c.knobs)))
    for s in range(samples):
        w = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units).astype(float)
        r = curve(table, rule, w)
        boot_t[s], boot_i[s] = r.text, r.identity
    alpha = (1 - confidence) / 2
    q = lambda a: np.quantile(a, [alpha, 1 - alpha], axis=0)  # noqa: E731
    (t_lo, t_hi), (i_lo, i_hi) = q(boot_t), q(boot_i)
    return {"knob": [float(k) for k in c.knobs],
            "text": [round(float(v), 4) for v in c.text], "text_low": [round(float(v), 4) for v in t_lo],
            "text_high": [round(float(v), 4) for v in t_hi],
            "identity": [round(float(v), 4) for v in c.identity],
            "identity_low": [round(float(v), 4) for v in i_lo], "identity_high": [round(float(v), 4) for v in i_hi]}


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def frontier_markdown(results: dict) -> str:
    """The comparison tables: per slice, each rule's mean identity gain at matched text alignment."""
    lines = ["# Frontier: identity at matched text alignment, each rule minus the baseline", "",
             f"Baseline: `{results['baseline']}`. Gain: mean over a grid of the common text-alignment range of "
             "(rule identity - baseline identity), each read off its curve; 95% paired bootstrap intervals over "
             "(subject, adapter, prompt) units. *Dominates*: never measurably lower, never lower at the point "
             "estimate, and measurably higher somewhere.", ""]
    for entry in results["slices"]:
        lines += [f"## {entry['adapter']} adapters, {entry['prompt_set']} prompts ({entry['units']} units)", ""]
        if entry.get("incomplete"):
            lines += ["Unfinished rules (share of their images done, and the knob values compared; "
                      "none: left out): " + "; ".join(
                          f"`{name}` {part['done']:.0%}, kept "
                          + (", ".join(f"{v:g}" for v in part["values_kept"]) or "none")
                          for name, part in entry["incomplete"].items()) + ".", ""]
        lines += ["| rule | knob | common text range | mean identity gain [95% CI] | lowest / highest gain "
                  "| measurably lower somewhere | dominates |", "|---|---|---|---|---|---|---|"]
        for c in entry["compared"]:
            rule = results["rules"][c["rule"]]
            if c["common_text_range"] is None:
                lines.append(f"| {c['rule']} | {rule['knob']} | none | – | – | – | – |")
                continue
            lo, hi = c["common_text_range"]
            diffs = c["identity_difference"]
            lines.append(f"| {c['rule']} | {rule['knob']} | {lo:.3f}–{hi:.3f} | {_fmt(c['mean_gain'])} "
                         f"[{_fmt(c['mean_gain_low'])}, {_fmt(c['mean_gain_high'])}] | {_fmt(min(diffs))} / "
                         f"{_fmt(max(diffs))} | {'yes' if c['measurably_lower_somewhere'] else 'no'} | "
                         f"{'**yes**' if c['dominates'] else 'no'} |")
        if entry.get("paired"):
            margin = entry["paired"][0]["margin"]
            lines += ["", f"Same knob value, rule minus its reference (paired over units; non-inferior: both "
                      f"lower ends above -{margin:g}):", "",
                      "| rule | reference | knob | text alignment [95% CI] | identity [95% CI] | non-inferior |",
                      "|---|---|---|---|---|---|"]
            for p in entry["paired"]:
                for point in p["points"]:
                    lines.append(
                        f"| {p['rule']} | {p['reference']} | {point['knob']:g} | {_fmt(point['text'])} "
                        f"[{_fmt(point['text_low'])}, {_fmt(point['text_high'])}] | {_fmt(point['identity'])} "
                        f"[{_fmt(point['identity_low'])}, {_fmt(point['identity_high'])}] | "
                        f"{'yes' if point['non_inferior'] else '**no**'} |")
        lines += ["", "Curves (knob: text alignment, identity):", ""]
        for name, c in entry["curves"].items():
            points = ", ".join(f"{k:g}: ({t:.3f}, {i:.3f})" for k, t, i in zip(c["knob"], c["text"], c["identity"]))
            lines.append(f"- `{name}` ({results['rules'][name]['knob']}): {points}")
        lines.append("")
    return "\n".join(lines)


def plot_frontier(results: dict, path) -> None:
    """One panel per slice: every rule's curve (text alignment vs identity) with bootstrap bars."""
    from dreamguide.evaluation.report import _pyplot, _save_figure

    plt = _pyplot()
    slices = results["slices"]
    columns = max(1, len({e["prompt_set"] for e in slices}))
    rows = max(1, -(-len(slices) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 5 * rows), squeeze=False)
    colours = plt.get_cmap("tab20")
    names = list(results["rules"])
    for ax, entry in zip(axes.flat, slices):
        for name, c in entry["curves"].items():
            baseline = name == results["baseline"]
            ax.errorbar(c["text"], c["identity"],
                        xerr=[np.subtract(c["text"], c["text_low"]), np.subtract(c["text_high"], c["text"])],
                        yerr=[np.subtract(c["identity"], c["identity_low"]),
                              np.subtract(c["identity_high"], c["identity"])],
                        marker="o", ms=3, lw=2.5 if baseline else 1, elinewidth=0.5, capsize=0,
                        color="black" if baseline else colours(names.index(name) % 20), label=name,
                        zorder=3 if baseline else 2)
        ax.set_title(f"{entry['adapter']} adapters, {entry['prompt_set']} prompts")
        ax.set_xlabel("text alignment")
        ax.set_ylabel("identity")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(slices):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save_figure(fig, path)
