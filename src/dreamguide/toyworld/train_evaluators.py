"""Train the miniature world's evaluators on generated data and record their held-out figures.

    python -m dreamguide.toyworld.train_evaluators --out src/dreamguide/toyworld/weights/evaluators

Every batch is freshly rendered from a seeded generator (the data never repeats), so the recipe
(:class:`Recipe`: seed, steps, batch size, learning rate) fixes the result up to floating-point
nondeterminism of the CPU kernels. Validation uses images from a different seed. Writes
``attributes.safetensors``, ``text_alignment.safetensors``, ``identity.safetensors`` (fp16) and
``validation.json`` (figures, recipe, wall time, device). With ``--validate-only`` it trains nothing and
scores the weights in ``--out`` on every attribute (``validation_attributes.json``)::

    python -m dreamguide.toyworld.train_evaluators --validate-only --samples 400 --validation-seed 12345
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dreamguide.images import write_json
from dreamguide.toyworld.evaluators import (
    ATTRIBUTES,
    WEIGHTS_DIR,
    AttributeClassifier,
    IdentityEncoder,
    ImageTextModel,
    ToyEvaluators,
    swap_attribute,
    validate_attributes,
)
from dreamguide.toyworld.render import render, sample_labels
from dreamguide.toyworld.subjects import reference_images, subject_labels
from dreamguide.toyworld.world import (
    SCENES,
    STYLES,
    SUBJECTS,
    Labels,
    caption,
    random_caption,
)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    batch_size: int = 128
    trunk_steps: int = 1500
    text_images: int = 12288
    text_epochs: int = 30
    identity_instances: int = 3072
    identity_views: int = 4
    identity_epochs: int = 40
    lr: float = 2e-3
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    threads: int = 2


# --------------------------------------------------------------------------------------------------
# data


def _labels_tensor(labels: list[Labels], name: str) -> torch.Tensor:
    values = ATTRIBUTES[name]
    return torch.tensor([values.index(getattr(lab, name)) for lab in labels])


def random_accents(labels: list[Labels], gen: torch.Generator, p_random: float = 0.5) -> torch.Tensor:
    """Accent colors ``(N, 3)``: the ordinary accent, or with probability ``p_random`` a random color."""
    base = torch.tensor([lab.accent for lab in labels])
    use_random = torch.rand(len(labels), 1, generator=gen) < p_random
    return torch.where(use_random, torch.rand(len(labels), 3, generator=gen), base)


def trunk_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, list[Labels], torch.Tensor, torch.Tensor]:
    """Images, labels, accent colors and the object's coverage on a 4x4 grid."""
    labels = sample_labels(n, gen)
    accents = random_accents(labels, gen)
    images, masks = render(labels, gen, accents=accents, return_masks=True)
    return images, labels, accents, F.avg_pool2d(masks, masks.shape[-1] // 4)


def identity_batch(instances: int, views: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``instances * views`` images: each instance in ``views`` random scenes, styles, poses, materials.

    An instance is a (class, color, pattern, accent) with the accent either ordinary or a random color;
    ids are equal for equal-looking instances (plain objects show no accent).
    """
    kinds = sample_labels(instances, gen)
    accents = random_accents(kinds, gen)
    keys = [(k.cls, k.color, "plain") if k.pattern == "plain" else (k.cls, k.color, k.pattern, tuple(a))
            for k, a in zip(kinds, accents.tolist())]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    ids = torch.tensor([first[key] for key in keys])
    scaffold = sample_labels(instances * views, gen)
    labels = [dataclasses.replace(scaffold[i * views + j], cls=k.cls, color=k.color, pattern=k.pattern)
              for i, k in enumerate(kinds) for j in range(views)]
    images = render(labels, gen, accents=accents.repeat_interleave(views, dim=0))
    return images, ids.repeat_interleave(views)


# --------------------------------------------------------------------------------------------------
# losses and training loops


def supervised_contrastive(embeddings: torch.Tensor, ids: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SupCon loss (Khosla et al. 2020): every other view of the same instance is a positive."""
    logits = embeddings @ embeddings.T / temperature
    eye = torch.eye(len(ids), dtype=torch.bool)
    logits = logits.masked_fill(eye, -1e9)
    positives = (ids.view(-1, 1) == ids.view(1, -1)) & ~eye
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    return -(log_prob * positives).sum(1).div(positives.sum(1).clamp(min=1)).mean()


def contrastive_image_text(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
                           captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE; identical caption strings in a batch share their targets (no false negatives)."""
    logits = image_emb @ text_emb.T * scale
    index = {c: i for i, c in enumerate(captions)}
    key = torch.tensor([index[c] for c in captions])
    same = (key.view(-1, 1) == key.view(1, -1)).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * ((-target * logits.log_softmax(1)).sum(1).mean() + (-target * logits.log_softmax(0)).sum(0).mean())


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(model, steps: int, loss_fn, lr: float, recipe: Recipe, label: str, log=print, every: int = 100) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, recipe.warmup_steps))
    model.train()
    start, running = time.time(), None
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % every == 0 or step == steps - 1:
            log(f"[{label}] step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f}s)")
    model.eval()
    return time.time() - start


CLASS_WEIGHTS = {"cls": 3.0, "pattern": 1.5}
"""Loss weights of the hardest labels (shape and pattern; scene and style are learned almost at once)."""


def train_trunk(recipe: Recipe, log=print) -> tuple[AttributeClassifier, float]:
    """The shared CNN trunk and attribute heads: cross-entropy per label + accent color regression."""
    torch.manual_seed(recipe.seed)
    model = AttributeClassifier()
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + 1)

    chunk: list = []
    check_gen = torch.Generator().manual_seed(recipe.seed * 1000 + 999)
    check_labels = sample_labels(256, check_gen)
    check_images, check_classes = render(check_labels, check_gen), _labels_tensor(check_labels, "cls")

    def loss_fn(step):
        nonlocal chunk
        if step % 16 == 0:  # render 16 batches at once: large batches render faster
            chunk = trunk_batch(16 * recipe.batch_size, gen)
        rows = slice((step % 16) * recipe.batch_size, (step % 16 + 1) * recipe.batch_size)
        images, labels, accents, coverage = (part[rows] for part in chunk)
        feature_map = model.encoder.feature_map(images)
        out = model.classify_features(model.encoder.pool(feature_map))
        loss = sum(CLASS_WEIGHTS.get(name, 1.0) * F.cross_entropy(out[name], _labels_tensor(labels, name))
                   for name in ATTRIBUTES)
        patterned = torch.tensor([lab.pattern != "plain" for lab in labels]).float().unsqueeze(1)
        loss = loss + 5 * ((out["accent"] - accents) ** 2 * patterned).mean()
        loss = loss + F.binary_cross_entropy_with_logits(model.mask(feature_map), coverage)
        if (step + 1) % 250 == 0:
            model.eval()
            with torch.no_grad():
                accuracy = (model(check_images)["cls"].argmax(1) == check_classes).float().mean()
            model.train()
            log(f"[trunk] step {step + 1}: held-out class accuracy {accuracy:.3f}")
        return loss

    return model, _train(model, recipe.trunk_steps, loss_fn, recipe.lr, recipe, "trunk", log)


@torch.no_grad()
def _features(trunk: AttributeClassifier, images: torch.Tensor) -> torch.Tensor:
    trunk.eval()
    return torch.cat([trunk.encoder(b) for b in images.split(512)])


def train_text_alignment(trunk: AttributeClassifier, recipe: Recipe, log=print) -> tuple[ImageTextModel, float]:
    """Image projection + text encoder on frozen trunk features; captions are redrawn every epoch."""
    start = time.time()
    torch.manual_seed(recipe.seed + 1)
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + 2)
    labels = sample_labels(recipe.text_images, gen)
    features = torch.cat([_features(trunk, render(labels[i:i + 1024], gen))
                          for i in range(0, len(labels), 1024)])
    model = ImageTextModel()
    per_epoch = len(labels) // recipe.batch_size
    order: list[int] = []
    captions: list[str] = []

    def loss_fn(step):
        nonlocal order, captions
        if step % per_epoch == 0:
            order = torch.randperm(len(labels), generator=gen).tolist()
            captions = [random_caption(lab, gen, p_drop_color=0.3, p_drop_pattern=0.5, p_drop_scene=0.3)
                        for lab in labels]
        batch = order[(step % per_epoch) * recipe.batch_size:(step % per_epoch + 1) * recipe.batch_size]
        texts = [captions[i] for i in batch]
        return contrastive_image_text(model.encode_features(features[batch]), model.encode_texts(texts),
                                      model.logit_scale.clamp(max=4.6).exp(), texts)

    log(f"[text] {len(labels)} images encoded ({time.time() - start:.0f}s)")
    _train(model, recipe.text_epochs * per_epoch, loss_fn, recipe.head_lr, recipe, "text", log, every=500)
    return model, time.time() - start


def train_identity(trunk: AttributeClassifier, recipe: Recipe, log=print) -> tuple[IdentityEncoder, float]:
    """Identity projection on frozen trunk features with the supervised contrastive loss."""
    start = time.time()
    torch.manual_seed(recipe.seed + 2)
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + 3)
    views = recipe.identity_views
    chunks = [identity_batch(256, views, gen) for _ in range(recipe.identity_instances // 256)]
    features = torch.cat([_features(trunk, images) for images, _ in chunks]).view(-1, views, 192)
    ids = torch.cat([ids + 256 * k for k, (_, ids) in enumerate(chunks)]).view(-1, views)[:, 0]
    model = IdentityEncoder()
    per_batch = recipe.batch_size // views
    per_epoch = len(ids) // per_batch
    order: list[int] = []

    def loss_fn(step):
        nonlocal order
        if step % per_epoch == 0:
            order = torch.randperm(len(ids), generator=gen).tolist()
        batch = order[(step % per_epoch) * per_batch:(step % per_epoch + 1) * per_batch]
        return supervised_contrastive(model(features[batch].flatten(0, 1)), ids[batch].repeat_interleave(views))

    log(f"[identity] {features.shape[0]} instances x {views} views encoded ({time.time() - start:.0f}s)")
    _train(model, recipe.identity_epochs * per_epoch, loss_fn, recipe.head_lr, recipe, "identity", log, every=500)
    return model, time.time() - start


# --------------------------------------------------------------------------------------------------
# held-out figures


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = positive.view(-1, 1) - negative.view(1, -1)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


@torch.no_grad()
def validate(evaluators: ToyEvaluators, seed: int = 12345, n: int = 2000) -> dict:
    """Held-out figures on fresh generator samples (``seed`` differs from every training seed)."""
    gen = torch.Generator().manual_seed(seed)
    labels = sample_labels(n, gen)
    images = render(labels, gen)
    figures: dict = {"samples": n, "seed": seed}

    # attribute classifiers
    predicted = evaluators.classify(images)
    accuracy = {name: sum(p == getattr(lab, name) for p, lab in zip(predicted[name], labels)) / n
                for name in ATTRIBUTES}
    photo = [i for i, lab in enumerate(labels) if lab.style == "photo"]
    accuracy["color_in_photos"] = sum(predicted["color"][i] == labels[i].color for i in photo) / len(photo)
    judgement = evaluators.judge(images, [caption(lab) for lab in labels])
    accuracy["class_scene_style_all_correct"] = float(judgement.all.float().mean())
    by_style = {style: sum(predicted["cls"][i] == labels[i].cls for i in range(n) if labels[i].style == style)
                / max(1, sum(lab.style == style for lab in labels)) for style in STYLES}
    figures["attributes"] = {"accuracy": {k: round(v, 4) for k, v in accuracy.items()},
                             "class_accuracy_by_style": {k: round(v, 4) for k, v in by_style.items()}}

    # text alignment: retrieval among groups of 100 full captions, and true caption vs one attribute swapped
    captions = [caption(lab) for lab in labels]
    image_emb = evaluators.text_model.encode_features(evaluators.features(images))
    text_emb = torch.cat([evaluators.text_model.encode_texts(captions[i:i + 256]) for i in range(0, n, 256)])
    top1_i2t, top1_t2i = [], []
    for start in range(0, n, 100):
        sim = image_emb[start:start + 100] @ text_emb[start:start + 100].T
        target = torch.arange(sim.shape[0])
        top1_i2t.append((sim.argmax(1) == target).float().mean())
        top1_t2i.append((sim.argmax(0) == target).float().mean())
    rng = random.Random(seed)
    pairwise = {}
    for name in ("cls", "color", "pattern", "scene", "style"):
        swapped = [caption(swap_attribute(lab, name, rng)) for lab in labels]
        true_score = evaluators.text_alignment(images, captions)
        swapped_score = evaluators.text_alignment(images, swapped)
        pairwise[name] = round(float((true_score > swapped_score).float().mean()), 4)
    short = [caption(lab, material=False, color=False, pattern=False, scene=False) for lab in labels]
    short_swapped = [caption(swap_attribute(lab, "style", rng), material=False, color=False, pattern=False, scene=False)
                     for lab in labels]
    pairwise["style_short_prompt"] = round(float(
        (evaluators.text_alignment(images, short) > evaluators.text_alignment(images, short_swapped))
        .float().mean()), 4)
    figures["text_alignment"] = {
        "retrieval_top1_image_to_text_of_100": round(float(torch.stack(top1_i2t).mean()), 4),
        "retrieval_top1_text_to_image_of_100": round(float(torch.stack(top1_t2i).mean()), 4),
        "true_caption_beats_one_swapped_attribute": pairwise,
        "mean_cosine_true_caption": round(float((image_emb * text_emb).sum(-1).mean()), 4),
    }

    # identity: same instance (other scene/style/pose/material) vs another instance of the same class
    pairs = max(4, 300 * n // 2000)  # the subject and pair counts scale with n (2000: 300 pairs, 40/20/40 views)
    id_images, ids = identity_batch(pairs, 2, gen)
    emb = evaluators.identity_embeddings(id_images).view(pairs, 2, -1)
    positive = (emb[:, 0] * emb[:, 1]).sum(-1)
    negative = (emb[:, 0] * emb.roll(1, dims=0)[:, 1]).sum(-1)
    # subjects: generated views (any scene/style) vs ordinary objects of the same class, scored against references
    subject_pos, subject_neg, subject_pos_photo = [], [], []
    for subject in SUBJECTS:
        refs = reference_images(subject)
        views = subject_labels(subject, max(2, 40 * n // 2000), gen, scenes=tuple(SCENES))
        styled = [dataclasses.replace(v, style=s) for v, s in zip(views, list(STYLES) * 5)]
        photos = subject_labels(subject, max(2, 20 * n // 2000), gen, scenes=tuple(SCENES))
        others = [dataclasses.replace(lab, cls=subject.cls) for lab in sample_labels(max(2, 40 * n // 2000), gen)]
        subject_pos.append(evaluators.identity(render(styled, gen), refs))
        subject_pos_photo.append(evaluators.identity(render(photos, gen), refs))
        subject_neg.append(evaluators.identity(render(others, gen), refs))
    figures["identity"] = {
        "verification_auc_random_instances": round(auc(positive, negative), 4),
        "subject_vs_same_class_auc_any_style": round(auc(torch.cat(subject_pos), torch.cat(subject_neg)), 4),
        "subject_vs_same_class_auc_photo": round(auc(torch.cat(subject_pos_photo), torch.cat(subject_neg)), 4),
        "mean_identity_subject_photo": round(float(torch.cat(subject_pos_photo).mean()), 4),
        "mean_identity_subject_any_style": round(float(torch.cat(subject_pos).mean()), 4),
        "mean_identity_other_same_class": round(float(torch.cat(subject_neg).mean()), 4),
    }
    return figures


# --------------------------------------------------------------------------------------------------
# entry point


def _save(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()
             if v.dtype.is_floating_point}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    save_file(state, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def train_all(out: str | Path = WEIGHTS_DIR, recipe: Recipe = Recipe(), log=print, validation_samples: int = 2000) -> dict:
    """Train the three evaluators with ``recipe``, save them to ``out`` and return the validation figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    start = time.time()
    attributes, t_attr = train_trunk(recipe, log)
    _save(attributes, out / "attributes.safetensors")
    text_model, t_text = train_text_alignment(attributes, recipe, log)
    _save(text_model, out / "text_alignment.safetensors")
    identity, t_id = train_identity(attributes, recipe, log)
    _save(identity, out / "identity.safetensors")
    # validate the weights as saved (fp16), exactly as users load them
    evaluators = ToyEvaluators.load(out)
    figures = validate(evaluators, n=validation_samples)
    record = {
        "figures": figures,
        "recipe": dataclasses.asdict(recipe),
        "train_seconds": {"trunk_and_attributes": round(t_attr, 1), "text_alignment": round(t_text, 1),
                          "identity": round(t_id, 1), "total_with_validation": round(time.time() - start, 1)},
        "device": f"CPU ({platform.processor() or platform.machine()}, {recipe.threads} threads), "
                  f"torch {torch.__version__}",
        "command": f"python -m dreamguide.toyworld.train_evaluators --seed {recipe.seed}",
    }
    write_json(out / "validation.json", record)
    log(json.dumps(figures, indent=2))
    return record


def attribute_table(figures: dict) -> str:
    """A plain-text table of :func:`~dreamguide.toyworld.evaluators.validate_attributes`' figures."""
    rows = [f"{'attribute':<10} {'classifier':>10} {'prior':>7} {'text swap':>10}"]
    for name in ATTRIBUTES:
        rows.append(f"{name:<10} {figures['classifier_accuracy'][name]:>10.3f} "
                    f"{figures['majority_prior'][name]:>7.3f} {figures['text_swap_accuracy'][name]:>10.3f}")
    rows.append("material swap by pair (true->swapped): " + ", ".join(
        f"{pair} {value:.3f}" for pair, value in figures["material_swap_by_pair"].items()))
    rows.append("material classifier recall: " + ", ".join(
        f"{m} {value:.3f}" for m, value in figures["material_recall"].items()))
    judged = figures["judge_accepts_true_caption"]
    rows.append(f"judge accepts the true caption: class+scene+style {judged['class_scene_style']:.3f}, "
                f"all six {judged['all_six']:.3f}  ({figures['samples']} images, seed {figures['seed']})")
    return "\n".join(rows)


def validate_only(weights: str | Path, samples: int, seed: int, out_json: str | Path, threads: int,
                  log=print) -> dict:
    """Score the weights in ``weights`` on every attribute, print the table and write ``out_json``."""
    torch.set_num_threads(threads)
    start = time.time()
    figures = validate_attributes(ToyEvaluators.load(weights), n=samples, seed=seed)
    record = {
        "figures": {**figures, **{key: {k: round(v, 4) for k, v in figures[key].items()}
                                  for key in ("classifier_accuracy", "majority_prior", "text_swap_accuracy",
                                              "material_swap_by_pair", "material_recall",
                                              "judge_accepts_true_caption")}},
        "seconds": round(time.time() - start, 1),
        "device": f"CPU ({platform.processor() or platform.machine()}, {threads} threads), "
                  f"torch {torch.__version__}",
        "command": f"python -m dreamguide.toyworld.train_evaluators --validate-only --samples {samples} "
                   f"--validation-seed {seed}",
    }
    write_json(out_json, record)
    log(attribute_table(figures))
    log(f"wrote {out_json}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for the weights and validation.json")
    parser.add_argument("--validate-only", action="store_true",
                        help="train nothing: score the weights in --out on every attribute (classifier accuracy "
                             "and one-attribute-swap text alignment), print a table and write --json")
    parser.add_argument("--samples", type=int, default=400, help="with --validate-only: images to render")
    parser.add_argument("--validation-seed", type=int, default=12345, help="with --validate-only: their seed")
    parser.add_argument("--json", default=None,
                        help="with --validate-only: where to write the figures "
                             "(default: validation_attributes.json in --out)")
    defaults = Recipe()
    for field in dataclasses.fields(Recipe):
        default = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    if args.validate_only:
        if args.samples < 1:
            parser.error(f"--samples must be at least 1, got {args.samples}")
        out_json = args.json or str(Path(args.out) / "validation_attributes.json")
        validate_only(args.out, args.samples, args.validation_seed, out_json, args.threads)
        return 0
    train_all(args.out, Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
