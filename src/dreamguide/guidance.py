"""Guidance rules: how the per-step noise predictions are combined (SPEC sections 1-3).

Pure tensor math, no model code. Three predictions per denoising step:

    uncond        e_u   pretrained model, null or negative prompt
    base          e_c   pretrained model, base prompt ("a dog in the snow")
    personalized  e_ft  personalized model, token prompt ("a <sks> dog in the snow")

and, for plain ``dreambooth`` sampling, ``personalized_uncond`` (f_u: the personalized
model on the null prompt). Text guidance is ``g_text = e_c - e_u``, consistency guidance
``g_cons = e_ft - e_c``.

Parallel rescaling (Chae, Kim, Hwang 2025, arXiv 2506.00607) splits g_cons into the part
parallel to g_text and the part orthogonal to it, per spatial location, and replaces the
parallel coefficient k ("Consistency_p") by a re-centred, rescaled version:

    k      = <g_cons, g_text>_channels / (||g_text||^2 + eps)
    g_orth = g_cons - k * g_text
    k_hat  = (k - mean_hw k) / (std_hw k + eps)
    g_pr   = g_orth + rescale * k_hat * g_text

All arithmetic runs in float32 whatever the input dtype; results are cast back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal, NamedTuple

import torch

Granularity = Literal["location", "sample"]
Normalization = Literal["standardize", "none", "zero", "clip-negative"]

GRANULARITIES: tuple[str, ...] = ("location", "sample")
NORMALIZATIONS: tuple[str, ...] = ("standardize", "none", "zero", "clip-negative")

#: Quantiles recorded for Consistency_p at every traced step.
TRACE_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Histogram of Consistency_p: fixed bin edges so steps and runs can be compared;
#: values outside the range fall into the first or last bin.
TRACE_HISTOGRAM_RANGE: tuple[float, float] = (-4.0, 4.0)
TRACE_HISTOGRAM_BINS: int = 32

#: The guidance weights when none are given (SPEC section 2): the sampler's defaults too.
W_TEXT: float = 7.5
W_CONS: float = 3.0


@dataclass(frozen=True)
class ParallelRescaling:
    """The switches of parallel rescaling (SPEC section 3); defaults are our reading of Eq. 7."""

    granularity: Granularity = "location"
    normalization: Normalization = "standardize"
    rescale: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown PR granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown PR normalization {self.normalization!r}; choose one of {', '.join(NORMALIZATIONS)}"
            )
        if self.granularity == "sample" and self.normalization == "standardize":
            raise ValueError(
                "PR normalization 'standardize' needs granularity 'location': with one k per sample "
                "there is no spread to standardize over; use normalization 'clip-negative', 'zero' or 'none'"
            )
        if not self.eps > 0:
            raise ValueError(f"PR eps must be positive, got {self.eps}")

    def to_dict(self) -> dict:
        return asdict(self)


class Predictions(NamedTuple):
    """The noise predictions of one step; a mode reads only the ones it needs."""

    uncond: torch.Tensor | None = None
    base: torch.Tensor | None = None
    personalized: torch.Tensor | None = None
    personalized_uncond: torch.Tensor | None = None


class Decomposition(NamedTuple):
    """g_cons split relative to g_text; ``consistency_p`` has shape [B, 1, H, W] or [B, 1, 1, 1]."""

    consistency_p: torch.Tensor
    parallel: torch.Tensor
    orthogonal: torch.Tensor


def _reduce_dims(x: torch.Tensor, granularity: Granularity) -> tuple[int, ...]:
    return (1,) if granularity == "location" else tuple(range(1, x.ndim))


def decompose(
    g_cons: torch.Tensor, g_text: torch.Tensor, granularity: Granularity = "location", eps: float = 1e-6
) -> Decomposition:
    """Vector projection of g_cons onto g_text, over channels per location (or the whole sample)."""
    dims = _reduce_dims(g_text, granularity)
    k = (g_cons * g_text).sum(dim=dims, keepdim=True) / (g_text.square().sum(dim=dims, keepdim=True) + eps)
    parallel = k * g_text
    return Decomposition(k, parallel, g_cons - parallel)


def normalize_consistency_p(k: torch.Tensor, pr: ParallelRescaling) -> torch.Tensor:
    """The coefficient that replaces k in g_pr = g_orth + k' * g_text (``rescale`` included)."""
    if pr.normalization == "none":
        return k * pr.rescale
    if pr.normalization == "zero":
        return torch.zeros_like(k)
    if pr.normalization == "clip-negative":
        return k.clamp(min=0) * pr.rescale
    # Mean and spread in float64 (k is one value per location: cheap), so a constant k gives
    # exactly zero instead of float32 rounding noise amplified by 1 / eps.
    spatial = tuple(range(2, k.ndim))
    wide = k.to(torch.float64 if k.device.type != "mps" else torch.float32)
    mean = wide.mean(dim=spatial, keepdim=True)
    std = wide.std(dim=spatial, keepdim=True, correction=0)
    return ((wide - mean) / (std + pr.eps) * pr.rescale).to(k.dtype)


def parallel_rescaled(
    g_cons: torch.Tensor, g_text: torch.Tensor, pr: ParallelRescaling = ParallelRescaling()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (g_pr, k). Written as g_cons + (k' - k) g_text so 'none' gives g_cons and 'zero' g_orth exactly."""
    k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p
    return g_cons + (normalize_consistency_p(k, pr) - k) * g_text, k


def consistency_p_stats(k: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample statistics of Consistency_p, as tensors (no host sync): the timestep-analysis data."""
    flat = k.float().flatten(1)
    lo, hi = TRACE_HISTOGRAM_RANGE
    # Non-finite values would index out of range; the sampler reports them by step before this.
    finite = flat.nan_to_num(nan=0.0, posinf=hi, neginf=lo)
    bins = ((finite - lo) / (hi - lo) * TRACE_HISTOGRAM_BINS).floor().clamp(0, TRACE_HISTOGRAM_BINS - 1).long()
    histogram = torch.zeros(flat.shape[0], TRACE_HISTOGRAM_BINS, device=flat.device)
    histogram.scatter_add_(1, bins, torch.ones_like(flat))
    quantiles = torch.quantile(flat, torch.tensor(TRACE_QUANTILES, device=flat.device), dim=1).T
    return {
        "mean": flat.mean(dim=1),
        "std": flat.std(dim=1, correction=0),
        "quantiles": quantiles,
        "fraction_negative": (flat < 0).float().mean(dim=1),
        "histogram": histogram,
    }


# ---------------------------------------------------------------------------------------------
# Modes (SPEC section 2). Each one is a function of float32 predictions.


# A rule maps (predictions, w_text, w_cons, pr, want_k) to (guided, k or None); k is computed
# only when it is part of the rule or asked for, so untraced cfg/consistency steps stay cheap.


def _cfg(p: Predictions, w_text: float, w_cons: float, pr: ParallelRescaling, want_k: bool):
    return p.uncond + w_text * (p.base - p.uncond), None


def _dreambooth(p: Predictions, w_text: float, w_cons: float, pr: ParallelRescaling, want_k: bool):
    return p.personalized_uncond + w_text * (p.personalized - p.personalized_uncond), None


def _with_consistency(g_cons_rule: Callable):
    def rule(p: Predictions, w_text: float, w_cons: float, pr: ParallelRescaling, want_k: bool):
        g_text = p.base - p.uncond
        g_cons, k = g_cons_rule(p.personalized - p.base, g_text, pr, want_k)
        return p.uncond + w_text * g_text + w_cons * g_cons, k

    return rule


def _plain_consistency(g_cons, g_text, pr, want_k):
    k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p if want_k else None
    return g_cons, k


def _orthogonal_consistency(g_cons, g_text, pr, want_k):
    k, _, g_orth = decompose(g_cons, g_text, pr.granularity, pr.eps)
    return g_orth, k


def _parallel_rescaled_consistency(g_cons, g_text, pr, want_k):
    return parallel_rescaled(g_cons, g_text, pr)


@dataclass(frozen=True)
class GuidanceMode:
    """A named guidance rule and the predictions (rows of the batched forward) it needs."""

    name: str
    needs: tuple[str, ...]
    rule: Callable
    description: str

    @property
    def model_calls(self) -> int:
        return len(self.needs)


MODES: dict[str, GuidanceMode] = {
    m.name: m
    for m in (
        GuidanceMode("cfg", ("uncond", "base"), _cfg, "classifier-free guidance of the base model (no identity)"),
        GuidanceMode(
            "dreambooth",
            ("personalized_uncond", "personalized"),
            _dreambooth,
            "ordinary sampling of the personalized model",
        ),
        GuidanceMode(
            "consistency",
            ("uncond", "base", "personalized"),
            _with_consistency(_plain_consistency),
            "text guidance + consistency guidance (DCO)",
        ),
        GuidanceMode(
            "parallel-rescaled",
            ("uncond", "base", "personalized"),
            _with_consistency(_parallel_rescaled_consistency),
            "consistency guidance with its text-parallel part re-centred and rescaled",
        ),
        GuidanceMode(
            "orthogonal",
            ("uncond", "base", "personalized"),
            _with_consistency(_orthogonal_consistency),
            "consistency guidance with its text-parallel part dropped",
        ),
    )
}
ALIASES: dict[str, str] = {"pr": "parallel-rescaled"}


def get_mode(name: str) -> GuidanceMode:
    """Look a mode up by name or alias; unknown names list the valid ones."""
    key = ALIASES.get(name, name)
    if key not in MODES:
        valid = ", ".join([*MODES, *ALIASES])
        raise ValueError(f"unknown guidance mode {name!r}; choose one of {valid}")
    return MODES[key]


def guide(
    mode: str | GuidanceMode,
    predictions: Predictions,
    w_text: float = W_TEXT,
    w_cons: float = W_CONS,
    pr: ParallelRescaling = ParallelRescaling(),
    return_stats: bool = False,
):
    """Combine one step's predictions by ``mode``; with ``return_stats`` also return Consistency_p stats.

    Inputs may be any float dtype; the arithmetic is float32 and the result has the dtype of the
    inputs. The stats are ``None`` for modes with no consistency term (cfg, dreambooth).
    """
    mode = get_mode(mode) if isinstance(mode, str) else mode
    missing = [name for name in mode.needs if getattr(predictions, name) is None]
    if missing:
        raise ValueError(f"guidance mode {mode.name!r} needs predictions {missing}, which were not given")
    dtype = getattr(predictions, mode.needs[0]).dtype
    as_float = Predictions(*(None if p is None else p.float() for p in predictions))
    guided, k = mode.rule(as_float, float(w_text), float(w_cons), pr, return_stats)
    guided = guided.to(dtype)
    if not return_stats:
        return guided
    return guided, (None if k is None else consistency_p_stats(k))
