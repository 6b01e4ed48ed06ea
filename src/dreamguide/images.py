"""Reading images for every command, and writing sampled images: PNGs that carry their settings,
labelled comparison grids, JSON records.

Reading (:func:`open_rgb`, :func:`read_images`): every command that reads photos (training
data, ``eval``'s images and references, DreamBench references) decodes them here, so every
mode and bit depth converts the same way to 8-bit RGB; a file that cannot be read is named.

Every PNG gets two text chunks:

* ``dreamguide``: the sampling settings as JSON (prompt, base prompt, negative prompt, mode,
  weights, parallel-rescaling switches, seed, steps, scheduler, model, adapter, size), read
  back with :func:`read_png_metadata`;
* ``parameters``: the same settings as one A1111-style text block ("infotext"), which common
  image viewers, web UIs and Civitai read: ``Sampler`` is the scheduler's class, ``Model hash``,
  ``Lora hashes`` and ``TI hashes`` the short hashes A1111 writes (see :mod:`dreamguide.provenance`).

Sources are named without local paths: a Hub id, or a file or folder's base name with its
SHA-256 (``model_sha256``, ``lora_sha256``, ...).

All writes are atomic: the file is written beside its target under a temporary name and then
moved into place, so a crash never leaves a half-written image or record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from dreamguide.atomic import atomic_open  # noqa: F401 (part of this module's API)
from dreamguide.filenames import IMAGE_SUFFIXES, METADATA_KEY

PARAMETERS_KEY = "parameters"


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def _to_8bit(image: Image.Image, path: Path) -> Image.Image:
    """A single-channel image of more than 8 bits as 8-bit ``L``, by its range rather than clipped.

    16-bit modes (and ``I`` read from a PNG, which holds at most 16 bits) are scaled by 255/65535;
    ``F`` in [0, 1] by 255; other ``I``/``F`` values above 255 are taken as 16-bit.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and path.suffix.lower() == ".png"):
        values = values / 257.0
    elif image.mode == "F" and np.nanmax(values, initial=0.0) <= 1.0:
        values = values * 255.0
    elif np.nanmax(values, initial=0.0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8), mode="L")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully, apply its EXIF orientation and convert it to 8-bit RGB.

    Palette, grayscale, 16- and 32-bit grayscale, float, CMYK and YCbCr images convert by their
    value range; transparency (``RGBA``, ``LA``, ``PA``, palette transparency) is laid on white.
    A file that cannot be decoded raises :class:`ImageReadError` naming it.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}; replace or delete the file") from None
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image, path)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files in ``folder`` (by suffix, :data:`dreamguide.filenames.IMAGE_SUFFIXES`), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_images(
    paths: Sequence[str | os.PathLike], skip_unreadable: bool = False
) -> tuple[list[Image.Image], list[Path], list[tuple[Path, str]]]:
    """(RGB images, their paths, unreadable files with the reason) for ``paths``.

    A file that cannot be decoded raises :class:`ImageReadError` naming every such file, or with
    ``skip_unreadable`` is left out and listed in the third element.
    """
    images, kept, skipped = [], [], []
    for path in map(Path, paths):
        try:
            images.append(open_rgb(path))
            kept.append(path)
        except ImageReadError as error:
            skipped.append((path, str(error)))
    if skipped and not skip_unreadable:
        listed = "\n  ".join(str(path) for path, _ in skipped)
        raise ImageReadError(
            f"{len(skipped)} image file(s) cannot be read:\n  {listed}\n{skipped[0][1]}"
            + ("" if len(skipped) == 1 else f" (and {len(skipped) - 1} more)")
        )
    return images, kept, skipped


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    return Path(path)


def a1111_parameters(metadata: dict) -> str:
    """The settings as an A1111-style ``parameters`` block: prompt, negative prompt, ``key: value`` line."""
    hashes = metadata.get("hashes") or {}

    def listed(entries: dict | None) -> str | None:
        return ", ".join(f"{name}: {value}" for name, value in entries.items()) if entries else None

    fields = {
        "Steps": metadata.get("steps"),
        "Sampler": metadata.get("scheduler_class") or metadata.get("scheduler"),
        "CFG scale": metadata.get("w_text"),
        "Seed": metadata.get("seed"),
        "Size": f"{metadata['width']}x{metadata['height']}" if "width" in metadata else None,
        "Model hash": hashes.get("model"),
        "Model": metadata.get("model"),
        "Guidance": metadata.get("mode"),
        "Consistency scale": metadata.get("w_cons"),
        "Base prompt": metadata.get("base_prompt"),
        "Token": metadata.get("token"),
        "LoRA": metadata.get("lora"),
        "Embeddings": metadata.get("embeddings"),
        "Personalized UNet": metadata.get("personalized_unet"),
        "Lora hashes": listed(hashes.get("lora")),
        "TI hashes": listed(hashes.get("ti")),
        "Grid modes": ", ".join(metadata["grid_modes"]) if metadata.get("grid_modes") else None,
        "Grid seeds": ", ".join(map(str, metadata["grid_seeds"])) if metadata.get("grid_seeds") else None,
    }
    pr = metadata.get("pr") or {}
    if metadata.get("mode") == "parallel-rescaled":
        fields.update(
            {
                "PR granularity": pr.get("granularity"),
                "PR normalization": pr.get("normalization"),
                "PR rescale": pr.get("rescale"),
                "PR eps": pr.get("eps"),
            }
        )

    def show(value: object) -> str:
        text = str(value)
        return json.dumps(text) if any(c in text for c in ',:"\n') else text

    settings = ", ".join(f"{key}: {show(value)}" for key, value in fields.items() if value not in (None, ""))
    lines = [metadata.get("prompt", "")]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    lines.append(settings)
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Save ``image`` as PNG with ``metadata`` in a ``dreamguide`` JSON chunk and A1111 ``parameters``."""
    info = PngInfo()
    if metadata is not None:
        info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
        info.add_text(PARAMETERS_KEY, a1111_parameters(metadata))
    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return Path(path)


def read_png_metadata(path: str | os.PathLike) -> dict:
    """The ``dreamguide`` settings stored in a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
    if METADATA_KEY not in text:
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata chunk; it was not written by dreamguide")
    return json.loads(text[METADATA_KEY])


def read_png_parameters(path: str | os.PathLike) -> str:
    """The A1111-style ``parameters`` text of a PNG (empty if absent)."""
    with Image.open(path) as image:
        return (getattr(image, "text", {}) or {}).get(PARAMETERS_KEY, "")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    column_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    padding: int = 4,
) -> Image.Image:
    """Lay images out in a labelled grid (``rows[r][c]``); labels are drawn with Pillow's default font.

    Columns are at least as wide as their label, images are centred in their cell, and the
    labels sit in a header row (columns) and a left margin (rows).
    """
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    n_cols = len(rows[0])
    if any(len(row) != n_cols for row in rows):
        raise ValueError(f"every grid row needs {n_cols} images, got rows of {[len(r) for r in rows]}")
    if column_labels and len(column_labels) != n_cols:
        raise ValueError(f"{len(column_labels)} column labels for {n_cols} columns")
    if row_labels and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    font = _font(max(12, min(32, cell_h // 20)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    col_w = max([cell_w, *(text_size(t)[0] for t in column_labels)]) + padding
    header_h = (max(text_size(t)[1] for t in column_labels) + 2 * padding) if column_labels else 0
    margin_w = (max(text_size(t)[0] for t in row_labels) + 2 * padding) if row_labels else 0
    row_h = cell_h + padding
    grid = Image.new("RGB", (margin_w + n_cols * col_w + padding, header_h + len(rows) * row_h + padding), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        w, _ = text_size(label)
        left = margin_w + c * col_w + padding + (col_w - padding - w) // 2
        draw.text((left, padding), label, fill="black", font=font)
    for r, row in enumerate(rows):
        top = header_h + r * row_h + padding
        if row_labels:
            _, h = text_size(row_labels[r])
            draw.text((padding, top + (cell_h - h) // 2), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            left = margin_w + c * col_w + padding + (col_w - padding - image.width) // 2
            grid.paste(image.convert("RGB"), (left, top + (cell_h - image.height) // 2))
    return grid
