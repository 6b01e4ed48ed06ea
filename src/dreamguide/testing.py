"""Tiny random diffusion models built entirely in code, for tests and examples.

Nothing here downloads anything: the CLIP tokenizer is a real ``transformers.CLIPTokenizer``
over a small byte-level BPE vocabulary built by this module (:mod:`dreamguide.tokenizers` makes
the tokenizer), and every network is a few thousand parameters, deterministic by seed, fast on CPU.

    tiny_clip_tokenizer()      CLIPTokenizer over the 256 byte symbols + a few hundred common words
    tiny_sd15_pipeline(seed)   StableDiffusionPipeline   (latent, one text encoder)
    tiny_sdxl_pipeline(seed)   StableDiffusionXLPipeline (latent, two text encoders, text_time)
    tiny_pixel_model(seed)     DiffusionModel of kind "pixel" (no VAE, 3-channel UNet)
    save_tiny_pipeline(p, d)   save any of them as a safetensors folder that ``load_model(d)`` reads
    save_single_file(p, f)     save an SD/SDXL pipeline as one checkpoint file in the original (A1111) layout
    save_model_config(p, d)    save its configs and tokenizers without weights: the config folder of such a file
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


def tiny_sdxl_pipeline(seed: int = 0, text_encoder_2_width: int = 32):
    """A random SDXL-shaped ``StableDiffusionXLPipeline``: two CLIP encoders (32 + ``text_encoder_2_width``
    wide), text_time. Widths that differ, as in SDXL (768 + 1280), let diffusers' single-file loader
    tell the two encoders apart by their width."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    text_encoder = _text_encoder(tokenizer, seed + 1)
    text_encoder_2 = _text_encoder(tokenizer_2, seed + 2, hidden_size=text_encoder_2_width, with_projection=True)
    time_embed_dim = 8
    unet = _unet(
        seed + 3,
        in_channels=4,
        cross_attention_dim=32 + text_encoder_2_width,
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


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints in the original (LDM / A1111) key layout


def _ldm_unet(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under the original Stable Diffusion names (``model.diffusion_model.*``)."""
    config = unet.config
    per_block = config.layers_per_block + 1
    names = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(len(config.down_block_types)):
        for j in range(config.layers_per_block):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * per_block + j}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * per_block + j}.1"
        names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{i * per_block + per_block}.0.op"
    for i, block in enumerate(config.up_block_types):
        for j in range(per_block):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * per_block + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * per_block + j}.1"
        upsampler = 2 if "CrossAttn" in block else 1
        names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * per_block + per_block - 1}.{upsampler}.conv"
    resnet_parts = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    longest_first = sorted(names, key=len, reverse=True)
    out = {}
    for key, value in unet.state_dict().items():
        module, _, leaf = key.rpartition(".")
        prefix = next(p for p in longest_first if module == p or module.startswith(p + "."))
        rest = module[len(prefix) + 1 :]
        if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
            rest = resnet_parts.get(rest, rest)
        out["model.diffusion_model." + ".".join(p for p in (names[prefix], rest, leaf) if p)] = value
    return out


def _ldm_vae(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under the original names (``first_stage_model.*``; attention as 1x1 convolutions)."""
    blocks = len(vae.config.block_out_channels)
    renames = [("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
               ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"),
               ("conv_shortcut", "nin_shortcut"), ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"),
               ("to_v", "v"), ("to_out.0", "proj_out")]
    for i in range(blocks):
        renames += [(f"down_blocks.{i}.resnets", f"down.{i}.block"),
                    (f"down_blocks.{i}.downsamplers.0", f"down.{i}.downsample"),
                    (f"up_blocks.{i}.resnets", f"up.{blocks - 1 - i}.block"),
                    (f"up_blocks.{i}.upsamplers.0", f"up.{blocks - 1 - i}.upsample")]
    out = {}
    for key, value in vae.state_dict().items():
        name = key
        for old, new in renames:
            name = name.replace(f".{old}.", f".{new}.")
        if ".attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # a linear layer in diffusers, a 1x1 convolution in the original
        out["first_stage_model." + name] = value
    return out


def _ldm_clip(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text encoder as the original checkpoints hold it: the transformers names under ``prefix``."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()
            if not k.startswith("text_projection")}


def _ldm_open_clip(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in OpenCLIP's names (SD 2.x, SDXL's second encoder): fused q/k/v ``in_proj``,
    ``resblocks``, ``ln_final``, a ``text_projection`` matrix (transposed)."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    parts = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for layer in range(encoder.config.num_hidden_layers):
        old, new = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{old}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{new}attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in parts.items():
                out[f"{new}{b}.{kind}"] = state[f"{old}{a}.{kind}"]
    return out


def single_file_state_dict(pipe, architecture: str | None = None) -> dict[str, torch.Tensor]:
    """An SD/SDXL pipeline's weights as a single-file checkpoint holds them (A1111, ComfyUI, the original
    repositories): ``model.diffusion_model.*``, ``first_stage_model.*`` and the text encoder(s) under
    ``cond_stage_model.transformer.*`` (SD 1.x), ``cond_stage_model.model.*`` (SD 2.x, OpenCLIP names) or
    ``conditioner.embedders.0.transformer.*`` + ``conditioner.embedders.1.model.*`` (SDXL).

    ``architecture``: "sdxl", "sd1" or "sd2"; default "sdxl" for a pipeline with a second text encoder,
    else "sd1". A test helper: the key layout is what diffusers' single-file loader reads back.
    """
    architecture = architecture or ("sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1")
    state = {**_ldm_unet(pipe.unet), **_ldm_vae(pipe.vae)}
    if architecture == "sdxl":
        state.update(_ldm_clip(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(_ldm_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    elif architecture == "sd2":
        state.update(_ldm_open_clip(pipe.text_encoder, "cond_stage_model.model."))
    elif architecture == "sd1":
        state.update(_ldm_clip(pipe.text_encoder, "cond_stage_model.transformer."))
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose sdxl, sd1 or sd2")
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_single_file(pipe, path, architecture: str | None = None) -> Path:
    """Write :func:`single_file_state_dict` of ``pipe`` as one ``.safetensors`` file (atomically)."""
    from dreamguide.atomic import save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(single_file_state_dict(pipe, architecture), path)


def save_model_config(pipe, directory) -> Path:
    """The pipeline saved as a diffusers folder without its weights: ``model_index.json``, each
    component's ``config.json``, the scheduler and tokenizer files (the config folder that a
    single-file checkpoint is loaded with), atomically."""
    import shutil

    from dreamguide.atomic import atomic_directory

    with atomic_directory(directory) as tmp:
        full = save_tiny_pipeline(pipe, tmp / "with-weights")
        for file in sorted(full.rglob("*")):
            if file.is_file() and file.suffix != ".safetensors":
                (tmp / file.relative_to(full)).parent.mkdir(parents=True, exist_ok=True)
                file.replace(tmp / file.relative_to(full))
        shutil.rmtree(full)
    return Path(directory)
