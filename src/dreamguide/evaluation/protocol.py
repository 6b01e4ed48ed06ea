"""What an evaluation suite provides (``World``), and the plan, settings and jobs the runner builds from it.

A *world* is everything that differs between suites: its subjects and prompts, how an image is
generated and how it is scored. The runner (``evaluation.runner``) owns the rest: the job list,
sharding over processes, the manifest that makes runs resumable, the result tables and the
figures (``evaluation.report``). DreamBench with DINO/CLIP/SigLIP metrics is one world
(``evaluation.suites.dreambench``); the miniature world is another (``toyworld.bench_world``).

A world implements ``World``:

    name                    short name written in every row ("dreambench")
    prepare()               validate every input and load the scorers; raise before any generation
    cases()                 every (subject, adapter, prompt) of the suite, as ``PromptCase``
    metric_backbones()      metric name -> what computes it (backbone id), for every table
    metric_kinds()          metric name -> "identity" or "text"
    generate(jobs)          images (and Consistency_p traces) for jobs that share one ``group``
    score(jobs, images)     one {metric: value} dict per image
    describe()              a JSON-able description, stored in run.json
    unusable_adapters()     optional: the adapters ``prepare()`` found unusable (NaN weights), as
                            ``UnusableAdapter`` errors; the runner skips their cases

``generate`` always receives whole groups (same case, weights and variant; the modes x seeds of one
sampler call), so a group's images never depend on which process or which resumed run produced
them. A world that sets ``groups_per_call = n`` receives up to n groups per call (to batch many
small prompts); its images are then independent of the batch up to float rounding.

One subject's adapter failing does not stop a run: ``generate`` raises :class:`UnusableAdapter`
(or :class:`~dreamguide.denoise.NonFiniteError`) and the runner skips the rest of that (subject,
adapter)'s cases, finishes the others and lists the skipped ones in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from dreamguide.guidance import W_CONS, W_TEXT, ConsistencyShaping, ParallelRescaling, get_mode
from dreamguide.personalized_steps import EVERY_STEP, PersonalizedSteps


@dataclass(frozen=True)
class PromptCase:
    """One prompt of one subject (with one adapter): the unit the bootstrap resamples.

    ``template`` is the prompt with ``{}`` where "<token> <class word>" goes; ``adapter`` names the
    subject's adapter when a world compares several kinds (empty when it has one per subject).
    """

    subject: str
    class_word: str
    prompt_set: str
    prompt_index: int
    token_prompt: str
    base_prompt: str
    adapter: str = ""
    template: str = ""

    @property
    def unit(self) -> tuple:
        """The bootstrap unit: (subject, adapter, prompt set, template, prompt index)."""
        return (self.subject, self.adapter, self.prompt_set, self.template, self.prompt_index)

    @property
    def adapter_key(self) -> tuple[str, str]:
        """(subject, adapter): the personalized model that makes this case's images, and what is skipped
        when that model cannot make images."""
        return (self.subject, self.adapter)


def adapter_label(subject: str, adapter: str) -> str:
    """How messages and reports name a (subject, adapter): ``subject 'dog'`` or ``subject 'dog' (dco adapter)``."""
    return f"subject {subject!r}" + (f" ({adapter} adapter)" if adapter else "")


class UnusableAdapter(ValueError):
    """A subject's adapter cannot make images: NaN weights found before sampling, or a sample that became
    non-finite. The runner skips that (subject, adapter)'s cases and reports ``reason``."""

    def __init__(self, subject: str, adapter: str, reason: str):
        super().__init__(subject, adapter, reason)
        self.subject, self.adapter, self.reason = subject, adapter, reason

    def __str__(self) -> str:
        return f"{adapter_label(self.subject, self.adapter)}: {self.reason}"


@dataclass(frozen=True)
class Variant:
    """Named sampler switches besides the weights: the PR rule's settings (SPEC section 3), the shaping of
    the consistency term (schedule, interval, the shaping modes' knobs), the DDIM update."""

    name: str
    pr: ParallelRescaling = field(default_factory=ParallelRescaling)
    #: False: diffusers' default DDIM update (noise not recomputed from the clipped x0).
    clipped_model_output: bool = True
    shaping: ConsistencyShaping = field(default_factory=ConsistencyShaping)
    #: The steps that evaluate the personalized row (``personalized_steps.PersonalizedSteps``).
    personalized_steps: PersonalizedSteps = EVERY_STEP

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name != self.name.strip():
            raise ValueError(f"a variant needs a plain name (no '/', no surrounding spaces), got {self.name!r}")

    def to_dict(self) -> dict:
        data = {"name": self.name, "pr": self.pr.to_dict(), "clipped_model_output": self.clipped_model_output}
        if self.shaping != ConsistencyShaping():  # written only when used: earlier runs' records stay equal
            data["shaping"] = self.shaping.to_dict()
        if self.personalized_steps != EVERY_STEP:  # likewise
            data["personalized_steps"] = self.personalized_steps.to_dict()
        return data


@dataclass(frozen=True)
class Setting:
    """A guidance mode with its weights; ``w_cons`` is None for modes without consistency guidance.

    ``variant`` (None: the world's own sampler settings) switches the PR rule or the DDIM update.
    """

    mode: str
    w_text: float
    w_cons: float | None
    variant: Variant | None = None

    @property
    def variant_name(self) -> str:
        return "" if self.variant is None else self.variant.name

    @property
    def label(self) -> str:
        cons = "" if self.w_cons is None else f" w_cons={self.w_cons:g}"
        variant = "" if self.variant is None else f" [{self.variant.name}]"
        return f"{self.mode} w_text={self.w_text:g}{cons}{variant}"


def uses_consistency(mode: str) -> bool:
    return "personalized" in get_mode(mode).needs and "base" in get_mode(mode).needs


@dataclass(frozen=True)
class Plan:
    """The world-independent part of a run: guidance settings, variants and seeds (SPEC: seeds 0-3).

    Every mode runs at every ``w_text``; consistency modes at every ``w_cons`` as well; each such
    setting once per variant (``variants`` empty: once, with the world's sampler settings).
    """

    modes: tuple[str, ...] = ("consistency", "parallel-rescaled")
    w_text: tuple[float, ...] = (W_TEXT,)
    w_cons: tuple[float, ...] = (W_CONS,)
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    variants: tuple[Variant, ...] = ()

    def __post_init__(self) -> None:
        modes = tuple(dict.fromkeys(get_mode(m).name for m in self.modes))
        if not modes:
            raise ValueError("no guidance modes chosen")
        object.__setattr__(self, "modes", modes)
        for name in ("w_text", "w_cons", "seeds"):
            values = tuple(getattr(self, name))
            if not values:
                raise ValueError(f"{name} needs at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {list(values)}")
            if name != "seeds" and not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"{name} values must be finite numbers, got {list(values)}")
            if name == "seeds" and not all(isinstance(v, int) and v >= 0 for v in values):
                raise ValueError(f"seeds must be non-negative integers, got {list(values)}")
            object.__setattr__(self, name, tuple(int(v) if name == "seeds" else float(v) for v in values))
        variants = tuple(self.variants)
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants lists a name twice: {names}")
        object.__setattr__(self, "variants", variants)

    def settings(self) -> list[Setting]:
        out = []
        for mode in self.modes:
            for w_text in self.w_text:
                for w_cons in self.w_cons if uses_consistency(mode) else (None,):
                    for variant in self.variants or (None,):
                        out.append(Setting(mode, w_text, w_cons, variant))
        return out

    def to_dict(self) -> dict:
        out = {k: list(getattr(self, k)) for k in ("modes", "w_text", "w_cons", "seeds")}
        if self.variants:  # left out when empty: run.json of runs without variants reads as before
            out["variants"] = [v.to_dict() for v in self.variants]
        return out


@dataclass(frozen=True)
class Job:
    """One image: a prompt case, a guidance setting and a seed."""

    case: PromptCase
    setting: Setting
    seed: int

    @property
    def key(self) -> str:
        c, s = self.case, self.setting
        cons = "-" if s.w_cons is None else f"{s.w_cons:g}"
        adapter = f"{c.adapter}/" if c.adapter else ""
        variant = f"_{s.variant.name}" if s.variant is not None else ""
        return (f"{c.subject}/{adapter}{c.prompt_set}-{c.prompt_index:02d}/"
                f"{s.mode}_wt{s.w_text:g}_wc{cons}{variant}/s{self.seed}")

    @property
    def group(self) -> tuple:
        """Jobs of one sampler call: same case, weights and variant; consistency and plain modes apart."""
        s = self.setting
        return (self.case, s.w_text, s.w_cons, uses_consistency(s.mode), s.variant)

    @property
    def file_stem(self) -> str:
        return self.key.split("/", 1)[1].replace("/", "_")

    def row(self) -> dict[str, Any]:
        c, s = self.case, self.setting
        return {
            "subject": c.subject,
            "class_word": c.class_word,
            "adapter": c.adapter,
            "prompt_set": c.prompt_set,
            "prompt_index": c.prompt_index,
            "template": c.template,
            "prompt": c.token_prompt,
            "base_prompt": c.base_prompt,
            "seed": self.seed,
            "mode": s.mode,
            "w_text": s.w_text,
            "w_cons": s.w_cons,
            "variant": s.variant_name,
        }


@dataclass
class Generated:
    """What ``World.generate`` returns per job: the image and, when traced, its Consistency_p trace."""

    image: Any  # PIL.Image
    trace: list[dict] | None = None
    metadata: dict | None = None  # stored in the PNG (dreamguide.images.save_png)


@runtime_checkable
class World(Protocol):
    name: str

    def prepare(self) -> None: ...

    def cases(self) -> Sequence[PromptCase]: ...

    def metric_backbones(self) -> dict[str, str]: ...

    def metric_kinds(self) -> dict[str, str]: ...

    def generate(self, jobs: Sequence[Job]) -> list[Generated]: ...

    def score(self, jobs: Sequence[Job], images: Sequence[Any]) -> list[dict[str, float]]: ...

    def describe(self) -> dict: ...
