"""Fine-tuning a text-to-image model on a few photos of a subject (SPEC section 4).

Three methods, all training a LoRA adapter on the UNet attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``):

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

    from dreamguide.training import load_config, train
    config = load_config("configs/sdxl-dco.toml", overrides=["train.steps=500"])
    result = train(config)                 # TrainResult: paths, losses, the trained model
    result.lora_path, result.embeddings_path

or ``dreamguide train --config run.toml [--set key=value ...] [--resume latest]``.

The modules, in the order data flows:

    config        TrainConfig: typed TOML sections, --set overrides, the resolved config file
    data          image folder + captions -> checked, cropped tensors (errors name the file)
    tokens        trainable token embeddings that survive mixed precision
    losses        mse_loss, dco_loss (batch or per-sample averaging), prediction_target
    trainer       train(): the accelerate loop, latent caching, progress, logging
    checkpoints   checkpoint-<step>/ folders, atomic writes, exact resume
    outputs       Kohya conversion and the metadata header of the output files
    samples       sample images during training with dreamguide.sampling

Outputs in ``output.dir``: ``pytorch_lora_weights.safetensors`` (diffusers keys),
``pytorch_lora_weights_kohya.safetensors`` (ComfyUI/A1111), ``embeddings.safetensors`` (when
tokens train), ``config.toml`` (the resolved config), ``log.jsonl`` (loss and lr per step),
``checkpoint-<step>/`` and ``samples/``. See docs/TRAINING.md.
"""

from dreamguide.training.config import ConfigError, TrainConfig, config_from_dict, load_config, save_config
from dreamguide.training.data import DataError
from dreamguide.training.losses import dco_loss, mse_loss, prediction_target
from dreamguide.training.outputs import from_kohya, read_metadata, to_kohya
from dreamguide.training.trainer import ADAPTER_NAME, TrainResult, train

__all__ = [
    "ADAPTER_NAME",
    "ConfigError",
    "DataError",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "dco_loss",
    "from_kohya",
    "load_config",
    "mse_loss",
    "prediction_target",
    "read_metadata",
    "save_config",
    "to_kohya",
    "train",
]
