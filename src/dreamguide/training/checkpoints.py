"""Checkpoints: ``checkpoint-<step>/`` folders that a run resumes from exactly.

A checkpoint holds the trainable state and everything that decides the next steps:

    adapter.safetensors      LoRA weights (float32, diffusers keys)
    embeddings.safetensors   trained token vectors and their initial norms (pivotal tuning only)
    optimizer.pt             optimizer state (tensors only; read with ``weights_only=True``)
    lr_scheduler.pt          learning-rate scheduler state
    grad_scaler.pt           fp16 loss-scaler state (fp16 runs only)
    rng.safetensors          torch CPU (and CUDA) generator states
    state.json               step, Python and NumPy generator states; written last

The folder is written under a hidden temporary name and renamed into place, so a run killed
while saving never leaves a partial ``checkpoint-<step>`` that ``--resume latest`` would pick.
Batch order, noise and timesteps of step s are drawn from generators seeded by (seed, s), so
the restored generator states matter only to code outside the training step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dreamguide.atomic import atomic_directory

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"
#: Name prefix of pruned checkpoints between their rename and their deletion.
TRASH_PREFIX = ".trash-"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as (step, path), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match[1]), path))
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from (a file missing, empty or unreadable), or None."""
    from safetensors import safe_open

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{STATE_FILE} is unreadable ({error})"
    for name in ("adapter.safetensors", "rng.safetensors"):
        try:
            with safe_open(str(path / name), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error types for torn files
            return f"{name} is unreadable ({error})"
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            return f"{name} is missing or empty"
    return None


def resolve_checkpoint(output_dir: str | os.PathLike, resume: str) -> Path:
    """``"latest"`` -> the newest readable checkpoint in ``output_dir`` (a damaged newer one is skipped
    with a warning naming what is wrong); otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume latest: {output_dir} has no checkpoint-<step>/ folder; start without --resume"
            )
        for _, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            warnings.warn(f"--resume latest: skipping {path}: {problem}; trying the previous checkpoint",
                          stacklevel=2)
        raise FileNotFoundError(f"--resume latest: no checkpoint in {output_dir} is readable; start without --resume")
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); pass 'latest' or a checkpoint-<step>/ path")
    return path


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, values, gauss = plain["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    embeddings: dict[str, torch.Tensor] | None = None,
    scaler_state: dict | None = None,
    keep: int = 3,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>/`` atomically, then delete all but the newest ``keep`` checkpoints."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    with atomic_directory(final) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in adapter.items()}, tmp / "adapter.safetensors")
        if embeddings:
            save_file({k: v.detach().cpu().contiguous() for k, v in embeddings.items()}, tmp / "embeddings.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "lr_scheduler.pt")
        if scaler_state is not None:
            torch.save(scaler_state, tmp / "grad_scaler.pt")
        rng_tensors, rng_plain = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {"step": step, "rng": rng_plain, **(extra or {})}
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
    for _, old in list_checkpoints(output_dir)[:-keep]:
        # Renamed first (one atomic step), deleted after: a kill mid-delete leaves a trash folder,
        # never a half-deleted checkpoint that looks complete.
        trash = old.with_name(f"{TRASH_PREFIX}{old.name}-{os.getpid()}")
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    for leftover in output_dir.glob(f"{TRASH_PREFIX}*"):  # from a run killed while pruning
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint folder into a dict (step, adapter, embeddings, optimizer, lr_scheduler, grad_scaler)
    and restore the global generator states."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    result: dict[str, Any] = {
        "step": int(state["step"]),
        "state": state,
        "adapter": load_file(str(path / "adapter.safetensors")),
        "embeddings": load_file(str(path / "embeddings.safetensors")) if (path / "embeddings.safetensors").is_file() else None,
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "lr_scheduler": torch.load(path / "lr_scheduler.pt", weights_only=True, map_location="cpu"),
        "grad_scaler": torch.load(path / "grad_scaler.pt", weights_only=True) if (path / "grad_scaler.pt").is_file() else None,
    }
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return result
