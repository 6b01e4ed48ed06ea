"""What to sample: ``SampleSettings`` (one prompt, its modes x seeds), ``SampleItem`` (one image), results.

The field defaults of :class:`SampleSettings` are the project's sampling defaults (guidance
weights: ``guidance.W_TEXT`` / ``guidance.W_CONS``; PR switches: ``guidance.ParallelRescaling``);
the command line, training samples and benchmarks read them from here. Import these names from
:mod:`dreamguide.sampling`, which samples them.
"""

from __future__ import annotations

import collections
import numbers
import warnings
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from dreamguide import guidance
from dreamguide.denoise import SCHEDULERS
from dreamguide.guidance import ConsistencyShaping, ParallelRescaling
from dreamguide.personalized_steps import EVERY_STEP, PersonalizedSteps
from dreamguide.prompts import base_prompt as derive_base_prompt
from dreamguide.prompts import contains_token
from dreamguide.unet_rows import ROWS

if TYPE_CHECKING:
    from PIL import Image


def parse_modes(modes: str | Iterable[str]) -> tuple[str, ...]:
    """Canonical mode names from "cfg,pr" or a list (aliases resolved, duplicates dropped, order kept)."""
    items = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else [str(m).strip() for m in modes]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"no guidance mode given; choose from {', '.join([*guidance.MODES, *guidance.ALIASES])}")
    return tuple(dict.fromkeys(guidance.get_mode(m).name for m in items))


#: Most seeds one sampling call takes (a range like 0-100000000 is refused, not enumerated).
MAX_SEEDS = 100_000
#: Guidance weights beyond this size are warned about: images come out saturated or as noise.
USUAL_WEIGHT_LIMIT = 50.0


def parse_seeds(seeds: str | int | Iterable[int]) -> tuple[int, ...]:
    """Seeds from "0,1,2,3", "0-3", "0-3,10", an int or a list; each must be a non-negative integer."""
    if isinstance(seeds, bool) or isinstance(seeds, float):
        raise ValueError(f"seeds must be integers, got {seeds!r}; e.g. seeds=(0, 1, 2)")
    if isinstance(seeds, numbers.Integral):
        items: list[int] = [int(seeds)]
    elif isinstance(seeds, str):
        items = []
        for part in (p.strip() for p in seeds.split(",")):
            if not part:
                continue
            match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if match:
                lo, hi = int(match[1]), int(match[2])
                if hi < lo:
                    raise ValueError(f"seed range {part!r} runs backwards; write it as {hi}-{lo}")
                if len(items) + hi - lo + 1 > MAX_SEEDS:
                    raise ValueError(
                        f"seed range {part!r} makes {hi - lo + 1} images per mode; one call takes at most "
                        f"{MAX_SEEDS} seeds: split the range over several runs"
                    )
                items.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                items.append(int(part))
            else:
                raise ValueError(f"bad seed {part!r}; write seeds as non-negative integers, e.g. 0,1,2,3 or 0-3")
    else:
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
        if bad:
            raise ValueError(
                f"seeds must be integers, got {bad[0]!r} in {list(seeds)!r}; a float or bool would silently "
                "become another seed, pass e.g. [1, 2]"
            )
        items = [int(s) for s in seeds]
    if not items:
        raise ValueError("no seeds given; pass at least one, e.g. 0 or 0-3")
    for seed in items:
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed {seed} is out of range; seeds are integers from 0 to 2**63-1")
    if len(items) > MAX_SEEDS:
        raise ValueError(f"{len(items)} seeds given; one call takes at most {MAX_SEEDS}: split them over several runs")
    duplicates = sorted(seed for seed, n in collections.Counter(items).items() if n > 1)
    if duplicates:
        raise ValueError(f"seeds {duplicates} are given more than once; each seed makes one image, list it once")
    return tuple(items)


def _require_token(prompt: str, token: str, class_word: str | None) -> None:
    if not contains_token(prompt, token):
        example = f"{token} {class_word}" if class_word else token
        raise ValueError(
            f"the prompt {prompt!r} does not contain the token {token!r}; "
            f"write it into the prompt, e.g. 'a photo of {example}'"
        )


def reads_personalized(mode: str) -> bool:
    """True if the guidance mode reads a prediction of the personalized model."""
    return any(ROWS[need].personalized for need in guidance.get_mode(mode).needs)


def check_finite(name: str, value) -> float:
    """``value`` as a float; anything but a finite real number is a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_run(steps, batch_size, scheduler) -> None:
    """What one sampling call shares: the number of steps, the batch size and the scheduler."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}; e.g. steps=30")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}; e.g. batch_size=4")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")


#: Denoising steps of a preview, fewer than ``SampleSettings.steps``: the sample images written
#: during training, the toy-world demo and the web app's sample form.
PREVIEW_STEPS: int = 25


@dataclass(frozen=True)
class SampleSettings:
    """What to sample: prompts, guidance modes and weights, seeds, size and steps (validated).

    ``prompt`` is the token prompt ("a <sks> dog in the snow"); ``base_prompt`` defaults to it
    with the token replaced by ``class_word`` ("a dog in the snow"). Without a token (plain
    ``cfg`` sampling) the base prompt is the prompt itself. ``height``/``width`` of ``None``
    mean the model's native size; ``seeds`` make one image each per mode. These field defaults
    are the project's sampling defaults (the command line, the training samples and the
    benchmarks read them from here).
    """

    prompt: str
    token: str | None = None
    class_word: str | None = None
    base_prompt: str | None = None
    negative_prompt: str = ""
    modes: tuple[str, ...] = ("parallel-rescaled",)
    seeds: tuple[int, ...] = (0,)
    #: Images per batched UNet forward; the (mode, seed) images are packed in order, several modes
    #: may share a batch. Each image adds one UNet row per prediction its mode reads (3 for pr).
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    steps: int = 50
    w_text: float = guidance.W_TEXT
    w_cons: float = guidance.W_CONS
    pr: ParallelRescaling = field(default_factory=ParallelRescaling)
    #: When and how strongly the consistency term acts (schedules, intervals, the shaping modes' knobs).
    shaping: ConsistencyShaping = field(default_factory=ConsistencyShaping)
    #: The steps that evaluate the personalized row of the consistency modes (the others reuse or drop it).
    personalized_steps: PersonalizedSteps = EVERY_STEP
    scheduler: str = "default"
    trace: bool = False
    #: Where the scheduler clips x0 (pixel models' DDIM), step with the noise recomputed from the
    #: clipped x0 (see ``denoise.clipped_step_kwargs``); False reproduces diffusers' default update.
    clipped_model_output: bool = True
    #: The base prompt as derived (not given); lets ``dataclasses.replace(s, prompt=...)`` re-derive it.
    derived_base_prompt: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the prompt is empty; pass what to draw, e.g. 'a photo of <sks> dog'")
        set_("modes", parse_modes(self.modes))
        set_("seeds", parse_seeds(self.seeds))
        if self.token is not None and not self.token.strip():
            set_("token", None)
        if self.base_prompt is not None and self.base_prompt == self.derived_base_prompt:
            set_("base_prompt", None)  # copied from a derived settings object: derive again
        set_("derived_base_prompt", None)
        if self.base_prompt is None:
            if self.token is None:
                set_("base_prompt", self.prompt)
                set_("derived_base_prompt", self.prompt)
            elif not self.class_word:
                _require_token(self.prompt, self.token, self.class_word)
                raise ValueError(
                    f"cannot derive the base prompt of {self.prompt!r} without a class word; "
                    f"pass class_word (--class-word, e.g. 'dog') or base_prompt (--base-prompt)"
                )
            else:
                set_("base_prompt", derive_base_prompt(self.prompt, self.token, self.class_word))
                set_("derived_base_prompt", self.base_prompt)
        elif self.token is not None:
            _require_token(self.prompt, self.token, self.class_word)
        check_run(self.steps, self.batch_size, self.scheduler)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
        for name in ("w_text", "w_cons"):
            set_(name, check_finite(name, getattr(self, name)))
            if abs(getattr(self, name)) > USUAL_WEIGHT_LIMIT:
                flag = "--" + name.replace("_", "-")
                warnings.warn(
                    f"{name} {getattr(self, name):g} ({flag}) is far outside the usual range (about 1 to 15; "
                    f"warned above {USUAL_WEIGHT_LIMIT:g}): the images will likely be saturated or noise",
                    stacklevel=3,
                )
        _check_switches(self.pr, self.shaping, self.personalized_steps)
        if self.personalized_steps != EVERY_STEP and not any(guidance.get_mode(m).has_consistency for m in self.modes):
            warnings.warn(
                f"personalized_steps ({self.personalized_steps.describe()}) changes only modes with a consistency "
                f"term, and none of {', '.join(self.modes)} has one; add e.g. consistency or pr to the modes",
                stacklevel=3,
            )

    @property
    def needs_personalized(self) -> bool:
        """True if any mode reads a prediction of the personalized model."""
        return any(reads_personalized(m) for m in self.modes)

    def items(self) -> list["SampleItem"]:
        """One item per (mode, seed): mode by mode, seeds in order."""
        return [
            SampleItem(
                prompt=self.prompt, base_prompt=self.base_prompt, negative_prompt=self.negative_prompt, mode=mode,
                seed=seed, w_text=self.w_text, w_cons=self.w_cons, pr=self.pr, shaping=self.shaping, token=self.token,
                class_word=self.class_word, personalized_steps=self.personalized_steps,
            )
            for mode in self.modes
            for seed in self.seeds
        ]

    @classmethod
    def from_dict(cls, data: dict) -> "SampleSettings":
        """Settings from ``to_dict()`` output (e.g. the ``settings`` of settings.json); unknown keys are errors."""
        from dataclasses import fields

        known = {f.name for f in fields(cls)} - {"derived_base_prompt"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sample setting(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        data = dict(data)
        if isinstance(data.get("pr"), dict):
            data["pr"] = ParallelRescaling(**data["pr"])
        if isinstance(data.get("shaping"), dict):
            data["shaping"] = ConsistencyShaping.from_dict(data["shaping"])
        if isinstance(data.get("personalized_steps"), dict):
            data["personalized_steps"] = PersonalizedSteps.from_dict(data["personalized_steps"])
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["derived_base_prompt"]
        data["modes"], data["seeds"], data["pr"] = list(self.modes), list(self.seeds), self.pr.to_dict()
        data["shaping"] = self.shaping.to_dict()
        data["personalized_steps"] = self.personalized_steps.to_dict()
        return data


@dataclass(frozen=True)
class SampleItem:
    """One image to sample: its prompts, guidance mode and weights, and seed (validated).

    ``base_prompt`` ``None`` means the prompt itself (plain ``cfg`` without a token; to derive it
    from a token prompt use ``dreamguide.prompts.base_prompt`` or ``SampleSettings``). ``token`` and
    ``class_word`` are recorded in the image's metadata; a mode that reads the personalized model
    checks that the sampler has one for ``token``. Defaults: those of :class:`SampleSettings`.
    """

    prompt: str
    base_prompt: str | None = None
    negative_prompt: str = SampleSettings.negative_prompt
    mode: str = SampleSettings.modes[0]
    seed: int = SampleSettings.seeds[0]
    w_text: float = SampleSettings.w_text
    w_cons: float = SampleSettings.w_cons
    pr: ParallelRescaling = field(default_factory=ParallelRescaling)
    shaping: ConsistencyShaping = field(default_factory=ConsistencyShaping)
    token: str | None = None
    class_word: str | None = None
    #: The steps that evaluate the personalized row; images of one batch share it (the sampler batches so).
    personalized_steps: PersonalizedSteps = EVERY_STEP

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not self.prompt.strip():
            raise ValueError("the prompt is empty; pass what to draw, e.g. 'a photo of <sks> dog'")
        if self.base_prompt is None:
            set_("base_prompt", self.prompt)
        set_("mode", guidance.get_mode(self.mode).name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        set_("seed", parse_seeds(self.seed)[0])
        for name in ("w_text", "w_cons"):
            set_(name, check_finite(name, getattr(self, name)))
        _check_switches(self.pr, self.shaping, self.personalized_steps)

    @property
    def rule(self) -> tuple:
        """What the guidance rule of this image depends on: images with equal rules are combined together."""
        return (self.mode, self.w_text, self.w_cons, self.pr, self.shaping)


def _check_switches(pr, shaping, personalized_steps=EVERY_STEP) -> None:
    if not isinstance(personalized_steps, PersonalizedSteps):
        raise ValueError(
            f"personalized_steps must be a PersonalizedSteps, got {type(personalized_steps).__name__}; build it with "
            "dreamguide.personalized_steps.PersonalizedSteps(every=3) or PersonalizedSteps.from_dict({...})"
        )
    if not isinstance(pr, ParallelRescaling):
        raise ValueError(f"pr must be a guidance.ParallelRescaling, got {type(pr).__name__}")
    if not isinstance(shaping, ConsistencyShaping):
        raise ValueError(f"shaping must be a guidance.ConsistencyShaping, got {type(shaping).__name__}")


def no_personalization_message(modes: Iterable[str]) -> str:
    """The error for modes that read the personalized model when none was given."""
    needing = [m for m in dict.fromkeys(guidance.get_mode(m).name for m in modes) if reads_personalized(m)]
    return (
        f"guidance mode(s) {', '.join(needing)} need a personalized model, but none was given; "
        "pass a LoRA (--lora), token embeddings (--embeddings) or a personalized UNet "
        "(--personalized-unet), or use --modes cfg"
    )


@dataclass
class SampleResult:
    """One sampled image and everything needed to reproduce and describe it."""

    image: "Image.Image"
    seed: int
    mode: str
    prompt: str
    base_prompt: str
    metadata: dict
    trace: list[dict] = field(default_factory=list)
