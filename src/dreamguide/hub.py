"""Sharing a training run: a model card beside the adapter, and a push to the Hugging Face Hub.

A run folder (``output.dir`` of ``dreamguide train``) holds:

    pytorch_lora_weights.safetensors        diffusers LoRA                     shared
    <name>.safetensors                      the same LoRA in Kohya's layout    shared
    embeddings.safetensors                  learned token (pivotal tuning)     shared
    <name>_emb.safetensors                  the same, named for A1111          shared
    samples/step-<n>/prompt-<i>/            images sampled during training     the newest step's shared
    README.md                               the model card (``write_model_card``) shared
    config.toml                             the resolved run config            read, not shared (local paths)
    log.jsonl, checkpoint-<n>/, logs/       training state                     not shared

The card is read from the files themselves: the ``dreamguide`` JSON header of the safetensors
files (token, class word, base model, method, steps), ``config.toml`` (hyperparameters) and the
newest samples' ``settings.json`` (the guidance settings the shown images were made with).
``<name>`` is the run's name (``dreamguide`` header ``name``, else ``output.name`` of
``config.toml``, else :func:`dreamguide.filenames.default_run_name`); a run written before run
names has its Kohya LoRA as ``pytorch_lora_weights_kohya.safetensors``, shared too.
Nothing here imports torch or the training code.

    from dreamguide.hub import push_run, write_model_card

    write_model_card("outputs/dog")                  # outputs/dog/README.md
    push_run("outputs/dog", "me/dog-lora")           # card + shared files -> huggingface.co/me/dog-lora
"""

from __future__ import annotations

import glob
import html
import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from dreamguide.atomic import atomic_write_text
from dreamguide.filenames import (
    CONFIG_FILE,
    EMBEDDINGS_FILE,
    LEGACY_KOHYA_FILE,
    LORA_FILE,
    METADATA_KEY,
    SAMPLES_DIR,
    default_run_name,
    kohya_file,
    shared_embeddings_file,
)

logger = logging.getLogger(__name__)

SAMPLE_SETTINGS_FILE = "settings.json"
CARD_FILE = "README.md"


def weight_files(name: str) -> tuple[str, ...]:
    """The weight files a run called ``name`` may hold, in the order a card lists them."""
    return (LORA_FILE, kohya_file(name), LEGACY_KOHYA_FILE, EMBEDDINGS_FILE, shared_embeddings_file(name))

#: Marks a card this module wrote, so a card written by hand is never overwritten.
CARD_MARKER = "<!-- model card written by dreamguide; `dreamguide push` rewrites it -->"

METHOD_NAMES: dict[str, str] = {
    "dreambooth": "DreamBooth LoRA",
    "dreambooth-ti": "DreamBooth LoRA with pivotal tuning (a learned token embedding)",
    "dco": "Direct Consistency Optimization (DCO) LoRA",
}
KIND_TAGS: dict[str, tuple[str, ...]] = {
    "sdxl": ("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
    "sd": ("stable-diffusion", "stable-diffusion-diffusers"),
}


@dataclass(frozen=True)
class SampleImage:
    """One prompt's sample image of a run, and the settings it was sampled with."""

    prompt: str
    image: str  # path relative to the run folder, "/"-separated
    settings: dict


@dataclass(frozen=True)
class Run:
    """What a run folder says about itself (see the module docstring)."""

    folder: Path
    token: str
    class_word: str
    method: str
    model_kind: str | None
    base_model: str  # as recorded: a hub id or a local folder
    steps: int | None
    config: dict = field(default_factory=dict)
    weights: tuple[str, ...] = ()  # the weight files present, by name
    name: str = ""  # the run's name, which the shared Kohya LoRA and embeddings carry
    sample_step: int | None = None
    samples: tuple[SampleImage, ...] = ()

    @property
    def learned_token(self) -> bool:
        return EMBEDDINGS_FILE in self.weights

    @property
    def instance_prompt(self) -> str:
        template = self.config.get("data", {}).get("instance_prompt") or "a photo of {token} {class_word}"
        return template.replace("{token}", self.token).replace("{class_word}", self.class_word)


# ---------------------------------------------------------------------------------------------
# Reading a run


def safetensors_header(path: str | os.PathLike) -> dict[str, str]:
    """The string header (``__metadata__``) of a safetensors file, read without loading tensors."""
    path = Path(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {error})") from error
    return dict(header.get("__metadata__") or {})


def _run_metadata(path: Path) -> dict[str, Any]:
    text = safetensors_header(path).get(METADATA_KEY)
    if text is None:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the {METADATA_KEY!r} header is not JSON ({error})") from error


def _newest_samples(folder: Path) -> tuple[int | None, tuple[SampleImage, ...]]:
    """The newest ``samples/step-<n>/`` of a run: per prompt folder, its grid (or only image) and settings."""
    steps = []
    for step_dir in (folder / SAMPLES_DIR).glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", step_dir.name)
        if match and step_dir.is_dir():
            steps.append((int(match[1]), step_dir))
    if not steps:
        return None, ()
    step, step_dir = max(steps)
    prompt_dirs = [(int(m[1]), p) for p in step_dir.iterdir() if (m := re.fullmatch(r"prompt-(\d+)", p.name))]
    samples = []
    for _, prompt_dir in sorted(prompt_dirs):
        settings_path = prompt_dir / SAMPLE_SETTINGS_FILE
        if not settings_path.is_file():
            continue
        try:
            record = json.loads(settings_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{settings_path} is not JSON ({error})") from error
        settings = record.get("settings", {})
        images = [prompt_dir / "grid.png"] + [prompt_dir / name for name in record.get("files", [])]
        image = next((p for p in images if p.is_file()), None)
        if image is not None and settings.get("prompt"):
            relative = image.relative_to(folder).as_posix()
            samples.append(SampleImage(settings["prompt"], relative, settings))
    return step, tuple(samples)


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder's weights headers, ``config.toml`` and newest samples."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} does not exist; pass the output.dir of a training run")
    if not (folder / LORA_FILE).is_file() and not (folder / EMBEDDINGS_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} holds no trained weights ({LORA_FILE} or {EMBEDDINGS_FILE}); pass the output.dir of a "
            "finished training run"
        )
    config: dict = {}
    if (folder / CONFIG_FILE).is_file():
        try:
            config = tomllib.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{folder / CONFIG_FILE} is not valid TOML: {error}") from error
    metadata: dict = {}
    for name in (LORA_FILE, EMBEDDINGS_FILE):
        metadata = _run_metadata(folder / name) if (folder / name).is_file() else {}
        if metadata:
            break
    data, train, model = config.get("data", {}), config.get("train", {}), config.get("model", {})
    token = metadata.get("token") or data.get("token")
    run_name = metadata.get("name") or config.get("output", {}).get("name") or default_run_name(token or "", folder.name)
    weights = tuple(name for name in weight_files(run_name) if (folder / name).is_file())
    class_word = metadata.get("class_word") or data.get("class_word")
    if not token or not class_word:
        raise ValueError(
            f"{folder}: cannot tell the token and class word: neither the {METADATA_KEY!r} header of "
            f"{', '.join(weights)} nor {CONFIG_FILE} records them"
        )
    sample_step, samples = _newest_samples(folder)
    return Run(
        folder=folder,
        token=token,
        class_word=class_word,
        method=metadata.get("method") or train.get("method") or "dreambooth",
        model_kind=metadata.get("model_kind"),
        base_model=metadata.get("base_model") or model.get("pretrained") or "",
        steps=metadata.get("steps", train.get("steps")),
        config=config,
        weights=weights,
        name=run_name,
        sample_step=sample_step,
        samples=samples,
    )


def hub_model_id(recorded: str) -> str | None:
    """``recorded`` if it reads as a Hub model id ("owner/name", not a local folder), else None."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", recorded or "") or Path(recorded).exists():
        return None
    return recorded


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "\\\\")) or bool(re.match(r"[A-Za-z]:[\\/]", value))


def local_paths(run: Run) -> list[str]:
    """Absolute local paths in the headers of the run's shared weight files, as "file: key = value"."""
    found = []

    def walk(value, key: str, name: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k, name)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]", name)
        elif isinstance(value, str) and _is_local_path(value):
            found.append(f"{name}: {key} = {value}")

    for name in run.weights:
        walk(_run_metadata(run.folder / name), "", name)
    return found


def shared_files(run: Run) -> list[str]:
    """The files ``push_run`` uploads, relative to the run folder: weights, card, newest sample images."""
    files = [*run.weights, CARD_FILE, *(s.image for s in run.samples)]
    return sorted(dict.fromkeys(files))


# ---------------------------------------------------------------------------------------------
# The model card


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def model_card(run: Run, base_model: str | None = None, title: str | None = None, license: str | None = None):
    """The model card of ``run`` as a ``huggingface_hub.ModelCard`` (YAML metadata + markdown).

    ``base_model`` names the base model's Hub id when the run recorded a local folder;
    ``license`` is the card's license id (the base model's license governs the weights; none by default).
    """
    from huggingface_hub import ModelCard, ModelCardData

    import dreamguide

    base_id = base_model or hub_model_id(run.base_model)
    base_name = base_id or (Path(run.base_model).name if run.base_model else "unknown")
    title = title or run.folder.resolve().name
    tags = ["text-to-image", "diffusers", "lora", "template:sd-lora", "dreamguide"]
    tags += list(KIND_TAGS.get(run.model_kind or "", ()))
    tags += ["dco"] if run.method == "dco" else ["dreambooth"]
    tags += ["textual-inversion"] if run.learned_token else []
    data = ModelCardData(
        base_model=base_id,
        library_name="diffusers",
        license=license,
        tags=tags,
        instance_prompt=run.instance_prompt,
        widget=[{"text": s.prompt, "output": {"url": s.image}} for s in run.samples] or None,
    )
    method = METHOD_NAMES.get(run.method, run.method)
    if run.method == "dco" and run.learned_token:
        method += " with a learned token embedding"
    base_text = f"`{base_id}`" if base_id else f"a local model folder named `{base_name}`"
    lines = [
        CARD_MARKER,
        "",
        f"# {title}",
        "",
        f"{method} of {base_text} for the subject `{run.token} {run.class_word}`, trained with dreamguide "
        f"{dreamguide.__version__}" + (f" for {run.steps} steps." if run.steps else "."),
        "",
        "## Trigger",
        "",
        f"Write `{run.token} {run.class_word}` into the prompt, e.g. `{run.instance_prompt}`.",
    ]
    if run.learned_token:
        lines.append(
            f"`{run.token}` is a learned token: load `{EMBEDDINGS_FILE}` into the text encoder(s) under that name "
            "together with the LoRA."
        )
    lines += ["", "## Files", "", "| file | format | loads with |", "|---|---|---|"]
    file_rows = {
        LORA_FILE: (
            "diffusers LoRA (PEFT keys)",
            "`pipe.load_lora_weights(repo, weight_name=...)`, `dreamguide sample --lora`",
        ),
        kohya_file(run.name): (
            "Kohya LoRA (`lora_unet_*`, kohya and SAI model spec header)",
            f"ComfyUI, A1111 / Forge (`<lora:{run.name}:1>`), kohya sd-scripts",
        ),
        LEGACY_KOHYA_FILE: ("Kohya LoRA (`lora_unet_*`)", "ComfyUI, A1111 / Forge, kohya sd-scripts"),
        EMBEDDINGS_FILE: (
            "textual inversion (`clip_l` + `clip_g` for SDXL, `emb_params` otherwise)",
            "`pipe.load_textual_inversion`, `dreamguide sample --embeddings`",
        ),
        shared_embeddings_file(run.name): (
            "the same textual inversion, named for A1111",
            f"A1111 / Forge `embeddings/` (trigger word `{run.name}_emb`), ComfyUI (`embedding:{run.name}_emb`)",
        ),
    }
    lines += [f"| `{name}` | {file_rows[name][0]} | {file_rows[name][1]} |" for name in run.weights]

    lines += ["", "## Guidance", ""]
    settings = run.samples[0].settings if run.samples else None
    if settings:
        pr = settings.get("pr") or {}
        lines += [
            f"The sample images below were made at training step {run.sample_step} with dreamguide's sampler in these "
            "settings:",
            "",
            "| setting | value |",
            "|---|---|",
            f"| modes | {_value(settings.get('modes', []))} |",
            f"| w_text | `{settings.get('w_text')}` |",
            f"| w_cons | `{settings.get('w_cons')}` |",
            f"| steps | `{settings.get('steps')}` |",
            f"| scheduler | `{settings.get('scheduler', 'default')}` |",
            f"| parallel rescaling | {', '.join(f'{k} `{v}`' for k, v in pr.items())} |",
            f"| seeds | {_value(settings.get('seeds', []))} |",
        ]
        modes, w_text, w_cons = ",".join(settings.get("modes", [])), settings.get("w_text"), settings.get("w_cons")
    else:
        lines.append("This run wrote no sample images, so no guidance settings were checked on it.")
        modes, w_text, w_cons = "parallel-rescaled", 7.5, 3.0
    lines += [
        "",
        "Consistency and parallel-rescaled guidance combine three predictions per step: the base model (LoRA off) "
        "on the negative prompt and on the base prompt (the token replaced by the class word), and the "
        "personalized model (LoRA on) on the token prompt. With dreamguide:",
        "",
        "```bash",
        f"dreamguide sample --model {base_id or base_name} --lora {LORA_FILE}"
        + (f" --embeddings {EMBEDDINGS_FILE}" if run.learned_token else "")
        + f' --token "{run.token}" --class-word "{run.class_word}" --prompt "{run.instance_prompt}"'
        + f" --modes {modes} --w-text {w_text} --w-cons {w_cons}",
        "```",
    ]
    if run.model_kind == "sdxl":
        lines += ["", "In diffusers' modular SDXL pipeline: `dreamguide.integrations.diffusers.ConsistencyGuidance`."]

    train, lora, ti, dco, data_ = (run.config.get(k, {}) for k in ("train", "lora", "ti", "dco", "data"))
    rows = [
        ("method", run.method),
        ("steps", run.steps),
        ("resolution", data_.get("resolution")),
        ("batch size", train.get("batch_size")),
        ("learning rate", train.get("lr")),
        ("LoRA rank / alpha", f"{lora['rank']} / {lora['alpha']}" if "rank" in lora and "alpha" in lora else None),
        ("LoRA target modules", lora.get("target_modules")),
        ("token learning rate", ti.get("lr") if run.learned_token else None),
        ("DCO beta / average", f"{dco.get('beta')} / {dco.get('average')}" if run.method == "dco" and dco else None),
        ("mixed precision", train.get("mixed_precision")),
        ("seed", train.get("seed")),
    ]
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_value(value)} |" for name, value in rows if value not in (None, "", [])]

    if run.samples:
        lines += ["", "## Samples", ""]
        for sample in run.samples:
            lines += [f"`{sample.prompt}`", "", f"![{html.escape(sample.prompt)}]({sample.image})", ""]
    text = "\n".join(lines).rstrip() + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def write_model_card(
    run_dir: str | os.PathLike,
    base_model: str | None = None,
    title: str | None = None,
    license: str | None = None,
) -> Path:
    """Write ``README.md`` (the model card) into the run folder, atomically; return its path.

    A ``README.md`` that this module did not write (no ``CARD_MARKER``) is kept: a ValueError says so.
    """
    run = read_run(run_dir)
    path = run.folder / CARD_FILE
    if path.is_file() and CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        raise ValueError(
            f"{path} was not written by dreamguide; keep it (push with --keep-card) or move it away to write a new card"
        )
    atomic_write_text(path, str(model_card(run, base_model=base_model, title=title, license=license)))
    return path


# ---------------------------------------------------------------------------------------------
# Pushing


@dataclass(frozen=True)
class PushResult:
    url: str
    files: list[str]
    local_paths: list[str]


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid "owner/name" Hub model id; else a ValueError with an example."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo {repo_id!r} must be owner/name, e.g. 'my-name/dog-lora'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo {repo_id!r} is not a valid Hub repo id: {error}") from error
    return repo_id


def push_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    base_model: str | None = None,
    license: str | None = None,
    keep_card: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Write the model card and upload the shared files of a run to the Hub model repo ``repo_id``.

    The repo is created if missing (``private`` as given, else the Hub's default). Only
    ``shared_files`` are uploaded; files already in the repo under other names stay. Absolute
    local paths found in the weight files' headers are logged as a warning and returned.
    ``token`` defaults to the stored login (``hf auth login``) or ``HF_TOKEN``.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(run_dir)
    if keep_card:
        if not (folder / CARD_FILE).is_file():
            raise FileNotFoundError(f"{folder / CARD_FILE} does not exist; push without --keep-card to write one")
    else:
        write_model_card(folder, base_model=base_model, title=repo_id.split("/")[1], license=license)
    run = read_run(folder)
    files = shared_files(run)
    leaked = local_paths(run)
    if leaked:
        logger.warning("the weight files' headers name local paths, which will be public:\n  %s", "\n  ".join(leaked))
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=[glob.escape(name) for name in files],
        commit_message=commit_message or f"Upload {run.token} {run.class_word} ({run.method}) with dreamguide",
    )
    return PushResult(url=str(repo), files=files, local_paths=leaked)
