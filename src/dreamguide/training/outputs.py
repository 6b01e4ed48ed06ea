"""What a run leaves in ``output.dir``: the LoRA in two layouts, the learned token, their metadata.

``pytorch_lora_weights.safetensors``
    the LoRA in the diffusers layout (:func:`dreamguide.lora_files.save_lora`)
``<name>.safetensors``
    the same weights in the Kohya layout for ComfyUI and A1111 (:func:`dreamguide.lora_files.save_kohya_lora`),
    with kohya's training fields and the SAI model spec in its header (:func:`kohya_metadata`)
``embeddings.safetensors`` and ``<name>_emb.safetensors`` (when the token trains)
    the trained token vectors in float32 (:func:`dreamguide.token_files.save_embeddings`): the
    first for dreamguide and diffusers, the second, the same file, to share

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

from dreamguide.filenames import EMBEDDINGS_FILE, LORA_FILE, METADATA_KEY, kohya_file, shared_embeddings_file
from dreamguide.lora_files import ADAPTER_NAME, save_kohya_lora, save_lora
from dreamguide.token_files import save_embeddings
from dreamguide.training.config import TrainConfig


@dataclass(frozen=True)
class OutputFiles:
    """The paths of a run's weight files (the embeddings are None when no token trains)."""

    lora: Path
    kohya: Path
    embeddings: Path | None
    shared_embeddings: Path | None = None

    @classmethod
    def in_folder(cls, output_dir: str | os.PathLike, with_embeddings: bool, name: str) -> "OutputFiles":
        """The files of the run called ``name`` (:attr:`TrainConfig.run_name`) in ``output_dir``."""
        output_dir = Path(output_dir)
        if not with_embeddings:
            return cls(output_dir / LORA_FILE, output_dir / kohya_file(name), None, None)
        embeddings, shared = output_dir / EMBEDDINGS_FILE, output_dir / shared_embeddings_file(name)
        return cls(output_dir / LORA_FILE, output_dir / kohya_file(name), embeddings, shared)


def run_metadata(config: TrainConfig, model, step: int) -> dict[str, Any]:
    """The ``dreamguide`` header of the output files: what was trained, from what, and how.

    It travels with the files, so it holds no local paths: the base model is its Hub id or its
    folder's name with the SHA-256 of its UNet weights, the image folders and ``output.dir`` their
    names (the instance images with a SHA-256 over them), see :mod:`dreamguide.provenance`.
    """
    import dreamguide
    from dreamguide.provenance import folder_sha256, portable, portable_name

    base = portable(config.model.pretrained or model.source)
    shared = config.to_dict()
    shared["model"]["pretrained"] = portable_name(config.model.pretrained) or ""
    shared["model"]["config"] = portable_name(config.model.config) or ""
    for section, key in (("data", "instance_dir"), ("data", "class_dir"), ("output", "dir")):
        shared[section][key] = portable_name(shared[section][key]) or ""
    instance_dir = Path(config.data.instance_dir)
    return {
        "name": config.run_name,
        "token": config.data.token,
        "class_word": config.data.class_word,
        "base_model": base["name"],
        "base_model_sha256": base["sha256"],
        "instance_data_sha256": folder_sha256(instance_dir) if instance_dir.is_dir() else None,
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
        "config": shared,
    }


def model_version(model) -> tuple[str, str]:
    """(kohya's ``ss_base_model_version``, the SAI model spec architecture) of ``model``.

    SDXL is ``sdxl_base_v1-0`` / ``stable-diffusion-xl-v1-base``; an SD model whose UNet attends
    to 1024-wide text (OpenCLIP ViT-H) is SD 2.x, ``sd_v2`` / ``stable-diffusion-v2-512`` (``-768-v``
    when it predicts v); any other SD model is SD 1.x, ``sd_v1`` / ``stable-diffusion-v1``. The
    pixel models of the toy world have no kohya name: ``dreamguide_pixel`` / ``dreamguide-pixel``.
    """
    if model.kind == "sdxl":
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
    if model.kind == "sd":
        if model.unet.config.cross_attention_dim == 1024:
            v_prediction = model.scheduler.config.get("prediction_type") == "v_prediction"
            return "sd_v2", "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        return "sd_v1", "stable-diffusion-v1"
    return "dreamguide_pixel", "dreamguide-pixel"


def tag_frequency(config: TrainConfig) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: {instance folder's name: {tag: number of captions with it}},
    a caption's tags being its comma-separated parts, stripped."""
    from dreamguide.training.data import scan_instance_folder

    d = config.data
    counts: dict[str, int] = {}
    for entry in scan_instance_folder(d.instance_dir, d.token, d.class_word, d.instance_prompt):
        for tag in {part.strip() for part in entry.token_caption.split(",")} - {""}:
            counts[tag] = counts.get(tag, 0) + 1
    return {Path(d.instance_dir).name: dict(sorted(counts.items()))}


def kohya_metadata(config: TrainConfig, model, step: int, name: str, when: float | None = None) -> dict[str, str]:
    """The training fields kohya sd-scripts writes into a LoRA's header and A1111 / Civitai read
    (``ss_*``), and the SAI model spec fields (``modelspec.*``); all values are strings.

    ``name`` is the run's name (``ss_output_name``, ``modelspec.title``); ``when`` the Unix time of
    the run's end (now when None), written as ``modelspec.date`` and ``ss_training_finished_at``.
    """
    import datetime
    import time

    from dreamguide.provenance import portable_name

    when = time.time() if when is None else when
    version, architecture = model_version(model)
    size = config.data.resolution or model.default_size
    resolution = f"({size}, {size})"
    return {
        "ss_base_model_version": version,
        "ss_sd_model_name": portable_name(config.model.pretrained or model.source) or "",
        "ss_v2": str(version == "sd_v2"),
        "ss_output_name": name,
        "ss_training_comment": f"trigger: {config.data.token}",
        "ss_resolution": resolution,
        "ss_max_train_steps": str(config.train.steps),
        "ss_steps": str(step),
        "ss_learning_rate": str(config.train.lr),
        "ss_seed": str(config.train.seed),
        "ss_tag_frequency": json.dumps(tag_frequency(config), sort_keys=True),
        "ss_training_finished_at": str(int(when)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.trigger_phrase": config.data.token,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(when), datetime.timezone.utc).isoformat(),
    }


def write_outputs(
    files: OutputFiles,
    model,
    token_vectors: list[torch.Tensor],
    metadata: dict[str, Any],
    token: str,
    kohya: dict[str, str] | None = None,
) -> None:
    """Write the adapter ``ADAPTER_NAME`` of ``model.unet`` (diffusers and Kohya layouts) and, when
    ``files.embeddings`` is set, the trained ``token_vectors`` (one per text encoder), each file
    with ``metadata`` as its ``dreamguide`` header; the Kohya file also gets the ``kohya`` fields
    (:func:`kohya_metadata`)."""
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    save_lora(model.unet, files.lora, ADAPTER_NAME, metadata=header)
    save_kohya_lora(model.unet, files.kohya, ADAPTER_NAME, metadata={**(kohya or {}), **header})
    for path in (files.embeddings, files.shared_embeddings):
        if path is not None:
            save_embeddings(model, [token], path, header, vectors=token_vectors)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dreamguide`` header of an output file, as a dict (empty if absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        header = handle.metadata() or {}
    return json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
