"""Random metric backbones (DINO ViT, DINOv2, CLIP, SigLIP) built in code, for tests and timing.

Same architectures, processors and file layout as the real checkpoints, so ``Scorer`` runs
offline on them exactly as on the real ones: ``size="tiny"`` (a few thousand parameters, 32 px
inputs: tests) or ``size="base"`` (the shapes of the default checkpoints, 224 px inputs: the
throughput benchmark, where only the cost matters).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreamguide.metrics import Backbones

_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=8)
_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _layers(hidden: int, layers: int, heads: int, **extra) -> dict:
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                **extra)


#: The shapes of facebook/dino-vits16, facebook/dinov2-small, openai/clip-vit-base-patch32 and
#: google/siglip-base-patch16-224 (random weights).
_BASE = {
    "dino": _layers(384, 12, 6, image_size=224, patch_size=16),
    "dinov2": _layers(384, 12, 6, image_size=518, patch_size=14),
    "clip_vision": _layers(768, 12, 12, image_size=224, patch_size=32),
    "clip_text": _layers(512, 12, 8, max_position_embeddings=77),
    "siglip_vision": _layers(768, 12, 12, image_size=224, patch_size=16),
    "siglip_text": _layers(768, 12, 12, max_position_embeddings=64),
}


def save_tiny_backbones(directory: str | Path, seed: int = 0, size: str = "tiny") -> Backbones:
    """Write the four backbones under ``directory`` and return ``Backbones`` pointing at them."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipModel,
        ViTConfig,
        ViTModel,
    )
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from dreamguide.testing import tiny_clip_tokenizer

    directory = Path(directory)
    tokenizer = tiny_clip_tokenizer()
    vocab = len(tokenizer)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if size not in ("tiny", "base"):
        raise ValueError(f"backbone size must be 'tiny' or 'base', got {size!r}")
    if size == "tiny":
        shapes = {"dino": _VISION, "dinov2": {**_VISION, "patch_size": 8}, "clip_vision": _VISION,
                  "clip_text": dict(**_TEXT, max_position_embeddings=77), "siglip_vision": _VISION,
                  "siglip_text": dict(**_TEXT, max_position_embeddings=16)}
        side, projection = 32, 8
    else:
        shapes, side, projection = _BASE, 224, 512
    square = {"height": side, "width": side}
    specs = {
        "dino": (ViTModel(ViTConfig(**shapes["dino"]), add_pooling_layer=False), ViTImageProcessorPil(size=square),
                 None),
        "dinov2": (
            Dinov2Model(Dinov2Config(**shapes["dinov2"])),
            BitImageProcessorPil(size={"shortest_edge": side * 8 // 7}, crop_size=square, do_convert_rgb=True),
            None,
        ),
        "clip": (
            CLIPModel(CLIPConfig(text_config=dict(**shapes["clip_text"], vocab_size=vocab, **special),
                                 vision_config=shapes["clip_vision"], projection_dim=projection)),
            CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=square),
            tokenizer,
        ),
        "siglip": (
            SiglipModel(SiglipConfig(text_config=dict(**shapes["siglip_text"], vocab_size=vocab, **special),
                                     vision_config=shapes["siglip_vision"])),
            SiglipImageProcessorPil(size=square),
            tokenizer,
        ),
    }
    paths = {}
    for offset, (name, (model, processor, tok)) in enumerate(specs.items()):
        torch.manual_seed(seed + offset)
        for parameter in model.parameters():  # reseed so weights depend on ``seed`` only
            torch.nn.init.normal_(parameter, std=0.2) if parameter.ndim > 1 else None
        if name == "siglip":
            with torch.no_grad():
                model.logit_scale.fill_(1.5)
                model.logit_bias.fill_(-0.5)
        path = directory / name
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)
        if tok is not None:
            tok.save_pretrained(path)
        paths[name] = str(path)
    return Backbones(**paths)
