"""The miniature world's grammar: classes, colors, patterns, materials, scenes, styles and subjects.

A caption names every attribute of one object in one scene drawn in one style::

    a photo of a shiny red striped ball on the beach
    |- style -| |material| |color| |pattern| |class| |- scene -|

Styles are templates around the object phrase ("{} in pixel art style"), scenes are phrases after the
class word, and every class is one word, so :func:`parse` reads a caption back without ambiguity.
An attribute a prompt does not mention is ``None`` (unspecified); the world's default style, used
when a prompt names none, is ``photo`` (:data:`DEFAULT_STYLE`).

Subjects are unique instances (a class, color, pattern and an accent color the base data never uses),
each named by a rare token: ``a photo of a sks ball on the beach``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

CLASSES: tuple[str, ...] = ("ball", "box", "cup", "star", "tree", "house", "ring", "tent")

# name -> RGB in [0, 1]
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.98, 0.52, 0.05),
    "yellow": (0.98, 0.88, 0.12),
    "green": (0.12, 0.62, 0.18),
    "blue": (0.12, 0.28, 0.92),
    "purple": (0.56, 0.18, 0.78),
    "white": (0.96, 0.96, 0.96),
    "black": (0.08, 0.08, 0.08),
}

# The color of an ordinary object's stripes/dots/checks: fixed by its main color.
BASE_ACCENT: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 1.0, 1.0),
    "orange": (0.2, 0.1, 0.0),
    "yellow": (0.1, 0.1, 0.1),
    "green": (1.0, 1.0, 1.0),
    "blue": (1.0, 1.0, 1.0),
    "purple": (1.0, 1.0, 1.0),
    "white": (0.1, 0.1, 0.1),
    "black": (1.0, 1.0, 1.0),
}

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
MATERIALS: tuple[str, ...] = ("matte", "shiny", "glass")

# name -> phrase after the class word (mirrors DreamBench's background prompts)
SCENES: dict[str, str] = {
    "beach": "on the beach",
    "snow": "in the snow",
    "jungle": "in the jungle",
    "city": "with a city in the background",
    "wood": "on top of a wooden floor",
    "fabric": "on top of pink fabric",
    "night": "under a night sky",
    "grass": "on top of green grass",
    "water": "floating on top of water",
    "mountain": "with a mountain in the background",
}

# name -> template around the object phrase (mirrors the stylized prompt set of SPEC section 5)
STYLES: dict[str, str] = {
    "photo": "a photo of {}",
    "sketch": "a pencil sketch of {}",
    "pixel": "{} in pixel art style",
    "watercolor": "a watercolor painting of {}",
    "neon": "a neon sign of {}",
    "mosaic": "a mosaic of {}",
    "inverted": "an inverted image of {}",
    "cartoon": "a cartoon illustration of {}",
}

DEFAULT_STYLE = "photo"


@dataclass(frozen=True)
class Subject:
    """A unique instance: a (class, color, pattern) the base data never shows, with its own accent color."""

    token: str
    cls: str
    color: str
    pattern: str
    accent: tuple[float, float, float]
    accent_name: str
    reference_scenes: tuple[str, ...]

    @property
    def token_prompt_object(self) -> str:
        """The personalized object phrase ``"<token> <class>"`` that fills ``{}`` in prompt templates."""
        return f"{self.token} {self.cls}"


SUBJECTS: tuple[Subject, ...] = (
    Subject("sks", "ball", "red", "striped", (0.98, 0.82, 0.10), "gold", ("beach", "wood", "grass")),
    Subject("zwx", "cup", "blue", "dotted", (1.0, 0.55, 0.05), "orange", ("wood", "fabric", "snow")),
    Subject("qlo", "house", "yellow", "checkered", (0.55, 0.15, 0.75), "violet", ("grass", "snow", "beach")),
    Subject("vrt", "star", "green", "striped", (1.0, 0.45, 0.72), "pink", ("night", "wood", "fabric")),
    Subject("bny", "box", "purple", "dotted", (0.2, 0.95, 0.85), "cyan", ("fabric", "beach", "wood")),
    Subject("mup", "tent", "orange", "checkered", (0.10, 0.30, 0.85), "navy", ("grass", "mountain", "snow")),
)
SUBJECT_BY_TOKEN: dict[str, Subject] = {s.token: s for s in SUBJECTS}

_FUNCTION_WORDS = ("a", "an", "of", "the", "in", "on", "top", "with", "under", "floating")


def _words(text: str) -> list[str]:
    return text.split()


VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(CLASSES)
        | set(COLORS)
        | set(PATTERNS)
        | set(MATERIALS)
        | {w for phrase in SCENES.values() for w in _words(phrase)}
        | {w for t in STYLES.values() for w in _words(t.replace("{}", ""))}
        | {s.token for s in SUBJECTS}
        | set(_FUNCTION_WORDS)
    )
)
"""Every word a caption or prompt of this world can contain (lower case, split on spaces)."""


@dataclass(frozen=True)
class Labels:
    """What one image shows. ``None`` means "unspecified" (only in parsed prompts, never in rendered images).

    ``x``, ``y`` (object center) and ``scale`` (object size) are fractions of the image side; captions do
    not mention them, so :func:`parse` leaves them ``None``. ``subject`` is a subject token or ``None``
    for an ordinary object; a subject's accent color comes from :data:`SUBJECTS`.
    """

    cls: str | None
    color: str | None = None
    pattern: str | None = None
    material: str | None = None
    scene: str | None = None
    style: str | None = None
    subject: str | None = None
    x: float | None = None
    y: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("cls", CLASSES),
            ("color", COLORS),
            ("pattern", PATTERNS),
            ("material", MATERIALS),
            ("scene", SCENES),
            ("style", STYLES),
            ("subject", SUBJECT_BY_TOKEN),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"Labels.{name}={value!r} is not in this world; choose one of {sorted(allowed)}")
        if self.subject is not None and self.cls != SUBJECT_BY_TOKEN[self.subject].cls:
            subject = SUBJECT_BY_TOKEN[self.subject]
            raise ValueError(f"subject {self.subject!r} is a {subject.cls}, not a {self.cls!r}")

    def without_pose(self) -> Labels:
        """The same labels with position and scale cleared: what a caption can say."""
        return dataclasses.replace(self, x=None, y=None, scale=None)

    @property
    def is_complete(self) -> bool:
        """True when every attribute needed to render the image is set."""
        return None not in (self.cls, self.color, self.pattern, self.material, self.scene, self.style,
                            self.x, self.y, self.scale)

    @property
    def accent(self) -> tuple[float, float, float]:
        """RGB of the pattern: the subject's own accent, else the fixed accent of the main color."""
        if self.subject is not None:
            return SUBJECT_BY_TOKEN[self.subject].accent
        if self.color is None:
            raise ValueError("Labels.accent needs a color")
        return BASE_ACCENT[self.color]

    @property
    def instance(self) -> str:
        """A name for the object's identity (same instance under any scene, style, pose or material)."""
        if self.subject is not None:
            subject = SUBJECT_BY_TOKEN[self.subject]
            if (self.color, self.pattern) == (subject.color, subject.pattern):
                return self.subject
            return f"{self.subject}:{self.color}:{self.pattern}"
        return f"{self.color}:{self.pattern}:{self.cls}"


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def caption(
    labels: Labels,
    *,
    style: bool = True,
    material: bool = True,
    color: bool = True,
    pattern: bool = True,
    scene: bool = True,
) -> str:
    """The caption of ``labels``; the keyword flags leave an attribute out (it then reads as unspecified).

    A subject is named by its token; its color and pattern are written only where they differ from the
    subject's own (a recolouring such as ``a red zwx cup``).
    """
    words: list[str] = []
    if material and labels.material is not None:
        words.append(labels.material)
    own = SUBJECT_BY_TOKEN[labels.subject] if labels.subject else None
    if color and labels.color is not None and (own is None or labels.color != own.color):
        words.append(labels.color)
    if pattern and labels.pattern is not None and (own is None or labels.pattern != own.pattern):
        words.append(labels.pattern)
    if own is not None:
        words.append(own.token)
    if labels.cls is None:
        raise ValueError("caption needs Labels.cls")
    words.append(labels.cls)
    text = f"{_article(words[0])} {' '.join(words)}"
    if scene and labels.scene is not None:
        text = f"{text} {SCENES[labels.scene]}"
    if style and labels.style is not None:
        text = STYLES[labels.style].format(text)
    return text


def _compile_style_patterns() -> list[tuple[str, re.Pattern[str]]]:
    patterns = []
    for name, template in STYLES.items():
        before, after = template.split("{}")
        patterns.append((name, re.compile("^" + re.escape(before) + "(.*)" + re.escape(after) + "$")))
    # longer fixed text first so "an inverted image of" never matches a shorter template by accident
    return sorted(patterns, key=lambda p: -len(p[1].pattern))


_STYLE_PATTERNS = _compile_style_patterns()


def parse(text: str) -> Labels:
    """Read a caption or prompt of this world back into :class:`Labels` (unmentioned attributes are ``None``).

    A subject token fills in the subject's own color and pattern unless the prompt names others.
    Raises ValueError naming the prompt and the unknown word when the text is not in the grammar.
    """
    normalized = " ".join(text.lower().replace(",", " ").split())
    style = None
    body = normalized
    for name, regex in _STYLE_PATTERNS:
        match = regex.match(normalized)
        if match:
            style, body = name, match.group(1)
            break
    words = body.split()
    class_positions = [i for i, w in enumerate(words) if w in CLASSES]
    if len(class_positions) != 1:
        raise ValueError(f"prompt {text!r} must name exactly one object class (one of {list(CLASSES)})")
    at = class_positions[0]
    cls = words[at]
    modifiers, rest = words[:at], " ".join(words[at + 1:])
    scene = None
    if rest:
        matches = [name for name, phrase in SCENES.items() if phrase == rest]
        if not matches:
            raise ValueError(f"prompt {text!r}: {rest!r} is not a scene of this world; "
                             f"use one of {list(SCENES.values())}")
        scene = matches[0]
    found: dict[str, str] = {}
    for word in modifiers:
        for key, vocabulary in (("color", COLORS), ("pattern", PATTERNS), ("material", MATERIALS),
                                ("subject", SUBJECT_BY_TOKEN)):
            if word in vocabulary:
                if key in found:
                    raise ValueError(f"prompt {text!r} names two {key}s ({found[key]!r} and {word!r})")
                found[key] = word
                break
        else:
            if word not in ("a", "an"):
                raise ValueError(f"prompt {text!r}: word {word!r} is not a color, pattern, material or "
                                 f"subject token of this world")
    subject = found.get("subject")
    color, pattern = found.get("color"), found.get("pattern")
    if subject is not None:
        own = SUBJECT_BY_TOKEN[subject]
        if own.cls != cls:
            raise ValueError(f"prompt {text!r}: subject {subject!r} is a {own.cls}, not a {cls}")
        color = color or own.color
        pattern = pattern or own.pattern
    return Labels(cls=cls, color=color, pattern=pattern, material=found.get("material"), scene=scene,
                  style=style, subject=subject)


def random_caption(
    labels: Labels,
    generator,
    *,
    p_drop_photo: float = 0.5,
    p_drop_matte: float = 0.8,
    p_drop_color: float = 0.15,
    p_drop_pattern: float = 0.25,
    p_drop_scene: float = 0.1,
) -> str:
    """A training caption of ``labels`` that leaves attributes out at random (``generator``: a torch.Generator).

    Only the defaults are dropped for style (``photo``) and material (``matte``), so a prompt that
    names neither asks for a matte object in a photo; color, pattern and scene are dropped whatever
    they are, so an unnamed one reads as "any".
    """
    import torch

    draws = torch.rand(5, generator=generator).tolist()
    return caption(
        labels,
        style=not (labels.style == DEFAULT_STYLE and draws[0] < p_drop_photo),
        material=not (labels.material == "matte" and draws[1] < p_drop_matte),
        color=draws[2] >= p_drop_color,
        pattern=draws[3] >= p_drop_pattern,
        scene=draws[4] >= p_drop_scene,
    )
