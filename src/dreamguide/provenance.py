"""Naming models and files in what dreamguide shares, without the local paths they were read from.

A file that leaves the machine (a LoRA or embeddings header, a PNG's text) names its sources as
a Hub id, or, for a local file or folder, by its base name and a SHA-256 of its content, the
hash Civitai and A1111 link resources by:

file (a LoRA, embeddings, a single-file checkpoint)
    the SHA-256 of the whole file (:func:`sha256_file`).
diffusers model folder
    the SHA-256 of its UNet weights file (``unet/diffusion_pytorch_model.safetensors``, else the
    only ``unet/*.safetensors``): the part of the model a fine-tune changes (:func:`model_weights_file`).

A1111 writes short forms of these hashes into an image's infotext (modules/hashes.py,
modules/sd_models.py, extensions-builtin/Lora/network.py, modules/textual_inversion): ``Model hash``
is the first 10 hex digits of the checkpoint's SHA-256 (:func:`short_model_hash`); ``Lora hashes``
the first 12 of the LoRA's "addnet" hash, the SHA-256 of a safetensors file's bytes after its
header (:func:`addnet_hash`), as kohya's ``sshs_model_hash`` header field holds it; ``TI hashes``
the first 12 of the embedding file's SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20
_CACHE: dict[tuple[str, str, int, int], str] = {}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _hash(path: Path, skip_header: bool) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), "addnet" if skip_header else "file", stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            if skip_header:
                length = int.from_bytes(handle.read(8), "little")
                handle.seek(8 + length)
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
        _CACHE[key] = digest.hexdigest()
    return _CACHE[key]


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes; remembered per path, size and modification time."""
    return _hash(Path(path), skip_header=False)


def addnet_hash(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a safetensors file's bytes after its header: the same for the same
    tensors whatever the header says (A1111's ``addnet_hash_safetensors``, kohya's ``sshs_model_hash``)."""
    return _hash(Path(path), skip_header=True)


def addnet_hash_bytes(data: bytes) -> str:
    """:func:`addnet_hash` of a safetensors file held in memory."""
    length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + length :]).hexdigest()


def model_weights_file(folder: str | os.PathLike) -> Path | None:
    """The UNet weights of a diffusers model folder (or of a UNet folder), whose hash stands for
    the model; None if absent."""
    for unet in (Path(folder) / "unet", Path(folder)):
        default = unet / "diffusion_pytorch_model.safetensors"
        if default.is_file():
            return default
        found = sorted(unet.glob("*.safetensors")) if unet.is_dir() else []
        if len(found) == 1:
            return found[0]
    return None


def folder_sha256(folder: str | os.PathLike) -> str:
    """A SHA-256 over the files directly in ``folder`` (e.g. training images and captions): of
    each file's name and SHA-256, in name order; the same for the same files wherever they lie."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as a Hub id (``owner/name``) and names no local file or folder."""
    return bool(_HUB_ID.fullmatch(source)) and not Path(source).exists()


def portable(source: str | os.PathLike | None) -> dict[str, Any]:
    """``{"name": ..., "sha256": ...}`` for a model, LoRA or embeddings source.

    A Hub id is kept as it is (no hash); a local file or folder becomes its base name with the hash
    above (None for a folder without a single UNet weights file); any other text (a description
    such as "training step 5") is kept, and a path that does not exist keeps only its base name.
    """
    if source is None or source == "":
        return {"name": None, "sha256": None}
    text = os.fspath(source)
    if is_hub_id(text):
        return {"name": text, "sha256": None}
    path = Path(text)
    if path.is_file():
        return {"name": path.name, "sha256": sha256_file(path)}
    if path.is_dir():
        weights = model_weights_file(path)
        return {"name": path.resolve().name, "sha256": None if weights is None else sha256_file(weights)}
    if path.is_absolute() or os.sep in text or "/" in text:
        return {"name": path.name, "sha256": None}
    return {"name": text, "sha256": None}


def portable_name(source: str | os.PathLike | None) -> str | None:
    """The name part of :func:`portable`."""
    return portable(source)["name"]


def short_model_hash(sha256: str | None) -> str | None:
    """A1111's ``Model hash``: the first 10 hex digits."""
    return None if sha256 is None else sha256[:10]


def short_network_hash(sha256: str | None) -> str | None:
    """A1111's ``Lora hashes`` / ``TI hashes`` entries: the first 12 hex digits."""
    return None if sha256 is None else sha256[:12]
