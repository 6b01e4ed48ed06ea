"""The Consistency_p trace: per image and denoising step, statistics of k (SPEC section 3).

k = <g_cons, g_text> / (||g_text||^2 + eps) per location (or per sample), with g_text = e_c - e_u
and g_cons = e_ft - e_c: defined for every mode that reads the ``uncond``, ``base`` and
``personalized`` predictions, computed before any normalization (so ``consistency``, ``pr`` and
``orthogonal`` give the same values for the same predictions). :class:`ConsistencyTrace` is a
callback of :func:`dreamguide.denoise.denoise`; its statistics stay on the device until
:meth:`ConsistencyTrace.records` reads them once, after the loop. The file format is in
docs/SAMPLING.md (:func:`trace_document`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dreamguide import guidance
from dreamguide.personalized_steps import OFF

if TYPE_CHECKING:
    from dreamguide.denoise import Step
    from dreamguide.sampling import SampleResult
    from dreamguide.unet_rows import RowLayout

@dataclass(frozen=True)
class TracedImages:
    """Consecutive images of a batch traced with one PR setting (its granularity and eps give k)."""

    images: tuple[int, ...]
    pr: guidance.ParallelRescaling


class ConsistencyTrace:
    """Callback: Consistency_p statistics at every step for ``groups`` of the images of a batch.

    ``layout`` says where each image's rows are in the model output; the output's first
    ``channels`` channels are the predictions (a learned variance, if any, comes after them).
    ``personalized_rows``: per step, what a personalized-steps schedule did with the personalized
    row (``personalized_steps.PersonalizedSteps.plan``); given, each record says it under
    ``personalized_row`` (``"evaluated"`` or ``"reused"``: k of the reused g_cons) and steps
    where the row is off (no consistency term) are not recorded. None: every step evaluates it.
    """

    def __init__(self, layout: "RowLayout", groups: Sequence[TracedImages], channels: int,
                 personalized_rows: Sequence[str] | None = None) -> None:
        self.layout, self.groups, self.channels = layout, list(groups), channels
        self.personalized_rows = None if personalized_rows is None else list(personalized_rows)
        self._steps: list[tuple[int, float, object, list[dict]]] = []

    def __call__(self, step: "Step") -> None:
        if not self.groups or (self.personalized_rows is not None and self.personalized_rows[step.i] == OFF):
            return
        prediction = step.output[:, : self.channels]
        stats = []
        for group in self.groups:
            uncond, base, personalized = (
                self.layout.take(prediction, need, group.images) for need in ("uncond", "base", "personalized")
            )
            k = guidance.decompose(personalized - base, base - uncond, group.pr.granularity, group.pr.eps)
            stats.append(guidance.consistency_p_stats(k.consistency_p))
        self._steps.append((step.i, step.t, step.sigma, stats))

    def records(self) -> list[list[dict]]:
        """Per image of the batch, one dict per step (empty for untraced images): one host sync."""
        records: list[list[dict]] = [[] for _ in range(self.layout.images)]
        if not self._steps:
            return records
        lo, hi = guidance.TRACE_HISTOGRAM_RANGE
        bins = guidance.TRACE_HISTOGRAM_BINS
        edges = [lo + (hi - lo) * b / bins for b in range(bins + 1)]
        import torch

        for g, group in enumerate(self.groups):
            per_step = [stats[g] for _, _, _, stats in self._steps]
            stacked = {key: torch.stack([s[key] for s in per_step]).cpu().tolist() for key in per_step[0]}
            for s, (i, t, sigma, _) in enumerate(self._steps):
                for position, image in enumerate(group.images):
                    record = {"step": i, "timestep": float(t)}
                    if sigma is not None:
                        record["sigma"] = float(sigma)
                    if self.personalized_rows is not None:
                        record["personalized_row"] = self.personalized_rows[i]
                    record.update(
                        {
                            "mean": stacked["mean"][s][position],
                            "std": stacked["std"][s][position],
                            "quantiles": {
                                f"{q:g}": v for q, v in zip(guidance.TRACE_QUANTILES, stacked["quantiles"][s][position])
                            },
                            "fraction_negative": stacked["fraction_negative"][s][position],
                            "histogram": {
                                "edges": edges,
                                "counts": [int(c) for c in stacked["histogram"][s][position]],
                            },
                        }
                    )
                    records[image].append(record)
        return records


def trace_document(results: Sequence["SampleResult"], files: Sequence[str | os.PathLike] | None = None) -> dict:
    """The trace JSON: per image (mode, seed, prompts), its per-step Consistency_p records."""
    lo, hi = guidance.TRACE_HISTOGRAM_RANGE
    return {
        "format": "dreamguide.trace/1",
        "quantity": "consistency_p (k = <g_cons, g_text> / ||g_text||^2 per location, SPEC section 3)",
        "quantile_levels": list(guidance.TRACE_QUANTILES),
        "histogram_range": [lo, hi],
        "histogram_bins": guidance.TRACE_HISTOGRAM_BINS,
        "images": [
            {
                **({"file": Path(files[i]).name} if files else {}),
                "mode": r.mode,
                "seed": r.seed,
                "prompt": r.prompt,
                "base_prompt": r.base_prompt,
                "w_text": r.metadata.get("w_text"),
                "w_cons": r.metadata.get("w_cons"),
                "steps": r.trace,
            }
            for i, r in enumerate(results)
        ],
    }
