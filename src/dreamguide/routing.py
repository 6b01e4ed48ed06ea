"""Per-row model routing: several predictions from one batched UNet forward (SPEC section 2).

The 3-call guidance modes need, per denoising step, the base model on the null and base
prompts and the personalized model on the token prompt. With a LoRA adapter these are one
UNet forward over the rows [null, base prompt, token prompt]: every PEFT LoRA layer accepts
``adapter_names`` (one name per row, ``"__base__"`` = adapter off) and adds each adapter's
update only to its own rows. ``routed_adapters`` passes that list to every LoRA layer for the
duration of a ``with`` block. This is exact: rows never mix (the UNet has no batch-coupled layer).

A personalized model that is a full UNet of its own takes two forwards instead; ``predict_noise``
handles both cases and returns the predictions in row order.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from dreamguide.models import TextConditioning, take_rows

BASE = "__base__"


def lora_layers(unet) -> list[torch.nn.Module]:
    """The PEFT tuner layers (LoRA Linear/Conv wrappers) inside ``unet``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def check_routable(unet, adapter_names: Sequence[str]) -> list[torch.nn.Module]:
    """Raise a ValueError saying how to fix it when rows cannot be routed per adapter; return the layers."""
    from peft.tuners.lora import LoraLayer

    wanted = sorted({name for name in adapter_names if name != BASE})
    layers = lora_layers(unet)
    known = list(getattr(unet, "peft_config", None) or {})
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(
            f"adapter(s) {unknown} are not loaded on the UNet (it has {known or 'no adapters'}); "
            f"load them first or use {BASE!r} for rows without an adapter"
        )
    if wanted and not layers:
        raise ValueError(f"the UNet has no LoRA layers to route adapters {wanted} to")
    for layer in layers:
        if getattr(layer, "merged", False):
            raise ValueError(
                "the LoRA adapter is merged (fused) into the UNet weights, so base and personalized rows "
                "cannot share a forward; unfuse it (pipe.unfuse_lora() / unet.unmerge_adapter()) or pass "
                "the fused model as a separate personalized UNet"
            )
        if getattr(layer, "disable_adapters", False) and wanted:
            raise ValueError("the UNet's adapters are disabled; call unet.enable_adapters() before routing rows")
        if isinstance(layer, LoraLayer):
            dora = [name for name in wanted if layer.use_dora.get(name, False)]
            if dora:
                raise ValueError(
                    f"adapter {dora[0]!r} is a DoRA adapter, which PEFT cannot apply per row; use a non-DoRA "
                    "LoRA adapter, or merge it into a copy of the UNet and pass that as a separate "
                    "personalized UNet"
                )
    return layers


@contextmanager
def routed_adapters(unet, adapter_names: Sequence[str]):
    """Within the block, row i of every UNet forward uses adapter ``adapter_names[i]`` (``"__base__"``: none).

    The hooks are removed on exit, also when the block raises.
    """
    names = list(adapter_names)
    layers = check_routable(unet, names)

    def pass_adapter_names(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = []
    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(pass_adapter_names, with_kwargs=True))
        yield unet
    finally:
        for handle in handles:
            handle.remove()


def _rows_of(timestep, rows: Sequence[int], batch: int):
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 1 and timestep.shape[0] == batch > 1:
        return take_rows(timestep, rows)
    return timestep


def _forward(unet, sample, timestep, conditioning: TextConditioning) -> torch.Tensor:
    return unet(sample, timestep, return_dict=False, **conditioning.unet_kwargs())[0]


def predict_noise(
    unet,
    sample: torch.Tensor,
    timestep,
    conditioning: TextConditioning,
    row_adapters: Sequence[str] | None = None,
    personalized_unet=None,
) -> torch.Tensor:
    """The UNet's prediction for every row of ``sample``, each row on its own model.

    ``row_adapters``: one name per row; ``"__base__"`` rows use the base weights, the others the
    named LoRA adapter of ``unet`` (one batched forward), or, when ``personalized_unet`` is given,
    that full UNet (one forward for the base rows, adapters of ``unet`` off, one for the others;
    put back in row order). None: one plain forward with whatever adapters are active.
    No host-device synchronisation: rows are gathered by slicing, never by index tensors.
    """
    batch = sample.shape[0]
    if len(conditioning) != batch:
        raise ValueError(f"{len(conditioning)} conditioning rows for a batch of {batch} samples")
    if row_adapters is None:
        return _forward(unet, sample, timestep, conditioning)
    row_adapters = list(row_adapters)
    if len(row_adapters) != batch:
        raise ValueError(f"{len(row_adapters)} row adapters for a batch of {batch} samples")
    if personalized_unet is None:
        with routed_adapters(unet, row_adapters):
            return _forward(unet, sample, timestep, conditioning)

    base_rows = [i for i, name in enumerate(row_adapters) if name == BASE]
    other_rows = [i for i, name in enumerate(row_adapters) if name != BASE]

    def rows_forward(model, rows):
        return _forward(model, take_rows(sample, rows), _rows_of(timestep, rows, batch), conditioning.select(rows))

    parts = []
    if base_rows:
        with routed_adapters(unet, [BASE] * len(base_rows)):  # adapters on the base UNet stay off
            parts.append(rows_forward(unet, base_rows))
    if other_rows:
        parts.append(rows_forward(personalized_unet, other_rows))
    if len(parts) == 1:
        return parts[0]
    # Back to row order: where each original row sits in the concatenation [base rows, other rows].
    position = {row: k for k, row in enumerate(base_rows + other_rows)}
    return take_rows(torch.cat(parts), [position[i] for i in range(batch)])
