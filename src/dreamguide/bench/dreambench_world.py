"""The DreamBench world: a base model + one adapter per subject, sampled with ``Sampler``, scored with ``Scorer``.

A run is described by one TOML file (every key optional except ``[model] base`` and the
adapters; unknown keys are errors that name the key):

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
    token = "sks"                           # default identifier token
    folder = "adapters"                     # optional: <folder>/<subject>/{lora,embeddings}.safetensors
    [adapters.subjects.dog]                 # or per subject (overrides the folder)
    lora = "adapters/dog/lora.safetensors"
    embeddings = "adapters/dog/embeddings.safetensors"
    token = "<dog>"

    [metrics]
    names = ["dino", "dinov2", "clip_i", "clip_t", "siglip"]
    batch_size = 16
    dtype = "float32"
    [metrics.backbones]                     # hub ids or local folders
    dino = "facebook/dino-vits16@refs/pr/1"

    [report]
    baseline_mode = "consistency"
    bootstrap_samples = 1000
    identity_metric = "dino"
    text_metric = "siglip"

Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from dreamguide.bench.dreambench import PROMPT_SETS, DreamBench, load_dreambench
from dreamguide.bench.report import ReportSettings
from dreamguide.bench.world import Generated, Job, Plan, PromptCase, uses_consistency
from dreamguide.guidance import ParallelRescaling
from dreamguide.metrics import METRICS, Backbones, check_metrics

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ADAPTER_FILES = {"lora": "lora.safetensors", "embeddings": "embeddings.safetensors"}
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class SubjectAdapter:
    lora: Path | None = None
    embeddings: Path | None = None
    token: str = "sks"


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 50
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    scheduler: str = "default"
    negative_prompt: str = ""
    trace: bool = True
    pr: ParallelRescaling = field(default_factory=ParallelRescaling)


@dataclass(frozen=True)
class MetricsConfig:
    names: tuple[str, ...] = tuple(METRICS)
    backbones: Backbones = field(default_factory=Backbones)
    batch_size: int = 16
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class TrainAllConfig:
    """Train every subject without a listed adapter with ``dreamguide.training`` before sampling."""

    config: Path
    output: Path
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class DreamBenchConfig:
    dreambench: Path
    base_model: str
    adapters: dict[str, SubjectAdapter]
    subjects: tuple[str, ...] = ()
    prompt_sets: tuple[str, ...] = PROMPT_SETS
    prompts_per_set: int = 0
    dtype: str = "auto"
    device: str = "auto"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    plan: Plan = field(default_factory=Plan)
    report: ReportSettings = field(default_factory=ReportSettings)
    default_token: str = "sks"
    adapter_folder: Path | None = None
    output: Path | None = None
    train: TrainAllConfig | None = None


# ---------------------------------------------------------------------------------------------
# Config file


def _take(table: dict, allowed: dict[str, type | tuple], where: str, source: str) -> dict:
    """Check keys and value types of one TOML table; returns it unchanged."""
    for key, value in table.items():
        if key not in allowed:
            raise ValueError(f"{source}: unknown key '{where}{key}'; known: {', '.join(sorted(allowed))}")
        kinds = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = "/".join(k.__name__ for k in kinds)
            raise ValueError(f"{source}: {where}{key} must be {names}, got {value!r}")
    return table


def _path(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _id_or_path(value: str, base: Path) -> str:
    """A hub id stays as is; a path (absolute, or existing relative to the config's folder) is resolved."""
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith((".", "~")):
        return str(path if path.is_absolute() else base / path)
    return str(base / path) if (base / path).exists() else value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                sampling_overrides: dict[str, Any] | None = None) -> DreamBenchConfig:
    """Read and validate a DreamBench run config (see the module docstring); overrides (not None) win."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark config {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from error
    return config_from_dict(data, path.parent, str(path), overrides, sampling_overrides)


def config_from_dict(data: dict, base: Path, source: str = "config", overrides: dict[str, Any] | None = None,
                     sampling_overrides: dict[str, Any] | None = None) -> DreamBenchConfig:
    """Validate a parsed config; relative paths are resolved against ``base``."""
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if sampling_overrides:
        data["sampling"] = {**data.get("sampling", {}),
                            **{k: v for k, v in sampling_overrides.items() if v is not None}}
    top = _take(data, {"dreambench": (str, Path), "subjects": list, "prompt_sets": list, "prompts_per_set": int,
                       "output": (str, Path), "world": str, "model": dict, "sampling": dict, "adapters": dict,
                       "metrics": dict, "report": dict, "train": dict}, "", source)
    if top.get("world", "dreambench") != "dreambench":
        raise ValueError(f"{source}: world {top['world']!r} is not the DreamBench world")
    train = None
    if "train" in top:
        table = _take(top["train"], {"config": str, "output": str, "overrides": list}, "train.", source)
        if "config" not in table:
            raise ValueError(f"{source}: [train] needs 'config', a `dreamguide train` config used for every subject")
        if not all(isinstance(o, str) and "=" in o for o in table.get("overrides", [])):
            raise ValueError(f"{source}: train.overrides must be 'key=value' strings, e.g. 'train.steps=500'")
        train = TrainAllConfig(_path(table["config"], base), _path(table.get("output", "adapters"), base),
                               tuple(table.get("overrides", ())))
    if "dreambench" not in top:
        raise ValueError(f"{source}: missing key 'dreambench' (the DreamBench folder)")
    model = _take(top.get("model", {}), {"base": str, "dtype": str, "device": str}, "model.", source)
    if "base" not in model:
        raise ValueError(f"{source}: missing [model] base (hub id or folder of the base model)")

    sampling = dict(_take(top.get("sampling", {}), {
        "modes": list, "seeds": list, "w_text": (list, float, int), "w_cons": (list, float, int), "steps": int,
        "batch_size": int, "height": int, "width": int, "scheduler": str, "negative_prompt": str, "trace": bool,
        "pr": dict}, "sampling.", source))
    pr_table = _take(sampling.pop("pr", {}), {"granularity": str, "normalization": str, "rescale": (float, int),
                                              "eps": float}, "sampling.pr.", source)
    as_list = lambda v: list(v) if isinstance(v, list) else [v]  # noqa: E731
    plan_kwargs = {k: tuple(as_list(sampling.pop(k))) for k in ("modes", "seeds", "w_text", "w_cons") if k in sampling}
    try:
        plan = Plan(**plan_kwargs)
        pr = ParallelRescaling(**pr_table)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: [sampling] {error}") from error
    sampling_config = SamplingConfig(**sampling, pr=pr)
    if sampling_config.steps < 1 or sampling_config.batch_size < 1:
        raise ValueError(f"{source}: sampling.steps and sampling.batch_size must be >= 1")
    from dreamguide.sampling import SCHEDULERS

    if sampling_config.scheduler not in SCHEDULERS:
        raise ValueError(f"{source}: sampling.scheduler {sampling_config.scheduler!r}: choose from "
                         f"{', '.join(SCHEDULERS)}")

    metrics = dict(_take(top.get("metrics", {}), {"names": list, "backbones": dict, "batch_size": int,
                                                   "dtype": str, "device": str}, "metrics.", source))
    backbone_table = metrics.pop("backbones", {})
    backbones = Backbones.from_dict(
        {k: _id_or_path(v, base) if isinstance(v, str) else v for k, v in backbone_table.items()},
        f"{source}: [metrics.backbones]")
    if "names" in metrics:
        metrics["names"] = check_metrics(tuple(metrics["names"]))
    metrics_config = MetricsConfig(**metrics, backbones=backbones)
    for key, value, choices in (("model.dtype", model.get("dtype", "auto"), ("auto", *DTYPES)),
                                ("metrics.dtype", metrics_config.dtype, DTYPES)):
        if value not in choices:
            raise ValueError(f"{source}: {key} {value!r}: choose from {', '.join(choices)}")

    report_table = _take(top.get("report", {}), {f.name: (int, float, str) for f in fields(ReportSettings)},
                         "report.", source)
    report = ReportSettings(**report_table)

    adapters = _take(top.get("adapters", {}), {"token": str, "folder": str, "subjects": dict}, "adapters.", source)
    default_token = adapters.get("token", "sks")
    per_subject = {}
    for name, table in adapters.get("subjects", {}).items():
        if not isinstance(table, dict):
            raise ValueError(f"{source}: [adapters.subjects.{name}] must be a table with lora/embeddings/token")
        _take(table, {"lora": str, "embeddings": str, "token": str}, f"adapters.subjects.{name}.", source)
        per_subject[name] = SubjectAdapter(_path(table.get("lora"), base), _path(table.get("embeddings"), base),
                                           table.get("token", default_token))

    prompt_sets = tuple(top.get("prompt_sets", PROMPT_SETS))
    bad = [p for p in prompt_sets if p not in PROMPT_SETS]
    if bad or not prompt_sets:
        raise ValueError(f"{source}: prompt_sets {list(prompt_sets)}: choose from {', '.join(PROMPT_SETS)}")
    if top.get("prompts_per_set", 0) < 0:
        raise ValueError(f"{source}: prompts_per_set must be >= 0 (0 = all)")
    return DreamBenchConfig(
        dreambench=_path(str(top["dreambench"]), base),
        base_model=_id_or_path(model["base"], base),
        adapters=per_subject,
        subjects=tuple(top.get("subjects", ())),
        prompt_sets=prompt_sets,
        prompts_per_set=int(top.get("prompts_per_set", 0)),
        dtype=model.get("dtype", "auto"),
        device=model.get("device", "auto"),
        sampling=sampling_config,
        metrics=metrics_config,
        plan=plan,
        report=report,
        default_token=default_token,
        adapter_folder=_path(adapters.get("folder"), base),
        output=_path(str(top["output"]), base) if "output" in top else None,
        train=train,
    )


# ---------------------------------------------------------------------------------------------
# The world


def _device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        from dreamguide.bench.runner import process_info

        index, _, _ = process_info()
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device("cpu")


class DreamBenchWorld:
    """DreamBench subjects and prompts; images from the base model + each subject's adapter."""

    name = "dreambench"

    def __init__(self, config: DreamBenchConfig):
        self.config = config
        self.data: DreamBench | None = None
        self.scorer = None
        self._model = None
        self._sampler = None
        self._loaded_subject: str | None = None
        self._tokens_added = False
        self._prepared = False
        self._references: dict[str, Any] = {}

    # -- inputs ------------------------------------------------------------------------------

    def load_data(self) -> DreamBench:
        if self.data is None:
            self.data = load_dreambench(self.config.dreambench, self.config.subjects or None)
        return self.data

    def adapter(self, subject: str) -> SubjectAdapter:
        cfg = self.config
        if subject in cfg.adapters:
            return cfg.adapters[subject]
        if cfg.train is not None:
            return self._trained_adapter(subject)
        if cfg.adapter_folder is not None:
            folder = cfg.adapter_folder / subject
            found = {k: folder / f for k, f in ADAPTER_FILES.items() if (folder / f).is_file()}
            if found:
                return SubjectAdapter(found.get("lora"), found.get("embeddings"), cfg.default_token)
        return SubjectAdapter(token=cfg.default_token)

    # -- training every subject ([train]) -----------------------------------------------------

    def _train_config(self, subject: str):
        """The subject's `dreamguide train` config: the shared file plus its data, base model and output."""
        from dreamguide.training import load_train_config

        train = self.config.train
        info = self.load_data().subjects[subject]
        instance = self.config.dreambench / subject
        overrides = [*train.overrides, f"model.pretrained={self.config.base_model}",
                     f"data.instance_dir={instance}", f"data.class_word={info.class_word}",
                     f"output.dir={train.output / subject}"]
        return load_train_config(train.config, overrides=overrides)

    def _trained_adapter(self, subject: str) -> SubjectAdapter:
        from dreamguide.filenames import EMBEDDINGS_FILE, LORA_FILE

        config = self._train_config(subject)
        folder = Path(config.output.dir)
        embeddings = folder / EMBEDDINGS_FILE if config.uses_ti else None
        return SubjectAdapter(folder / LORA_FILE, embeddings, config.data.token)

    def untrained_subjects(self) -> list[str]:
        if self.config.train is None:
            return []
        return [s for s in self.load_data().subjects if s not in self.config.adapters
                and not all(p is None or p.is_file() for p in (self.adapter(s).lora, self.adapter(s).embeddings))]

    def train_missing(self, log=print) -> list[str]:
        """Train (or resume training) every subject whose adapter files are not there yet."""
        from dreamguide.training import train
        from dreamguide.training.checkpoints import list_checkpoints

        trained = []
        for subject in self.untrained_subjects():
            config = self._train_config(subject)
            resume = "latest" if list_checkpoints(config.output.dir) else None
            log(f"training {subject} -> {config.output.dir}" + (" (resuming)" if resume else ""))
            train(config, resume=resume, progress=False)
            trained.append(subject)
        return trained

    def needs_adapters(self) -> bool:
        return any(uses_consistency(m) or m == "dreambooth" for m in self.config.plan.modes)

    def cases(self) -> list[PromptCase]:
        from dreamguide.prompts import format_prompt

        data = self.load_data()
        out = []
        for subject in data.subjects.values():
            token = self.adapter(subject.name).token
            for prompt_set in self.config.prompt_sets:
                templates = data.prompts(subject.name, prompt_set)
                if self.config.prompts_per_set:
                    templates = templates[: self.config.prompts_per_set]
                for index, template in enumerate(templates):
                    token_prompt, base = format_prompt(template, token, subject.class_word)
                    out.append(PromptCase(subject.name, subject.class_word, prompt_set, index, token_prompt, base))
        return out

    def describe(self) -> dict:
        cfg = self.config
        return {
            "dreambench": str(cfg.dreambench),
            "base_model": cfg.base_model,
            "subjects": list(self.load_data().subjects),
            "prompt_sets": list(cfg.prompt_sets),
            "prompts_per_set": cfg.prompts_per_set,
            "adapters": {s: {"lora": str(a.lora) if a.lora else None,
                             "embeddings": str(a.embeddings) if a.embeddings else None, "token": a.token}
                         for s in self.load_data().subjects for a in [self.adapter(s)]},
            "sampling": {"steps": cfg.sampling.steps, "height": cfg.sampling.height, "width": cfg.sampling.width,
                         "scheduler": cfg.sampling.scheduler, "negative_prompt": cfg.sampling.negative_prompt,
                         "trace": cfg.sampling.trace, "pr": cfg.sampling.pr.to_dict()},
            "metrics": {"names": list(cfg.metrics.names), "backbones": self.metric_backbones()},
        }

    def metric_backbones(self) -> dict[str, str]:
        return {m: self.config.metrics.backbones.for_metric(m) for m in self.config.metrics.names}

    def metric_kinds(self) -> dict[str, str]:
        return {m: METRICS[m][0] for m in self.config.metrics.names}

    def check_adapters(self) -> None:
        """Every subject has the adapter files its modes need, and each fits the base model."""
        from dreamguide import models

        data = self.load_data()
        if not self.needs_adapters():
            return
        model = self._base_model()
        for subject in data.subjects:
            adapter = self.adapter(subject)
            if adapter.lora is None and adapter.embeddings is None:
                where = f" or files in {self.config.adapter_folder / subject}" if self.config.adapter_folder else ""
                raise FileNotFoundError(
                    f"subject {subject!r} has no adapter: add [adapters.subjects.{subject}] lora/embeddings{where} "
                    f"(modes {', '.join(self.config.plan.modes)} need a personalized model)"
                )
            for kind, path in (("LoRA", adapter.lora), ("embeddings", adapter.embeddings)):
                if path is not None and not path.is_file():
                    raise FileNotFoundError(f"subject {subject!r}: {kind} file {path} does not exist")
            try:
                if adapter.lora is not None:
                    models.load_lora(model, adapter.lora, "__check__")
                    model.unet.delete_adapters("__check__")
                if adapter.embeddings is not None:
                    _check_embeddings(model, adapter.embeddings)
            except ValueError as error:
                raise ValueError(f"subject {subject!r}: adapter does not fit base model "
                                 f"{self.config.base_model!r}: {error}") from error

    def prepare(self) -> None:
        """Validate data and adapters and load the metric backbones, before any generation."""
        import torch

        from dreamguide.bench.runner import process_info
        from dreamguide.metrics import Scorer

        if self._prepared:
            return
        self.load_data()
        if self.scorer is None:  # first: a missing backbone must not wait for hours of training
            dtype = getattr(torch, self.config.metrics.dtype)
            self.scorer = Scorer(self.config.metrics.backbones, self.config.metrics.names,
                                 _device(self.config.metrics.device), dtype, self.config.metrics.batch_size)
        missing = self.untrained_subjects()
        if missing:
            if process_info()[1] > 1:
                raise RuntimeError(
                    f"subjects {missing} are not trained yet; train them first in one process "
                    f"(`dreamguide bench dreambench CONFIG --train-only`), then launch the benchmark"
                )
            self.train_missing()
        self.check_adapters()
        self._prepared = True

    # -- generation --------------------------------------------------------------------------

    def _base_model(self):
        import torch

        from dreamguide import models

        if self._model is None:
            device = _device(self.config.device)
            dtype = self.config.dtype
            if dtype == "auto":
                dtype = torch.float16 if device.type == "cuda" else torch.float32
            else:
                dtype = getattr(torch, dtype)
            self._model = models.load_model(self.config.base_model, dtype=dtype, device=device)
        return self._model

    def _drop_model(self) -> None:
        import torch

        self._model = self._sampler = self._loaded_subject = None
        self._tokens_added = False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _sampler_for(self, subject: str):
        """A Sampler over the shared base model with this subject's adapter loaded (the previous one removed)."""
        from dreamguide import models
        from dreamguide.sampling import Sampler

        if self._loaded_subject == subject and self._sampler is not None:
            return self._sampler
        if self._tokens_added:
            # Learned tokens change the tokenizers and text encoders: start the next subject from the
            # pristine base model, so a subject's images never depend on which subject came before.
            self._drop_model()
        model = self._base_model()
        if "subject" in (getattr(model.unet, "peft_config", None) or {}):
            model.unet.delete_adapters("subject")
        adapter = self.adapter(subject)
        if adapter.lora is not None:
            models.load_lora(model, adapter.lora, "subject")
        if adapter.embeddings is not None:
            models.load_embeddings(model, adapter.embeddings, adapter.token)
            self._tokens_added = True
        self._sampler = Sampler(
            model, adapter_name="subject" if adapter.lora is not None else None,
            embeddings=adapter.embeddings,
            sources={"model": self.config.base_model, "lora": str(adapter.lora) if adapter.lora else None},
        )
        self._loaded_subject = subject
        return self._sampler

    def generate(self, jobs: Sequence[Job]) -> list[Generated]:
        from dreamguide.sampling import SampleSettings

        case = jobs[0].case
        setting = jobs[0].setting
        cfg = self.config.sampling
        sampler = self._sampler_for(case.subject)
        modes = tuple(dict.fromkeys(j.setting.mode for j in jobs))
        seeds = tuple(dict.fromkeys(j.seed for j in jobs))
        settings = SampleSettings(
            prompt=case.token_prompt, token=self.adapter(case.subject).token, class_word=case.class_word,
            base_prompt=case.base_prompt, negative_prompt=cfg.negative_prompt, modes=modes, seeds=seeds,
            batch_size=cfg.batch_size, height=cfg.height, width=cfg.width, steps=cfg.steps, w_text=setting.w_text,
            w_cons=setting.w_cons if setting.w_cons is not None else 0.0, pr=cfg.pr, scheduler=cfg.scheduler,
            trace=cfg.trace,
        )
        results = {(r.mode, r.seed): r for r in sampler.sample(settings, progress=False)}
        out = []
        for job in jobs:
            result = results[(job.setting.mode, job.seed)]
            out.append(Generated(result.image, result.trace or None, result.metadata))
        return out

    # -- scoring -----------------------------------------------------------------------------

    def references(self, subject: str):
        from PIL import Image

        if subject not in self._references:
            paths = self.load_data().subjects[subject].images
            images = []
            for path in paths:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            self._references[subject] = self.scorer.embed_references(images)
        return self._references[subject]

    def score(self, jobs: Sequence[Job], images) -> list[dict[str, float]]:
        subject = jobs[0].case.subject
        refs = self.references(subject) if any(METRICS[m][0] == "identity" for m in self.scorer.metrics) else None
        return self.scorer.score(images, [j.case.base_prompt for j in jobs], refs)


def _check_embeddings(model, path: Path) -> None:
    """The embedding file's vectors have the width of the model's text encoders (read without loading)."""
    from safetensors import safe_open

    from dreamguide.token_files import SDXL_EMBEDDING_KEYS

    with safe_open(str(path), framework="pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    widths = [enc.get_input_embeddings().weight.shape[1] for enc in model.text_encoders]
    if model.kind == "sdxl":
        if set(shapes) != set(SDXL_EMBEDDING_KEYS):
            raise ValueError(f"{path} holds {sorted(shapes)}; an SDXL model needs clip_l and clip_g embeddings")
        pairs = [(k, shapes[k], w) for k, w in zip(SDXL_EMBEDDING_KEYS, widths)]
    else:
        if len(shapes) != 1:
            raise ValueError(f"{path} holds {sorted(shapes)}; a {model.kind!r} model needs one embedding tensor")
        key, shape = next(iter(shapes.items()))
        pairs = [(key, shape, widths[0])]
    for key, shape, width in pairs:
        if shape[-1] != width:
            raise ValueError(f"{path}: embedding {key!r} has width {shape[-1]}, but the text encoder expects {width}")
