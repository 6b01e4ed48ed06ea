"""Models: loading text-to-image diffusion models and encoding prompts.

A ``DiffusionModel`` is the handful of components the rest of the project needs, not a pipeline:

    kind           "sdxl" (two CLIP encoders, text_time conditioning), "sd" (SD 1.x/2.x, one
                   encoder) or "pixel" (no VAE: the UNet works on 3-channel images directly)
    unet, scheduler, tokenizers, text_encoders, vae (None for "pixel"), source

Formats read by ``load_model``: a diffusers folder (``model_index.json`` + ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/`` and for SDXL ``text_encoder_2/``,
``tokenizer_2/``), a hub id of one (from the local cache when offline), the pixel format
(the same layout without ``vae/``), and a single-file SD 1.x / 2.x / SDXL checkpoint with the
config folder of its architecture (:mod:`dreamguide.single_file`). Weights are read only from
safetensors.

What a model is personalized with has modules of its own: LoRA adapters on the UNet and their
files in :mod:`dreamguide.lora_files`, learned tokens and their files in :mod:`dreamguide.token_files`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dreamguide.atomic import atomic_directory

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("sdxl", "sd", "pixel")
PIXEL_CLASS_NAME = "PixelTextToImage"

#: Names accepted for a dtype (``parse_dtype``), besides a ``torch.dtype`` itself.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

#: Short scheduler names accepted by ``load_model(scheduler=...)`` besides diffusers class names.
SCHEDULER_ALIASES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass
class DiffusionModel:
    """The components of a text-to-image diffusion model (see the module docstring)."""

    kind: str
    unet: torch.nn.Module
    scheduler: object
    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module | None = None
    source: str = ""
    #: SDXL: the empty (null) prompt is encoded as zeros rather than run through the encoders.
    force_zeros_for_empty_prompt: bool = False
    #: Pixels per latent cell along each side (8 for SD/SDXL, 1 for pixel models).
    vae_scale_factor: int | None = None
    #: Multiplier from VAE latents to UNet latents (0.18215 SD 1.x, 0.13025 SDXL, 1.0 pixel).
    vae_scaling_factor: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if len(self.tokenizers) != len(self.text_encoders):
            raise ValueError(
                f"{len(self.tokenizers)} tokenizers for {len(self.text_encoders)} text encoders; they must pair up"
            )
        expected = 2 if self.kind == "sdxl" else 1
        if len(self.text_encoders) != expected:
            raise ValueError(f"a {self.kind!r} model has {expected} text encoder(s), got {len(self.text_encoders)}")
        if (self.vae is None) != (self.kind == "pixel"):
            raise ValueError(f"a {self.kind!r} model {'has no' if self.kind == 'pixel' else 'needs a'} VAE")
        if self.vae_scale_factor is None:
            blocks = self.vae.config.block_out_channels if self.vae is not None else [0]
            self.vae_scale_factor = 2 ** (len(blocks) - 1)
        if self.vae_scaling_factor is None:
            self.vae_scaling_factor = float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @classmethod
    def from_pipeline(cls, pipe, source: str = "") -> "DiffusionModel":
        """Wrap an in-memory diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``."""
        components = pipe.components
        if components.get("text_encoder_2") is not None:
            kind, tokenizers = "sdxl", [pipe.tokenizer, pipe.tokenizer_2]
            text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
            force_zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        elif components.get("text_encoder") is not None and components.get("vae") is not None:
            kind, tokenizers, text_encoders, force_zeros = "sd", [pipe.tokenizer], [pipe.text_encoder], False
        else:
            raise ValueError(
                f"cannot wrap a {type(pipe).__name__}: expected a Stable Diffusion or SDXL pipeline "
                "(unet, vae, text encoder(s), tokenizer(s))"
            )
        return cls(
            kind=kind,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            tokenizers=list(tokenizers),
            text_encoders=list(text_encoders),
            vae=pipe.vae,
            source=source or getattr(pipe, "name_or_path", "") or type(pipe).__name__,
            force_zeros_for_empty_prompt=force_zeros,
        )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def default_size(self) -> int:
        """Native image side in pixels (1024 for SDXL base, 512 for SD 1.5)."""
        return int(self.unet.config.sample_size) * int(self.vae_scale_factor)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, *self.text_encoders) if m is not None]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "DiffusionModel":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in self.modules():
            module.to(**kwargs)
        return self

    def to_pipeline(self):
        """A diffusers pipeline sharing these components (SD/SDXL only)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.kind == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=self.unet,
                scheduler=self.scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        if self.kind == "sd":
            return StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                tokenizer=self.tokenizers[0],
                unet=self.unet,
                scheduler=self.scheduler,
                safety_checker=None,
                feature_extractor=None,
                image_encoder=None,
                requires_safety_checker=False,
            )
        raise ValueError("a 'pixel' model has no diffusers pipeline; use dreamguide's sampler")


def parse_device(device: str | torch.device | None) -> torch.device:
    """A torch device from ``--device`` (``None``: cuda when available, else cpu); an unknown name or an
    accelerator this machine lacks is a ValueError naming it and the choices."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device torch knows; use cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this machine has no CUDA GPU torch can use; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: there are {torch.cuda.device_count()} CUDA devices (0-based)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: MPS is not available here; use --device cpu")
    return parsed


def parse_dtype(dtype, device=None) -> torch.dtype:
    """A torch dtype from a dtype or its name (``float32``/``fp32``, ``float16``/``fp16``, ``bfloat16``/``bf16``).

    ``None`` and ``"auto"`` mean float16 on a CUDA ``device`` and float32 anywhere else.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, float32, float16, bfloat16")
    return DTYPE_NAMES[dtype]


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_model(model: DiffusionModel, directory, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers-layout folder of safetensors files that ``load_model`` reads.

    The folder is written beside ``directory`` first and moved into place at the end.
    """
    import diffusers

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True or pick a new folder")
    with atomic_directory(directory) as tmp:
        if model.kind in ("sd", "sdxl"):
            model.to_pipeline().save_pretrained(tmp, safe_serialization=True)
        else:
            model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            model.text_encoders[0].save_pretrained(tmp / "text_encoder", safe_serialization=True)
            model.tokenizers[0].save_pretrained(tmp / "tokenizer")
            model.scheduler.save_pretrained(tmp / "scheduler")
            index = {
                "_class_name": PIXEL_CLASS_NAME,
                "_diffusers_version": diffusers.__version__,
                "scheduler": ["diffusers", type(model.scheduler).__name__],
                "text_encoder": ["transformers", type(model.text_encoders[0]).__name__],
                "tokenizer": ["transformers", type(model.tokenizers[0]).__name__],
                "unet": ["diffusers", type(model.unet).__name__],
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return directory


def _looks_like_path(text: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper) is a path."""
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text)
    )


def detect_kind(index: dict, folders: set[str]) -> str:
    """Model kind from a ``model_index.json`` dict and the names of the folder's sub-folders."""
    class_name = str(index.get("_class_name", ""))

    def has(component: str) -> bool:
        entry = index.get(component)
        listed = isinstance(entry, list) and bool(entry) and entry[0] is not None
        return listed or (component not in index and component in folders)

    if class_name == PIXEL_CLASS_NAME:
        return "pixel"
    if "XL" in class_name or has("text_encoder_2"):
        if not has("text_encoder"):
            raise ValueError(
                f"{class_name or 'this model'} has no first text encoder (an SDXL refiner?); "
                "only SDXL base-style models with two text encoders are supported"
            )
        return "sdxl"
    if has("vae"):
        return "sd"
    if has("unet") and has("text_encoder"):
        return "pixel"
    raise ValueError(
        f"cannot tell the model kind (class {class_name!r}, folders {sorted(folders)}); expected an SD/SDXL "
        "diffusers folder or the pixel format (unet/, text_encoder/, tokenizer/, scheduler/)"
    )


def _hub_index(repo_id: str) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        path = hf_hub_download(repo_id, "model_index.json")
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a model on the Hugging Face hub; check the id or the path"
        ) from error
    except Exception as error:  # offline mode, no network, not in the cache
        raise FileNotFoundError(
            f"{repo_id!r} is not a folder in {Path.cwd()} (if you meant a local folder, check the path: "
            f"./{repo_id} does not exist), and as a hub id its weights are not available offline (not in the "
            f"local hub cache and the hub cannot be reached: {type(error).__name__}); download them once with "
            "network access, or pass a local diffusers folder (model_index.json, unet/, text_encoder/, ...)"
        ) from error
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _make_scheduler(spec, default):
    import diffusers

    if spec is None:
        return default
    if not isinstance(spec, str):
        return spec.from_config(default.config) if isinstance(spec, type) else spec
    name = SCHEDULER_ALIASES.get(spec.lower(), spec)
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        valid = ", ".join([*SCHEDULER_ALIASES, "or a diffusers scheduler class name"])
        raise ValueError(f"unknown scheduler {spec!r}; choose one of {valid}")
    return cls.from_config(default.config)


def load_model(
    id_or_path,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    scheduler=None,
    variant: str | None = None,
    config=None,
) -> DiffusionModel:
    """Load an SDXL, SD 1.x/2.x or pixel model from a diffusers folder, a hub id or a single-file
    ``.safetensors`` checkpoint, component by component.

    ``scheduler``: None (the model's own), a short name (``ddim``, ``euler``, ...), a diffusers
    scheduler class name, or a scheduler instance. ``variant`` picks e.g. the ``fp16`` weight files.
    ``config`` (single-file checkpoints only): the folder, or hub id, of a diffusers model of the
    same architecture whose configs and tokenizers the file is read with (no weights needed); None
    reads the architecture from the file and uses its reference model's configs
    (:func:`dreamguide.single_file.config_folder`).
    """
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dreamguide import single_file

    text = os.fspath(id_or_path)
    local = Path(text).expanduser()
    checkpoint = None
    if local.is_file() or local.suffix.lower() in single_file.CHECKPOINT_SUFFIXES:
        checkpoint, local = local, single_file.check_checkpoint(local, config)
        if variant:
            raise ValueError(f"variant {variant!r} picks weight files of a model folder; the single-file "
                             f"checkpoint {checkpoint} has one set of weights: leave the variant out")
    elif config is not None:
        raise ValueError(f"a model config ({os.fspath(config)}) is for single-file checkpoints; {text} is a model "
                         "folder or hub id, which brings its own configs: leave the model config out")
    if local.exists():  # a folder: every file took the checkpoint branch
        index_file = local / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.exists() else {}
        folders = {p.name for p in local.iterdir() if p.is_dir()}
        root = str(local)
        from dreamguide.lora_files import read_safetensors_header

        for weights in sorted(local.glob("*/*.safetensors")):  # a damaged file is named, before diffusers reads it
            read_safetensors_header(weights, "model weight")
    elif _looks_like_path(text):
        raise FileNotFoundError(f"model folder {text} does not exist")
    else:
        index = _hub_index(text)
        folders = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        root = text
    kind = detect_kind(index, folders)

    named = text if checkpoint is None else f"the config folder {root}"
    common = dict(torch_dtype=dtype, use_safetensors=True)
    if variant:
        common["variant"] = variant

    def component(sub: str, cls, **kwargs):
        try:
            loaded = cls.from_pretrained(root, subfolder=sub, **kwargs)
        except OSError as error:  # missing folder or file, or only pickle (.bin) weights
            raise FileNotFoundError(
                f"cannot load {sub}/ of {named}: {str(error).rstrip('.')}. dreamguide reads weights only from .safetensors; "
                "convert .bin weights with diffusers/transformers save_pretrained(safe_serialization=True)"
            ) from error
        return loaded.eval() if isinstance(loaded, torch.nn.Module) else loaded

    if checkpoint is None:
        unet = component("unet", diffusers.UNet2DConditionModel, **common)
    scheduler_config = diffusers.DDIMScheduler.load_config(root, subfolder="scheduler")
    scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise ValueError(
            f"{named}: unknown scheduler class {scheduler_config.get('_class_name')!r} in scheduler/; "
            "pass scheduler='ddim' (or another diffusers scheduler) to load_model"
        )
    default_scheduler = scheduler_class.from_config(scheduler_config)
    tokenizers = [component("tokenizer", CLIPTokenizer)]
    if kind == "sdxl":
        tokenizers.append(component("tokenizer_2", CLIPTokenizer))
    if checkpoint is None:
        text_encoders = [component("text_encoder", CLIPTextModel, **common)]
        vae = None
        if kind == "sdxl":
            text_encoders.append(component("text_encoder_2", CLIPTextModelWithProjection, **common))
        if kind != "pixel":
            vae = component("vae", diffusers.AutoencoderKL, **common)
    else:
        unet, vae, text_encoders = single_file.load_weights(checkpoint, local, kind, dtype, tokenizers,
                                                            default_scheduler)
    model = DiffusionModel(
        kind=kind,
        unet=unet,
        scheduler=_make_scheduler(scheduler, default_scheduler),
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        vae=vae,
        source=text,
        force_zeros_for_empty_prompt=kind == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    return model.to(device=device) if torch.device(device) != unet.device else model


# ---------------------------------------------------------------------------------------------
# Prompt encoding


def take_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``x[rows]`` built from slices of consecutive rows: no index tensor, so no host-to-device copy."""
    rows = [int(r) for r in rows]
    if not rows:
        return x[:0]
    parts, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            parts.append(x[rows[start] : rows[i - 1] + 1])
            start = i
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class TextConditioning:
    """Encoded prompts, one row per prompt: what the UNet is conditioned on.

    ``prompt_embeds`` [B, 77, D]; SDXL adds ``pooled_prompt_embeds`` [B, D2] and ``add_time_ids`` [B, 6].
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "TextConditioning":
        return TextConditioning(*(None if t is None else fn(t) for t in self._tensors()))

    def _tensors(self) -> tuple:
        return (self.prompt_embeds, self.pooled_prompt_embeds, self.add_time_ids)

    def select(self, rows) -> "TextConditioning":
        """The rows ``rows`` (an int, a slice or a sequence of ints), in that order."""
        if isinstance(rows, int):
            rows = [rows]
        if isinstance(rows, slice):
            return self._map(lambda t: t[rows])
        return self._map(lambda t: take_rows(t, rows))

    def repeat_rows(self, n: int) -> "TextConditioning":
        """Each row repeated ``n`` times in place: [a, b] -> [a, a, b, b] (n images per prompt)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(parts: Sequence["TextConditioning"]) -> "TextConditioning":
        """Rows of ``parts`` stacked in order; all parts must come from the same model kind."""
        if not parts:
            raise ValueError("TextConditioning.cat needs at least one part")
        has_pooled = {p.pooled_prompt_embeds is not None for p in parts}
        if len(has_pooled) > 1:
            raise ValueError("cannot concatenate SDXL conditioning (pooled, time ids) with SD conditioning")
        columns = list(zip(*(p._tensors() for p in parts)))
        return TextConditioning(*(None if col[0] is None else torch.cat(col) for col in columns))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextConditioning":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def unet_kwargs(self) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for these rows."""
        kwargs = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.add_time_ids}
        return kwargs


def _token_ids(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


class PromptTooLongError(ValueError):
    """A prompt whose token (or another part that is needed) lies past the text encoder's limit."""


def _fits(tokenizer, text: str) -> bool:
    return len(tokenizer.tokenize(text)) + 2 <= tokenizer.model_max_length


def check_prompt_length(model: DiffusionModel, prompt: str, needed: Sequence[str] = (), what: str = "prompt") -> None:
    """Refuse ``prompt`` if a part in ``needed`` (the token, the class word) lies past the limit of a
    tokenizer of ``model`` (77 tokens for CLIP, start and end included): the text encoder would
    never see it. A long prompt whose needed parts all fit is encoded cut short, with a warning
    that names the words lost.
    """
    from dreamguide.prompts import _token_pattern

    cut_message = None
    for tokenizer in model.tokenizers:
        tokens = tokenizer.tokenize(prompt)
        limit = tokenizer.model_max_length
        count = len(tokens) + 2
        if count <= limit:
            continue
        for part in needed:
            if not part:
                continue
            found = list(_token_pattern(part).finditer(prompt))
            if found and not _fits(tokenizer, prompt[: found[-1].end()]):
                raise PromptTooLongError(
                    f"the {what} {prompt!r} is {count} tokens long, but the text encoder reads only {limit} "
                    f"(start and end included), so {part!r} is cut off and would have no effect; "
                    f"shorten the {what} or move {part!r} nearer its start"
                )
        if cut_message is None:
            cut = tokenizer.decode(tokenizer.convert_tokens_to_ids(tokens[limit - 2 :])).strip()
            cut_message = (
                f"the {what} {prompt!r} is {count} tokens long; the text encoder reads only {limit}, "
                f"so {cut!r} is cut off"
            )
    if cut_message is not None:
        warnings.warn(cut_message, stacklevel=2)


def encode_prompts(
    model: DiffusionModel, prompts: Sequence[str], height: int | None = None, width: int | None = None
) -> TextConditioning:
    """Encode ``prompts`` as the UNet expects (gradients flow: learned tokens train through this).

    SD/pixel: the last hidden state of the text encoder. SDXL: the penultimate hidden states of
    both encoders side by side, the pooled projection of encoder 2, and time ids
    (height, width, 0, 0, height, width) for the image size (default: the model's native size);
    an empty prompt encodes to zeros when ``force_zeros_for_empty_prompt`` (as SDXL base samples).
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts, not one string")
    prompts = list(prompts)
    device = model.text_encoders[0].device
    dtype = model.unet.dtype
    if model.kind != "sdxl":
        ids = _token_ids(model.tokenizers[0], prompts, device)
        return TextConditioning(model.text_encoders[0](ids).last_hidden_state.to(dtype))
    hidden, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        out = encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        raise ValueError("the second SDXL text encoder must have a projection (CLIPTextModelWithProjection)")
    prompt_embeds, pooled = torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)
    empty = [p == "" for p in prompts]
    if model.force_zeros_for_empty_prompt and any(empty):
        keep = torch.tensor([0.0 if e else 1.0 for e in empty], dtype=dtype).to(prompt_embeds.device)
        prompt_embeds = prompt_embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]
    h = height or model.default_size
    w = width or model.default_size
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype).to(prompt_embeds.device).expand(len(prompts), 6)
    return TextConditioning(prompt_embeds, pooled, time_ids)

