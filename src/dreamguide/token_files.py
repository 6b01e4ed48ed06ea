"""Learned tokens ("textual inversion", pivotal tuning): adding them to a model, and their files.

A learned token lives in every tokenizer and text encoder of a model (two for SDXL). Its
embedding file (``embeddings.safetensors`` of a training run) holds, per text encoder, a
[n_tokens, width] tensor: SDXL ``clip_l`` and ``clip_g``, SD 1.x and pixel models one
``emb_params``; the token strings are in the ``tokens`` header. diffusers'
``load_textual_inversion`` reads the same file (for SDXL once per encoder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from dreamguide.atomic import save_safetensors

if TYPE_CHECKING:
    from dreamguide.models import DiffusionModel

SDXL_EMBEDDING_KEYS: tuple[str, ...] = ("clip_l", "clip_g")
SD_EMBEDDING_KEY = "emb_params"


def _as_list(tokens) -> list[str]:
    return [tokens] if isinstance(tokens, str) else list(tokens)


def _fix_legacy_pooling(tokenizer, encoder) -> None:
    """CLIP configs with eos_token_id 2 pool at argmax(input_ids), which is wrong once tokens are added
    after <|endoftext|>; pool at the first <|endoftext|> instead (identical without added tokens)."""
    eos = tokenizer.eos_token_id
    text_model = getattr(encoder, "text_model", None)
    if eos is not None and encoder.config.eos_token_id == 2 and eos != 2:
        encoder.config.eos_token_id = eos
        if text_model is not None and hasattr(text_model, "eos_token_id"):
            text_model.eos_token_id = eos


def token_ids(model: "DiffusionModel", tokens) -> list[list[int]]:
    """Ids of ``tokens`` in each tokenizer; unknown tokens are an error that names them."""
    tokens = _as_list(tokens)
    result = []
    for tokenizer in model.tokenizers:
        ids = tokenizer.convert_tokens_to_ids(tokens)
        missing = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokens {missing} are not in the tokenizer; add them with add_tokens first")
        result.append(list(ids))
    return result


def add_tokens(model: "DiffusionModel", tokens, init_word: str) -> list[list[int]]:
    """Add ``tokens`` to every tokenizer and text encoder, each embedding a copy of ``init_word``'s.

    A multi-token init word ("stuffed animal") gives the mean of its token embeddings. Returns the
    new token ids per tokenizer.
    """
    tokens = _as_list(tokens)
    if not tokens or len(set(tokens)) != len(tokens):
        raise ValueError(f"add_tokens needs distinct new tokens, got {tokens}")
    for tokenizer in model.tokenizers:
        present = [t for t in tokens if t in tokenizer.get_vocab()]
        if present:
            raise ValueError(f"tokens {present} are already in the tokenizer; choose new token strings")
    all_ids = []
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not init_word.strip() or not init_ids:
            raise ValueError(f"init word {init_word!r} encodes to no tokens; pass the class word, e.g. 'dog'")
        tokenizer.add_tokens(tokens)
        encoder.resize_token_embeddings(len(tokenizer))
        _fix_legacy_pooling(tokenizer, encoder)
        weight = encoder.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            weight[ids] = weight[init_ids].mean(dim=0, keepdim=True).expand(len(ids), -1)
        all_ids.append(list(ids))
    return all_ids


def token_embeddings(model: "DiffusionModel", tokens) -> list[torch.Tensor]:
    """The current embeddings of ``tokens``, one [n_tokens, dim] tensor per text encoder."""
    ids = token_ids(model, tokens)
    return [enc.get_input_embeddings().weight[i].detach().clone() for enc, i in zip(model.text_encoders, ids)]


def save_embeddings(
    model: "DiffusionModel",
    tokens,
    path,
    metadata: dict | None = None,
    vectors: Sequence[torch.Tensor] | None = None,
) -> Path:
    """Write the learned tokens' embeddings: SDXL ``clip_l``/``clip_g``, SD/pixel ``emb_params``.

    Each tensor is [n_tokens, dim]: ``vectors`` (one per text encoder, e.g. the float32 vectors a
    run trained), else the model's current embeddings. The token strings are stored in the header
    (``tokens``, JSON) so ``load_embeddings`` can restore them; extra ``metadata`` (str values) is
    stored there too. diffusers' ``load_textual_inversion`` reads the same file.
    """
    tokens = _as_list(tokens)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"embeddings are written as .safetensors; got {path}")
    keys = SDXL_EMBEDDING_KEYS if model.kind == "sdxl" else (SD_EMBEDDING_KEY,)
    if vectors is None:
        vectors = token_embeddings(model, tokens)
    elif len(vectors) != len(keys):
        raise ValueError(f"a {model.kind!r} model has {len(keys)} text encoder(s), got vectors for {len(vectors)}")
    header = {"tokens": json.dumps(tokens), "model_kind": model.kind, **(metadata or {})}
    return save_safetensors(dict(zip(keys, vectors)), path, header)


def _read_embedding_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header of an embeddings file."""
    from safetensors import safe_open

    from dreamguide.lora_files import read_safetensors_header

    read_safetensors_header(Path(path), "embeddings")  # a clear error for a damaged or pickled file
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_embeddings(model: "DiffusionModel", path, token=None) -> list[str]:
    """Add (or overwrite) learned tokens from an embeddings file; returns the token strings.

    Formats: SDXL ``clip_l``/``clip_g``, SD 1.x ``emb_params``, and diffusers' ``{"<token>": tensor}``.
    Token names: ``token`` if given (a string for n vectors gives ``token``, ``token_1``, ... as
    diffusers does, or pass a list), else those stored by ``save_embeddings``, else the dict key.
    A file that holds NaN or infinite values is refused (:class:`~dreamguide.lora_files.NonFiniteWeights`).
    """
    from dreamguide.lora_files import NonFiniteWeights, non_finite_tensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: embeddings are read only from .safetensors files")
    tensors, header = _read_embedding_file(path)
    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteWeights("embeddings", path, bad)
    stored_tokens = json.loads(header["tokens"]) if "tokens" in header else None
    if set(tensors) == set(SDXL_EMBEDDING_KEYS):
        if model.kind != "sdxl":
            raise ValueError(f"{path} holds SDXL embeddings (clip_l, clip_g) but the model is {model.kind!r}")
        per_encoder = [tensors[k] for k in SDXL_EMBEDDING_KEYS]
    elif len(tensors) == 1:
        key, tensor = next(iter(tensors.items()))
        if model.kind == "sdxl":
            raise ValueError(
                f"{path} holds one embedding tensor ({key!r}) but an SDXL model needs clip_l and clip_g tensors"
            )
        per_encoder = [tensor]
        if key != SD_EMBEDDING_KEY and stored_tokens is None:
            stored_tokens = [key]
    else:
        raise ValueError(
            f"{path}: unknown embeddings layout (keys {sorted(tensors)}); expected clip_l + clip_g (SDXL), "
            f"{SD_EMBEDDING_KEY} (SD 1.x) or one '<token>' tensor"
        )
    per_encoder = [t if t.ndim == 2 else t.reshape(1, -1) for t in per_encoder]
    n = per_encoder[0].shape[0]
    if token is not None:
        tokens = _as_list(token)
        if len(tokens) == 1 and n > 1:
            tokens = [tokens[0]] + [f"{tokens[0]}_{i}" for i in range(1, n)]
    elif stored_tokens is not None:
        tokens = stored_tokens
    else:
        raise ValueError(f"{path} does not record its token strings; pass token='<your-token>'")
    if len(tokens) != n:
        raise ValueError(f"{path} holds {n} embedding vector(s) but {len(tokens)} token(s) were given: {tokens}")
    for tokenizer, encoder, vectors in zip(model.tokenizers, model.text_encoders, per_encoder):
        dim = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != dim:
            raise ValueError(
                f"{path}: embedding width {vectors.shape[1]} does not fit a text encoder of width {dim} "
                "(embeddings trained for another model?)"
            )
        new = [t for t in tokens if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_tokens(new)
            encoder.resize_token_embeddings(len(tokenizer))
            _fix_legacy_pooling(tokenizer, encoder)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[tokenizer.convert_tokens_to_ids(tokens)] = vectors.to(weight.device, weight.dtype)
    return tokens
