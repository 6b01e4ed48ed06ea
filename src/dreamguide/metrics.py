"""Image metrics: identity (DINO, DINOv2, CLIP-I) and text alignment (CLIP-T, SigLIP) (SPEC section 5).

Every metric is a number per generated image:

    dino    mean over reference photos of cos(DINO CLS(image), DINO CLS(reference))       identity
    dinov2  the same with DINOv2's CLS token                                               identity
    clip_i  the same with CLIP image embeddings                                            identity
    clip_t  cos(CLIP image embedding, CLIP text embedding of the *base* prompt)            text
    siglip  sigmoid(logit_scale * cos(SigLIP image, SigLIP text of the base prompt) + logit_bias)  text

The text metrics see the base prompt ("a dog in the snow"), never the token prompt: the
backbones do not know the identifier token. Backbones are loaded with ``transformers`` from a
hub id (already in the local cache when offline) or a local folder, each with its own image
processor (PIL backend: the same pixels with or without torchvision), from safetensors only.

    scorer = Scorer(Backbones(), device="cuda")      # loads every backbone now
    refs = scorer.embed_references(reference_images)          # once per subject
    rows = scorer.score(images, base_prompts, refs)           # [{"dino": .., "siglip": .., ...}, ...]
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

#: Metric name -> (kind, backbone field of ``Backbones``, description).
METRICS: dict[str, tuple[str, str, str]] = {
    "dino": ("identity", "dino", "DINO CLS cosine to each reference photo, averaged"),
    "dinov2": ("identity", "dinov2", "DINOv2 CLS cosine to each reference photo, averaged"),
    "clip_i": ("identity", "clip", "CLIP image-embedding cosine to each reference photo, averaged"),
    "clip_t": ("text", "clip", "CLIP image-text cosine with the base prompt"),
    "siglip": ("text", "siglip", "SigLIP image-text probability sigmoid(scale*cos+bias) with the base prompt"),
}
IDENTITY_METRICS: tuple[str, ...] = tuple(m for m, (kind, _, _) in METRICS.items() if kind == "identity")
TEXT_METRICS: tuple[str, ...] = tuple(m for m, (kind, _, _) in METRICS.items() if kind == "text")


@dataclass(frozen=True)
class Backbones:
    """Hub ids (``owner/name`` or ``owner/name@revision``) or local folders of the metric backbones.

    CLIP serves both CLIP-I and CLIP-T.
    """

    #: The main branch of facebook/dino-vits16 holds only pickle weights; refs/pr/1 adds model.safetensors.
    dino: str = "facebook/dino-vits16@refs/pr/1"
    dinov2: str = "facebook/dinov2-small"
    clip: str = "openai/clip-vit-base-patch32"
    siglip: str = "google/siglip-base-patch16-224"

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Backbones":
        known = {f.name for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"{source}: unknown metric backbone {key!r}; known: {', '.join(sorted(known))}")
            if not isinstance(value, str) or not value:
                raise ValueError(f"{source}: backbone {key!r} must be a hub id or a folder, got {value!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def for_metric(self, metric: str) -> str:
        """The backbone id that computes ``metric``."""
        return getattr(self, METRICS[metric][1])


def metric_backbones(backbones: Backbones, metrics: Sequence[str] = tuple(METRICS)) -> dict[str, str]:
    """Metric name -> backbone id: printed beside every table so readers know what was measured."""
    return {m: backbones.for_metric(m) for m in metrics}


class BackboneUnavailable(FileNotFoundError):
    """A metric backbone could not be loaded (not a folder, not in the local hub cache, no network)."""


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if not metrics:
        raise ValueError(f"no metrics chosen; choose from {', '.join(METRICS)}")
    return tuple(metrics)


def split_revision(source: str) -> tuple[str, str | None]:
    """"owner/name@revision" -> ("owner/name", "revision"); a plain id or a folder has no revision."""
    if "@" in source and not source.startswith((".", "/", "~")) and not Path(source).exists():
        repo, revision = source.split("@", 1)
        return repo, revision or None
    return source, None


def _load(loader, name: str, source: str, **kwargs):
    """``loader.from_pretrained(source)`` with a message that says how to fix a missing backbone."""
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise BackboneUnavailable(
            f"metric backbone {name}: {source!r} is not a model folder (no config.json there); "
            f"pass a hub id or a folder saved with save_pretrained"
        )
    repo, revision = (str(path), None) if looks_local else split_revision(source)
    if revision:
        kwargs["revision"] = revision
    try:
        return loader.from_pretrained(repo, **kwargs)
    except (OSError, ValueError) as error:
        where = f"[metrics.backbones] {name} in a bench config, --{name} for eval"
        download = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        if "sentencepiece" in str(error).lower():
            hint = "its tokenizer needs the sentencepiece package: pip install sentencepiece"
        elif looks_local:
            hint = f"the folder is incomplete or not a {name} checkpoint"
        elif "safetensors" in str(error).lower():
            hint = (f"it has no safetensors weights at this revision (weights are read only from safetensors); "
                    f"pass a revision that has them, e.g. the hub's converted branch '{repo}@refs/pr/<n>', "
                    f"or a local folder with model.safetensors ({where})")
        elif os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            hint = (f"it is not in the local hub cache and HF_HUB_OFFLINE is set; download it once "
                    f"(`{download}`) or point it at a local folder ({where})")
        else:
            hint = f"download it (`{download}`) or point it at a local folder ({where})"
        raise BackboneUnavailable(f"cannot load metric backbone {name} = {source!r}: {hint} ({error})") from error


def _image_processor(name: str, source: str):
    from transformers import AutoImageProcessor

    # The PIL backend: identical preprocessing whether torchvision is installed or not.
    return _load(AutoImageProcessor, name, source, backend="pil")


def _features(output) -> torch.Tensor:
    """CLIP/SigLIP ``get_*_features`` return a tensor (transformers 4) or an output with pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _rgb(images) -> list:
    return [image.convert("RGB") for image in images]


class _ClsEncoder:
    """DINO / DINOv2: the CLS token of the last (layer-normed) hidden state."""

    def __init__(self, name: str, source: str, device, dtype):
        from transformers import AutoConfig, Dinov2Model, ViTModel

        config = _load(AutoConfig, name, source)
        if config.model_type == "vit":
            self.model = _load(ViTModel, name, source, add_pooling_layer=False, use_safetensors=True)
        elif config.model_type == "dinov2":
            self.model = _load(Dinov2Model, name, source, use_safetensors=True)
        else:
            raise ValueError(
                f"metric backbone {name} = {source!r} is a {config.model_type!r} model; "
                f"expected a ViT (DINO) or DINOv2 checkpoint"
            )
        self.model.to(device=device, dtype=dtype).eval()
        self.processor = _image_processor(name, source)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        pixels = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(self.device, self.dtype))
        return out.last_hidden_state[:, 0].float()


class _ImageTextEncoder:
    """CLIP / SigLIP: projected image and text embeddings (and SigLIP's logit scale and bias)."""

    def __init__(self, name: str, source: str, device, dtype, expected: str):
        from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel

        config = _load(AutoConfig, name, source)
        classes = {"clip": CLIPModel, "siglip": SiglipModel}
        if config.model_type != expected:
            raise ValueError(
                f"metric backbone {name} = {source!r} is a {config.model_type!r} model; expected {expected!r}"
            )
        self.model = _load(classes[expected], name, source, use_safetensors=True).to(device=device, dtype=dtype)
        self.model.eval()
        self.processor = _image_processor(name, source)
        try:
            self.tokenizer = _load(AutoTokenizer, name, source)
        except ImportError as error:  # SigLIP's sentencepiece tokenizer
            raise BackboneUnavailable(
                f"the tokenizer of metric backbone {name} = {source!r} needs a missing package: {error}. "
                f"Install it (`pip install sentencepiece`)"
            ) from error
        self.expected = expected
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        pixels = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.expected == "siglip":
            # SigLIP was trained on texts padded to a fixed length (64) and pools the last position.
            length = getattr(self.model.config.text_config, "max_position_embeddings", 64)
            tokens = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                                    return_tensors="pt")
        else:
            tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        kwargs = {"input_ids": tokens["input_ids"].to(self.device)}
        if self.expected == "clip" and "attention_mask" in tokens:
            kwargs["attention_mask"] = tokens["attention_mask"].to(self.device)
        return _features(self.model.get_text_features(**kwargs)).float()

    def logit_scale_and_bias(self) -> tuple[float, float]:
        bias = getattr(self.model, "logit_bias", None)
        scale = float(self.model.logit_scale.detach().float().exp())
        return scale, float(bias.detach().float()) if bias is not None else 0.0


def cosine_to_references(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """[N, D] x [R, D] -> [N]: each image's cosine to every reference, averaged over the references."""
    return (F.normalize(embeddings.float(), dim=-1) @ F.normalize(references.float(), dim=-1).T).mean(dim=1)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D] x [N, D] -> [N]: row-wise cosine."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def siglip_probability(cosine: torch.Tensor, logit_scale: float, logit_bias: float) -> torch.Tensor:
    """SigLIP's pairwise image-text probability: sigmoid(scale * cos + bias)."""
    return torch.sigmoid(logit_scale * cosine + logit_bias)


@dataclass
class ReferenceEmbeddings:
    """One subject's reference photos, embedded by every identity backbone (metric -> [R, D])."""

    by_metric: dict[str, torch.Tensor]


class Scorer:
    """Loads the backbones of the chosen metrics once and scores batches of images."""

    def __init__(
        self,
        backbones: Backbones = Backbones(),
        metrics: Sequence[str] = tuple(METRICS),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ):
        self.metrics = check_metrics(metrics)
        if batch_size < 1:
            raise ValueError(f"metric batch_size must be >= 1, got {batch_size}")
        self.backbones, self.batch_size = backbones, batch_size
        self.device, self.dtype = torch.device(device), dtype
        needed = {METRICS[m][1] for m in self.metrics}
        self.encoders: dict[str, _ClsEncoder | _ImageTextEncoder] = {}
        # Load everything now: a missing backbone fails here, before any image is generated.
        for name in ("dino", "dinov2"):
            if name in needed:
                self.encoders[name] = _ClsEncoder(name, getattr(backbones, name), self.device, dtype)
        for name in ("clip", "siglip"):
            if name in needed:
                self.encoders[name] = _ImageTextEncoder(name, getattr(backbones, name), self.device, dtype, name)

    def _batched(self, fn, items) -> torch.Tensor:
        items = list(items)
        return torch.cat([fn(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)])

    def embed_references(self, images) -> ReferenceEmbeddings:
        images = list(images)
        if not images:
            raise ValueError("no reference images to score identity against")
        by_metric = {}
        for metric in self.metrics:
            if METRICS[metric][0] == "identity":
                by_metric[metric] = self._batched(self.encoders[METRICS[metric][1]].embed_images, images)
        return ReferenceEmbeddings(by_metric)

    def score(
        self, images, base_prompts: Sequence[str], references: ReferenceEmbeddings | None = None
    ) -> list[dict[str, float]]:
        """One dict of metric values per image; identity metrics need ``references``."""
        images = list(images)
        if len(base_prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(base_prompts)} base prompts")
        image_embeddings: dict[str, torch.Tensor] = {}

        def embed(backbone: str) -> torch.Tensor:
            if backbone not in image_embeddings:
                image_embeddings[backbone] = self._batched(self.encoders[backbone].embed_images, images)
            return image_embeddings[backbone]

        values: dict[str, torch.Tensor] = {}
        for metric in self.metrics:
            kind, backbone, _ = METRICS[metric]
            if kind == "identity":
                if references is None:
                    raise ValueError(f"metric {metric} needs reference images; pass embed_references(...)")
                values[metric] = cosine_to_references(embed(backbone), references.by_metric[metric])
                continue
            encoder = self.encoders[backbone]
            texts = self._batched(encoder.embed_texts, base_prompts)
            cosine = paired_cosine(embed(backbone), texts)
            if metric == "clip_t":
                values[metric] = cosine
            else:
                values[metric] = siglip_probability(cosine, *encoder.logit_scale_and_bias())
        return [{m: float(values[m][i]) for m in self.metrics} for i in range(len(images))]
