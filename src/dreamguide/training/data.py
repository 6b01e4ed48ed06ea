"""Training data: a folder of images with same-name ``.txt`` captions, checked before any training.

Every image is decoded, EXIF-rotated, converted to RGB (grayscale, palette, RGBA on white,
CMYK, 16-bit), resized so its shorter side is the training size (aspect preserved) and cropped
to a square. Every instance caption must contain the token; its base caption has the token
replaced by the class word (:func:`dreamguide.prompts.base_prompt`). Anything wrong raises a
:class:`DataError` that names the file and the fix, before a single step runs.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamguide.filenames import IMAGE_SUFFIXES
from dreamguide.images import ImageReadError, image_files
from dreamguide.images import open_rgb as _open_rgb
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
    files = image_files(folder)
    if not files:
        raise DataError(
            f"{what} image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); "
            f"add the subject's photos or point data.{what}_dir at the right folder"
        )
    return files


class CaptionWarning(UserWarning):
    """Caption files in a data folder that no image uses (named, with the likely fix)."""


def check_caption_files(folder: str | Path, image_files: list[Path], what: str = "instance") -> None:
    """Caption files an image would not use are listed in a :class:`CaptionWarning` (orphans: a
    name that differs from an image's only by case, a double suffix such as ``b.jpg.txt``, no
    image at all); one caption file that several images would share (``a.png`` + ``a.jpg`` +
    ``a.txt``) is a :class:`DataError`."""
    folder = Path(folder)
    by_caption: dict[Path, list[Path]] = {}
    for path in image_files:
        by_caption.setdefault(path.with_suffix(".txt"), []).append(path)
    for caption, owners in by_caption.items():
        if len(owners) > 1 and caption.is_file():
            names = ", ".join(p.name for p in owners)
            raise DataError(
                f"caption file {caption} would caption {len(owners)} images ({names}); it is ambiguous: "
                f"rename the images so each has its own caption file, or remove all but one"
            )
    stems = {p.stem.lower(): p for p in image_files}
    names = {p.name.lower(): p for p in image_files}
    orphans = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".txt" or path in by_caption:
            continue
        stem = path.name[: -len(path.suffix)]
        if stem.lower() in names:
            image = names[stem.lower()]
            hint = f"a double suffix: rename it to {image.with_suffix('.txt').name} to caption {image.name}"
        elif stem.lower() in stems:
            image = stems[stem.lower()]
            hint = f"differs from {image.name} in case only: rename it to {image.with_suffix('.txt').name}"
        else:
            hint = "no image has this name"
        orphans.append(f"{path.name} ({hint})")
    if orphans:
        warnings.warn(
            f"{len(orphans)} caption file(s) in the {what} folder {folder} are not used by any image "
            f"(those images use data.{what}_prompt):\n  " + "\n  ".join(orphans),
            CaptionWarning,
            stacklevel=3,
        )


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
    files = list_images(folder, "instance")
    check_caption_files(folder, files, "instance")
    for path in files:
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
    files = list_images(folder, "class")
    check_caption_files(folder, files, "class")
    for path in files:
        caption = read_caption(path, template, "", class_word)
        entries.append(CaptionedFile(path, caption, caption))
    return entries


def open_training_image(path: Path) -> Image.Image:
    """Decode ``path`` as 8-bit RGB (:func:`dreamguide.images.open_rgb`); a :class:`DataError` if it cannot be read."""
    try:
        return _open_rgb(path)
    except ImageReadError as error:
        raise DataError(str(error)) from None


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
        image = open_training_image(entry.path)
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
        open_training_image(entry.path)


def check_caption_lengths(model, instance: list[CaptionedFile], classes: list[CaptionedFile], token: str,
                          class_word: str) -> None:
    """Every caption checked against ``model``'s tokenizers: a token caption whose token, or a base
    caption whose class word, lies past the limit is a :class:`DataError` naming the image."""
    from dreamguide.models import PromptTooLongError, check_prompt_length

    seen: set[tuple] = set()
    for entries, needed in ((instance, (token,)), (classes, (class_word,))):
        for entry in entries:
            for text, parts, what in ((entry.token_caption, needed, "caption"),
                                      (entry.base_caption, (class_word,), "base caption")):
                if (text, parts) in seen:
                    continue
                seen.add((text, parts))
                try:
                    check_prompt_length(model, text, parts, f"{what} of {entry.path}")
                except PromptTooLongError as error:
                    raise DataError(str(error)) from None
