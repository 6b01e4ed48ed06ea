"""What a run leaves in ``output.dir``: the LoRA in two layouts, the learned token, their metadata.

``pytorch_lora_weights.safetensors``
    the LoRA in the diffusers layout (:func:`dreamguide.lora_files.save_lora`)
``pytorch_lora_weights_kohya.safetensors``
    the same weights in the Kohya layout for ComfyUI and A1111 (:func:`dreamguide.lora_files.save_kohya_lora`)
``embeddings.safetensors`` (when the token trains)
    the trained token vectors in float32 (:func:`dreamguide.token_files.save_embeddings`)

Every file carries a ``dreamguide`` header: JSON with the token, class word, base model, method,
steps and the run's hyperparameters (:func:`run_metadata`, read back with :func:`read_metadata`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamguide.filenames import EMBEDDINGS_FILE, KOHYA_FILE, LORA_FILE, METADATA_KEY
from dreamguide.lora_files import ADAPTER_NAME, save_kohya_lora, save_lora
from dreamguide.token_files import save_embeddings
from dreamguide.training.config import TrainConfig


@dataclass(frozen=True)
class OutputFiles:
    """The paths of a run's weight files (``embeddings`` is None when no token trains)."""

    lora: Path
    kohya: Path
    embeddings: Path | None

    @classmethod
    def in_folder(cls, output_dir: str | os.PathLike, with_embeddings: bool) -> "OutputFiles":
        output_dir = Path(output_dir)
        return cls(output_dir / LORA_FILE, output_dir / KOHYA_FILE, output_dir / EMBEDDINGS_FILE if with_embeddings else None)


def run_metadata(config: TrainConfig, model, step: int) -> dict[str, Any]:
    """The ``dreamguide`` header of the output files: what was trained, from what, and how."""
    import dreamguide

    return {
        "token": config.data.token,
        "class_word": config.data.class_word,
        "base_model": config.model.pretrained or model.source,
        "model_kind": model.kind,
        "method": config.train.method,
        "steps": step,
        "resolution": config.data.resolution,
        "lora_rank": config.lora.rank,
        "lora_alpha": config.lora.alpha,
        "lr": config.train.lr,
        "ti_lr": config.ti.lr if config.uses_ti else None,
        "dco_beta": config.dco.beta if config.train.method == "dco" else None,
        "dco_average": config.dco.average if config.train.method == "dco" else None,
        "dreamguide_version": dreamguide.__version__,
        "config": config.to_dict(),
    }


def write_outputs(
    files: OutputFiles, model, token_vectors: list[torch.Tensor], metadata: dict[str, Any], token: str
) -> None:
    """Write the adapter ``ADAPTER_NAME`` of ``model.unet`` (diffusers and Kohya layouts) and, when
    ``files.embeddings`` is set, the trained ``token_vectors`` (one per text encoder), each file
    with ``metadata`` as its ``dreamguide`` header."""
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    save_lora(model.unet, files.lora, ADAPTER_NAME, metadata=header)
    save_kohya_lora(model.unet, files.kohya, ADAPTER_NAME, metadata=header)
    if files.embeddings is not None:
        save_embeddings(model, [token], files.embeddings, header, vectors=token_vectors)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dreamguide`` header of an output file, as a dict (empty if absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        header = handle.metadata() or {}
    return json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
