"""The world's subjects: unique instances to personalize, their reference photos, and the base sampler.

Each :class:`~dreamguide.toyworld.world.Subject` is a (class, color, pattern) combination drawn with
an accent color that ordinary objects never use. :func:`sample_base_labels` (the data of the base
model) never yields a subject's (class, color, pattern), so the base model has never seen a subject.
:func:`reference_images` gives 5 photos per subject on a few backgrounds at varied position and
scale, like DreamBench's photos.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from dreamguide.toyworld.render import IMAGE_SIZE, render, sample_labels, sample_pose, _generator
from dreamguide.toyworld.world import SUBJECT_BY_TOKEN, SUBJECTS, Labels, Subject

SUBJECT_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple((s.cls, s.color, s.pattern) for s in SUBJECTS)
"""(class, color, pattern) of every subject: never drawn for the base model's data."""

REFERENCES_PER_SUBJECT = 5


def get_subject(subject: str | Subject) -> Subject:
    """The subject named by ``subject`` (its token), or ``subject`` itself."""
    if isinstance(subject, Subject):
        return subject
    if subject not in SUBJECT_BY_TOKEN:
        raise ValueError(f"unknown subject {subject!r}; the world's subjects are {sorted(SUBJECT_BY_TOKEN)}")
    return SUBJECT_BY_TOKEN[subject]


def sample_base_labels(n: int, generator: int | torch.Generator | None = None) -> list[Labels]:
    """``n`` random labels for base-model training: never a subject's (class, color, pattern)."""
    return sample_labels(n, generator, exclude=SUBJECT_COMBINATIONS)


def subject_labels(
    subject: str | Subject,
    n: int,
    generator: int | torch.Generator | None = None,
    *,
    scenes: tuple[str, ...] | None = None,
    style: str = "photo",
    material: str = "matte",
) -> list[Labels]:
    """``n`` labels of ``subject`` in ``style`` with random pose, cycling through ``scenes``."""
    subject = get_subject(subject)
    gen = _generator(generator)
    scenes = scenes or subject.reference_scenes
    x, y, scale = sample_pose(n, gen)
    return [
        Labels(cls=subject.cls, color=subject.color, pattern=subject.pattern, material=material,
               scene=scenes[i % len(scenes)], style=style, subject=subject.token,
               x=round(float(x[i]), 4), y=round(float(y[i]), 4), scale=round(float(scale[i]), 4))
        for i in range(n)
    ]


def _subject_seed(subject: Subject) -> int:
    return zlib.crc32(subject.token.encode())


def reference_labels(subject: str | Subject, n: int = REFERENCES_PER_SUBJECT) -> list[Labels]:
    """The labels of the subject's reference photos (fixed: a function of the subject only)."""
    subject = get_subject(subject)
    return subject_labels(subject, n, _subject_seed(subject))


def reference_images(subject: str | Subject, n: int = REFERENCES_PER_SUBJECT, *,
                     size: int = IMAGE_SIZE) -> torch.Tensor:
    """The subject's ``n`` reference photos, float32 ``(n, 3, size, size)`` in [-1, 1] (always the same)."""
    subject = get_subject(subject)
    return render(reference_labels(subject, n), _subject_seed(subject) + 1, size=size)


def reference_captions(subject: str | Subject, n: int = REFERENCES_PER_SUBJECT) -> list[str]:
    """Instance prompts of the reference photos, e.g. ``"a photo of a sks ball on the beach"``."""
    from dreamguide.toyworld.world import caption

    return [caption(dataclasses.replace(lab, material=None)) for lab in reference_labels(subject, n)]
