"""Tiny random metric backbones (DINO ViT, DINOv2, CLIP, SigLIP) built in code, for tests and dry runs.

Same architectures, processors and file layout as the real checkpoints, a few thousand
parameters each, so ``Scorer`` runs offline on them exactly as on the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreamguide.metrics import Backbones

_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=8)
_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def save_tiny_backbones(directory: str | Path, seed: int = 0) -> Backbones:
    """Write the four tiny backbones under ``directory`` and return ``Backbones`` pointing at them."""
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
    square = {"height": 32, "width": 32}
    specs = {
        "dino": (ViTModel(ViTConfig(**_VISION), add_pooling_layer=False), ViTImageProcessorPil(size=square), None),
        "dinov2": (
            Dinov2Model(Dinov2Config(**{**_VISION, "patch_size": 8})),
            BitImageProcessorPil(size={"shortest_edge": 36}, crop_size=square, do_convert_rgb=True),
            None,
        ),
        "clip": (
            CLIPModel(CLIPConfig(text_config=dict(**_TEXT, vocab_size=vocab, max_position_embeddings=77, **special),
                                 vision_config=_VISION, projection_dim=8)),
            CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=square),
            tokenizer,
        ),
        "siglip": (
            SiglipModel(SiglipConfig(text_config=dict(**_TEXT, vocab_size=vocab, max_position_embeddings=16, **special),
                                     vision_config=_VISION)),
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
