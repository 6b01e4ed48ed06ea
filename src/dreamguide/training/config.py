"""The run configuration: one TOML file, typed and validated, with ``--set key=value`` overrides.

A config is a :class:`TrainConfig` made of small sections (``[model]``, ``[data]``, ``[train]``,
``[lora]``, ``[ti]``, ``[dco]``, ``[output]``, ``[sample]``). Every key has a type; an unknown key
or a value of the wrong type is a :class:`ConfigError` that names the key and the file. The
resolved config (defaults filled in, overrides applied) is written beside the outputs as
``config.toml`` and reads back to the same object.

Defaults that belong to other parts are read from them, not restated: the LoRA targets from
:mod:`dreamguide.lora_files`, DCO's beta from :mod:`dreamguide.training.losses`, and the
guidance weights of ``[sample]`` from :class:`dreamguide.sampling.SampleSettings`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dreamguide.config import ConfigError, defaults, from_dict, load_toml, save_toml, to_toml
from dreamguide.lora_files import LORA_TARGETS
from dreamguide.sample_settings import PREVIEW_STEPS
from dreamguide.sampling import SampleSettings
from dreamguide.training.losses import DCO_BETA

METHODS: tuple[str, ...] = ("dreambooth", "dreambooth-ti", "dco")
#: The sampler's defaults, which samples during training share.
_SAMPLER_DEFAULTS = defaults(SampleSettings)


@dataclass
class ModelConfig:
    #: Hub id or local folder of a diffusers pipeline, or a single-file ``.safetensors`` checkpoint.
    pretrained: str = ""
    #: Weight variant such as "fp16", or "" for the default files.
    variant: str = ""
    #: For a single-file checkpoint: the folder (or hub id) of a diffusers model of its architecture,
    #: whose configs and tokenizers it is read with; "" reads its architecture's reference configs.
    config: str = ""


@dataclass
class DataConfig:
    #: Folder of subject images; a same-name .txt beside an image is its caption.
    instance_dir: str = ""
    #: Identifier token learned for the subject; every caption must contain it.
    token: str = "<sks>"
    #: The subject's class ("dog"): base captions replace the token with it; TI starts from it.
    class_word: str = ""
    #: Caption for images without a .txt; ``{token}`` and ``{class_word}`` are filled in.
    instance_prompt: str = "a photo of {token} {class_word}"
    #: Square training size in pixels; 0 picks the model's own (SDXL 1024, SD 512).
    resolution: int = 0
    #: Crop the centre (true) or a seeded random window (false) after the aspect-preserving resize.
    center_crop: bool = True
    #: Allow images whose shorter side is under half the training size (they are upscaled).
    allow_upscale: bool = False
    #: Encode every image with the VAE once, before training, instead of at every step.
    cache_latents: bool = True
    #: Prior preservation: folder of class images (dreambooth methods only); "" turns it off.
    class_dir: str = ""
    #: Caption for class images without a .txt; ``{class_word}`` is filled in.
    class_prompt: str = "a photo of a {class_word}"
    #: Weight of the class-image loss.
    prior_loss_weight: float = 1.0


@dataclass
class TrainSettings:
    method: Literal["dreambooth", "dreambooth-ti", "dco"] = "dreambooth"
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    #: Learning rate of the LoRA weights.
    lr: float = 5e-5
    #: Any diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ...
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-4
    #: Gradient-norm clipping; 0 turns it off.
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class TextualInversionConfig:
    #: Learn the token embedding (pivotal tuning). Implied by ``dreambooth-ti``; optional for ``dco``.
    enabled: bool = False
    lr: float = 5e-6
    #: After every step, rescale each new embedding to the norm it started with.
    renormalize: bool = True
    #: Train the embeddings for this fraction of the steps, then freeze them.
    train_fraction: float = 1.0


@dataclass
class DCOConfig:
    beta: float = DCO_BETA
    #: "batch": each MSE averaged over the whole batch before the sigmoid (the reference code);
    #: "sample": one sigmoid term per sample, then the mean.
    average: Literal["batch", "sample"] = "batch"


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    #: The run's name, which the shared files carry (``<name>.safetensors``, the Kohya LoRA;
    #: ``<name>_emb.safetensors``, the embeddings); "" names the run after the token without its
    #: angle brackets, else after the output folder.
    name: str = ""
    #: Save ``checkpoint-<step>/`` every this many steps; 0 turns checkpoints off.
    checkpoint_every: int = 250
    #: Keep only the newest this many checkpoints.
    keep_checkpoints: int = 3
    #: Log loss and learning rate for TensorBoard under ``<dir>/logs`` (the same as tracker = "tensorboard").
    tensorboard: bool = False
    #: Experiment tracker through accelerate: "tensorboard" (``<dir>/logs``), "wandb" (Weights &
    #: Biases, project "dreamguide", run named after the run), or "" (none; unless tensorboard = true).
    #: Loss and learning rate per step, and every setting of the resolved config as hyperparameters.
    tracker: Literal["", "tensorboard", "wandb"] = ""


@dataclass
class SampleConfig:
    #: Write sample images every this many steps (and at the end); 0 turns samples off.
    every: int = 0
    #: Token prompts; ``{token}`` and ``{class_word}`` are filled in.
    prompts: list[str] = field(default_factory=lambda: ["a photo of {token} {class_word}"])
    #: Guidance modes (SPEC section 2), one image per prompt, mode and seed: plain DreamBooth
    #: guidance beside the sampler's default, so the samples show what the guidance corrects.
    modes: list[str] = field(default_factory=lambda: ["dreambooth", *_SAMPLER_DEFAULTS["modes"]])
    seeds: list[int] = field(default_factory=lambda: [0])
    #: Fewer denoising steps than the sampler's default: a preview during training, not a final image.
    steps: int = PREVIEW_STEPS
    w_text: float = _SAMPLER_DEFAULTS["w_text"]
    w_cons: float = _SAMPLER_DEFAULTS["w_cons"]


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ti: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    dco: DCOConfig = field(default_factory=DCOConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def uses_ti(self) -> bool:
        """Whether the token embeddings are trained."""
        return self.train.method == "dreambooth-ti" or (self.train.method == "dco" and self.ti.enabled)

    @property
    def tracker(self) -> str:
        """The experiment tracker in use: ``output.tracker``, or "tensorboard" for ``output.tensorboard``."""
        return self.output.tracker or ("tensorboard" if self.output.tensorboard else "")

    @property
    def run_name(self) -> str:
        """``output.name``, or the name :func:`dreamguide.filenames.default_run_name` derives."""
        from dreamguide.filenames import default_run_name

        return self.output.name or default_run_name(self.data.token, self.output.dir)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "<config>") -> "TrainConfig":
        """Check values that types alone cannot; raise :class:`ConfigError` naming the key and ``source``.

        ``model.pretrained`` may be empty here: ``train(config, model=...)`` takes an in-memory model.
        """

        def fail(key: str, why: str) -> typing.NoReturn:
            raise ConfigError(f"{source}: {key} {why}")

        if not self.data.instance_dir:
            fail("data.instance_dir", "is required: the folder of subject images")
        if self.model.config and self.model.pretrained and not self.model.pretrained.lower().endswith(".safetensors"):
            fail("model.config", f"is for a single-file checkpoint (.safetensors); model.pretrained "
                 f"{self.model.pretrained!r} is a folder or hub id with its own configs: leave model.config out")
        if not self.data.token.strip() or any(c.isspace() for c in self.data.token):
            fail("data.token", f"must be one word without spaces, got {self.data.token!r}")
        if not self.data.class_word.strip():
            fail("data.class_word", "is required: the subject's class, e.g. 'dog'")
        if self.data.resolution < 0 or self.data.resolution % 8:
            fail("data.resolution", f"must be 0 (model default) or a positive multiple of 8, got {self.data.resolution}")
        positive = {
            "train.steps": self.train.steps,
            "train.batch_size": self.train.batch_size,
            "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "lora.rank": self.lora.rank,
            "output.keep_checkpoints": self.output.keep_checkpoints,
            "sample.steps": self.sample.steps,
        }
        for key, value in positive.items():
            if value < 1:
                fail(key, f"must be at least 1, got {value}")
        non_negative = {
            "train.lr": self.train.lr,
            "ti.lr": self.ti.lr,
            "train.lr_warmup_steps": self.train.lr_warmup_steps,
            "train.weight_decay": self.train.weight_decay,
            "train.max_grad_norm": self.train.max_grad_norm,
            "output.checkpoint_every": self.output.checkpoint_every,
            "sample.every": self.sample.every,
            "data.prior_loss_weight": self.data.prior_loss_weight,
            "dco.beta": self.dco.beta,
        }
        for key, value in non_negative.items():
            if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
                fail(key, f"must be a finite number >= 0, got {value}")
        if self.lora.alpha <= 0:
            fail("lora.alpha", f"must be positive, got {self.lora.alpha}")
        if self.output.tensorboard and self.output.tracker not in ("", "tensorboard"):
            fail("output.tensorboard", f"= true contradicts output.tracker = {self.output.tracker!r}; set one of them")
        if self.output.name:
            from dreamguide.filenames import run_name_error

            error = run_name_error(self.output.name)
            if error:
                fail("output.name", f"is {error}")
        if not self.lora.target_modules:
            fail("lora.target_modules", "must name at least one module, e.g. ['to_q', 'to_k', 'to_v', 'to_out.0']")
        if self.train.seed < 0:
            fail("train.seed", f"must be a non-negative integer, got {self.train.seed}")
        for key, value in (("train.adam_beta1", self.train.adam_beta1), ("train.adam_beta2", self.train.adam_beta2)):
            if not 0.0 <= value < 1.0:
                fail(key, f"must be in [0, 1), got {value} (AdamW's default: 0.9 for beta1, 0.999 for beta2)")
        if not self.train.adam_epsilon > 0:
            fail("train.adam_epsilon", f"must be positive, got {self.train.adam_epsilon} (e.g. 1e-8)")
        from diffusers.optimization import SchedulerType

        schedulers = [kind.value for kind in SchedulerType]
        if self.train.lr_scheduler not in schedulers:
            fail("train.lr_scheduler", f"is {self.train.lr_scheduler!r}; choose one of {', '.join(schedulers)}")
        if not 0.0 <= self.ti.train_fraction <= 1.0:
            fail("ti.train_fraction", f"must be between 0 and 1, got {self.ti.train_fraction}")
        if self.ti.enabled and self.train.method == "dreambooth":
            fail("ti.enabled", "is set with method 'dreambooth'; use train.method = 'dreambooth-ti' for pivotal tuning")
        if self.data.class_dir and self.train.method == "dco":
            fail("data.class_dir", "(prior preservation) is for the dreambooth methods; DCO regularises through its reference model")
        if "{token}" in self.data.class_prompt:
            fail("data.class_prompt", "must not contain the token: class images show the class, not the subject")
        if self.sample.every:
            from dreamguide.guidance import get_mode

            for mode in self.sample.modes:
                try:
                    get_mode(mode)
                except (KeyError, ValueError) as error:
                    fail("sample.modes", f"has an unknown mode {mode!r}: {error}")
            if not self.sample.prompts or not self.sample.seeds:
                fail("sample.prompts", "and sample.seeds must be non-empty when sample.every > 0")
            from dreamguide.prompts import contains_token

            for prompt in self.sample.prompts:
                filled = prompt.replace("{token}", self.data.token).replace("{class_word}", self.data.class_word)
                if not contains_token(filled, self.data.token):
                    fail("sample.prompts", f"has {prompt!r} without the token; write {{token}} into it")
        return self


def train_config_from_dict(data: dict[str, Any], source: str = "<config>", validate: bool = True) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested dicts (as TOML reads them), checking every key and type."""
    config = from_dict(TrainConfig, data, source)
    return config.validate(source) if validate else config


def load_train_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML run config, apply ``--set`` overrides and validate; errors name the key and file."""
    config = load_toml(TrainConfig, path, list(overrides))
    if not config.model.pretrained:
        source = str(path) + (" (with --set overrides)" if overrides else "")
        raise ConfigError(f"{source}: model.pretrained is required: a hub id, a local diffusers folder or a "
                          "single-file .safetensors checkpoint")
    return config


def config_to_toml(config: TrainConfig) -> str:
    """The config as TOML text that :func:`load_train_config` reads back to an equal object."""
    return to_toml(config)


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as TOML, atomically."""
    return save_toml(config, path)

