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

``ConsistencyShaping`` holds the switches of the rules that reshape the consistency term
beyond PR, and its weight schedule over the trajectory (docs/METHOD.md, "Shaping the
consistency term"); its defaults change nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
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

#: How the consistency weight moves over its interval, u = 0 at ``start`` and 1 at ``stop``.
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda u: 1.0,
    "linear-increase": lambda u: u,
    "linear-decrease": lambda u: 1.0 - u,
    "cosine-increase": lambda u: 0.5 - 0.5 * math.cos(math.pi * u),
    "cosine-decrease": lambda u: 0.5 + 0.5 * math.cos(math.pi * u),
}

#: What each fraction-valued field of ``ConsistencyShaping`` is a fraction of (for its error message).
FRACTIONS: dict[str, str] = {
    "start": "of the trajectory: 0 = first step, 1 = last",
    "stop": "of the trajectory: 0 = first step, 1 = last",
    "pr_from": "of the trajectory: 0 = first step, 1 = last",
    "floor": "of w_cons that the schedule keeps at its lowest: 0 = the schedule itself, 1 = constant",
}


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
        if isinstance(self.rescale, bool) or not isinstance(self.rescale, (int, float)) or not math.isfinite(
            self.rescale
        ):
            raise ValueError(f"PR rescale must be a finite number, got {self.rescale!r}; e.g. rescale=1.0")
        if (
            isinstance(self.eps, bool)
            or not isinstance(self.eps, (int, float))
            or not math.isfinite(self.eps)
            or not self.eps > 0
        ):
            raise ValueError(f"PR eps must be positive and finite, got {self.eps!r}; e.g. eps=1e-6")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ConsistencyShaping:
    """Switches of the consistency-shaping rules and the weight schedule (docs/METHOD.md).

    Schedule (every mode with a consistency term): the term is on for steps whose progress
    lies in [``start``, ``stop``] (0 = first step, 1 = last, both ends included) and off
    elsewhere; inside, w_cons is multiplied by ``floor + (1 - floor) schedule(u)`` at
    u = (progress - start) / (stop - start): ``floor`` 0 is the schedule itself, and a decreasing
    schedule with floor F falls from w_cons to F w_cons instead of to 0.

    Rules (each read only by its mode; ``None`` or the default leaves that mode's output equal
    to the mode it reduces to):

    - ``spread_cap`` (tau, ``spread-capped``): cap on the spatial std of Consistency_p; None: no cap.
    - ``norm_bound`` (r, ``norm-bounded``): ||w_cons g_cons|| <= r ||w_text g_text|| per location.
    - ``magnitude_ratio``, ``magnitude_power`` (ratio0, p, ``magnitude-weighted``):
      w_cons / (1 + (ratio / ratio0)^p), ratio = ||g_cons|| / ||g_text|| per sample.
    - ``parallel_target`` (``adaptive-parallel``): net coefficient of g' along g_text per sample.
    - ``pr_from`` (``late-pr``): progress from which PR replaces plain consistency guidance.
    """

    schedule: str = "constant"
    start: float = 0.0
    stop: float = 1.0
    floor: float = 0.0
    spread_cap: float | None = None
    norm_bound: float | None = None
    magnitude_ratio: float | None = None
    magnitude_power: float = 2.0
    parallel_target: float = 0.0
    pr_from: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown consistency schedule {self.schedule!r} (ConsistencyShaping.schedule); "
                f"choose one of {', '.join(SCHEDULES)}, e.g. schedule='linear-increase'"
            )
        for name, example in (("start", 0.5), ("stop", 1.0), ("floor", 0.5), ("pr_from", 0.5)):
            value = _number(self, name, example)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"ConsistencyShaping.{name} is a fraction ({FRACTIONS[name]}) and must lie in [0, 1], "
                    f"got {value}; e.g. {name}={example}"
                )
        if self.floor and self.schedule == "constant":
            raise ValueError(
                f"ConsistencyShaping.floor ({self.floor}) acts only with a schedule that moves (the constant "
                f"one keeps w_cons everywhere); choose one, e.g. schedule='cosine-decrease', floor={self.floor}"
            )
        if not self.start < self.stop:
            raise ValueError(
                f"ConsistencyShaping.start ({self.start}) must be below stop ({self.stop}): the "
                f"consistency term is on for progress in [start, stop]; e.g. start=0.0, stop=0.6"
            )
        for name, example, minimum in (
            ("spread_cap", 0.5, "0"),
            ("norm_bound", 1.0, "0"),
            ("magnitude_ratio", 1.0, "above 0"),
        ):
            if getattr(self, name) is None:
                continue
            value = _number(self, name, example, none_ok=True)
            if value < 0 or (minimum != "0" and value == 0):
                raise ValueError(
                    f"ConsistencyShaping.{name} is a cap and must be {'>= 0' if minimum == '0' else '> 0'} "
                    f"(or None for no cap), got {value}; e.g. {name}={example}"
                )
        if not _number(self, "magnitude_power", 2.0) > 0:
            raise ValueError(
                f"ConsistencyShaping.magnitude_power must be > 0, got {self.magnitude_power}; e.g. magnitude_power=2.0"
            )
        _number(self, "parallel_target", 0.0)

    def active(self, progress: float) -> bool:
        """Whether the consistency term is on at this fraction of the trajectory."""
        return self.start <= progress <= self.stop

    def weight(self, w_cons: float, progress: float) -> float:
        """w_cons at this progress: 0 outside [start, stop], w_cons (floor + (1 - floor) schedule(u)) inside."""
        if not self.active(progress):
            return 0.0
        shape = SCHEDULES[self.schedule]((progress - self.start) / (self.stop - self.start))
        if self.floor:  # written so that floor 0 multiplies by the schedule exactly
            shape = self.floor + (1.0 - self.floor) * shape
        return w_cons * shape

    def to_dict(self) -> dict:
        """The fields; one added after the first records (``floor``) is written only when it is not its
        default, so earlier records (a run folder's run.json, settings.json, tuned.json) stay equal."""
        data = asdict(self)
        if data["floor"] == 0.0:
            del data["floor"]
        return data

    @classmethod
    def from_dict(cls, values: dict, source: str = "shaping") -> ConsistencyShaping:
        """Build from a mapping (a config table); an unknown key is an error naming it and ``source``."""
        known = [f.name for f in fields(cls)]
        unknown = [key for key in values if key not in known]
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {source}; valid keys: {', '.join(known)}")
        return cls(**values)


def _number(shaping: ConsistencyShaping, name: str, example: float, none_ok: bool = False) -> float:
    """The field's value as a float; anything but a finite real number is a ValueError naming it."""
    value = getattr(shaping, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        none = " or None" if none_ok else ""
        raise ValueError(
            f"ConsistencyShaping.{name} must be a finite number{none}, got {value!r}; e.g. {name}={example}"
        )
    return float(value)


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


def recentred_consistency_p(k: torch.Tensor, rescale: float = 1.0, spread_cap: float | None = None) -> torch.Tensor:
    """k' = rescale (k - mean_hw k) min(1, spread_cap / std_hw k): PR's recentring, spread kept up to a cap.

    Equal to rescale * (k - mean) / std * min(std, spread_cap), written so that no cap (None) or
    a cap at or above the spread multiplies by exactly 1, and a cap of 0 gives exactly 0.
    Mean and spread in float64, as in ``normalize_consistency_p``.
    """
    spatial = tuple(range(2, k.ndim))
    wide = k.to(torch.float64 if k.device.type != "mps" else torch.float32)
    centred = wide - wide.mean(dim=spatial, keepdim=True)
    if spread_cap is not None:
        std = wide.std(dim=spatial, keepdim=True, correction=0)
        centred = centred * torch.where(std > spread_cap, spread_cap / std, 1.0)
    return (centred * rescale).to(k.dtype)


def norm_bounded(
    g_cons: torch.Tensor, g_text: torch.Tensor, w_cons: float, w_text: float, bound: float | None
) -> torch.Tensor:
    """g_cons scaled down where ||w_cons g_cons|| > bound ||w_text g_text|| (channel norms, per location).

    Where the bound holds the factor is exactly 1; None is no bound.
    """
    if bound is None:
        return g_cons
    size = abs(w_cons) * torch.linalg.vector_norm(g_cons, dim=1, keepdim=True)
    limit = bound * abs(w_text) * torch.linalg.vector_norm(g_text, dim=1, keepdim=True)
    return g_cons * torch.where(size > limit, limit / size, 1.0)


def magnitude_factor(
    g_cons: torch.Tensor, g_text: torch.Tensor, ratio0: float, power: float, eps: float = 1e-6
) -> torch.Tensor:
    """1 / (1 + (ratio / ratio0)^power) per sample, ratio = ||g_cons|| / (||g_text|| + eps) over C, H, W."""
    dims = tuple(range(1, g_cons.ndim))
    ratio = torch.linalg.vector_norm(g_cons, dim=dims, keepdim=True) / (
        torch.linalg.vector_norm(g_text, dim=dims, keepdim=True) + eps
    )
    return 1.0 / (1.0 + (ratio / ratio0) ** power)


def parallel_targeted(
    g_cons: torch.Tensor, g_text: torch.Tensor, target: float = 0.0, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (g', k_bar): g' = g_cons + (target - k_bar) g_text, so sum_hw <g', g_text> = target ||g_text||^2.

    k_bar = <g_cons, g_text> / (||g_text||^2 + eps) over the whole sample: the ||g_text||^2-weighted
    mean of Consistency_p. Shifting every location's k by target - k_bar keeps its spatial spread
    and sets the net projection; target 0 is the sample-granularity orthogonal part exactly.
    """
    k_bar = decompose(g_cons, g_text, "sample", eps).consistency_p
    return g_cons + (target - k_bar) * g_text, k_bar


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


# A rule maps (predictions, w_text, w_cons, pr, shaping, progress, want_k) to (guided, k or None);
# k is computed only when it is part of the rule or asked for, so untraced cfg/consistency steps
# stay cheap.


def _cfg(p: Predictions, w_text: float, w_cons: float, pr, shaping, progress: float, want_k: bool):
    return p.uncond + w_text * (p.base - p.uncond), None


def _dreambooth(p: Predictions, w_text: float, w_cons: float, pr, shaping, progress: float, want_k: bool):
    return p.personalized_uncond + w_text * (p.personalized - p.personalized_uncond), None


def _with_consistency(g_cons_rule: Callable, location_only: str | None = None):
    """e_u + w_text g_text + w g', with g' = g_cons_rule(...) and w the scheduled w_cons.

    Outside the shaping interval the consistency term is left out (the cfg prediction); inside,
    w = w_cons * schedule(u), which is w_cons itself for the default constant schedule.
    ``location_only`` names a mode that reshapes Consistency_p across locations and so refuses
    PR granularity 'sample' (one k per sample has no spatial spread).
    """

    def rule(p: Predictions, w_text: float, w_cons: float, pr, shaping, progress: float, want_k: bool):
        if location_only and pr.granularity != "location":
            raise ValueError(
                f"guidance mode {location_only!r} reshapes Consistency_p across locations and needs PR "
                f"granularity 'location', got {pr.granularity!r}; use ParallelRescaling(granularity='location')"
            )
        g_text = p.base - p.uncond
        g_cons = p.personalized - p.base
        if not shaping.active(progress):
            k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p if want_k else None
            return p.uncond + w_text * g_text, k
        w = shaping.weight(w_cons, progress)
        g_cons, k = g_cons_rule(g_cons, g_text, w_text, w, pr, shaping, progress, want_k)
        return p.uncond + w_text * g_text + w * g_cons, k

    return rule


# A g_cons rule maps (g_cons, g_text, w_text, w, pr, shaping, progress, want_k) to (g', k or None);
# w is the scheduled consistency weight that will multiply g'.


def _plain_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p if want_k else None
    return g_cons, k


def _orthogonal_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    k, _, g_orth = decompose(g_cons, g_text, pr.granularity, pr.eps)
    return g_orth, k


def _parallel_rescaled_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    return parallel_rescaled(g_cons, g_text, pr)


def _recentred_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p
    return g_cons + (recentred_consistency_p(k, pr.rescale) - k) * g_text, k


def _spread_capped_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p
    return g_cons + (recentred_consistency_p(k, pr.rescale, shaping.spread_cap) - k) * g_text, k


def _norm_bounded_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p if want_k else None
    return norm_bounded(g_cons, g_text, w, w_text, shaping.norm_bound), k


def _magnitude_weighted_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p if want_k else None
    if shaping.magnitude_ratio is None:
        return g_cons, k
    return g_cons * magnitude_factor(g_cons, g_text, shaping.magnitude_ratio, shaping.magnitude_power, pr.eps), k


def _adaptive_parallel_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    k = decompose(g_cons, g_text, pr.granularity, pr.eps).consistency_p if want_k else None
    return parallel_targeted(g_cons, g_text, shaping.parallel_target, pr.eps)[0], k


def _late_pr_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k):
    if progress >= shaping.pr_from:
        return parallel_rescaled(g_cons, g_text, pr)
    return _plain_consistency(g_cons, g_text, w_text, w, pr, shaping, progress, want_k)


@dataclass(frozen=True)
class GuidanceMode:
    """A named guidance rule, the predictions (rows of the batched forward) it needs, and its knob.

    ``knob`` names the one setting that sets the rule's strength, so a sweep can vary each mode
    generically (``with_knob``): ``"w_text"``, ``"w_cons"``, ``"pr.<field>"`` of
    ``ParallelRescaling`` or ``"shaping.<field>"`` of ``ConsistencyShaping``. ``strength`` says
    in words what moving the knob does and which value gives which other mode.
    """

    name: str
    needs: tuple[str, ...]
    rule: Callable
    description: str
    knob: str
    strength: str

    @property
    def model_calls(self) -> int:
        return len(self.needs)

    @property
    def has_consistency(self) -> bool:
        """True for the modes with a consistency term: they read uncond, base and personalized (g_cons = e_ft - e_c)."""
        return set(_CONSISTENCY_NEEDS) <= set(self.needs)


_CONSISTENCY_NEEDS = ("uncond", "base", "personalized")

MODES: dict[str, GuidanceMode] = {
    m.name: m
    for m in (
        GuidanceMode(
            "cfg",
            ("uncond", "base"),
            _cfg,
            "classifier-free guidance of the base model (no identity)",
            "w_text",
            "higher: more text guidance",
        ),
        GuidanceMode(
            "dreambooth",
            ("personalized_uncond", "personalized"),
            _dreambooth,
            "ordinary sampling of the personalized model",
            "w_text",
            "higher: more guidance towards the token prompt",
        ),
        GuidanceMode(
            "consistency",
            _CONSISTENCY_NEEDS,
            _with_consistency(_plain_consistency),
            "text guidance + consistency guidance (DCO)",
            "w_cons",
            "higher: more identity, less text alignment; 0: cfg",
        ),
        GuidanceMode(
            "parallel-rescaled",
            _CONSISTENCY_NEEDS,
            _with_consistency(_parallel_rescaled_consistency),
            "consistency guidance with its text-parallel part re-centred and rescaled",
            "w_cons",
            "higher: more identity; 0: cfg",
        ),
        GuidanceMode(
            "orthogonal",
            _CONSISTENCY_NEEDS,
            _with_consistency(_orthogonal_consistency),
            "consistency guidance with its text-parallel part dropped",
            "w_cons",
            "higher: more identity; 0: cfg",
        ),
        GuidanceMode(
            "recentred",
            _CONSISTENCY_NEEDS,
            _with_consistency(_recentred_consistency, "recentred"),
            "consistency guidance with the spatial mean of its text-parallel coefficient removed",
            "w_cons",
            "higher: more identity; 0: cfg (pr.rescale scales the kept spread; 0: orthogonal)",
        ),
        GuidanceMode(
            "spread-capped",
            _CONSISTENCY_NEEDS,
            _with_consistency(_spread_capped_consistency, "spread-capped"),
            "recentred, with the spatial spread of the text-parallel coefficient capped at shaping.spread_cap",
            "shaping.spread_cap",
            "higher: more of the original spread kept; None (no cap): recentred; 0: orthogonal",
        ),
        GuidanceMode(
            "norm-bounded",
            _CONSISTENCY_NEEDS,
            _with_consistency(_norm_bounded_consistency),
            "consistency term bounded per location by shaping.norm_bound times the text term (channel norms)",
            "shaping.norm_bound",
            "higher: looser bound; None (no bound): consistency; 0: cfg",
        ),
        GuidanceMode(
            "magnitude-weighted",
            _CONSISTENCY_NEEDS,
            _with_consistency(_magnitude_weighted_consistency),
            "w_cons / (1 + (ratio / shaping.magnitude_ratio)^p), ratio = ||g_cons|| / ||g_text|| per sample",
            "shaping.magnitude_ratio",
            "higher: closer to consistency; None: consistency; near 0: cfg",
        ),
        GuidanceMode(
            "adaptive-parallel",
            _CONSISTENCY_NEEDS,
            _with_consistency(_adaptive_parallel_consistency),
            "text-parallel coefficient shifted per step so its net projection on g_text is shaping.parallel_target",
            "shaping.parallel_target",
            "higher: more text guidance from the consistency term; 0: orthogonal at PR granularity 'sample'",
        ),
        GuidanceMode(
            "late-pr",
            _CONSISTENCY_NEEDS,
            _with_consistency(_late_pr_consistency),
            "consistency guidance before progress shaping.pr_from, parallel-rescaled from it on",
            "shaping.pr_from",
            "higher: consistency for longer; 0: parallel-rescaled",
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


def with_knob(
    mode: str | GuidanceMode,
    value: float | None,
    *,
    w_text: float = W_TEXT,
    w_cons: float = W_CONS,
    pr: ParallelRescaling = ParallelRescaling(),
    shaping: ConsistencyShaping = ConsistencyShaping(),
) -> dict:
    """``guide`` keyword arguments (w_text, w_cons, pr, shaping) with ``mode``'s knob set to ``value``.

    The dataclasses are rebuilt, so a value out of range is the usual ValueError naming the field.
    """
    mode = get_mode(mode) if isinstance(mode, str) else mode
    settings = {"w_text": w_text, "w_cons": w_cons, "pr": pr, "shaping": shaping}
    group, _, field = mode.knob.partition(".")
    if not field:
        settings[group] = value
    else:
        settings[group] = type(settings[group])(**{**settings[group].to_dict(), field: value})
    return settings


def guide(
    mode: str | GuidanceMode,
    predictions: Predictions,
    w_text: float = W_TEXT,
    w_cons: float = W_CONS,
    pr: ParallelRescaling = ParallelRescaling(),
    return_stats: bool = False,
    *,
    shaping: ConsistencyShaping = ConsistencyShaping(),
    progress: float = 0.0,
):
    """Combine one step's predictions by ``mode``; with ``return_stats`` also return Consistency_p stats.

    ``progress`` is the fraction of the trajectory done at this step: 0.0 at the first step,
    i / (steps - 1) at step i, 1.0 at the last (0.0 when there is a single step). It is read by
    the shaping schedule and interval and by ``late-pr``; with the default ``shaping`` no mode
    depends on it.

    Inputs may be any float dtype; the arithmetic is float32 and the result has the dtype of the
    inputs. The stats are ``None`` for modes with no consistency term (cfg, dreambooth); the
    other modes trace the Consistency_p of the raw g_cons, whatever their rule does with it.
    """
    mode = get_mode(mode) if isinstance(mode, str) else mode
    missing = [name for name in mode.needs if getattr(predictions, name) is None]
    if missing:
        raise ValueError(f"guidance mode {mode.name!r} needs predictions {missing}, which were not given")
    progress = float(progress)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(
            f"progress must lie in [0, 1] (the fraction of the trajectory done: i / (steps - 1) at "
            f"step i), got {progress}"
        )
    dtype = getattr(predictions, mode.needs[0]).dtype
    as_float = Predictions(*(None if p is None else p.float() for p in predictions))
    guided, k = mode.rule(as_float, float(w_text), float(w_cons), pr, shaping, progress, return_stats)
    guided = guided.to(dtype)
    if not return_stats:
        return guided
    return guided, (None if k is None else consistency_p_stats(k))
