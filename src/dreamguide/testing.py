"""Tiny random diffusion models built entirely in code, for tests and examples.

Nothing here downloads anything: the CLIP tokenizer is a real ``transformers.CLIPTokenizer``
over a small byte-level BPE vocabulary built by this module (:mod:`dreamguide.tokenizers` makes
the tokenizer), and every network is a few thousand parameters, deterministic by seed, fast on CPU.

    tiny_clip_tokenizer()      CLIPTokenizer over the 256 byte symbols + a few hundred common words
    tiny_sd15_pipeline(seed)   StableDiffusionPipeline   (latent, one text encoder)
    tiny_sdxl_pipeline(seed)   StableDiffusionXLPipeline (latent, two text encoders, text_time)
    tiny_pixel_model(seed)     DiffusionModel of kind "pixel" (no VAE, 3-channel UNet)
    save_tiny_pipeline(p, d)   save any of them as a safetensors folder that ``load_model(d)`` reads
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from dreamguide.tokenizers import END_TOKEN, START_TOKEN, bpe, clip_tokenizer

#: Words the tiny tokenizer knows as single tokens (DreamBench prompts, classes, styles).
COMMON_WORDS: tuple[str, ...] = tuple(
    sorted(
        set(
            """
            a an and around as autumn background beach black blue chef city cobblestone crowded cube dirt
            eiffel fabric field firefighter floating floor forest glasses grass green hat house in it jungle
            leaves milk mirror monocle mountain ocean of on outfit pink police purple rainbow red road rug
            santa scarf shaped shiny shirt sidewalk snow street sunflowers the top tower tree water wearing
            wet wheat white with wizard wooden yellow photo picture image painting watercolor pencil sketch
            pixel art style oil van gogh render stained glass window depicting origami cartoon illustration
            made lego bricks mosaic ukiyo neon sign marble statue comic book panel children s
            backpack bear plushie stuffed animal berry bowl can candle cat clock sneaker dog toy boot sloth
            monster sunglasses poop emoji rc car robot teapot vase wolf person man woman sks zwx ohwx
            by at for from is this that his her close up high quality detailed
            """.split()
        )
    )
)

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """CLIP-layout vocab (bytes, bytes + '</w>', merged pieces, then the two special tokens) and merges.

    Each word is first encoded with the merges so far, then its pieces are merged left to right by
    new merges ranked after all earlier ones, so every listed word becomes one token (earlier words
    are unaffected: they are single tokens before the new merges could apply). Anything else falls
    back to smaller pieces and byte symbols: nothing is unknown.
    """
    byte_map = _bytes_to_unicode()
    byte_symbols = list(byte_map.values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    seen_tokens = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        pieces = bpe(symbols, ranks)
        piece = pieces[0]
        for nxt in pieces[1:]:
            ranks.setdefault((piece, nxt), len(ranks))
            piece += nxt
            if piece not in seen_tokens:
                seen_tokens.add(piece)
                tokens.append(piece)
    tokens += [START_TOKEN, END_TOKEN]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return {token: i for i, token in enumerate(tokens)}, merges


def tiny_clip_tokenizer(extra_words: tuple[str, ...] | list[str] = (), model_max_length: int = 77):
    """A real ``CLIPTokenizer`` over a small byte-level vocabulary (offline)."""
    words = tuple(dict.fromkeys(w.lower() for w in (*COMMON_WORDS, *extra_words) if w))
    vocab, merges = _cached_vocab(words)
    return clip_tokenizer(vocab, merges, model_max_length)


@lru_cache(maxsize=8)
def _cached_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    return _vocab_and_merges(words)


def _text_encoder(tokenizer, seed: int, hidden_size: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden_size,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def _unet(seed: int, in_channels: int, cross_attention_dim: int, sample_size: int, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        **extra,
    ).eval()


def _sd_scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


def tiny_sd15_pipeline(seed: int = 0):
    """A random SD 1.x-shaped ``StableDiffusionPipeline`` (VAE factor 2: 32 px images, 16x16 latents)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=_text_encoder(tokenizer, seed + 1),
        tokenizer=tokenizer,
        unet=_unet(seed + 2, in_channels=4, cross_attention_dim=32, sample_size=16),
        scheduler=DDIMScheduler(**_sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A random SDXL-shaped ``StableDiffusionXLPipeline``: two CLIP encoders (32 + 32 wide), text_time."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    text_encoder = _text_encoder(tokenizer, seed + 1)
    text_encoder_2 = _text_encoder(tokenizer_2, seed + 2, with_projection=True)
    time_embed_dim = 8
    unet = _unet(
        seed + 3,
        in_channels=4,
        cross_attention_dim=64,
        sample_size=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def tiny_pixel_model(seed: int = 0, sample_size: int = 16):
    """A random pixel-space text-to-image model (``DiffusionModel`` of kind "pixel", no VAE)."""
    from diffusers import DDPMScheduler

    from dreamguide.models import DiffusionModel

    tokenizer = tiny_clip_tokenizer()
    return DiffusionModel(
        kind="pixel",
        unet=_unet(seed + 2, in_channels=3, cross_attention_dim=32, sample_size=sample_size),
        scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True),
        tokenizers=[tokenizer],
        text_encoders=[_text_encoder(tokenizer, seed + 1)],
        vae=None,
        source="tiny_pixel_model",
    )


def save_tiny_pipeline(pipe_or_model, directory) -> Path:
    """Save a diffusers pipeline or ``DiffusionModel`` as a safetensors folder ``load_model`` reads."""
    from dreamguide.models import DiffusionModel, save_model

    model = pipe_or_model if isinstance(pipe_or_model, DiffusionModel) else DiffusionModel.from_pipeline(pipe_or_model)
    return save_model(model, directory)
