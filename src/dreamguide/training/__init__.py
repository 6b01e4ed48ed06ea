"""Fine-tuning a text-to-image model on a few photos of a subject (SPEC section 4).

Three methods, all training a LoRA adapter on the UNet (by default on the attention projections,
:data:`dreamguide.lora_files.LORA_TARGETS`):

    dreambooth      noise-prediction MSE on the token captions; optional prior preservation
                    with a folder of class images
    dreambooth-ti   the same plus pivotal tuning: the token is added to every text encoder,
                    initialised from the class word, trained with its own learning rate,
                    optionally re-normalised to its initial norm after each step and frozen
                    after a fraction of the steps
    dco             Direct Consistency Optimization (Lee et al. 2024):
                    -log sigmoid(-beta * (L_ft - L_ref)), where L_ref is the same UNet with the
                    adapter off on the base caption, same x_t, noise and timestep; token
                    embeddings optional

Works with SDXL, SD 1.x/2.x and any UNet2DConditionModel + CLIP text encoder model, including
pixel-space ones without a VAE. Token embeddings train under fp16/bf16 (they are float32
parameters spliced into the embedding lookup, never a detached half-precision copy).

Use from Python::

    from dreamguide.training import load_train_config, train
    config = load_train_config("configs/sdxl-dco.toml", overrides=["train.steps=500"])
    result = train(config)                 # TrainResult: paths, losses, the trained model
    result.lora_path, result.embeddings_path

or ``dreamguide train --config run.toml [--set key=value ...] [--resume latest]``.

The modules, in the order data flows:

    config        TrainConfig: typed TOML sections, --set overrides, the resolved config file
    data          image folder + captions -> checked, cropped tensors (errors name the file)
    batches       micro-batches seeded by step: x_0 (cached latents), noise, timesteps, captions
    tokens        trainable token embeddings that survive mixed precision
    losses        mse_loss, dco_loss (batch or per-sample averaging), prediction_target
    trainer       train(): its phases, from checking the data to writing the outputs
    checkpoints   checkpoint-<step>/ folders, atomic writes, exact resume
    outputs       the output files (LoRA in two layouts, embeddings) and their metadata header
    samples       sample images during training with dreamguide.sampling

The files are written by :mod:`dreamguide.lora_files` and :mod:`dreamguide.token_files`, under
the names in :mod:`dreamguide.filenames`.

Outputs in ``output.dir``: ``pytorch_lora_weights.safetensors`` (diffusers keys),
``<name>.safetensors`` (Kohya keys for ComfyUI/A1111; ``<name>`` is ``TrainConfig.run_name``),
``embeddings.safetensors`` and its shared copy ``<name>_emb.safetensors`` (when tokens train), ``config.toml`` (the resolved config), ``log.jsonl`` (loss and lr per step),
``checkpoint-<step>/`` and ``samples/``. See docs/TRAINING.md.
"""

from dreamguide.training.config import ConfigError, TrainConfig, load_train_config, save_config, train_config_from_dict
from dreamguide.training.data import DataError
from dreamguide.training.losses import dco_loss, mse_loss, prediction_target
from dreamguide.training.outputs import read_metadata
from dreamguide.training.trainer import TrainingStopped, TrainResult, train

__all__ = [
    "ConfigError",
    "DataError",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "dco_loss",
    "load_train_config",
    "mse_loss",
    "prediction_target",
    "read_metadata",
    "save_config",
    "train",
    "train_config_from_dict",
]
