"""The miniature world's evaluators, trained on generated data only and shipped with their weights.

* **Attributes**: :class:`AttributeClassifier`, a small CNN trunk with a head per label (class,
  color, pattern, material, scene, style) and a regression of the pattern's accent color.
* **Text alignment** (this world's CLIP): :class:`ImageTextModel`, an image projection of the trunk's
  features and a two-layer transformer text encoder over :data:`~dreamguide.toyworld.world.VOCABULARY`,
  trained with the symmetric contrastive (InfoNCE) loss on image-caption pairs. Score: cosine.
* **Identity** (this world's DINO): :class:`IdentityEncoder`, a projection of the trunk's features
  trained with a supervised contrastive loss whose positives are the same instance (class, color,
  pattern, accent) under another scene, style, pose and material. Score: mean cosine to the references.

The trunk is trained first, on the labels; the two projections are then trained on its frozen
features (a CPU can afford one convolutional network, not three).

All take images as float tensors ``(N, 3, 32, 32)`` in ``[-1, 1]`` (the generator's output; use
:func:`~dreamguide.toyworld.render.from_pil` for PIL images). ``ToyEvaluators.load()`` reads the
committed weights (``weights/evaluators/*.safetensors``) offline; their held-out figures are in
``weights/evaluators/validation.json``; ``python -m dreamguide.toyworld.train_evaluators`` retrains them.
:func:`validate_attributes` scores them on every attribute a prompt can change (``--validate-only``
writes ``weights/evaluators/validation_attributes.json``).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dreamguide.toyworld.render import render, sample_labels
from dreamguide.toyworld.world import (
    CLASSES,
    COLORS,
    DEFAULT_STYLE,
    MATERIALS,
    PATTERNS,
    SCENES,
    STYLES,
    VOCABULARY,
    Labels,
    caption,
    parse,
)

WEIGHTS_DIR = Path(__file__).parent / "weights" / "evaluators"
MAX_WORDS = 20
EMBED_DIM = 64

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "cls": CLASSES,
    "color": tuple(COLORS),
    "pattern": PATTERNS,
    "material": MATERIALS,
    "scene": tuple(SCENES),
    "style": tuple(STYLES),
}
"""Label name -> class names, in the order of the classifier's logits."""


# --------------------------------------------------------------------------------------------------
# networks


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    kernel, padding = (4, 1) if stride == 2 else (3, 1)
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """32x32 image -> feature vector: a full-resolution layer, three stride-2 stages (16, 8, 4 px), mean+max pooling."""

    def __init__(self, widths: tuple[int, int, int, int] = (24, 32, 64, 96)):
        super().__init__()
        s, a, b, c = widths
        self.features = nn.Sequential(_block(3, s), _block(s, a, 2), _block(a, a), _block(a, b, 2), _block(b, b),
                                      _block(b, c, 2), _block(c, c))
        self.map_dim = c
        self.out_dim = 2 * c

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, 4, 4)`` features before pooling."""
        return self.features(images)

    @staticmethod
    def pool(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(images))


class AttributeClassifier(nn.Module):
    """The shared image trunk with one logit vector per attribute of :data:`ATTRIBUTES`.

    It also regresses the pattern's accent color (``accent``, RGB), so its features carry what tells
    one instance from another (the identity and text-alignment heads read those features), and, as a
    training aid that makes the trunk find the object quickly, the object's coverage on a 4x4 grid.
    """

    def __init__(self):
        super().__init__()
        self.encoder = ConvEncoder()
        self.heads = nn.ModuleDict({name: nn.Linear(self.encoder.out_dim, len(values))
                                    for name, values in ATTRIBUTES.items()})
        self.accent = nn.Linear(self.encoder.out_dim, 3)
        self.mask = nn.Conv2d(self.encoder.map_dim, 1, 1)  # training aid: where the object is (4x4)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.classify_features(self.encoder(images))

    def classify_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {name: head(features) for name, head in self.heads.items()}
        out["accent"] = self.accent(features)
        return out


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(inplace=True), nn.Linear(d_hidden, d_out))


class IdentityEncoder(nn.Module):
    """Unit-length instance embedding of trunk features, invariant to scene, style, pose and material."""

    def __init__(self, d_in: int = 192, dim: int = EMBED_DIM):
        super().__init__()
        self.project = _mlp(d_in, 256, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(features), dim=-1)


_WORD_INDEX = {word: i + 1 for i, word in enumerate(VOCABULARY)}  # 0 = padding


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """Word ids ``(N, MAX_WORDS)`` (0 = padding); ValueError names a word outside the vocabulary."""
    rows = []
    for text in texts:
        words = text.lower().replace(",", " ").split()
        unknown = [w for w in words if w not in _WORD_INDEX]
        if unknown:
            raise ValueError(f"prompt {text!r}: words {unknown} are not in the world's vocabulary")
        if len(words) > MAX_WORDS:
            raise ValueError(f"prompt {text!r} has {len(words)} words; at most {MAX_WORDS}")
        rows.append([_WORD_INDEX[w] for w in words] + [0] * (MAX_WORDS - len(words)))
    return torch.tensor(rows, dtype=torch.long)


class TextEncoder(nn.Module):
    """Word embeddings + positions, two transformer layers, mean over words, projection; unit length."""

    def __init__(self, dim: int = EMBED_DIM, width: int = 96, layers: int = 2):
        super().__init__()
        self.words = nn.Embedding(len(VOCABULARY) + 1, width, padding_idx=0)
        self.positions = nn.Parameter(torch.zeros(MAX_WORDS, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.project = nn.Linear(width, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        h = self.transformer(self.words(ids) + self.positions[: ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        h = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return F.normalize(self.project(h), dim=-1)


class ImageTextModel(nn.Module):
    """This world's CLIP: image (trunk features) and text embeddings in one space, compared by cosine."""

    def __init__(self, d_in: int = 192, dim: int = EMBED_DIM):
        super().__init__()
        self.image_project = _mlp(d_in, 256, dim)
        self.text_encoder = TextEncoder(dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.66))  # log(1 / 0.07)

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_project(features), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(tokenize(texts))


# --------------------------------------------------------------------------------------------------
# the public scoring API


JUDGED_BY_DEFAULT: tuple[str, ...] = ("cls", "scene", "style")
"""The attributes :meth:`ToyEvaluators.judge` checks unless told otherwise (the most reliable heads)."""


@dataclass
class Judgement:
    """Per-image booleans: does the image carry the prompt's class, scene and style (and all of them)?

    ``color``, ``pattern`` and ``material`` are ``None`` unless the judge was asked to check them;
    :attr:`all` combines every attribute that was checked.
    """

    cls: torch.Tensor
    scene: torch.Tensor
    style: torch.Tensor
    color: torch.Tensor | None = None
    pattern: torch.Tensor | None = None
    material: torch.Tensor | None = None

    @property
    def all(self) -> torch.Tensor:
        result = self.cls & self.scene & self.style
        for extra in (self.color, self.pattern, self.material):
            if extra is not None:
                result = result & extra
        return result


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, 3, 32, 32) in [-1, 1], got {shape}; "
                         "convert PIL images with dreamguide.toyworld.from_pil")
    if images.shape[-2:] != (32, 32):
        images = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.float()


class ToyEvaluators:
    """The three evaluators together; build with :meth:`load` (committed weights) or from modules."""

    def __init__(self, text_model: ImageTextModel, identity_model: IdentityEncoder,
                 classifier: AttributeClassifier, batch_size: int = 256):
        self.text_model = text_model.eval()
        self.identity_model = identity_model.eval()
        self.classifier = classifier.eval()
        self.batch_size = batch_size

    @classmethod
    def load(cls, directory: str | Path = WEIGHTS_DIR) -> ToyEvaluators:
        """Load the evaluators from ``directory`` (default: the weights shipped with the package)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        modules = {"attributes": AttributeClassifier(), "text_alignment": ImageTextModel(),
                   "identity": IdentityEncoder()}
        for name, module in modules.items():
            path = directory / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"evaluator weights {path} are missing; train them with "
                                        f"`python -m dreamguide.toyworld.train_evaluators --out {directory}`")
            state = {k: v.float() for k, v in load_file(str(path)).items()}
            missing, unexpected = module.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{path} does not match the evaluator architecture: missing keys "
                                 f"{missing[:5]}, unexpected keys {unexpected[:5]}; retrain with train_evaluators")
        return cls(modules["text_alignment"], modules["identity"], modules["attributes"])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Trunk features ``(N, 192)`` shared by the three evaluators."""
        images = _check_images(images)
        return torch.cat([self.classifier.encoder(images[i:i + self.batch_size])
                          for i in range(0, images.shape[0], self.batch_size)])

    @torch.no_grad()
    def text_alignment(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        """Cosine similarity ``(N,)`` of each image to its prompt (one prompt for all, or one per image).

        Prompts are read as this world's text; pass base prompts (no subject token), as with CLIP-T.
        """
        images = _check_images(images)
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"text_alignment got {images.shape[0]} images but {len(prompts)} prompts")
        image_emb = self.text_model.encode_features(self.features(images))
        text_emb = self.text_model.encode_texts(prompts)
        return (image_emb * text_emb).sum(-1)

    @torch.no_grad()
    def identity_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length identity embeddings ``(N, 64)``."""
        return self.identity_model(self.features(images))

    @torch.no_grad()
    def identity(self, images: torch.Tensor, reference_images: torch.Tensor) -> torch.Tensor:
        """Mean cosine ``(N,)`` of each image's identity embedding to every reference (as DreamBench's DINO)."""
        return (self.identity_embeddings(images) @ self.identity_embeddings(reference_images).T).mean(dim=1)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.classifier.classify_features(self.features(images))
        return {name: out[name] for name in ATTRIBUTES}

    def classify(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Predicted label names per attribute (``cls``, ``color``, ``pattern``, ``material``, ``scene``, ``style``)."""
        return {name: [ATTRIBUTES[name][i] for i in logits.argmax(-1).tolist()]
                for name, logits in self.logits(images).items()}

    def judge(self, images: torch.Tensor, prompts: Sequence[str] | str,
              attributes: Sequence[str] = JUDGED_BY_DEFAULT) -> Judgement:
        """Whether each image carries its prompt's attributes: class, scene and style, and on request more.

        ``attributes`` names the attributes to check, from :data:`ATTRIBUTES`; it must include class,
        scene and style. A prompt without a scene accepts any scene; one without a style asks for
        :data:`DEFAULT_STYLE`; one without a color, pattern or material accepts any (a subject token
        names its own color and pattern). Color and material heads are less accurate than the default
        three (docs/TOYWORLD.md, "Evaluators").
        """
        attributes = tuple(attributes)
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"judge: attributes {unknown} are not in this world; choose from {list(ATTRIBUTES)}")
        missing = [a for a in JUDGED_BY_DEFAULT if a not in attributes]
        if missing:
            raise ValueError(f"judge: attributes must include {list(JUDGED_BY_DEFAULT)} (missing {missing}); "
                             f"add color, pattern or material to check more")
        images = _check_images(images)
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"judge got {images.shape[0]} images but {len(prompts)} prompts")
        wanted: list[Labels] = [parse(p) for p in prompts]
        predicted = self.classify(images)
        cls = torch.tensor([w.cls == p for w, p in zip(wanted, predicted["cls"])])
        scene = torch.tensor([w.scene is None or w.scene == p for w, p in zip(wanted, predicted["scene"])])
        style = torch.tensor([(w.style or DEFAULT_STYLE) == p for w, p in zip(wanted, predicted["style"])])
        extra = {name: torch.tensor([getattr(w, name) is None or getattr(w, name) == p
                                     for w, p in zip(wanted, predicted[name])])
                 for name in ("color", "pattern", "material") if name in attributes}
        return Judgement(cls=cls, scene=scene, style=style, **extra)


def swap_attribute(labels: Labels, name: str, rng: random.Random) -> Labels:
    """``labels`` with attribute ``name`` replaced by another value of :data:`ATTRIBUTES`, drawn from ``rng``."""
    other = rng.choice([v for v in ATTRIBUTES[name] if v != getattr(labels, name)])
    return dataclasses.replace(labels, **{name: other})


@torch.no_grad()
def validate_attributes(evaluators: ToyEvaluators, n: int = 400, seed: int = 12345) -> dict:
    """Per-attribute figures of the evaluators on ``n`` fresh images from ``seed``, for every attribute.

    * ``classifier_accuracy[a]``: fraction of images whose predicted ``a`` is the true one;
      ``majority_prior[a]``: the fraction of the commonest value of ``a`` among the images (what
      always guessing it scores).
    * ``text_swap_accuracy[a]``: fraction of images whose full true caption scores a higher
      text alignment than the same caption with ``a`` swapped to another value (chance: 0.5);
      the swap is drawn from ``random.Random(seed)``, attribute by attribute in :data:`ATTRIBUTES`' order.
    * ``material_swap_by_pair["matte->shiny"]``: the material swap accuracy among images of that
      true material swapped to that one (``material_swap_pair_images``: how many);
      ``material_recall[m]``: the classifier's accuracy on images
      of material ``m`` (``material_images[m]``: how many; material is the attribute whose prior is
      far from uniform).
    * ``judge_accepts_true_caption``: the judge on the true captions, with the default attributes
      and with all six.
    """
    if n < 1:
        raise ValueError(f"validate_attributes: n must be at least 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    labels = sample_labels(n, gen)
    images = render(labels, gen)
    captions = [caption(lab) for lab in labels]
    predicted = evaluators.classify(images)
    accuracy = {name: sum(p == getattr(lab, name) for p, lab in zip(predicted[name], labels)) / n
                for name in ATTRIBUTES}
    prior = {name: max(sum(getattr(lab, name) == v for lab in labels) for v in values) / n
             for name, values in ATTRIBUTES.items()}
    true_score = evaluators.text_alignment(images, captions)
    rng = random.Random(seed)
    swap, material_pairs, pair_images = {}, {}, {}
    for name in ATTRIBUTES:
        swapped = [swap_attribute(lab, name, rng) for lab in labels]
        wins = true_score > evaluators.text_alignment(images, [caption(lab) for lab in swapped])
        swap[name] = int(wins.sum()) / n
        if name == "material":
            for a in MATERIALS:
                for b in MATERIALS:
                    rows = [i for i, (lab, other) in enumerate(zip(labels, swapped))
                            if (lab.material, other.material) == (a, b)]
                    if rows:
                        material_pairs[f"{a}->{b}"] = int(wins[rows].sum()) / len(rows)
                        pair_images[f"{a}->{b}"] = len(rows)
    material_recall = {m: sum(p == m for p, lab in zip(predicted["material"], labels) if lab.material == m)
                       / max(1, sum(lab.material == m for lab in labels)) for m in MATERIALS}
    judge_default = int(evaluators.judge(images, captions).all.sum()) / n
    judge_all = int(evaluators.judge(images, captions, attributes=tuple(ATTRIBUTES)).all.sum()) / n
    return {
        "samples": n,
        "seed": seed,
        "classifier_accuracy": accuracy,
        "majority_prior": prior,
        "text_swap_accuracy": swap,
        "material_swap_by_pair": material_pairs,
        "material_swap_pair_images": pair_images,
        "material_recall": material_recall,
        "material_images": {m: sum(lab.material == m for lab in labels) for m in MATERIALS},
        "judge_accepts_true_caption": {"class_scene_style": judge_default, "all_six": judge_all},
    }


def load_validation(directory: str | Path = WEIGHTS_DIR) -> dict:
    """The held-out figures recorded when the weights in ``directory`` were trained."""
    return json.loads((Path(directory) / "validation.json").read_text())
