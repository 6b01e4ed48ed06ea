"""The names of the files dreamguide writes, in one place, so every reader finds what a writer wrote.

A training run's folder (``dreamguide train``, ``dreamguide toyworld personalize``)::

    pytorch_lora_weights.safetensors        LORA_FILE        the LoRA, diffusers keys
    <name>.safetensors                      kohya_file(name) the same LoRA, Kohya keys (ComfyUI, A1111)
    embeddings.safetensors                  EMBEDDINGS_FILE  learned token embeddings (pivotal tuning)
    <name>_emb.safetensors                  shared_embeddings_file(name)  the same embeddings, to share
    config.toml                             CONFIG_FILE      the resolved run config
    log.jsonl                               LOG_FILE         loss and learning rate per step
    samples/                                SAMPLES_DIR      images sampled during training
    logs/                                   TENSORBOARD_DIR  TensorBoard events
    personalization.json                    PERSONALIZATION_RECORD  the toy world's record of a run

``<name>`` is the run's name (``output.name``; by default the token without its angle brackets,
see :func:`default_run_name`): the files that leave the folder for A1111 / ComfyUI, where a LoRA
is called by its file name (``<lora:name:1>``) and an embedding's file name is its trigger word,
carry it, so two runs share one models folder without overwriting each other. The diffusers files
keep the names ``load_lora_weights`` and dreamguide's readers look for. Runs written before the
run name existed have the Kohya LoRA as :data:`LEGACY_KOHYA_FILE`.

Files dreamguide writes carry their provenance as JSON under :data:`METADATA_KEY`: in the
safetensors header of LoRA and embedding files, in a text chunk of PNG images.
"""

import re
from pathlib import Path

LORA_FILE = "pytorch_lora_weights.safetensors"
LEGACY_KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
CONFIG_FILE = "config.toml"
LOG_FILE = "log.jsonl"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "logs"
PERSONALIZATION_RECORD = "personalization.json"

METADATA_KEY = "dreamguide"

#: Files read as images wherever dreamguide takes a folder of photos (training data, DreamBench
#: subjects, reference folders); other files are skipped.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_RESERVED = {LORA_FILE, EMBEDDINGS_FILE, LEGACY_KOHYA_FILE}


def kohya_file(name: str) -> str:
    """The shared Kohya LoRA of the run called ``name``."""
    return f"{name}.safetensors"


def shared_embeddings_file(name: str) -> str:
    """The shared copy of the learned token embeddings of the run called ``name`` (the diffusers
    advanced DreamBooth script's ``<name>_emb`` name: in A1111 the trigger word is ``<name>_emb``)."""
    return f"{name}_emb.safetensors"


def run_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a run's shared files, or None when it can."""
    if not _RUN_NAME.fullmatch(name) or name.endswith("."):
        return (
            f"{name!r} is not a portable file name: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, e.g. 'sks-dog'"
        )
    taken = {kohya_file(name), shared_embeddings_file(name)} & _RESERVED
    if taken:
        return f"{name!r} would overwrite the run's {sorted(taken)[0]}; pick another name"
    return None


def default_run_name(token: str, output_dir: str) -> str:
    """The run's name when ``output.name`` is empty: the token without angle brackets (other
    characters a file name cannot portably hold become ``_``), else the output folder's name."""
    for text in (token.strip().strip("<>"), Path(output_dir).name):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
        if name and run_name_error(name) is None:
            return name
    return "run"
