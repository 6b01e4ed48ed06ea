"""Output files: LoRA weights in diffusers and Kohya layouts, textual-inversion embeddings, metadata.

``pytorch_lora_weights.safetensors`` (written by :func:`dreamguide.models.save_lora`)
    diffusers/PEFT keys (``unet.<module>.lora_A.weight``, ``...lora_B.weight``) plus the adapter's
    rank and alpha in the ``lora_adapter_metadata`` header, so ``pipe.load_lora_weights`` and
    :func:`dreamguide.models.load_lora` rebuild the same adapter.
``pytorch_lora_weights_kohya.safetensors``
    the same weights in the Kohya layout read by ComfyUI and A1111: ``lora_unet_<module with _>``
    + ``.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha`` (a scalar).
``embeddings.safetensors`` (textual inversion, float32, the layout of :func:`dreamguide.models.save_embeddings`)
    SDXL: ``clip_l`` and ``clip_g``, each [n_tokens, width]; SD 1.x and pixel models: one
    ``emb_params`` tensor; both layouts load with diffusers' ``load_textual_inversion``.

Every file carries a ``dreamguide`` header: JSON with the token, class word, base model, method,
steps and the run's hyperparameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dreamguide.atomic import save_safetensors

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
METADATA_KEY = "dreamguide"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dreamguide`` header of an output file, as a dict (empty if absent)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        header = handle.metadata() or {}
    return json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_parameters(unet: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters under their diffusers keys (``unet.<module>.lora_A.weight``)."""
    marker = f".{adapter_name}."
    params = {}
    for name, param in unet.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and marker in name:
            params["unet." + name.replace(marker, ".")] = param
    if not params:
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    return params


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers LoRA keys -> Kohya keys: ``lora_unet_<module, dots as _>.lora_down/lora_up/alpha``."""
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.startswith("unet.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"unexpected LoRA key {key!r}; expected unet.<module>.lora_A/lora_B.weight")
        module, part = key[len("unet.") :].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return kohya


def from_kohya(kohya: dict[str, torch.Tensor], module_names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Kohya keys -> (diffusers state dict, alpha per module). ``module_names`` are the UNet's module
    names (``unet.named_modules()``): they resolve which underscores were dots."""
    lookup = {"lora_unet_" + name.replace(".", "_"): name for name in module_names}
    state_dict, alphas = {}, {}
    for key, tensor in kohya.items():
        name, rest = key.split(".", 1)
        if name not in lookup:
            raise ValueError(f"Kohya key {key!r} names no module of this UNet")
        module = lookup[name]
        if rest == "alpha":
            alphas[module] = float(tensor)
        elif rest == "lora_down.weight":
            state_dict[f"unet.{module}.lora_A.weight"] = tensor
        elif rest == "lora_up.weight":
            state_dict[f"unet.{module}.lora_B.weight"] = tensor
        else:
            raise ValueError(f"unexpected Kohya key {key!r}; expected lora_down.weight, lora_up.weight or alpha")
    return state_dict, alphas


def save_kohya(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, rank: int, alpha: float, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the Kohya-layout copy, with the ``ss_`` header fields Kohya tools show."""
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    if metadata is not None:
        header[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    return save_safetensors(to_kohya(state_dict, alpha), path, header)


def save_embeddings(
    kind: str, token: str, vectors: list[torch.Tensor], path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the trained token vectors in float32, in the layout of :func:`dreamguide.models.save_embeddings`
    (SDXL ``clip_l``/``clip_g``, otherwise ``emb_params``; token strings in the ``tokens`` header)."""
    from dreamguide.models import SD_EMBEDDING_KEY, SDXL_EMBEDDING_KEYS

    keys = SDXL_EMBEDDING_KEYS if kind == "sdxl" else (SD_EMBEDDING_KEY,)
    if len(keys) != len(vectors):
        raise ValueError(f"a {kind!r} model has {len(keys)} text encoder(s), got vectors for {len(vectors)}")
    header = {"tokens": json.dumps([token]), "model_kind": kind}
    if metadata is not None:
        header[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    return save_safetensors({k: v.detach().float() for k, v in zip(keys, vectors)}, path, header)
