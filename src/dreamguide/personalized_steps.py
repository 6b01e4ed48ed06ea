"""Which denoising steps evaluate the personalized row, and what the others use instead.

A mode with a consistency term (``consistency``, ``pr``, ``orthogonal`` and the shaping modes:
every mode that reads the ``uncond``, ``base`` and ``personalized`` predictions) runs one UNet row
per image more than ``cfg``: the personalized model on the token prompt, e_ft, which gives the
consistency guidance g_cons = e_ft - e_c. A :class:`PersonalizedSteps` schedule evaluates that
row on some steps only:

* **interval** ``[start, stop]`` (fractions of the trajectory: 0 = first step, 1 = last, both
  included, as ``ConsistencyShaping``'s): outside it the row is not run and the step is ``cfg``'s
  (the consistency term is left out);
* **every** ``N`` steps inside the interval, counted from its first step; the steps between
  *reuse* the consistency guidance of the last evaluations:

  - ``reuse="hold"``: the last evaluated value;
  - ``reuse="extrapolate"``: the straight line through the last two evaluations, at this step
    (after the first evaluation only: hold);

  in the *terms* of ``carry``:

  - ``"g_cons"``: g_cons itself;
  - ``"parts"``: its coefficient along the text guidance, k = <g_cons, g_text> / ||g_text||^2 per
    location (Consistency_p), and its orthogonal part g_orth; a reused step rebuilds
    g_cons' = k g_text + g_orth with the step's *own* g_text, so the parallel part follows the
    text guidance as it moves.

The sampler (``dreamguide.sampling``) runs the rows without the personalized ones on a reused
step and hands the guidance rule e_ft' = e_c + g_cons' (:meth:`Carried.recall`), so every mode's
rule applies unchanged. The default, every step, evaluates the row at every step and gives the
images of a sampler without this option, bit for bit. Measured quality and cost: docs/RESULTS.md
and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch

from dreamguide.guidance import ParallelRescaling, decompose

Reuse = Literal["hold", "extrapolate"]
Carry = Literal["g_cons", "parts"]

REUSES: tuple[str, ...] = ("hold", "extrapolate")
CARRIES: tuple[str, ...] = ("g_cons", "parts")

#: What a step does with the personalized row (:meth:`PersonalizedSteps.plan`).
EVALUATE, REUSE, OFF = "evaluated", "reused", "off"

@dataclass(frozen=True)
class PersonalizedSteps:
    """The steps that evaluate the personalized row (see the module docstring); defaults: every step."""

    every: int = 1
    start: float = 0.0
    stop: float = 1.0
    reuse: Reuse = "hold"
    carry: Carry = "g_cons"

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(
                f"PersonalizedSteps.every must be a positive integer (evaluate the personalized row every N "
                f"steps), got {self.every!r}; e.g. every=3"
            )
        for name, example in (("start", 0.0), ("stop", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
                0.0 <= value <= 1.0
            ):
                raise ValueError(
                    f"PersonalizedSteps.{name} is a fraction of the trajectory (0 = first step, 1 = last) "
                    f"and must lie in [0, 1], got {value!r}; e.g. {name}={example}"
                )
        if not self.start < self.stop:
            raise ValueError(
                f"PersonalizedSteps.start ({self.start}) must be below stop ({self.stop}): the personalized "
                "row is evaluated for progress in [start, stop]; e.g. start=0.0, stop=0.7"
            )
        if self.reuse not in REUSES:
            raise ValueError(f"unknown PersonalizedSteps.reuse {self.reuse!r}; choose one of {', '.join(REUSES)}")
        if self.carry not in CARRIES:
            raise ValueError(f"unknown PersonalizedSteps.carry {self.carry!r}; choose one of {', '.join(CARRIES)}")

    @property
    def every_step(self) -> bool:
        """True when every step evaluates the row (the schedule changes nothing)."""
        return self.every == 1 and self.start == 0.0 and self.stop == 1.0

    def plan(self, steps: int) -> tuple[str, ...]:
        """Per step: ``"evaluated"``, ``"reused"`` or ``"off"``; progress of step i is i / max(steps - 1, 1)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer (the denoising steps), got {steps!r}; e.g. 30")
        out, first = [], None
        for i in range(steps):
            progress = i / max(steps - 1, 1)
            if not self.start <= progress <= self.stop:
                out.append(OFF)
                continue
            first = i if first is None else first
            out.append(EVALUATE if (i - first) % self.every == 0 else REUSE)
        return tuple(out)

    def evaluated_fraction(self, steps: int) -> float:
        """The share of the ``steps`` steps that evaluate the personalized row."""
        return self.plan(steps).count(EVALUATE) / steps

    def describe(self) -> str:
        """One line: ``every step``, or e.g. ``every 3 steps in [0, 0.7], hold g_cons``."""
        if self.every_step:
            return "every step"
        parts = ["every step" if self.every == 1 else f"every {self.every} steps"]
        if (self.start, self.stop) != (0.0, 1.0):
            parts[0] += f" in [{self.start:g}, {self.stop:g}]"
        if self.every > 1:
            parts.append(f"{self.reuse} {self.carry}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "personalized_steps") -> "PersonalizedSteps":
        """Build from a mapping (a config table); an unknown key is an error naming it and ``source``."""
        known = [f.name for f in fields(cls)]
        unknown = [key for key in values if key not in known]
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {source}; valid keys: {', '.join(known)}")
        return cls(**values)

    @classmethod
    def parse(cls, text: str) -> "PersonalizedSteps":
        """From the command line: ``every`` or ``3`` or ``every=3,stop=0.7,reuse=extrapolate,carry=parts``."""
        text = text.strip()
        if text in ("", "every-step", "every"):
            return cls()
        if text.isdigit():
            return cls(every=int(text))
        from dreamguide.config import key_value_pairs

        values: dict = {}
        given = key_value_pairs(text, [f.name for f in fields(cls)], "personalized-steps", "every=3,reuse=hold")
        for key, value in given.items():
            if key == "every":
                if not value.isdigit():
                    raise ValueError(f"personalized-steps every={value!r} must be a positive integer, e.g. every=3")
                values[key] = int(value)
            elif key in ("start", "stop"):
                try:
                    values[key] = float(value)
                except ValueError:
                    raise ValueError(f"personalized-steps {key}={value!r} must be a number in [0, 1]") from None
            else:
                values[key] = value
        return cls(**values)


#: The schedule that evaluates the personalized row at every step.
EVERY_STEP = PersonalizedSteps()


class Carried:
    """The consistency guidance of the last evaluations of a batch's images, and its reuse.

    ``remember(i, g_cons, g_text)`` after an evaluated step ``i``; ``recall(i, g_text)`` the
    g_cons to use at a reused step ``i`` (``g_text``: that step's text guidance, read by
    ``carry="parts"``). Tensors are [images, C, H, W], kept in float32.
    """

    def __init__(self, schedule: PersonalizedSteps) -> None:
        self.schedule = schedule
        self._last: list[tuple[int, tuple[torch.Tensor, ...]]] = []

    def _terms(self, g_cons: torch.Tensor, g_text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g_cons = g_cons.float()
        if self.schedule.carry == "g_cons":
            return (g_cons,)
        k, _, g_orth = decompose(g_cons, g_text.float(), "location", ParallelRescaling().eps)
        return k, g_orth

    def remember(self, i: int, g_cons: torch.Tensor, g_text: torch.Tensor) -> None:
        keep = 2 if self.schedule.reuse == "extrapolate" else 1
        self._last = [*self._last, (i, self._terms(g_cons, g_text))][-keep:]

    def recall(self, i: int, g_text: torch.Tensor) -> torch.Tensor:
        if not self._last:
            raise RuntimeError(f"step {i} reuses the consistency guidance, but no step evaluated it before")
        i2, terms = self._last[-1]
        if self.schedule.reuse == "extrapolate" and len(self._last) == 2:
            i1, previous = self._last[0]
            slope = (i - i2) / (i2 - i1)
            terms = tuple(b + (b - a) * slope for a, b in zip(previous, terms))
        if self.schedule.carry == "g_cons":
            return terms[0]
        k, g_orth = terms
        return k * g_text.float() + g_orth
