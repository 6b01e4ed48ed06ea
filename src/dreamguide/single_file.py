"""Single-file checkpoints: a whole SD 1.x, SD 2.x or SDXL model in one ``.safetensors`` file.

This is how A1111, ComfyUI and Civitai share models: the original (LDM) key layout, with the UNet
under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoder(s) under
``cond_stage_model.transformer.`` (SD 1.x, OpenAI CLIP), ``cond_stage_model.model.`` (SD 2.x,
OpenCLIP) or ``conditioner.embedders.0.transformer.`` + ``conditioner.embedders.1.model.`` (SDXL).

The file holds weights only. What else a model needs (each component's config, the scheduler,
the tokenizers) comes from a config folder: the folder of a diffusers model of the same
architecture (``model_index.json``, ``*/config.json``, ``scheduler/``, ``tokenizer*/``), whose weight
files are not read and need not be there. Without one, the architecture is read from the file's
keys and the configs of its reference model (:data:`REFERENCE_CONFIGS`, the models diffusers itself
picks) are taken from the Hugging Face hub, or offline from the local hub cache.

:func:`dreamguide.models.load_model` is the one loader; it calls this module for a file. The weights
are converted by diffusers' ``from_single_file`` with the config folder; the tokenizers and the
scheduler are read from that folder as ``load_model`` reads them from a model folder. Pickle
checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused: weights load only from safetensors.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

#: Names of the architectures a single-file checkpoint can hold.
ARCHITECTURES: dict[str, str] = {"sdxl": "SDXL", "sd1": "SD 1.x", "sd2": "SD 2.x"}

#: The hub model whose configs and tokenizers a checkpoint of each architecture is read with when
#: no config folder is given (diffusers' own choices: SDXL base 1.0, SD 1.5, SD 2.1 at 768 px).
REFERENCE_CONFIGS: dict[str, str] = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
}

#: The files of a hub model that make its config folder (no weights).
CONFIG_FILES: tuple[str, ...] = ("model_index.json", "*/config.json", "scheduler/*", "tokenizer*/*")

#: Suffixes of pickle checkpoints, which are refused.
PICKLE_SUFFIXES: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
#: Suffixes that make ``models.load_model`` read a path as a single-file checkpoint (pickle ones are refused).
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".safetensors", *PICKLE_SUFFIXES)

_UNET = "model.diffusion_model."
_VAE = ("first_stage_model.", "vae.")
_UNET_CONV_IN = _UNET + "input_blocks.0.0.weight"
#: Per architecture: (text encoder sub-folder, key of its token embedding [vocab, width]) in the file.
_TEXT_ENCODERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"),),
    "sd2": (("text_encoder", "cond_stage_model.model.token_embedding.weight"),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"),
             ("text_encoder_2", "conditioner.embedders.1.model.token_embedding.weight")),
}


def _shapes(path: Path, keys) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in keys}


def _what_else(keys: set[str]) -> str:
    """What a safetensors file without a Stable Diffusion UNet looks like, for the error."""
    if any("lora_down" in k or "lora_A" in k or k.startswith("lora_") for k in keys):
        return "; it looks like a LoRA: pass it with --lora"
    if keys & {"emb_params", "clip_l", "clip_g", "string_to_param"}:
        return "; it looks like textual-inversion embeddings: pass it with --embeddings"
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        return "; it looks like the UNet weights of a diffusers folder: pass the model folder instead"
    return ""


def checkpoint_architecture(path: str | os.PathLike) -> str:
    """``"sdxl"``, ``"sd1"`` or ``"sd2"``: the architecture of a single-file checkpoint, read from the
    names of its tensors (the file's header only). A file that is missing, a pickle, damaged, or not
    a whole text-to-image SD/SDXL model (a LoRA, a refiner, an inpainting model, no VAE) is an error
    that names it and says what to do."""
    from dreamguide.lora_files import read_safetensors_header

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle checkpoint ({suffix}); dreamguide loads weights only from safetensors, never "
            "pickle (loading one can run code). Use the .safetensors release of the model, or convert it once "
            "in a trusted environment, e.g. with safetensors.torch.save_file on its state dict"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file; a single-file checkpoint is one .safetensors file")
    if suffix != ".safetensors":
        raise ValueError(f"{path} is a file but not a .safetensors checkpoint; pass a single-file .safetensors "
                         "checkpoint or a diffusers model folder (with model_index.json)")
    keys = set(read_safetensors_header(path, "checkpoint"))
    if not any(k.startswith(_UNET) for k in keys):
        raise ValueError(f"{path} holds no Stable Diffusion UNet (no '{_UNET}*' tensors), so it is not a single-file "
                         f"SD/SDXL checkpoint{_what_else(keys)}")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        architecture = "sdxl"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ValueError(f"{path} is an SDXL refiner (one OpenCLIP text encoder, no first encoder); only "
                         "SDXL base-style models with two text encoders are supported")
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        architecture = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        architecture = "sd1"
    else:
        raise ValueError(f"{path} holds a UNet but no text encoder (no 'cond_stage_model.*' or "
                         "'conditioner.embedders.*' tensors); a single-file checkpoint of a whole model is needed")
    missing = [key for _, key in _TEXT_ENCODERS[architecture] if key not in keys]
    if missing:
        raise ValueError(f"{path}: an {ARCHITECTURES[architecture]} checkpoint without the tensor {missing[0]!r}; "
                         "the file is incomplete or of an unsupported layout")
    if not any(k.startswith(_VAE) for k in keys):
        raise ValueError(f"{path} holds no VAE (no 'first_stage_model.*' tensors); use a checkpoint with its VAE "
                         "baked in")
    if _UNET_CONV_IN in keys:
        channels = _shapes(path, [_UNET_CONV_IN])[_UNET_CONV_IN][1]
        if channels != 4:
            raise ValueError(f"{path}: its UNet takes {channels} input channels (an inpainting or image-editing "
                             "model); dreamguide samples text-to-image models with 4 latent channels")
    return architecture


def _hub_configs(repo_id: str) -> Path:
    """The config files of hub model ``repo_id`` (downloaded, or from the local hub cache when offline)."""
    from huggingface_hub import constants, snapshot_download

    folder = snapshot_download(repo_id, allow_patterns=list(CONFIG_FILES), local_files_only=constants.HF_HUB_OFFLINE)
    return Path(folder)


def config_folder(path: str | os.PathLike, config: str | os.PathLike | None, architecture: str) -> Path:
    """The config folder to read the checkpoint ``path`` with: ``config`` (a local folder, or a hub id
    whose config files are fetched or read from the cache), else the configs of the architecture's
    reference model (:data:`REFERENCE_CONFIGS`). Not available offline is an error naming the file and
    the fix (pass a config folder)."""
    from dreamguide.provenance import is_hub_id

    name = ARCHITECTURES[architecture]
    folder_help = ("pass the folder of a diffusers model of the same architecture with --model-config "
                   "(model.config in a config file): its model_index.json, */config.json, scheduler/ and "
                   "tokenizer*/ files are read, its weight files are not needed")
    if config is None:
        repo_id = REFERENCE_CONFIGS[architecture]
        try:
            folder = _hub_configs(repo_id)
        except Exception as error:  # offline, no network, not in the cache
            raise FileNotFoundError(
                f"{path} is a single-file {name} checkpoint: it holds the weights, but the component configs and "
                f"tokenizers come from a config folder. None was given, and those of {repo_id} are not available "
                f"(not in the local hub cache and the hub cannot be reached: {type(error).__name__}). To load it, "
                f"{folder_help}; or run once with network access, which stores {repo_id}'s config files "
                "(a few MB, no weights) in the hub cache for later offline use"
            ) from error
        if architecture == "sd2":
            warnings.warn(
                f"{path}: an SD 2.x checkpoint does not say whether it predicts v (SD 2.x at 768 px) or epsilon "
                f"(SD 2.x base at 512 px); it is read with the configs of {repo_id} (v-prediction). For a "
                "base model pass --model-config stabilityai/stable-diffusion-2-1-base (or its folder)",
                stacklevel=3,
            )
        return folder
    text = os.fspath(config)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"model config {local} is a file; {folder_help}")
        if not (local / "model_index.json").is_file():
            raise FileNotFoundError(f"model config folder {local} has no model_index.json; {folder_help}")
        return local
    if not is_hub_id(text):
        raise FileNotFoundError(f"model config folder {text} does not exist; {folder_help}")
    try:
        return _hub_configs(text)
    except Exception as error:
        raise FileNotFoundError(
            f"model config {text!r} is not a local folder, and as a hub id its config files are not available "
            f"(not in the local hub cache and the hub cannot be reached: {type(error).__name__}); {folder_help}"
        ) from error


def check_config(path: Path, architecture: str, kind: str, root: Path) -> None:
    """The config folder ``root`` (of model kind ``kind``) fits the checkpoint: the same kind, and the
    text encoders and the UNet's first layer as wide as the file's. A mismatch names both."""
    name = ARCHITECTURES[architecture]
    expected = "sdxl" if architecture == "sdxl" else "sd"
    if kind != expected:
        found = {"sdxl": "an SDXL", "sd": "an SD 1.x/2.x", "pixel": "a pixel-space"}[kind]
        raise ValueError(f"{path} is an {name} checkpoint but the config folder {root} describes {found} model; "
                         f"pass the config folder of an {name} model (e.g. {REFERENCE_CONFIGS[architecture]})")

    def config_value(sub: str, key: str):
        file = root / sub / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"model config folder {root} has no {sub}/config.json, which the {name} "
                                    "checkpoint needs")
        return json.loads(file.read_text(encoding="utf-8")).get(key)

    keys = [key for _, key in _TEXT_ENCODERS[architecture]] + [_UNET_CONV_IN]
    shapes = _shapes(path, keys)
    checks = [(sub, "hidden_size", shapes[key][1], f"its {sub} is") for sub, key in _TEXT_ENCODERS[architecture]]
    checks.append(("unet", "block_out_channels", shapes[_UNET_CONV_IN][0], "its UNet's first block is"))
    for sub, key, width, what in checks:
        configured = config_value(sub, key)
        configured = configured[0] if isinstance(configured, list) else configured
        if configured != width:
            raise ValueError(
                f"{path} does not fit the config folder {root}: {what} {width} wide, {sub}/config.json says "
                f"{configured} ({key}). The config belongs to another model (SD 1.x and SD 2.x look alike); "
                f"pass the config folder of the model this checkpoint was made from")


def check_checkpoint(path: str | os.PathLike, config: str | os.PathLike | None = None) -> Path:
    """All that is checked of a single-file checkpoint before its weights are read (the file, its
    architecture, the config folder and its fit: :func:`checkpoint_architecture`,
    :func:`config_folder`, :func:`check_config`); returns the config folder."""
    from dreamguide.models import detect_kind

    path = Path(path)
    architecture = checkpoint_architecture(path)
    root = config_folder(path, config, architecture)
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else {}
    check_config(path, architecture, detect_kind(index, {p.name for p in root.iterdir() if p.is_dir()}), root)
    return root


def load_weights(path: Path, root: Path, kind: str, dtype: torch.dtype, tokenizers: list, scheduler) -> tuple:
    """(unet, vae, text_encoders) from the checkpoint ``path``, built with the configs in ``root`` by
    diffusers' ``from_single_file`` (the tokenizers and scheduler already loaded are passed in)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    extra: dict = {"tokenizer": tokenizers[0], "scheduler": scheduler, "feature_extractor": None, "image_encoder": None}
    if kind == "sdxl":
        pipeline_class = StableDiffusionXLPipeline
        extra["tokenizer_2"] = tokenizers[1]
    else:
        pipeline_class = StableDiffusionPipeline
        extra.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = pipeline_class.from_single_file(str(path), config=str(root), local_files_only=True, torch_dtype=dtype,
                                               **extra)
    except (ValueError, KeyError, RuntimeError, OSError, SingleFileComponentError) as error:
        raise ValueError(f"{path} cannot be loaded with the config folder {root}: {error}") from error
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    for label, module in (("unet", pipe.unet), ("vae", pipe.vae), *zip(("text_encoder", "text_encoder_2"),
                                                                         text_encoders)):
        unset = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if unset:
            raise ValueError(f"{path} gave no weights for {len(unset)} tensors of the {label} the config folder "
                             f"{root} describes (e.g. {unset[0]}), so they would stay unset; the config may belong "
                             "to another model, or the file may lack part of the model")
    return pipe.unet, pipe.vae, text_encoders
