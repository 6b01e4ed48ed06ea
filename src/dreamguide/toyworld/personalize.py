"""Personalizing the toy world's subjects: a LoRA per subject by ``dreambooth``, ``dreambooth-ti`` or ``dco``.

The subject's reference photos (:func:`dreamguide.toyworld.subjects.reference_images`) and their
captions are written as an ordinary training folder (``ref-0.png`` + ``ref-0.txt``, ...) and
trained with :func:`dreamguide.training.train` on the toy base model, in memory.

Tokens: ``dreambooth`` and ``dco`` use the subject's rare word (``sks``), which the base tokenizer
knows but no base caption contains, as in the DreamBooth paper; ``dreambooth-ti`` learns a new
token ``<sks>`` initialised from the class word (pivotal tuning). :func:`subject_token` gives the
one a method uses.

The defaults (:data:`DEFAULTS`) are chosen so plain DreamBooth overfits the way the PR paper
describes: a rank-32 LoRA on attention, feed-forward and time-embedding layers, trained 1000 steps
at lr 2e-3 on five photos, keeps the subject but drops the style word in a good share of
stylized prompts (measured in docs/RESULTS.md).

The bundled adapter (``weights/subjects/<token>-<method>/``) is one of these runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dreamguide.filenames import EMBEDDINGS_FILE, LORA_FILE, PERSONALIZATION_RECORD
from dreamguide.lora_files import ADAPTER_NAME, LORA_TARGETS
from dreamguide.toyworld.model import BUNDLED_MODEL_DIR, load_toyworld_model
from dreamguide.training.config import METHODS
from dreamguide.training.losses import DCO_BETA

BUNDLED_SUBJECTS_DIR = Path(__file__).parent / "weights" / "subjects"
#: The adapter the demo uses.
BUNDLED_SUBJECT = "sks"
BUNDLED_METHOD = "dreambooth"

#: LoRA targets: the attention projections (the usual DreamBooth-LoRA choice, ``LORA_TARGETS``) plus
#: the transformer feed-forward layers and each ResNet's time-embedding projection (all Linear).
WIDE_TARGETS: tuple[str, ...] = LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "time_emb_proj")


@dataclass(frozen=True)
class PersonalizeSettings:
    """Fine-tuning hyper-parameters for one subject (the toy world's defaults).

    The defaults were picked with ``benchmarks/toyworld_overfit.py`` (docs/RESULTS.md): the weakest
    recipe of that grid under which plain DreamBooth stops following style words on a good share of
    stylized prompts while it still draws the subject; stronger ones (lr 3e-3 and up) wreck the subject.
    """

    steps: int = 1000
    batch_size: int = 4
    lr: float = 2e-3
    rank: int = 32
    ti_lr: float = 5e-3
    dco_beta: float = DCO_BETA
    seed: int = 0
    #: UNet Linear layers that get LoRA (names as PEFT matches them).
    lora_targets: tuple[str, ...] = WIDE_TARGETS


DEFAULTS = PersonalizeSettings()


def subject_token(subject: str, method: str) -> str:
    """The identifier a method trains: the rare word itself, or ``<word>`` for pivotal tuning."""
    if method not in METHODS:
        raise ValueError(f"unknown personalization method {method!r}; choose one of {', '.join(METHODS)}")
    return f"<{subject}>" if method == "dreambooth-ti" else subject


def write_reference_folder(subject: str, folder, token: str | None = None) -> Path:
    """The subject's reference photos as PNGs with same-name caption files; returns the folder."""
    from dreamguide.toyworld.render import to_pil
    from dreamguide.toyworld.subjects import get_subject, reference_captions, reference_images

    subject_ = get_subject(subject)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = to_pil(reference_images(subject_))
    for i, (image, caption) in enumerate(zip(images, reference_captions(subject_))):
        if token is not None and token != subject_.token:
            caption = " ".join(token if w == subject_.token else w for w in caption.split())
        image.save(folder / f"ref-{i}.png")
        (folder / f"ref-{i}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def personalize(
    subject: str,
    method: str,
    out,
    settings: PersonalizeSettings = DEFAULTS,
    model=None,
    model_path=None,
    device: str | None = None,
    progress: bool = False,
    resume: str | None = None,
    overwrite: bool = True,
    checkpoint_every: int = 0,
):
    """Fine-tune ``subject`` with ``method``; writes the adapter to ``out`` and returns ``TrainResult``.

    ``model``: a loaded base ``DiffusionModel`` to train in place (else the bundled one, or
    ``model_path``, is loaded; it must be a toy-world model). ``result.model`` carries the adapter
    (``ADAPTER_NAME``) afterwards. ``checkpoint_every`` > 0 writes resumable checkpoints like
    ``dreamguide train``; ``resume="latest"`` continues the newest one. ``overwrite=False`` refuses an
    ``out`` that already holds an adapter or an unfinished run's checkpoints (unless resuming).
    """
    import time

    from dreamguide.toyworld.subjects import get_subject
    from dreamguide.training import train, train_config_from_dict

    subject_ = get_subject(subject)
    token = subject_token(subject_.token, method)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    if not overwrite and resume is None and (out / LORA_FILE).is_file():
        raise ValueError(f"{out} already holds an adapter ({LORA_FILE}); pass --overwrite to replace it, "
                         "--resume to continue its run, or choose another --out")
    if resume is None:
        from dreamguide.training.checkpoints import list_checkpoints

        earlier = list_checkpoints(out)
        if earlier and not overwrite:
            raise ValueError(f"{out} holds checkpoints of an unfinished run; pass --resume to continue it, "
                             "--overwrite to start over, or choose another --out")
        for _, folder in earlier:  # an earlier run's checkpoints: this run replaces that run
            shutil.rmtree(folder)
    if model is None:
        model = load_toyworld_model(model_path, device=device)
    if model.kind != "pixel":
        raise ValueError(f"{model_path or 'the given model'} is a {model.kind!r} model, not a toy-world model (a pixel "
                         "model with the world's vocabulary); use the bundled one or `dreamguide toyworld train-base`")
    references = write_reference_folder(subject_.token, out / "references", token)
    config = train_config_from_dict(
        {
            "data": {
                "instance_dir": str(references),
                "token": token,
                "class_word": subject_.cls,
                "resolution": model.unet.config.sample_size,
                "cache_latents": False,
            },
            "train": {
                "method": method,
                "steps": settings.steps,
                "batch_size": settings.batch_size,
                "lr": settings.lr,
                "seed": settings.seed,
                "mixed_precision": "bf16" if str(device).startswith("cuda") else "no",
            },
            "lora": {"rank": settings.rank, "alpha": float(settings.rank),
                     "target_modules": list(settings.lora_targets)},
            "ti": {"lr": settings.ti_lr},
            "dco": {"beta": settings.dco_beta},
            "output": {"dir": str(out), "checkpoint_every": checkpoint_every},
        },
        source=f"toyworld personalize {subject_.token} {method}",
    )
    started = time.time()
    result = train(config, model=model, progress=progress, resume=resume)
    record = {
        "subject": subject_.token,
        "class_word": subject_.cls,
        "method": method,
        "token": token,
        "settings": asdict(settings),
        "base_model": str(model_path or BUNDLED_MODEL_DIR.name),
        "final_loss": result.losses[-1] if getattr(result, "losses", None) else None,
        "seconds": round(time.time() - started, 1),
        "device": str(device),
    }
    (out / PERSONALIZATION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return result


def adapter_dir(subject: str = BUNDLED_SUBJECT, method: str = BUNDLED_METHOD) -> Path:
    """Folder of a bundled adapter."""
    return BUNDLED_SUBJECTS_DIR / f"{subject}-{method}"


def load_personalized(subject: str = BUNDLED_SUBJECT, method: str = BUNDLED_METHOD, folder=None,
                      model=None, device: str = "cpu"):
    """The base model with an adapter loaded (``ADAPTER_NAME``) and, for pivotal tuning, its token.

    ``folder``: a ``personalize`` output folder (default: the bundled adapter of ``subject``/``method``).
    """
    from dreamguide.lora_files import load_lora
    from dreamguide.token_files import load_embeddings

    folder = Path(folder) if folder is not None else adapter_dir(subject, method)
    lora = folder / LORA_FILE
    if not lora.exists():
        raise FileNotFoundError(
            f"no adapter in {folder} ({LORA_FILE} missing); train one with "
            f"`dreamguide toyworld personalize --subject {subject} --method {method} --out {folder}`"
        )
    model = model if model is not None else load_toyworld_model(device=device)
    token = subject_token(subject, method)
    if (folder / EMBEDDINGS_FILE).exists():
        load_embeddings(model, folder / EMBEDDINGS_FILE, token)
    load_lora(model, lora, ADAPTER_NAME)
    return model, token
