"""Training data: a folder of images with same-name ``.txt`` captions, checked before any training.

Every image is decoded, EXIF-rotated, converted to RGB (grayscale, palette, RGBA on white,
CMYK, 16-bit), resized so its shorter side is the training size (aspect preserved) and cropped
to a square. Every instance caption must contain the token; its base caption has the token
replaced by the class word (:func:`dreamguide.prompts.base_prompt`). Anything wrong raises a
:class:`DataError` that names the file and the fix, before a single step runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dreamguide.filenames import IMAGE_SUFFIXES
from dreamguide.prompts import base_prompt, contains_token
#: Images whose shorter side is below this fraction of the training size need ``allow_upscale``.
MIN_SIZE_FRACTION = 0.5


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the fix."""


@dataclass
class TrainImage:
    """One prepared training image."""

    path: Path
    #: [3, size, size] float32 in [-1, 1].
    pixels: torch.Tensor
    #: Caption the personalized model trains on ("a photo of <sks> dog").
    token_caption: str
    #: The same caption with the token replaced by the class word ("a photo of dog").
    base_caption: str
    #: (height, width) of the image after EXIF rotation, before resizing (SDXL's size conditioning).
    original_size: tuple[int, int]
    #: (top, left) of the crop in the resized image (SDXL's crop conditioning).
    crop_top_left: tuple[int, int]


@dataclass
class CaptionedFile:
    path: Path
    token_caption: str
    base_caption: str


def list_images(folder: str | Path, what: str = "instance") -> list[Path]:
    """Image files in ``folder`` (sorted by name); an error if the folder is missing or has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} image folder {folder} does not exist; set data.{what}_dir to a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"{what} image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); "
            f"add the subject's photos or point data.{what}_dir at the right folder"
        )
    return files


def read_caption(image_path: Path, template: str, token: str, class_word: str) -> str:
    """The image's .txt caption, or ``template`` with ``{token}``/``{class_word}`` filled in."""
    caption_path = image_path.with_suffix(".txt")
    if caption_path.is_file():
        caption = " ".join(caption_path.read_text(encoding="utf-8").split())
        if not caption:
            raise DataError(
                f"caption file {caption_path} is empty; write a caption that contains {token!r} "
                f"or delete the file to use data.instance_prompt"
            )
        return caption
    return template.replace("{token}", token).replace("{class_word}", class_word)


def scan_instance_folder(folder: str | Path, token: str, class_word: str, template: str) -> list[CaptionedFile]:
    """Captions of every subject image, each checked to contain ``token``; base captions derived."""
    entries = []
    for path in list_images(folder, "instance"):
        caption = read_caption(path, template, token, class_word)
        if not contains_token(caption, token):
            source = path.with_suffix(".txt") if path.with_suffix(".txt").is_file() else "data.instance_prompt"
            raise DataError(
                f"caption of {path} ({source}) does not contain the token {token!r}: {caption!r}; "
                f"write the token into the caption, e.g. 'a photo of {token} {class_word}'"
            )
        entries.append(CaptionedFile(path, caption, base_prompt(caption, token, class_word)))
    return entries


def scan_class_folder(folder: str | Path, class_word: str, template: str) -> list[CaptionedFile]:
    """Captions of the class images used for prior preservation (no token in them)."""
    entries = []
    for path in list_images(folder, "class"):
        caption = read_caption(path, template, "", class_word)
        entries.append(CaptionedFile(path, caption, caption))
    return entries


def open_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully, apply EXIF orientation, convert to 8-bit RGB (transparency on white)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}; replace or delete the file") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resize_and_crop(
    image: Image.Image, size: int, center: bool = True, rng: random.Random | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the shorter side is ``size`` (aspect kept), crop a ``size`` square; return it and (top, left)."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    image = image.resize((new_w, new_h), resample=resample)
    if center:
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        rng = rng or random.Random(0)
        top, left = rng.randint(0, new_h - size), rng.randint(0, new_w - size)
    return image.crop((left, top, left + size, top + size)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def load_images(
    entries: list[CaptionedFile], size: int, center_crop: bool = True, allow_upscale: bool = False, seed: int = 0
) -> list[TrainImage]:
    """Decode, check and prepare every image; a too-small image is an error unless ``allow_upscale``."""
    rng = random.Random(seed)
    images = []
    for entry in entries:
        image = open_rgb(entry.path)
        width, height = image.size
        if min(width, height) < MIN_SIZE_FRACTION * size and not allow_upscale:
            raise DataError(
                f"image {entry.path} is {width}x{height}, far smaller than the training size {size}; "
                f"use a larger photo, lower data.resolution, or set data.allow_upscale = true (--allow-upscale)"
            )
        cropped, top_left = resize_and_crop(image, size, center_crop, rng)
        images.append(
            TrainImage(entry.path, to_tensor(cropped), entry.token_caption, entry.base_caption, (height, width), top_left)
        )
    return images


def check_images_readable(entries: list[CaptionedFile]) -> None:
    """Decode every file once so a corrupt image is reported before the model is loaded."""
    for entry in entries:
        open_rgb(entry.path)
