"""The miniature world's text-to-image model: architecture, word-level tokenizer, saving and loading.

A pixel-space diffusion model small enough to train on one GPU in minutes and to sample on a
laptop CPU in seconds:

    tokenizer      a real ``transformers.CLIPTokenizer`` whose vocab.json/merges.txt are built here
                   from the world's vocabulary: every world word is one token, every subject token
                   (and a few spare identifiers) is reserved, anything else falls back to letters
    text_encoder   a small ``CLIPTextModel`` trained from scratch with the UNet
    unet           a diffusers ``UNet2DConditionModel`` on 3-channel images in [-1, 1]
    scheduler      DDIM over a cosine noise schedule, epsilon prediction, x0 clipped to [-1, 1]

The folder layout is the pixel format of :mod:`dreamguide.models` (``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``model_index.json``), so ``load_model`` and every component's
``from_pretrained`` read it offline. Prompts are encoded the SD 1.x way: padded to the
tokenizer's ``model_max_length``, the text encoder's last hidden state is the UNet's context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from dreamguide.tokenizers import END_TOKEN, START_TOKEN, bpe, clip_tokenizer

#: The model bundled with the package (trained by ``dreamguide toyworld train-base``).
BUNDLED_MODEL_DIR = Path(__file__).parent / "weights" / "base"

#: Rare identifiers kept as single tokens (never in training captions) for new subjects.
SPARE_IDENTIFIERS: tuple[str, ...] = ("ohwx", "pfo", "kdn", "wje", "hty", "gsq", "yzi", "tcv")

#: Single characters every tokenizer knows, so no word is ever unknown.
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789'-,.!?&/:;()"


@dataclass(frozen=True)
class ToyModelConfig:
    """Architecture of the toy-world model (all sizes; the defaults are the bundled model's)."""

    resolution: int = 32
    block_out_channels: tuple[int, ...] = (64, 128, 160)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    text_hidden_size: int = 192
    text_layers: int = 4
    text_heads: int = 4
    max_length: int = 24
    num_train_timesteps: int = 1000

    @classmethod
    def from_dict(cls, data: dict) -> "ToyModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        values = dict(data)
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_words(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The words that become single tokens: the world's vocabulary, subject tokens, spare identifiers."""
    from dreamguide.toyworld import world

    words = [*world.VOCABULARY, *(s.token for s in world.SUBJECTS), *SPARE_IDENTIFIERS, *extra]
    return tuple(dict.fromkeys(w.lower() for w in words if w))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """``word`` split by the tokenizer's byte-pair merges (:func:`dreamguide.tokenizers.bpe`)."""
    return bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)


def vocab_and_merges(words: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP-layout vocabulary and merge list in which every word of ``words`` is one token.

    Each word gets a left-to-right merge chain (``d o``, ``do g</w>``). Chains of different words can
    interfere (a later word's merge can fire first), so each word is checked with the same greedy
    BPE the tokenizer runs, and a failing word gets merges of its leftover pieces appended at the
    lowest rank; a merge ranked last only fires where BPE would otherwise stop, so it never breaks
    a word that already came out whole.
    """
    for word in words:
        if not word.isascii() or " " in word or not word:
            raise ValueError(f"tokenizer word {word!r} must be one non-empty ASCII word")
    tokens = list(_CHARACTERS) + [c + "</w>" for c in _CHARACTERS]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add_merge(a: str, b: str) -> None:
        if (a, b) not in ranks:
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
        if a + b not in tokens:
            tokens.append(a + b)

    for word in words:
        for ch in word:
            if ch not in _CHARACTERS:
                raise ValueError(f"tokenizer word {word!r} has character {ch!r} outside {_CHARACTERS!r}")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        piece = symbols[0]
        for symbol in symbols[1:]:
            add_merge(piece, symbol)
            piece += symbol
    for word in words:
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            add_merge(pieces[0], pieces[1])
            pieces = _bpe(word, ranks)
    tokens += [START_TOKEN, END_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


def build_tokenizer(words: Sequence[str] | None = None, max_length: int = ToyModelConfig.max_length):
    """A ``CLIPTokenizer`` over ``words`` (default: :func:`tokenizer_words`), read from files written here."""
    vocab, merges = vocab_and_merges(tokenizer_words() if words is None else words)
    return clip_tokenizer(vocab, merges, max_length)


def encode_text(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """UNet context for ``prompts``: last hidden state over max-length padded tokens (SD 1.x style)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids).last_hidden_state


# ---------------------------------------------------------------------------------------------
# Networks


def build_unet(config: ToyModelConfig = ToyModelConfig()):
    from diffusers import UNet2DConditionModel

    n = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=32,
    )


def build_text_encoder(tokenizer, config: ToyModelConfig = ToyModelConfig()):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=4 * config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_scheduler(config: ToyModelConfig = ToyModelConfig()):
    """DDIM over a cosine schedule (suits small pixel images); trailing spacing starts at pure noise."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )


def build_model(config: ToyModelConfig = ToyModelConfig(), seed: int = 0, words: Sequence[str] | None = None):
    """A freshly initialized ``DiffusionModel`` (kind "pixel") of this architecture, deterministic by seed."""
    from dreamguide.models import DiffusionModel

    tokenizer = build_tokenizer(words, config.max_length)
    torch.manual_seed(seed)
    unet = build_unet(config)
    text_encoder = build_text_encoder(tokenizer, config)
    return DiffusionModel(
        kind="pixel",
        unet=unet,
        scheduler=build_scheduler(config),
        tokenizers=[tokenizer],
        text_encoders=[text_encoder],
        vae=None,
        source="toyworld (untrained)",
    )


def parameter_count(model) -> int:
    return sum(p.numel() for m in (model.unet, *model.text_encoders) for p in m.parameters())


def save_toyworld_model(model, directory, dtype: torch.dtype = torch.float16, overwrite: bool = True) -> Path:
    """Save ``model`` in the pixel format with weights cast to ``dtype`` (the model itself is unchanged)."""
    import copy

    from dreamguide.models import save_model

    clone = copy.copy(model)
    clone.unet = copy.deepcopy(model.unet).to(dtype)
    clone.text_encoders = [copy.deepcopy(te).to(dtype) for te in model.text_encoders]
    return save_model(clone, directory, overwrite=overwrite)


def load_toyworld_model(path=None, device="cpu", dtype: torch.dtype = torch.float32):
    """Load the bundled model (or the folder ``path``) as a ``DiffusionModel``, in ``dtype`` on ``device``."""
    from dreamguide.models import load_model

    path = Path(path) if path is not None else BUNDLED_MODEL_DIR
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"no toy-world model in {path} (model_index.json missing); train one with "
            "`dreamguide toyworld train-base --out DIR` or reinstall dreamguide to restore the bundled weights"
        )
    return load_model(path, dtype=dtype, device=device)


#: ``sample_cfg``'s defaults, a quick look at the base model (``train_base.write_preview``, the
#: bundled ``preview.png``, the pinned regression images): a preview's settings, not the sampler's
#: (``SampleSettings.steps``, ``guidance.W_TEXT``); experiments pass their own.
BASE_PREVIEW_STEPS: int = 30
BASE_PREVIEW_W_TEXT: float = 5.0


@torch.no_grad()
def sample_cfg(model, prompts: Sequence[str], seeds: Sequence[int], steps: int = BASE_PREVIEW_STEPS,
               w_text: float = BASE_PREVIEW_W_TEXT, batch_size: int = 256,
               clipped_model_output: bool = True) -> torch.Tensor:
    """Classifier-free-guided samples of the base model with its own scheduler, one per (prompt, seed)
    pair, batched across prompts: ``(N, 3, S, S)`` in [-1, 1] on the CPU. Seed ``s`` draws the
    initial noise on the CPU as :class:`dreamguide.sampling.Sampler` does; the sample stays in the
    model's dtype between steps.

    For scoring many different prompts at once (the base-model bar); personalized sampling with
    guidance modes is :mod:`dreamguide.sampling`'s job.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_cfg needs one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    from dreamguide.denoise import clipped_step_kwargs, denoise, initial_noise
    from dreamguide.guidance import Predictions, guide
    from dreamguide.models import TextConditioning
    from dreamguide.unet_rows import predict_rows

    unet, tokenizer, text_encoder = model.unet, model.tokenizers[0], model.text_encoders[0]
    device, dtype = unet.device, unet.dtype
    size = unet.config.sample_size
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        noise, generators = initial_noise(seeds[start : start + batch_size], (3, size, size))
        scheduler = model.scheduler.__class__.from_config(model.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        x = (noise * scheduler.init_noise_sigma).to(device, dtype)
        # Rows need-major, as the sampler lays them out: [uncond of every image, prompt of every image].
        context = TextConditioning(encode_text(tokenizer, text_encoder, [""] * len(chunk) + chunk).to(dtype))

        def cfg_rows(x_in, t):
            return predict_rows(unet, torch.cat([x_in, x_in]), t, context).float()

        def cfg(output, i, steps):
            uncond, cond = output.chunk(2)
            return guide("cfg", Predictions(uncond=uncond, base=cond), w_text=w_text)

        x = denoise(cfg_rows, x, scheduler, cfg, generators=generators,
                    step_kwargs=clipped_step_kwargs(scheduler) if clipped_model_output else {})
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)
