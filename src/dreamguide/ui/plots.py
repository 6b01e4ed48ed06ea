"""The comparison's two plots: Consistency_p per denoising step per mode, and the trade-off.

Consistency_p (SPEC section 3) is traced for every mode that reads the uncond, base and
personalized predictions; each curve is one mode's mean over its images of the per-step
spatial mean (band: the mean spatial std), beside the fraction of locations where it is
negative. The trade-off plot puts each image at (text alignment, identity) and each mode at the
mean of its images: up and to the right is better on both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dreamguide.sampling import SampleResult
    from dreamguide.ui.scores import ImageScore


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def consistency_p_curves(results: Sequence["SampleResult"]) -> dict[str, dict[str, list[float]]]:
    """Per traced mode: per step, the mean over its images of Consistency_p's spatial mean, its
    spatial std and its fraction of negative locations."""
    traces: dict[str, list[list[dict]]] = {}
    for result in results:
        if result.trace:
            traces.setdefault(result.mode, []).append(result.trace)
    curves = {}
    for mode, runs in traces.items():
        steps = min(len(run) for run in runs)
        curves[mode] = {
            key: [sum(run[s][key] for run in runs) / len(runs) for s in range(steps)]
            for key in ("mean", "std", "fraction_negative")
        }
    return curves


def plot_consistency_p(results: Sequence["SampleResult"], path: str | Path, labels: dict[str, str]) -> Path | None:
    """Write the Consistency_p plot of the traced modes to ``path``; None when no mode was traced."""
    curves = consistency_p_curves(results)
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for mode, curve in curves.items():
        x = list(range(1, len(curve["mean"]) + 1))
        (line,) = axes[0].plot(x, curve["mean"], label=labels.get(mode, mode))
        lo = [m - s for m, s in zip(curve["mean"], curve["std"])]
        hi = [m + s for m, s in zip(curve["mean"], curve["std"])]
        axes[0].fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
        axes[1].plot(x, curve["fraction_negative"], color=line.get_color(), label=labels.get(mode, mode))
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set_title("Consistency_p per step (band: spatial std)", fontsize=10)
    axes[1].set_title("fraction of locations with Consistency_p < 0", fontsize=10)
    for ax in axes:
        ax.set_xlabel("denoising step (noisy -> clean)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_tradeoff(modes: Sequence[str], scores: Sequence["ImageScore"], path: str | Path, labels: dict[str, str],
                  x_label: str, y_label: str) -> Path:
    """Write the trade-off plot: every image as a small dot, every mode's mean as a labelled marker."""
    from dreamguide.ui.scores import mode_means

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    colors = {}
    for mode, mean in mode_means(modes, scores).items():
        own = [s for m, s in zip(modes, scores) if m == mode]
        dots = ax.scatter([s.text_alignment for s in own], [s.identity for s in own], s=12, alpha=0.35)
        colors[mode] = dots.get_facecolor()[0]
        ax.scatter([mean.text_alignment], [mean.identity], s=70, color=colors[mode], edgecolor="black", zorder=3)
        ax.annotate(labels.get(mode, mode), (mean.text_alignment, mean.identity), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_losses(steps: Sequence[int], losses: Sequence[float], path: str | Path) -> Path:
    """Write the training loss per step (and its running mean over 20 steps) to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = 20
    if len(losses) >= window:
        running = [sum(losses[i - window + 1 : i + 1]) / window for i in range(window - 1, len(losses))]
        ax.plot(steps[window - 1 :], running, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    from dreamguide.atomic import atomic_open

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return path
