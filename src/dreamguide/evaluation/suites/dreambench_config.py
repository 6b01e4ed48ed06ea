"""The DreamBench run config: typed sections read with :mod:`dreamguide.config`.

One TOML file describes a run (every key optional except ``dreambench``, ``[model] base`` and, for
modes that need them, the adapters; an unknown key or a wrong type is an error that names the
key and the file):

    dreambench = "../shared/dreambench"     # the DreamBench folder
    subjects = []                           # [] = all 30
    prompt_sets = ["dreambench", "stylized"]
    prompts_per_set = 0                     # 0 = all (25 DreamBench + 15 stylized); n = the first n

    [model]
    base = "stabilityai/stable-diffusion-xl-base-1.0"
    dtype = "auto"                          # float16 on CUDA, float32 on CPU
    device = "auto"                         # this process's GPU under accelerate

    [sampling]
    modes = ["consistency", "pr"]
    seeds = [0, 1, 2, 3]
    w_text = [7.5]
    w_cons = [1.0, 2.0, 3.0, 5.0]           # the sweep behind the Pareto plot
    steps = 50
    batch_size = 4
    height = 1024                           # optional: the model's native size
    width = 1024
    scheduler = "default"
    negative_prompt = ""
    trace = true                            # Consistency_p per step (the timestep figure)

    [sampling.pr]                           # guidance.ParallelRescaling
    granularity = "location"
    normalization = "standardize"
    rescale = 1.0

    [adapters]
    token = "sks"                           # identifier token when an adapter file does not name one
    folder = "adapters"                     # optional: <folder>/<subject>/ as `dreamguide train` writes it
    [adapters.subjects.dog]                 # or per subject (wins over the folder)
    lora = "adapters/dog/pytorch_lora_weights.safetensors"
    embeddings = "adapters/dog/embeddings.safetensors"
    token = "<dog>"

    [train]                                 # optional: train every subject without adapter files
    config = "configs/sdxl-dco.toml"
    output = "adapters"
    overrides = ["train.steps=1000"]

    [metrics]
    names = ["dino", "dinov2", "clip_i", "clip_t", "siglip"]
    batch_size = 16
    dtype = "float32"
    [metrics.backbones]                     # hub ids or local folders
    dino = "facebook/dino-vits16@refs/pr/1"

    [report]                                # evaluation.report.ReportSettings
    baseline_mode = "consistency"
    bootstrap_samples = 1000
    identity_metric = "dino"
    text_metric = "siglip"

Relative paths (and overrides of them) are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from dreamguide.config import ConfigError, apply_overrides, defaults, from_dict, read_toml
from dreamguide.evaluation.protocol import Plan
from dreamguide.evaluation.report import ReportSettings
from dreamguide.evaluation.suites.dreambench_data import DREAMBENCH_PROMPT_SETS, PromptSetName
from dreamguide.guidance import W_CONS, W_TEXT, ParallelRescaling
from dreamguide.metrics import METRICS, Backbones, check_metrics

_PLAN = defaults(Plan)


def _sampling_default(name: str) -> Any:
    """The sampler's default for ``name`` (steps, scheduler, ...): defined once, on ``SampleSettings``."""
    from dreamguide.sampling import SampleSettings

    return defaults(SampleSettings)[name]


@dataclass(frozen=True)
class ModelSection:
    base: str = ""  # hub id, folder or single-file .safetensors checkpoint of the base model (required)
    config: str = ""  # for a single-file base: the config folder (or hub id) of its architecture
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"


@dataclass(frozen=True)
class SamplingSection:
    modes: tuple[str, ...] = _PLAN["modes"]
    seeds: tuple[int, ...] = _PLAN["seeds"]
    w_text: tuple[float, ...] = (W_TEXT,)
    w_cons: tuple[float, ...] = (W_CONS,)
    steps: int = field(default_factory=lambda: _sampling_default("steps"))
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    scheduler: str = field(default_factory=lambda: _sampling_default("scheduler"))
    negative_prompt: str = field(default_factory=lambda: _sampling_default("negative_prompt"))
    trace: bool = True
    pr: ParallelRescaling = field(default_factory=ParallelRescaling)


@dataclass(frozen=True)
class SubjectAdapter:
    """One subject's adapter files; ``token`` None: the token named in the files, else ``[adapters] token``."""

    name: str = ""
    lora: str | None = None
    embeddings: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class AdaptersSection:
    token: str = "sks"
    folder: str | None = None
    subjects: tuple[SubjectAdapter, ...] = ()

    def for_subject(self, name: str) -> SubjectAdapter | None:
        return next((s for s in self.subjects if s.name == name), None)


@dataclass(frozen=True)
class TrainSection:
    """Train every subject without listed adapter files with ``dreamguide.training`` before sampling."""

    config: str = ""  # a `dreamguide train` config used for every subject (required)
    output: str = "adapters"
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsSection:
    names: tuple[str, ...] = tuple(METRICS)
    backbones: Backbones = field(default_factory=Backbones)
    batch_size: int = 16
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class DreamBenchConfig:
    """A DreamBench run (see the module docstring); build it with :func:`load_dreambench_config`."""

    dreambench: str = ""
    world: Literal["dreambench"] = "dreambench"
    subjects: tuple[str, ...] = ()
    prompt_sets: tuple[PromptSetName, ...] = DREAMBENCH_PROMPT_SETS
    prompts_per_set: int = 0
    output: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    adapters: AdaptersSection = field(default_factory=AdaptersSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    report: ReportSettings = field(default_factory=ReportSettings)
    train: TrainSection | None = None

    @property
    def plan(self) -> Plan:
        s = self.sampling
        return Plan(modes=s.modes, w_text=s.w_text, w_cons=s.w_cons, seeds=s.seeds)

    def resolve(self, base: Path, source: str) -> "DreamBenchConfig":
        """Check what the types cannot, and resolve relative paths against ``base`` (the config's folder)."""
        from dreamguide.sampling import SCHEDULERS

        if not self.dreambench:
            raise ConfigError(f"{source}: missing key 'dreambench' (the DreamBench folder)")
        if not self.model.base:
            raise ConfigError(f"{source}: missing [model] base (hub id, folder or single-file checkpoint of the "
                              "base model)")
        if not self.prompt_sets:
            raise ConfigError(f"{source}: prompt_sets is empty: choose from {', '.join(DREAMBENCH_PROMPT_SETS)}")
        if self.prompts_per_set < 0:
            raise ConfigError(f"{source}: prompts_per_set must be >= 0 (0 = all), got {self.prompts_per_set}")
        s = self.sampling
        if s.steps < 1 or s.batch_size < 1:
            raise ConfigError(f"{source}: sampling.steps and sampling.batch_size must be >= 1")
        if s.scheduler not in SCHEDULERS:
            raise ConfigError(f"{source}: sampling.scheduler {s.scheduler!r}: choose from {', '.join(SCHEDULERS)}")
        try:
            plan = self.plan
            check_metrics(self.metrics.names)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
        empty = [f.name for f in dataclasses.fields(Backbones) if not getattr(self.metrics.backbones, f.name)]
        if empty:
            raise ConfigError(f"{source}: metrics.backbones.{empty[0]} is empty; give a hub id or a folder")
        if self.train is not None:
            if not self.train.config:
                raise ConfigError(f"{source}: [train] needs 'config', a `dreamguide train` config used for every "
                                  f"subject")
            bad = [o for o in self.train.overrides if "=" not in o]
            if bad:
                raise ConfigError(f"{source}: train.overrides must be 'key=value' strings, e.g. 'train.steps=500', "
                                  f"got {bad[0]!r}")
        path = lambda value: None if value is None else str(_path(value, base))  # noqa: E731
        backbones = Backbones(**{k: _id_or_path(v, base) for k, v in self.metrics.backbones.to_dict().items()})
        return dataclasses.replace(
            self,
            dreambench=path(self.dreambench),
            output=path(self.output),
            sampling=dataclasses.replace(s, modes=plan.modes),
            model=dataclasses.replace(self.model, base=_id_or_path(self.model.base, base),
                                      config=self.model.config and _id_or_path(self.model.config, base)),
            adapters=dataclasses.replace(
                self.adapters, folder=path(self.adapters.folder),
                subjects=tuple(dataclasses.replace(a, lora=path(a.lora), embeddings=path(a.embeddings))
                               for a in self.adapters.subjects)),
            metrics=dataclasses.replace(self.metrics, backbones=backbones),
            train=None if self.train is None else dataclasses.replace(
                self.train, config=path(self.train.config), output=path(self.train.output)),
        )


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _id_or_path(value: str, base: Path) -> str:
    """A hub id stays as is; a path (absolute, or existing relative to the config's folder) is resolved."""
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith((".", "~")):
        return str(path if path.is_absolute() else base / path)
    return str(base / path) if (base / path).exists() else value


def _subject_tables(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``[adapters.subjects.<name>]`` tables -> the typed list form (each checked, errors name the subject)."""
    adapters = data.get("adapters")
    if not isinstance(adapters, dict) or not isinstance(adapters.get("subjects"), dict):
        return data
    entries = []
    for name, table in adapters["subjects"].items():
        key = f"adapters.subjects.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{key}] must be a table with lora, embeddings and token")
        if "name" in table:
            raise ConfigError(f"{source}: unknown key '{key}.name'; the table's name is the subject")
        from_dict(SubjectAdapter, table, source, prefix=key)
        entries.append({"name": name, **table})
    return {**data, "adapters": {**adapters, "subjects": entries}}


def dreambench_config_from_dict(data: dict[str, Any], base: str | os.PathLike = ".", source: str = "config",
                                overrides: Sequence[str] = ()) -> DreamBenchConfig:
    """Check a parsed config, apply ``key=value`` overrides and resolve paths against ``base``."""
    if overrides:
        source = f"{source} (with overrides)"
    data = _subject_tables(data, source)
    config = from_dict(DreamBenchConfig, apply_overrides(DreamBenchConfig, data, overrides), source)
    return config.resolve(Path(base), source)


def load_dreambench_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> DreamBenchConfig:
    """Read a DreamBench run config (see the module docstring); ``overrides`` are ``"section.key=value"``."""
    return dreambench_config_from_dict(read_toml(path), Path(path).parent, str(path), overrides)


def override(key: str, value: Any) -> str:
    """``key=value`` with the value written as TOML (for command-line flags that override a config key)."""
    return f"{key}={json.dumps(value)}"
