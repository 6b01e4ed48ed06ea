"""The names of the files dreamguide writes, in one place, so every reader finds what a writer wrote.

A training run's folder (``dreamguide train``, ``dreamguide toyworld personalize``)::

    pytorch_lora_weights.safetensors        LORA_FILE        the LoRA, diffusers keys
    pytorch_lora_weights_kohya.safetensors  KOHYA_FILE       the same LoRA, Kohya keys (ComfyUI, A1111)
    embeddings.safetensors                  EMBEDDINGS_FILE  learned token embeddings (pivotal tuning)
    config.toml                             CONFIG_FILE      the resolved run config
    log.jsonl                               LOG_FILE         loss and learning rate per step
    samples/                                SAMPLES_DIR      images sampled during training
    logs/                                   TENSORBOARD_DIR  TensorBoard events
    personalization.json                    PERSONALIZATION_RECORD  the toy world's record of a run

Files dreamguide writes carry their provenance as JSON under :data:`METADATA_KEY`: in the
safetensors header of LoRA and embedding files, in a text chunk of PNG images.
"""

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
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
