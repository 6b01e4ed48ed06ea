"""What a benchmark world provides, and the jobs the runner builds from it.

A *world* is everything that differs between benchmarks: its subjects and prompts, how an
image is generated and how it is scored. The runner (``bench.runner``) owns the rest: the
job list, sharding over processes, the manifest that makes runs resumable, the result
tables and the figures. DreamBench with DINO/CLIP/SigLIP metrics is one world
(``bench.dreambench_world``); the small synthetic world is another.

A world implements ``World``:

    name                    short name written in every row ("dreambench")
    prepare()               validate every input and load the scorers; raise before any generation
    cases()                 every (subject, prompt) of the benchmark, as ``PromptCase``
    metric_backbones()      metric name -> what computes it (backbone id), for every table
    metric_kinds()          metric name -> "identity" or "text"
    generate(jobs)          images (and Consistency_p traces) for jobs that share one ``group``
    score(jobs, images)     one {metric: value} dict per image

``generate`` always receives the whole group (same subject, prompt, guidance weights; the
modes x seeds of one sampler call), so a group's images never depend on which process or
which resumed run produced them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from dreamguide.guidance import get_mode


@dataclass(frozen=True)
class PromptCase:
    """One prompt of one subject: the unit the bootstrap resamples."""

    subject: str
    class_word: str
    prompt_set: str
    prompt_index: int
    token_prompt: str
    base_prompt: str


@dataclass(frozen=True)
class Setting:
    """A guidance mode with its weights; ``w_cons`` is None for modes without consistency guidance."""

    mode: str
    w_text: float
    w_cons: float | None

    @property
    def label(self) -> str:
        cons = "" if self.w_cons is None else f" w_cons={self.w_cons:g}"
        return f"{self.mode} w_text={self.w_text:g}{cons}"


def uses_consistency(mode: str) -> bool:
    return "personalized" in get_mode(mode).needs and "base" in get_mode(mode).needs


@dataclass(frozen=True)
class Plan:
    """The world-independent part of a run: guidance settings and seeds (SPEC: seeds 0-3)."""

    modes: tuple[str, ...] = ("consistency", "parallel-rescaled")
    w_text: tuple[float, ...] = (7.5,)
    w_cons: tuple[float, ...] = (3.0,)
    seeds: tuple[int, ...] = (0, 1, 2, 3)

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

    def settings(self) -> list[Setting]:
        out = []
        for mode in self.modes:
            for w_text in self.w_text:
                for w_cons in self.w_cons if uses_consistency(mode) else (None,):
                    out.append(Setting(mode, w_text, w_cons))
        return out

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


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
        return f"{c.subject}/{c.prompt_set}-{c.prompt_index:02d}/{s.mode}_wt{s.w_text:g}_wc{cons}/s{self.seed}"

    @property
    def group(self) -> tuple:
        """Jobs of one sampler call: same case and weights; consistency and plain modes apart."""
        s = self.setting
        return (self.case, s.w_text, s.w_cons, uses_consistency(s.mode))

    @property
    def file_stem(self) -> str:
        return self.key.split("/", 1)[1].replace("/", "_")

    def row(self) -> dict[str, Any]:
        c, s = self.case, self.setting
        return {
            "subject": c.subject,
            "class_word": c.class_word,
            "prompt_set": c.prompt_set,
            "prompt_index": c.prompt_index,
            "prompt": c.token_prompt,
            "base_prompt": c.base_prompt,
            "seed": self.seed,
            "mode": s.mode,
            "w_text": s.w_text,
            "w_cons": s.w_cons,
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
