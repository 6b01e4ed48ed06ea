"""Sampling with guidance: a denoising loop over a diffusers scheduler (SPEC sections 1-2).

The loop is k-diffusion shaped: the scheduler does the integration, and guidance is a small
wrapper around the model call. At every step the rows a guidance mode needs are stacked into
ONE batched UNet forward, routed per row to the pretrained or the personalized weights:

    uncond               negative prompt   pretrained   (adapter off)
    base                 base prompt       pretrained   (adapter off)
    personalized         token prompt      personalized (adapter on)
    personalized_uncond  negative prompt   personalized (adapter on)

and ``guidance.guide`` combines them into the prediction the scheduler steps with. The same
loop serves SDXL, SD 1.x/2.x (VAE latents) and pixel-space models (no VAE).

    sampler = Sampler.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                      lora="out/lora.safetensors", embeddings="out/embeddings.safetensors",
                                      token="<sks>")
    settings = SampleSettings(prompt="a watercolor painting of <sks> dog", token="<sks>", class_word="dog",
                              modes=("cfg", "consistency", "pr"), seeds=(0, 1))
    for result in sampler.sample(settings):
        result.image.save(f"{result.mode}-{result.seed}.png")

Reproducibility: every image has its own ``torch.Generator`` seeded with its seed, which
draws its initial noise (on the CPU, so devices agree) and any noise a stochastic scheduler
adds; so an image does not depend on the batch it was sampled in, and every mode starts
from the same noise for the same seed.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dreamguide import guidance
from dreamguide.guidance import ParallelRescaling
from dreamguide.prompts import base_prompt as derive_base_prompt
from dreamguide.prompts import contains_token

if TYPE_CHECKING:  # heavy imports stay inside functions so the CLI starts fast
    import torch
    from PIL import Image

    from dreamguide.models import DiffusionModel

#: Scheduler names accepted by ``SampleSettings.scheduler`` / ``--scheduler``.
SCHEDULERS: tuple[str, ...] = ("default", "euler", "euler-a", "ddim", "dpm++", "ddpm")

#: Which prompt (0 negative, 1 base, 2 token) and which weights (personalized or not) each row uses.
ROWS: dict[str, tuple[int, bool]] = {
    "uncond": (0, False),
    "base": (1, False),
    "personalized": (2, True),
    "personalized_uncond": (0, True),
}

#: Adapter name that means "no adapter" in a routed forward.
BASE_ROUTE = "__base__"

#: Without tracing, the device-side non-finite flag is read back this often (steps).
NONFINITE_CHECK_EVERY = 10


# ---------------------------------------------------------------------------------------------
# Settings


def parse_modes(modes: str | Iterable[str]) -> tuple[str, ...]:
    """Canonical mode names from "cfg,pr" or a list (aliases resolved, duplicates dropped, order kept)."""
    items = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else [str(m).strip() for m in modes]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"no guidance mode given; choose from {', '.join([*guidance.MODES, *guidance.ALIASES])}")
    return tuple(dict.fromkeys(guidance.get_mode(m).name for m in items))


def parse_seeds(seeds: str | int | Iterable[int]) -> tuple[int, ...]:
    """Seeds from "0,1,2,3", "0-3", "0-3,10", an int or a list; each must be a non-negative integer."""
    if isinstance(seeds, int):
        items: list[int] = [seeds]
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
                items.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                items.append(int(part))
            else:
                raise ValueError(f"bad seed {part!r}; write seeds as non-negative integers, e.g. 0,1,2,3 or 0-3")
    else:
        items = [int(s) for s in seeds]
    if not items:
        raise ValueError("no seeds given; pass at least one, e.g. 0 or 0-3")
    for seed in items:
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed {seed} is out of range; seeds are integers from 0 to 2**63-1")
    duplicates = sorted({s for s in items if items.count(s) > 1})
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


@dataclass(frozen=True)
class SampleSettings:
    """What to sample: prompts, guidance modes and weights, seeds, size and steps (validated).

    ``prompt`` is the token prompt ("a <sks> dog in the snow"); ``base_prompt`` defaults to it
    with the token replaced by ``class_word`` ("a dog in the snow"). Without a token (plain
    ``cfg`` sampling) the base prompt is the prompt itself. ``height``/``width`` of ``None``
    mean the model's native size; ``seeds`` make one image each per mode.
    """

    prompt: str
    token: str | None = None
    class_word: str | None = None
    base_prompt: str | None = None
    negative_prompt: str = ""
    modes: tuple[str, ...] = ("parallel-rescaled",)
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 1
    height: int | None = None
    width: int | None = None
    steps: int = 50
    w_text: float = 7.5
    w_cons: float = 3.0
    pr: ParallelRescaling = field(default_factory=ParallelRescaling)
    scheduler: str = "default"
    trace: bool = False
    #: Where the scheduler clips x0 (pixel models' DDIM), step with the noise recomputed from the
    #: clipped x0 (see :func:`clipped_step_kwargs`); False reproduces diffusers' default update.
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
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}; e.g. steps=30")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}; e.g. batch_size=1")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
        for name in ("w_text", "w_cons"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            set_(name, float(value))
        if not isinstance(self.pr, ParallelRescaling):
            raise ValueError(f"pr must be a guidance.ParallelRescaling, got {type(self.pr).__name__}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")

    @property
    def needs_personalized(self) -> bool:
        """True if any mode reads a prediction of the personalized model."""
        return any(ROWS[n][1] for m in self.modes for n in guidance.get_mode(m).needs)

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
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["derived_base_prompt"]
        data["modes"], data["seeds"], data["pr"] = list(self.modes), list(self.seeds), self.pr.to_dict()
        return data


def no_personalization_message(settings: SampleSettings) -> str:
    """The error for modes that read the personalized model when none was given."""
    needing = [m for m in settings.modes if any(ROWS[n][1] for n in guidance.get_mode(m).needs)]
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


class NonFiniteError(FloatingPointError, ValueError):
    """A guided prediction became NaN or infinite (the step and mode are in the message)."""


# ---------------------------------------------------------------------------------------------
# Schedulers


def make_scheduler(model_scheduler, name: str = "default"):
    """A fresh scheduler: the model's own (``default``) or one of ``SCHEDULERS`` built from its config."""
    import diffusers

    config = model_scheduler.config
    if name == "default":
        return model_scheduler.__class__.from_config(config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "euler-a":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "dpm++":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddpm":
        return diffusers.DDPMScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def clipped_step_kwargs(scheduler) -> dict:
    """``{"use_clipped_model_output": True}`` for a scheduler that clips (or thresholds) its x0 estimate
    and can recompute the noise from the clipped x0 (DDIM); ``{}`` otherwise.

    DDIM by default clips x0 but keeps the *unclipped* predicted noise for the direction to x_{t-1}.
    With guidance the two disagree more the larger w_text is, and pixel-space samples turn into
    saturated noise; recomputing the noise from the clipped x0 keeps the update consistent (the
    miniature world's base model carries its prompt in 97% of normal prompts at w_text 7.5 with it and 2%
    without; docs/SAMPLING.md). Latent-model schedulers do not clip, so nothing changes for them.
    """
    config = scheduler.config
    clips = bool(config.get("clip_sample", False) or config.get("thresholding", False))
    if clips and "use_clipped_model_output" in inspect.signature(scheduler.step).parameters:
        return {"use_clipped_model_output": True}
    return {}


# ---------------------------------------------------------------------------------------------
# The sampler


def _torch_dtype(dtype) -> "torch.dtype | None":
    """A torch dtype from a dtype or a name (``float32``, ``float16``/``fp16``, ``bfloat16``/``bf16``);
    ``None`` and ``"auto"`` give ``None`` (the caller picks)."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, float32, float16, bfloat16")
    return names[dtype]


def _check_file(flag: str, path: str | os.PathLike | None, folder: bool = False) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.exists():
        kind = "folder" if folder else "file"
        raise FileNotFoundError(f"{flag} {kind} {path} does not exist; check the path")
    if folder and not path.is_dir():
        raise FileNotFoundError(f"{flag} {path} is not a folder; pass the folder holding config.json")
    return path


def _split_variance(output, channels: int, scheduler):
    """Models that also predict a variance (2x output channels): guide the mean, keep the variance
    for schedulers that use it (``variance_type`` learned/learned_range), drop it for the others."""
    if output.shape[1] != 2 * channels:
        return output, None
    prediction, variance = output.split(channels, dim=1)
    learned = str(scheduler.config.get("variance_type", "")).startswith("learned")
    return prediction, (variance if learned else None)


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Sampler:
    """Samples a ``DiffusionModel`` with any guidance mode (see the module docstring).

    The personalized model is one of: a LoRA adapter on ``model.unet`` named ``adapter_name``
    (routed per row inside one forward), a separate fully fine-tuned ``personalized_unet``, or
    only learned token embeddings (``embeddings``: then the same UNet serves every row and
    the identity comes from the token prompt alone). ``sources`` records where the weights came
    from (keys ``model``, ``lora``, ``embeddings``, ``personalized_unet``) for the image metadata.
    """

    def __init__(
        self,
        model: "DiffusionModel",
        adapter_name: str | None = None,
        personalized_unet: "torch.nn.Module | None" = None,
        *,
        embeddings: str | os.PathLike | None = None,
        sources: dict | None = None,
        fast: bool = True,
    ) -> None:
        if adapter_name is not None and personalized_unet is not None:
            raise ValueError("give either adapter_name (a LoRA on model.unet) or personalized_unet, not both")
        if adapter_name is not None:
            peft_config = getattr(model.unet, "peft_config", {}) or {}
            if adapter_name not in peft_config:
                known = ", ".join(peft_config) or "none"
                raise ValueError(
                    f"the UNet has no adapter named {adapter_name!r} (adapters: {known}); load it with "
                    "dreamguide.models.load_lora(model, path, adapter_name) first"
                )
        self.model = model
        self.adapter_name = adapter_name
        self.personalized_unet = personalized_unet
        #: Use dreamguide.fast (routing without indexing, CUDA-graph replay) where it is exact.
        self.fast = fast
        self.sources = {"model": model.source, "lora": None, "embeddings": None, "personalized_unet": None}
        if embeddings is not None:
            self.sources["embeddings"] = os.fspath(embeddings)
        self.sources.update(sources or {})
        self._float32_vae = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike,
        lora: str | os.PathLike | None = None,
        embeddings: str | os.PathLike | None = None,
        personalized_unet: str | os.PathLike | None = None,
        token: str | None = None,
        dtype: "torch.dtype | str | None" = None,
        device: "torch.device | str | None" = None,
        adapter_name: str = "subject",
        fast: bool = True,
    ) -> "Sampler":
        """Load a model and its personalized weights: a LoRA, token embeddings and/or a full UNet folder.

        ``dtype`` ``None``/``"auto"`` means float16 on CUDA and float32 elsewhere; ``device``
        ``None`` means CUDA when available.
        """
        import torch

        from dreamguide import models

        lora_path = _check_file("LoRA", lora)
        embeddings_path = _check_file("embeddings", embeddings)
        unet_path = _check_file("personalized UNet", personalized_unet, folder=True)
        if lora_path is not None and unet_path is not None:
            raise ValueError("give either a LoRA or a personalized UNet, not both")
        if embeddings_path is not None and not token:
            raise ValueError(
                f"embeddings {embeddings_path} need the token they were learned for; pass token='<sks>' (--token)"
            )
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _torch_dtype(dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
        model = models.load_model(model_id_or_path, dtype=dtype, device=device)
        if embeddings_path is not None:
            models.load_embeddings(model, embeddings_path, token)
        unet = None
        if lora_path is not None:
            models.load_lora(model, lora_path, adapter_name)
        if unet_path is not None:
            unet = load_personalized_unet(unet_path, model, dtype=dtype, device=device)
        return cls(
            model,
            adapter_name=adapter_name if lora_path is not None else None,
            personalized_unet=unet,
            sources={
                "model": os.fspath(model_id_or_path),
                "lora": None if lora_path is None else os.fspath(lora),
                "embeddings": None if embeddings_path is None else os.fspath(embeddings),
                "personalized_unet": None if unet_path is None else os.fspath(personalized_unet),
            },
            fast=fast,
        )

    # -- properties ----------------------------------------------------------------------------

    @property
    def device(self) -> "torch.device":
        return self.model.unet.device

    @property
    def dtype(self) -> "torch.dtype":
        return self.model.unet.dtype

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor, or the UNet's downsampling for pixel models."""
        if self.model.vae is not None:
            return int(self.model.vae_scale_factor)
        return 2 ** (len(self.model.unet.config.down_block_types) - 1)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at."""
        sample = self.model.unet.config.sample_size
        h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
        factor = int(self.model.vae_scale_factor) if self.model.vae is not None else 1
        return int(h) * factor, int(w) * factor

    def is_personalized(self, token: str | None = None) -> bool:
        """True if there is a personalized model: an adapter, a personalized UNet or learned token embeddings."""
        if self.adapter_name is not None or self.personalized_unet is not None or self.sources.get("embeddings"):
            return True
        return bool(token) and any(token in t.get_added_vocab() for t in self.model.tokenizers)

    def resolve_size(self, settings: SampleSettings) -> tuple[int, int]:
        """The (height, width) to sample at, checked against ``size_multiple``."""
        native_h, native_w = self.native_size
        height, width = settings.height or native_h, settings.width or native_w
        multiple = self.size_multiple
        what = "the VAE downsampling factor" if self.model.vae is not None else "the UNet's downsampling factor"
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                lower, upper = value - value % multiple, value - value % multiple + multiple
                nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
                raise ValueError(
                    f"{name} {value} is not divisible by {multiple} ({what} of this model); use e.g. {nearest}"
                )
        return height, width

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, settings: SampleSettings, progress: bool = True) -> list[SampleResult]:
        """Sample every (mode, seed) of ``settings``; results come mode by mode, seeds in order."""
        import torch
        from tqdm.auto import tqdm

        if settings.needs_personalized and not self.is_personalized(settings.token):
            raise ValueError(no_personalization_message(settings))
        height, width = self.resolve_size(settings)
        jobs = [(mode, seeds) for mode in settings.modes for seeds in _chunks(settings.seeds, settings.batch_size)]
        results: list[SampleResult] = []
        with torch.no_grad():
            prompts = [settings.negative_prompt, settings.base_prompt, settings.prompt]
            conditioning = self._encode(prompts, height, width)
            with tqdm(total=len(jobs) * settings.steps, disable=not progress, desc="sampling", unit="step") as bar:
                for mode, seeds in jobs:
                    mode_ = guidance.get_mode(mode)
                    batch = self._sample_batch(mode_, seeds, settings, conditioning, height, width, bar)
                    for seed, (image, trace) in zip(seeds, batch):
                        metadata = self.metadata(settings, mode, seed, height, width)
                        results.append(
                            SampleResult(image, seed, mode, settings.prompt, settings.base_prompt, metadata, trace)
                        )
        return results

    def metadata(self, settings: SampleSettings, mode: str, seed: int, height: int, width: int) -> dict:
        """Everything that determines one image, as stored in its PNG."""
        from dreamguide import __version__

        scheduler = make_scheduler(self.model.scheduler, settings.scheduler)
        return {
            "prompt": settings.prompt,
            "base_prompt": settings.base_prompt,
            "negative_prompt": settings.negative_prompt,
            "token": settings.token,
            "class_word": settings.class_word,
            "mode": guidance.get_mode(mode).name,
            "w_text": settings.w_text,
            "w_cons": settings.w_cons,
            "pr": settings.pr.to_dict(),
            "seed": seed,
            "steps": settings.steps,
            "scheduler": settings.scheduler,
            "scheduler_class": type(scheduler).__name__,
            "clipped_model_output": bool(settings.clipped_model_output and clipped_step_kwargs(scheduler)),
            "model": self.sources.get("model"),
            "model_kind": self.model.kind,
            "lora": self.sources.get("lora"),
            "embeddings": self.sources.get("embeddings"),
            "personalized_unet": self.sources.get("personalized_unet"),
            "height": height,
            "width": width,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dreamguide_version": __version__,
        }

    def _sample_batch(self, mode, seeds, settings, conditioning, height, width, bar) -> list[tuple]:
        """Denoise one batch of images with one mode; returns (image, trace) per seed."""
        import torch

        from dreamguide import routing

        unet = self.model.unet
        device = self.device
        scheduler = make_scheduler(self.model.scheduler, settings.scheduler)
        scheduler.set_timesteps(settings.steps, device=device)
        step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        clipped = clipped_step_kwargs(scheduler) if settings.clipped_model_output else {}

        # One generator per image: initial noise drawn per image on the CPU (device and batch independent).
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        factor = self.model.vae_scale_factor if self.model.vae is not None else 1
        shape = (1, unet.config.in_channels, height // factor, width // factor)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        x = noise.to(device) * scheduler.init_noise_sigma

        # Rows are need-major: [need_0 for every image, need_1 for every image, ...].
        n_images, needs = len(seeds), mode.needs
        row_conditioning = conditioning.select([ROWS[n][0] for n in needs for _ in range(n_images)])
        row_adapters = self._row_adapters([ROWS[n][1] for n in needs for _ in range(n_images)])
        fast_call = None
        if self.fast and self.personalized_unet is None:
            from dreamguide.fast import FastUNetCall

            fast_call = FastUNetCall.create(unet, row_adapters)  # None where the fast path is not exact

        first_bad = torch.full((n_images,), -1, dtype=torch.long, device=device)
        traced: list[tuple[int, float, float | None, dict]] = []
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(x, t).repeat(len(needs), 1, 1, 1)
            if fast_call is not None:
                output = fast_call(model_input.to(self.dtype), t, row_conditioning).float()
            else:
                output = routing.predict_noise(
                    unet, model_input.to(self.dtype), t, row_conditioning, row_adapters, self.personalized_unet
                ).float()
            output, variance = _split_variance(output, x.shape[1], scheduler)
            predictions = guidance.Predictions(**dict(zip(needs, output.chunk(len(needs)))))
            if settings.trace:
                # Traced steps read their stats anyway: stop before NaNs reach the statistics.
                bad = ~torch.isfinite(output).flatten(1).all(dim=1).view(len(needs), n_images).any(dim=0)
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
                self._raise_if_nonfinite(first_bad, seeds, mode, timesteps, settings.steps)
                guided, stats = guidance.guide(
                    mode, predictions, settings.w_text, settings.w_cons, settings.pr, return_stats=True
                )
            else:
                guided, stats = guidance.guide(mode, predictions, settings.w_text, settings.w_cons, settings.pr), None
            if stats is not None:
                sigma = getattr(scheduler, "sigmas", None)
                traced.append((i, float(t), None if sigma is None else float(sigma[i]), stats))
            if variance is not None:
                guided = torch.cat([guided, variance.chunk(len(needs))[-1]], dim=1)
            step_kwargs = {"generator": generators} if step_takes_generator else {}
            x = scheduler.step(guided, t, x, return_dict=False, **step_kwargs, **clipped)[0]
            # A non-finite guided prediction (or scheduler update) shows in x: flag it on the device.
            bad = ~torch.isfinite(x).flatten(1).all(dim=1)
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
            if settings.trace or (i + 1) % NONFINITE_CHECK_EVERY == 0:
                self._raise_if_nonfinite(first_bad, seeds, mode, timesteps, settings.steps)
            bar.update(1)
        self._raise_if_nonfinite(first_bad, seeds, mode, timesteps, settings.steps)
        images = [self._to_image(x[j : j + 1]) for j in range(n_images)]
        return list(zip(images, _trace_records(traced, n_images)))

    def _encode(self, prompts: list[str], height: int, width: int):
        from dreamguide.models import encode_prompts

        return encode_prompts(self.model, prompts, height=height, width=width)

    def _row_adapters(self, personalized: list[bool]) -> list[str] | None:
        """Per-row routing names: the adapter (or the personalized UNet) for personalized rows."""
        if self.adapter_name is not None:
            return [self.adapter_name if p else BASE_ROUTE for p in personalized]
        if self.personalized_unet is not None:
            return ["personalized" if p else BASE_ROUTE for p in personalized]
        return None  # learned tokens only, or no personalization: one UNet for every row

    @staticmethod
    def _raise_if_nonfinite(first_bad, seeds, mode, timesteps, steps) -> None:
        bad_steps = first_bad.tolist()  # the only host sync of the loop, every few steps
        for seed, step in zip(seeds, bad_steps):
            if step >= 0:
                raise NonFiniteError(
                    f"the sample became non-finite (NaN or inf) at step {step + 1}/{steps} "
                    f"(timestep {float(timesteps[step]):g}) in mode {mode.name!r} for seed {seed}; "
                    "sample in float32 (--dtype float32) or lower the guidance weights"
                )

    def _to_image(self, x) -> "Image.Image":
        """Decode one latent (or pixel) tensor to a PIL image; [-1, 1] maps to [0, 255]."""
        import torch
        from PIL import Image

        if self.model.vae is None:
            pixels = x
        else:
            vae = self._decoder()
            config = vae.config
            latents = x.to(vae.dtype)
            if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
                mean = torch.tensor(config.latents_mean, device=x.device, dtype=vae.dtype).view(1, -1, 1, 1)
                std = torch.tensor(config.latents_std, device=x.device, dtype=vae.dtype).view(1, -1, 1, 1)
                latents = latents * std / self.model.vae_scaling_factor + mean
            else:
                latents = latents / self.model.vae_scaling_factor
                if getattr(config, "shift_factor", None) is not None:
                    latents = latents + config.shift_factor
            pixels = vae.decode(latents).sample
        array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = array.permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    def _decoder(self):
        """The VAE to decode with: a float32 copy when the VAE is float16 (the SDXL VAE overflows in fp16)."""
        import torch

        vae = self.model.vae
        if vae.dtype != torch.float16 or not (self.model.kind == "sdxl" or getattr(vae.config, "force_upcast", False)):
            return vae
        if self._float32_vae is None:
            self._float32_vae = copy.deepcopy(vae).to(torch.float32)
        return self._float32_vae


# ---------------------------------------------------------------------------------------------
# Trace, personalized weights, saving


def _trace_records(traced: list[tuple[int, float, float | None, dict]], n_images: int) -> list[list[dict]]:
    """Per image, one dict per traced step: Consistency_p mean, std, quantiles, fraction negative, histogram."""
    import torch

    if not traced:
        return [[] for _ in range(n_images)]
    stacked = {key: torch.stack([s[key] for _, _, _, s in traced]).cpu().tolist() for key in traced[0][3]}
    lo, hi = guidance.TRACE_HISTOGRAM_RANGE
    bins = guidance.TRACE_HISTOGRAM_BINS
    edges = [lo + (hi - lo) * b / bins for b in range(bins + 1)]
    records: list[list[dict]] = [[] for _ in range(n_images)]
    for s, (step, timestep, sigma, _) in enumerate(traced):
        for j in range(n_images):
            record = {"step": step, "timestep": timestep}
            if sigma is not None:
                record["sigma"] = sigma
            record.update(
                {
                    "mean": stacked["mean"][s][j],
                    "std": stacked["std"][s][j],
                    "quantiles": {f"{q:g}": v for q, v in zip(guidance.TRACE_QUANTILES, stacked["quantiles"][s][j])},
                    "fraction_negative": stacked["fraction_negative"][s][j],
                    "histogram": {"edges": edges, "counts": [int(c) for c in stacked["histogram"][s][j]]},
                }
            )
            records[j].append(record)
    return records


def load_personalized_unet(path: str | os.PathLike, model: "DiffusionModel", dtype=None, device=None):
    """A fully fine-tuned UNet from a folder (``config.json`` + safetensors, or a model folder with ``unet/``).

    Its architecture must match ``model.unet``: same input/output channels, text width and extra
    conditioning, else a ValueError names the first difference.
    """
    from diffusers import UNet2DConditionModel

    path = Path(path)
    subfolder = "unet" if (path / "unet" / "config.json").is_file() else None
    if subfolder is None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"personalized UNet folder {path} has no config.json (nor unet/config.json); "
            "pass the folder written by unet.save_pretrained(...)"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder=subfolder, torch_dtype=dtype or model.unet.dtype, use_safetensors=True
        )
    except OSError as error:
        raise FileNotFoundError(f"cannot load the personalized UNet from {path} (safetensors only): {error}") from error
    for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "block_out_channels"):
        ours, theirs = model.unet.config.get(key), unet.config.get(key)
        if (list(ours) if isinstance(ours, (list, tuple)) else ours) != (
            list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        ):
            raise ValueError(
                f"the personalized UNet {path} does not match the model's UNet: {key} is {theirs!r}, "
                f"the model has {ours!r}; fine-tune from the same base model"
            )
    return unet.to(device or model.unet.device).eval()


def trace_document(results: Sequence[SampleResult], files: Sequence[str | os.PathLike] | None = None) -> dict:
    """The trace JSON: per image (mode, seed, prompts), its per-step Consistency_p records."""
    lo, hi = guidance.TRACE_HISTOGRAM_RANGE
    return {
        "format": "dreamguide.trace/1",
        "quantity": "consistency_p (k = <g_cons, g_text> / ||g_text||^2 per location, SPEC section 3)",
        "quantile_levels": list(guidance.TRACE_QUANTILES),
        "histogram_range": [lo, hi],
        "histogram_bins": guidance.TRACE_HISTOGRAM_BINS,
        "images": [
            {
                **({"file": Path(files[i]).name} if files else {}),
                "mode": r.mode,
                "seed": r.seed,
                "prompt": r.prompt,
                "base_prompt": r.base_prompt,
                "w_text": r.metadata.get("w_text"),
                "w_cons": r.metadata.get("w_cons"),
                "steps": r.trace,
            }
            for i, r in enumerate(results)
        ],
    }


def image_filename(result: SampleResult) -> str:
    """``<mode>-seed<seed>.png``."""
    return f"{result.mode}-seed{result.seed}.png"


def save_results(
    results: Sequence[SampleResult],
    output: str | os.PathLike,
    settings: SampleSettings | None = None,
    sampler: Sampler | None = None,
) -> dict[str, list[Path]]:
    """Write the images (PNG + metadata), a labelled grid, ``settings.json`` and, if traced, ``trace.json``.

    Returns the written paths by kind (``image``, ``grid``, ``trace``, ``settings``).
    """
    from dreamguide import images

    output = Path(output)
    written: dict[str, list[Path]] = {"image": [], "grid": [], "trace": [], "settings": []}
    for result in results:
        written["image"].append(images.save_png(result.image, output / image_filename(result), result.metadata))
    modes = list(dict.fromkeys(r.mode for r in results))
    seeds = list(dict.fromkeys(r.seed for r in results))
    if len(results) > 1:
        by_key = {(r.mode, r.seed): r.image for r in results}
        if all((m, s) in by_key for m in modes for s in seeds):
            rows = [[by_key[m, s] for m in modes] for s in seeds]
            grid = images.image_grid(rows, column_labels=modes, row_labels=[f"seed {s}" for s in seeds])
            written["grid"].append(images.save_png(grid, output / "grid.png"))
    if settings is not None and settings.trace:
        document = trace_document(results, written["image"])
        written["trace"].append(images.write_json(output / "trace.json", document))
    if settings is not None:
        record = {"settings": settings.to_dict(), "files": [p.name for p in written["image"]]}
        if sampler is not None:
            record["sources"] = dict(sampler.sources)
            record["model_kind"] = sampler.model.kind
        written["settings"].append(images.write_json(output / "settings.json", record))
    return written
