"""Models: loading text-to-image diffusion models, encoding prompts, LoRA and learned tokens.

A ``DiffusionModel`` is the handful of components the rest of the project needs, not a pipeline:

    kind           "sdxl" (two CLIP encoders, text_time conditioning), "sd" (SD 1.x/2.x, one
                   encoder) or "pixel" (no VAE: the UNet works on 3-channel images directly)
    unet, scheduler, tokenizers, text_encoders, vae (None for "pixel"), source

Formats read by ``load_model``: a diffusers folder (``model_index.json`` + ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/`` and for SDXL ``text_encoder_2/``,
``tokenizer_2/``), a hub id of one (from the local cache when offline), and the pixel format
(the same layout without ``vae/``). Weights are read only from safetensors.

LoRA adapters live on the UNet as PEFT layers (``add_lora``/``load_lora``/``save_lora``); learned
tokens ("textual inversion") live in every tokenizer and text encoder (``add_tokens``,
``save_embeddings``, ``load_embeddings``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("sdxl", "sd", "pixel")
PIXEL_CLASS_NAME = "PixelTextToImage"
LORA_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

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
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
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
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    if class_name == PIXEL_CLASS_NAME:
        return "pixel"
    if "XL" in class_name or "text_encoder_2" in folders or index.get("text_encoder_2"):
        if not (index.get("text_encoder") or "text_encoder" in folders):
            raise ValueError(
                f"{class_name or 'this model'} has no first text encoder (an SDXL refiner?); "
                "only SDXL base-style models with two text encoders are supported"
            )
        return "sdxl"
    if "vae" in folders or index.get("vae"):
        return "sd"
    if "unet" in folders and "text_encoder" in folders:
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
            f"the weights of {repo_id!r} are not available offline (not in the local hub cache and the hub "
            f"cannot be reached: {type(error).__name__}); download them once with network access, or pass a "
            "local diffusers folder (model_index.json, unet/, text_encoder/, ...) instead"
        ) from error
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _make_scheduler(spec, config_source, default):
    import diffusers

    if spec is None:
        return default
    if not isinstance(spec, str):
        return type(spec).from_config(default.config) if isinstance(spec, type) else spec
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
) -> DiffusionModel:
    """Load an SDXL, SD 1.x/2.x or pixel model from a diffusers folder or hub id, component by component.

    ``scheduler``: None (the model's own), a short name (``ddim``, ``euler``, ...), a diffusers
    scheduler class name, or a scheduler instance. ``variant`` picks e.g. the ``fp16`` weight files.
    """
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    text = os.fspath(id_or_path)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"{local} is a file; load_model needs a model folder (with model_index.json)")
        index_file = local / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.exists() else {}
        folders = {p.name for p in local.iterdir() if p.is_dir()}
        root = str(local)
    elif _looks_like_path(text):
        raise FileNotFoundError(f"model folder {text} does not exist")
    else:
        index = _hub_index(text)
        folders = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        root = text
    kind = detect_kind(index, folders)

    common = dict(torch_dtype=dtype, use_safetensors=True)
    if variant:
        common["variant"] = variant

    def transformers_model(sub: str, cls):
        try:
            return cls.from_pretrained(root, subfolder=sub, **common).eval()
        except OSError as error:
            raise FileNotFoundError(f"cannot load {sub}/ of {text} from safetensors: {error}") from error

    unet = diffusers.UNet2DConditionModel.from_pretrained(root, subfolder="unet", **common).eval()
    scheduler_class = (index.get("scheduler") or [None, "DDIMScheduler"])[1]
    scheduler_cls = getattr(diffusers, scheduler_class, None) or diffusers.DDIMScheduler
    default_scheduler = scheduler_cls.from_pretrained(root, subfolder="scheduler")
    tokenizers = [CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")]
    text_encoders = [transformers_model("text_encoder", CLIPTextModel)]
    vae = None
    if kind == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2"))
        text_encoders.append(transformers_model("text_encoder_2", CLIPTextModelWithProjection))
    if kind != "pixel":
        vae = diffusers.AutoencoderKL.from_pretrained(root, subfolder="vae", **common).eval()
    model = DiffusionModel(
        kind=kind,
        unet=unet,
        scheduler=_make_scheduler(scheduler, root, default_scheduler),
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        vae=vae,
        source=text,
        force_zeros_for_empty_prompt=kind == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    return model.to(device=device) if torch.device(device) != unet.device else model
