"""Trainable token embeddings that train under fp16/bf16.

The new tokens' vectors are float32 parameters held by a small module that wraps a text
encoder's input embedding: the frozen table stays in the model dtype, and the forward pass
swaps in the trained vectors (cast to that dtype, a differentiable op) wherever a new token id
appears. Nothing is a detached copy, so gradients reach the vectors whatever the precision —
the DCO reference code's bug was training a detached half-precision copy that never changed.
"""

from __future__ import annotations

import torch
from torch import nn


class TrainableTokenEmbedding(nn.Module):
    """An input embedding whose rows for ``token_ids`` come from float32 parameters ``vectors``."""

    def __init__(self, base: nn.Embedding, token_ids: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.vectors = nn.Parameter(base.weight.detach()[token_ids].float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        match = input_ids.unsqueeze(-1) == self.token_ids.to(input_ids.device)  # [..., n_tokens]
        if not bool(match.any()):
            return embeds
        trained = match.to(self.vectors.dtype) @ self.vectors  # [..., width]
        return torch.where(match.any(-1, keepdim=True), trained.to(embeds.dtype), embeds)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained vectors into the frozen table (in its dtype)."""
        self.base.weight[self.token_ids.to(self.base.weight.device)] = self.vectors.to(self.base.weight.dtype)


def install(text_encoder: nn.Module, token_ids: list[int]) -> TrainableTokenEmbedding:
    """Wrap ``text_encoder``'s input embedding so the rows of ``token_ids`` train."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, TrainableTokenEmbedding):
        raise ValueError("this text encoder already has trainable token embeddings")
    wrapper = TrainableTokenEmbedding(current, token_ids).to(current.weight.device)
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


def uninstall(text_encoder: nn.Module) -> None:
    """Write the trained vectors into the table and restore the plain embedding."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, TrainableTokenEmbedding):
        current.write_back()
        text_encoder.set_input_embeddings(current.base)
