"""Prompt sets of the miniature world, mirroring DreamBench (SPEC section 5).

Templates hold ``{}`` for the object: ``"<token> <class>"`` for personalized prompts (``"sks ball"``)
or the class word alone for base prompts (``"ball"``). Every prompt parses with
:func:`dreamguide.toyworld.world.parse` and uses only :data:`~dreamguide.toyworld.world.VOCABULARY`.
"""

from __future__ import annotations

from dreamguide.toyworld.world import SCENES, STYLES, Subject

BACKGROUND_TEMPLATES: tuple[str, ...] = tuple(f"a {{}} {phrase}" for phrase in SCENES.values())
RECOLOR_TEMPLATES: tuple[str, ...] = ("a red {}", "a purple {}", "a blue {}", "a green {}", "a yellow {}")
EDIT_TEMPLATES: tuple[str, ...] = ("a shiny {}", "a glass {}", "a striped {}", "a dotted {}", "a checkered {}")
NORMAL_TEMPLATES: tuple[str, ...] = BACKGROUND_TEMPLATES + RECOLOR_TEMPLATES + EDIT_TEMPLATES
"""DreamBench-like prompts: 10 backgrounds, 5 recolourings, 5 material/pattern edits."""

STYLIZED_TEMPLATES: tuple[str, ...] = tuple(
    template.format("a {}") for name, template in STYLES.items() if name != "photo"
)
"""One prompt per non-photo style, e.g. ``"a watercolor painting of a {}"``."""

STYLIZED_SCENE_TEMPLATES: tuple[str, ...] = tuple(
    template.format(f"a {{}} {SCENES[scene]}")
    for (name, template), scene in zip(
        [(n, t) for n, t in STYLES.items() if n != "photo"], ("beach", "snow", "city", "night", "grass", "jungle", "wood"))
)
"""Stylized prompts with a scene, e.g. ``"a pencil sketch of a {} in the snow"``."""

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "normal": NORMAL_TEMPLATES,
    "background": BACKGROUND_TEMPLATES,
    "recolor": RECOLOR_TEMPLATES,
    "edit": EDIT_TEMPLATES,
    "stylized": STYLIZED_TEMPLATES,
    "stylized_scene": STYLIZED_SCENE_TEMPLATES,
}


def prompts(set_name: str, subject: Subject | str | None = None, class_word: str | None = None) -> list[str]:
    """The prompts of ``set_name`` filled with ``"<token> <class>"`` for ``subject`` or with ``class_word``."""
    if set_name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {set_name!r}; choose one of {sorted(PROMPT_SETS)}")
    if subject is not None:
        from dreamguide.toyworld.subjects import get_subject

        obj = get_subject(subject).token_prompt_object
    elif class_word is not None:
        obj = class_word
    else:
        raise ValueError("prompts() needs a subject or a class_word")
    return [template.format(obj) for template in PROMPT_SETS[set_name]]
