"""The DreamBench world: a base model + one adapter per subject, sampled with ``Sampler``, scored with ``Scorer``.

The run is described by a :class:`~dreamguide.evaluation.suites.dreambench_config.DreamBenchConfig`
(``load_dreambench_config``). A subject's adapter comes from, in this order: its
``[adapters.subjects.<name>]`` files, the ``[train]`` section (trained here when missing), or the
``[adapters] folder`` (``<folder>/<subject>/`` as ``dreamguide train`` writes it:
``pytorch_lora_weights.safetensors`` and, with textual inversion, ``embeddings.safetensors``). The
identifier token is the one given in the config, else the one recorded in the adapter files, else
``[adapters] token``.

A subject whose adapter files hold NaN or infinite values (found by ``prepare``), or whose samples
become non-finite, is skipped by the runner with the reason; the other subjects are run and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dreamguide.evaluation.protocol import Generated, Job, PromptCase, UnusableAdapter, uses_consistency
from dreamguide.evaluation.suites.dreambench_config import DreamBenchConfig
from dreamguide.evaluation.suites.dreambench_data import DreamBench, load_dreambench
from dreamguide.filenames import EMBEDDINGS_FILE, LORA_FILE
from dreamguide.metrics import METRICS


@dataclass(frozen=True)
class Adapter:
    """The files and identifier token of one subject's personalized model."""

    lora: Path | None = None
    embeddings: Path | None = None
    token: str = "sks"

    @property
    def files(self) -> str:
        """The adapter's files, as messages name them."""
        return ", ".join(f"{kind} {path}" for kind, path in (("LoRA", self.lora), ("embeddings", self.embeddings))
                         if path is not None) or "no adapter files"


def _recorded_token(*paths: Path | None) -> str | None:
    """The token written in the ``dreamguide`` header of the first adapter file that records one."""
    from dreamguide.training.outputs import read_metadata

    for path in paths:
        if path is not None and path.is_file():
            token = read_metadata(path).get("token")
            if token:
                return token
    return None


def _device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        from dreamguide.evaluation.runner import process_info

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
        self._unusable: list[UnusableAdapter] = []

    # -- inputs ------------------------------------------------------------------------------

    def load_data(self) -> DreamBench:
        if self.data is None:
            self.data = load_dreambench(self.config.dreambench, self.config.subjects or None)
        return self.data

    def adapter(self, subject: str) -> Adapter:
        """The subject's adapter files and token (see the module docstring for the order)."""
        adapters = self.config.adapters
        listed = adapters.for_subject(subject)
        if listed is not None:
            lora, embeddings = (None if p is None else Path(p) for p in (listed.lora, listed.embeddings))
            return Adapter(lora, embeddings, listed.token or _recorded_token(lora, embeddings) or adapters.token)
        if self.config.train is not None:
            return self._trained_adapter(subject)
        if adapters.folder is not None:
            folder = Path(adapters.folder) / subject
            lora, embeddings = (p if p.is_file() else None for p in (folder / LORA_FILE, folder / EMBEDDINGS_FILE))
            if lora is not None or embeddings is not None:
                return Adapter(lora, embeddings, _recorded_token(lora, embeddings) or adapters.token)
        return Adapter(token=adapters.token)

    # -- training every subject ([train]) -----------------------------------------------------

    def _train_config(self, subject: str):
        """The subject's `dreamguide train` config: the shared file plus its data, base model and output."""
        from dreamguide.training import load_train_config

        train = self.config.train
        info = self.load_data().subjects[subject]
        instance = Path(self.config.dreambench) / subject
        model = [f"model.pretrained={self.config.model.base}"]
        model += [f"model.config={self.config.model.config}"] if self.config.model.config else []
        overrides = [*train.overrides, *model,
                     f"data.instance_dir={instance}", f"data.class_word={info.class_word}",
                     f"output.dir={Path(train.output) / subject}"]
        return load_train_config(train.config, overrides=overrides)

    def _trained_adapter(self, subject: str) -> Adapter:
        config = self._train_config(subject)
        folder = Path(config.output.dir)
        embeddings = folder / EMBEDDINGS_FILE if config.uses_ti else None
        return Adapter(folder / LORA_FILE, embeddings, config.data.token)

    def untrained_subjects(self) -> list[str]:
        if self.config.train is None:
            return []
        return [s for s in self.load_data().subjects if self.config.adapters.for_subject(s) is None
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
                    out.append(PromptCase(subject.name, subject.class_word, prompt_set, index, token_prompt, base,
                                          template=template))
        return out

    def describe(self) -> dict:
        cfg = self.config
        return {
            "dreambench": str(cfg.dreambench),
            "base_model": cfg.model.base,
            **({"model_config": cfg.model.config} if cfg.model.config else {}),
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
        """Every subject has the adapter files its modes need, and each fits the base model.

        A subject whose files hold NaN or infinite values is not an error: it is listed by
        :meth:`unusable_adapters` (naming the file and the tensors), and the runner skips it.
        """
        from dreamguide.lora_files import NonFiniteWeights, check_finite_file, load_lora

        data = self.load_data()
        self._unusable = []
        if not self.needs_adapters():
            return
        model = self._base_model()
        for subject in data.subjects:
            adapter = self.adapter(subject)
            if adapter.lora is None and adapter.embeddings is None:
                folder = self.config.adapters.folder
                where = f" or files in {Path(folder) / subject}" if folder else ""
                raise FileNotFoundError(
                    f"subject {subject!r} has no adapter: add [adapters.subjects.{subject}] lora/embeddings{where} "
                    f"(modes {', '.join(self.config.plan.modes)} need a personalized model)"
                )
            for kind, path in (("LoRA", adapter.lora), ("embeddings", adapter.embeddings)):
                if path is not None and not path.is_file():
                    raise FileNotFoundError(f"subject {subject!r}: {kind} file {path} does not exist")
            try:
                if adapter.lora is not None:
                    load_lora(model, adapter.lora, "__check__")
                    model.unet.delete_adapters("__check__")
                if adapter.embeddings is not None:
                    _check_embeddings(model, adapter.embeddings)
                    check_finite_file(adapter.embeddings, "embeddings")
            except NonFiniteWeights as error:
                self._unusable.append(UnusableAdapter(subject, "", str(error)))
            except ValueError as error:
                raise ValueError(f"subject {subject!r}: adapter does not fit base model "
                                 f"{self.config.model.base!r}: {error}") from error

    def unusable_adapters(self) -> list[UnusableAdapter]:
        """The subjects whose adapter files hold NaN or infinite values (found by :meth:`prepare`)."""
        return list(self._unusable)

    def prepare(self) -> None:
        """Validate data and adapters and load the metric backbones, before any generation."""
        from dreamguide.evaluation.runner import process_info
        from dreamguide.metrics import Scorer
        from dreamguide.models import parse_dtype

        if self._prepared:
            return
        self.load_data()
        if self.scorer is None:  # first: a missing backbone must not wait for hours of training
            dtype = parse_dtype(self.config.metrics.dtype)
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
        from dreamguide import models

        if self._model is None:
            device = _device(self.config.model.device)
            self._model = models.load_model(self.config.model.base, dtype=models.parse_dtype(self.config.model.dtype,
                                                                                            device), device=device,
                                            config=self.config.model.config or None)
        return self._model

    def _drop_model(self) -> None:
        import torch

        self._model = self._sampler = self._loaded_subject = None
        self._tokens_added = False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _sampler_for(self, subject: str):
        """A Sampler over the shared base model with this subject's adapter loaded (the previous one removed)."""
        from dreamguide.lora_files import ADAPTER_NAME, load_lora
        from dreamguide.sampling import Sampler
        from dreamguide.token_files import load_embeddings

        if self._loaded_subject == subject and self._sampler is not None:
            return self._sampler
        if self._tokens_added:
            # Learned tokens change the tokenizers and text encoders: start the next subject from the
            # pristine base model, so a subject's images never depend on which subject came before.
            self._drop_model()
        model = self._base_model()
        if ADAPTER_NAME in (getattr(model.unet, "peft_config", None) or {}):
            model.unet.delete_adapters(ADAPTER_NAME)
        adapter = self.adapter(subject)
        if adapter.lora is not None:
            load_lora(model, adapter.lora, ADAPTER_NAME)
        if adapter.embeddings is not None:
            load_embeddings(model, adapter.embeddings, adapter.token)
            self._tokens_added = True
        self._sampler = Sampler(
            model, adapter_name=ADAPTER_NAME if adapter.lora is not None else None,
            embeddings=adapter.embeddings,
            sources={"model": self.config.model.base, "lora": str(adapter.lora) if adapter.lora else None},
        )
        self._loaded_subject = subject
        return self._sampler

    def generate(self, jobs: Sequence[Job]) -> list[Generated]:
        """The group's images; a non-finite sample is an :class:`UnusableAdapter` naming the subject and its files."""
        from dreamguide.denoise import NonFiniteError
        from dreamguide.lora_files import NonFiniteWeights
        from dreamguide.sampling import SampleSettings

        case = jobs[0].case
        setting = jobs[0].setting
        cfg = self.config.sampling
        try:
            sampler = self._sampler_for(case.subject)
        except NonFiniteWeights as error:  # files prepare() did not need to check (modes without adapters)
            raise UnusableAdapter(case.subject, case.adapter, str(error)) from error
        modes = tuple(dict.fromkeys(j.setting.mode for j in jobs))
        seeds = tuple(dict.fromkeys(j.seed for j in jobs))
        settings = SampleSettings(
            prompt=case.token_prompt, token=self.adapter(case.subject).token, class_word=case.class_word,
            base_prompt=case.base_prompt, negative_prompt=cfg.negative_prompt, modes=modes, seeds=seeds,
            batch_size=cfg.batch_size, height=cfg.height, width=cfg.width, steps=cfg.steps, w_text=setting.w_text,
            w_cons=setting.w_cons if setting.w_cons is not None else 0.0, scheduler=cfg.scheduler, trace=cfg.trace,
            **({"pr": cfg.pr} if setting.variant is None else
               {"pr": setting.variant.pr, "clipped_model_output": setting.variant.clipped_model_output,
                "shaping": setting.variant.shaping, "personalized_steps": setting.variant.personalized_steps}),
        )
        try:
            results = {(r.mode, r.seed): r for r in sampler.sample(settings, progress=False)}
        except NonFiniteError as error:
            raise UnusableAdapter(case.subject, case.adapter,
                                  f"{error} (prompt {case.token_prompt!r}; adapter: "
                                  f"{self.adapter(case.subject).files})") from error
        out = []
        for job in jobs:
            result = results[(job.setting.mode, job.seed)]
            out.append(Generated(result.image, result.trace or None, result.metadata))
        return out

    # -- scoring -----------------------------------------------------------------------------

    def references(self, subject: str):
        from dreamguide.images import read_images

        if subject not in self._references:
            images, _, _ = read_images(self.load_data().subjects[subject].images)
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
