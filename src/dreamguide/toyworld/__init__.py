"""A miniature, download-free world where personalization and its guidance run on a laptop.

Everything here is procedural and seeded: nothing is downloaded.

* :mod:`~dreamguide.toyworld.world` -- the grammar: 8 object classes (one word each), 8 colors,
  4 surface patterns, 3 materials, 10 scenes and 8 styles; :class:`Labels` (what one image shows),
  :func:`caption` / :func:`parse` (labels <-> text, exact round trip) and :data:`VOCABULARY` (every
  word a prompt may contain, for a word-level tokenizer).
* :mod:`~dreamguide.toyworld.render` -- :func:`render` draws labels as ``(N, 3, 32, 32)`` float32
  images in ``[-1, 1]`` (vectorized torch on CPU, in batches; speed: docs/TOYWORLD.md);
  :func:`sample` draws random labels, images and captions from one seed.
* :mod:`~dreamguide.toyworld.subjects` -- the 6 subjects (rare token + class, e.g. ``sks ball``),
  their 5 reference photos (:func:`reference_images`) and :func:`sample_base_labels`, the base
  model's data, which never contains a subject's (class, color, pattern).
* :mod:`~dreamguide.toyworld.prompts` -- DreamBench-like prompt sets: backgrounds, recolourings,
  material/pattern edits and stylized prompts.
* :mod:`~dreamguide.toyworld.evaluators` -- this world's CLIP (text alignment), DINO (identity) and
  exact attribute classifiers, trained on generated data only and shipped with their weights:
  ``ToyEvaluators.load()`` with ``text_alignment``, ``identity``, ``classify`` and ``judge``;
  retrain with ``python -m dreamguide.toyworld.train_evaluators``.
* :mod:`~dreamguide.toyworld.bench_world` -- the world as a ``dreamguide.evaluation`` world (cases,
  base-model and adapter sampling, the evaluators' metrics).
* :mod:`~dreamguide.toyworld.experiment` -- experiments as configs of plans (the PR paper's by default);
  :mod:`~dreamguide.toyworld.reproduce` runs them on the shared evaluation runner and reports them.

See docs/TOYWORLD.md.

Example::

    from dreamguide.toyworld import sample, reference_images, parse
    images, labels, captions = sample(16, generator=0)   # (16, 3, 32, 32) in [-1, 1]
    captions[0]            # 'a photo of a shiny orange checkered tree on top of pink fabric'
    parse(captions[0]) == labels[0].without_pose()       # True
    refs = reference_images("sks")                        # the subject "sks ball", 5 photos
"""

from dreamguide.toyworld.prompts import PROMPT_SETS, prompts
from dreamguide.toyworld.render import IMAGE_SIZE, from_pil, render, sample, sample_labels, to_pil
from dreamguide.toyworld.subjects import (
    SUBJECT_COMBINATIONS,
    get_subject,
    reference_captions,
    reference_images,
    reference_labels,
    sample_base_labels,
    subject_labels,
)
from dreamguide.toyworld.world import (
    CLASSES,
    COLORS,
    DEFAULT_STYLE,
    MATERIALS,
    PATTERNS,
    SCENES,
    STYLES,
    SUBJECTS,
    VOCABULARY,
    Labels,
    Subject,
    caption,
    parse,
    random_caption,
)

__all__ = [
    "CLASSES", "COLORS", "DEFAULT_STYLE", "IMAGE_SIZE", "MATERIALS", "PATTERNS", "PROMPT_SETS", "SCENES",
    "STYLES", "SUBJECTS", "SUBJECT_COMBINATIONS", "VOCABULARY", "Labels", "Subject", "caption", "from_pil",
    "get_subject", "parse", "prompts", "random_caption", "reference_captions", "reference_images",
    "reference_labels", "render", "sample", "sample_base_labels", "sample_labels", "subject_labels", "to_pil",
]
