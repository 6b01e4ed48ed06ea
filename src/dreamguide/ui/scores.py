"""Identity and text alignment of each sampled image, as the evaluation protocol scores them.

Identity compares an image with the subject's reference photos; text alignment compares it with
its base prompt (the token replaced by the class word). In the miniature world the world's own
evaluators score (``dreamguide.toyworld.evaluators``: its DINO and CLIP); for real models the
DINO and CLIP-T metrics of :mod:`dreamguide.metrics`, whose backbones load from a local folder
or the hub cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class ImageScore:
    """One image's scores: identity (mean cosine to the references) and text alignment."""

    identity: float
    text_alignment: float


class ToyScorer:
    """The miniature world's evaluators (loaded once, on first use)."""

    identity_name = "identity (toy DINO)"
    text_name = "text alignment (toy CLIP)"

    def __init__(self, evaluators=None) -> None:
        self._evaluators = evaluators

    @property
    def evaluators(self):
        if self._evaluators is None:
            from dreamguide.toyworld.evaluators import ToyEvaluators

            self._evaluators = ToyEvaluators.load()
        return self._evaluators

    def score(self, images: Sequence["Image.Image"], base_prompts: Sequence[str],
              references: Sequence["Image.Image"]) -> list[ImageScore]:
        from dreamguide.toyworld.render import from_pil

        pixels = from_pil([image.convert("RGB") for image in images])
        text = self.evaluators.text_alignment(pixels, list(base_prompts))
        identity = self.evaluators.identity(pixels, from_pil([r.convert("RGB") for r in references]))
        return [ImageScore(float(i), float(t)) for i, t in zip(identity, text)]


class MetricScorer:
    """DINO (identity) and CLIP-T (text alignment) from :mod:`dreamguide.metrics` (loaded on first use)."""

    identity_metric, text_metric = "dino", "clip_t"
    identity_name = "identity (DINO)"
    text_name = "text alignment (CLIP-T)"

    def __init__(self, backbones=None, device: str | None = None) -> None:
        self.backbones, self.device = backbones, device
        self._scorer = None

    @property
    def scorer(self):
        if self._scorer is None:
            import torch

            from dreamguide.metrics import Backbones, Scorer

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._scorer = Scorer(self.backbones or Backbones(), (self.identity_metric, self.text_metric),
                                  device=device)
        return self._scorer

    def score(self, images: Sequence["Image.Image"], base_prompts: Sequence[str],
              references: Sequence["Image.Image"]) -> list[ImageScore]:
        scorer = self.scorer
        rows = scorer.score(list(images), list(base_prompts), scorer.embed_references(list(references)))
        return [ImageScore(row[self.identity_metric], row[self.text_metric]) for row in rows]


def mode_means(modes: Sequence[str], scores: Sequence[ImageScore]) -> dict[str, ImageScore]:
    """Per mode (in first-seen order), the mean identity and text alignment of its images."""
    groups: dict[str, list[ImageScore]] = {}
    for mode, score in zip(modes, scores):
        groups.setdefault(mode, []).append(score)
    return {
        mode: ImageScore(sum(s.identity for s in group) / len(group), sum(s.text_alignment for s in group) / len(group))
        for mode, group in groups.items()
    }
