"""The DreamBench dataset (DreamBooth, Ruiz et al. 2023): subjects, reference photos, prompts.

A DreamBench folder holds one sub-folder of photos per subject and ``prompts_and_classes.txt``
with the subject -> class table and two lists of 25 prompts, one for objects and one for
live subjects (DreamBooth treats the cat and dog subjects as live). Prompts are stored here as
templates whose ``{}`` stands for "<token> <class word>", the same form as SPEC's stylized set.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dreamguide.filenames import IMAGE_SUFFIXES

PROMPT_FILE = "prompts_and_classes.txt"
#: DreamBooth's live subjects are its animals; every other subject uses the object prompts.
LIVE_CLASSES = frozenset({"cat", "dog"})

#: SPEC section 5: the stylized prompt set ({} is "<token> <class word>").
STYLIZED_PROMPTS: tuple[str, ...] = (
    "a watercolor painting of {}",
    "a pencil sketch of {}",
    "{} in pixel art style",
    "an oil painting of {} in the style of van gogh",
    "{} as a 3d render",
    "a stained glass window depicting {}",
    "{} in origami style",
    "a cartoon illustration of {}",
    "{} made of lego bricks",
    "a mosaic of {}",
    "{} in ukiyo-e style",
    "a neon sign of {}",
    "{} as a marble statue",
    "a comic book panel of {}",
    "{} in the style of a children's book illustration",
)
PromptSetName = Literal["dreambench", "stylized"]
DREAMBENCH_PROMPT_SETS: tuple[str, ...] = typing.get_args(PromptSetName)


@dataclass(frozen=True)
class DreamBenchSubject:
    """One DreamBench subject: its name, class word, reference photos and prompt list."""

    name: str
    class_word: str
    live: bool
    images: tuple[Path, ...]


@dataclass(frozen=True)
class DreamBench:
    root: Path
    subjects: dict[str, DreamBenchSubject]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def prompts(self, subject: str, prompt_set: str) -> tuple[str, ...]:
        """The prompt templates of ``prompt_set`` ("dreambench" or "stylized") for ``subject``."""
        if prompt_set == "stylized":
            return STYLIZED_PROMPTS
        if prompt_set == "dreambench":
            return self.live_prompts if self.subjects[subject].live else self.object_prompts
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose from {', '.join(DREAMBENCH_PROMPT_SETS)}")


_TEMPLATE = re.compile(r"""^'(?P<text>[^']*)'\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?$""")


def _parse_prompt_list(lines: list[str], start: int, path: Path, heading: str) -> tuple[str, ...]:
    prompts = []
    for line in lines[start:]:
        line = line.strip()
        if line.startswith("prompt_list"):
            continue
        if line == "]":
            break
        if not line:
            continue
        match = _TEMPLATE.match(line)
        if not match:
            raise ValueError(f"{path}: cannot read prompt line {line!r} under {heading!r}")
        text = match["text"]
        if "{0} {1}" not in text:
            raise ValueError(f"{path}: prompt {text!r} under {heading!r} has no '{{0}} {{1}}' (token, class)")
        prompts.append(text.replace("{0} {1}", "{}"))
    if not prompts:
        raise ValueError(f"{path}: no prompts found under {heading!r}")
    return tuple(prompts)


def parse_prompts_and_classes(path: str | Path) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """Read ``prompts_and_classes.txt``: (subject -> class word, object prompts, live prompts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"DreamBench prompt file {path} is missing; the DreamBench folder must contain {PROMPT_FILE} "
            f"(from the DreamBooth dataset)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    classes: dict[str, str] = {}
    try:
        header = next(i for i, line in enumerate(lines) if line.strip() == "subject_name,class")
    except StopIteration:
        raise ValueError(f"{path}: no 'subject_name,class' table") from None
    for line in lines[header + 1 :]:
        line = line.strip()
        if not line:
            if classes:
                break
            continue
        if "," not in line:
            break
        name, class_word = (part.strip() for part in line.split(",", 1))
        classes[name] = class_word
    sections = {}
    for heading in ("Object Prompts", "Live Subject Prompts"):
        try:
            index = next(i for i, line in enumerate(lines) if line.strip() == heading)
        except StopIteration:
            raise ValueError(f"{path}: no {heading!r} section") from None
        sections[heading] = _parse_prompt_list(lines, index + 1, path, heading)
    return classes, sections["Object Prompts"], sections["Live Subject Prompts"]


def load_dreambench(root: str | Path, subjects: list[str] | tuple[str, ...] | None = None) -> DreamBench:
    """Read a DreamBench folder; ``subjects`` (default: all in the class table) must each have photos."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"DreamBench folder {root} does not exist; pass the folder that holds {PROMPT_FILE}")
    classes, object_prompts, live_prompts = parse_prompts_and_classes(root / PROMPT_FILE)
    chosen = list(classes) if not subjects else list(subjects)
    unknown = [s for s in chosen if s not in classes]
    if unknown:
        raise ValueError(f"subject(s) {unknown} are not in {root / PROMPT_FILE}; known: {', '.join(classes)}")
    from dreamguide.images import image_files

    table = {}
    for name in chosen:
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"DreamBench subject {name!r}: folder {folder} is missing")
        images = tuple(image_files(folder))
        if not images:
            raise FileNotFoundError(f"DreamBench subject {name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        table[name] = DreamBenchSubject(name, classes[name], classes[name] in LIVE_CLASSES, images)
    return DreamBench(root, table, object_prompts, live_prompts)
