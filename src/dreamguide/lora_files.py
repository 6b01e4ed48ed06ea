"""LoRA adapters on a UNet: adding one, its weights, and its files in the diffusers and Kohya layouts.

Adapters are PEFT layers on the UNet, each under a name; the one a run trains and the sampler
routes to is :data:`ADAPTER_NAME`. Two file layouts:

diffusers (``save_lora``; ``pytorch_lora_weights.safetensors`` of a training run)
    ``unet.<module>.lora_A.weight`` / ``...lora_B.weight``, with the adapter's rank, alpha and
    targets in the ``lora_adapter_metadata`` header, so ``pipe.load_lora_weights`` and
    :func:`load_lora` rebuild the same adapter.
Kohya (``save_kohya_lora``; ``<run name>.safetensors`` of a training run), read by ComfyUI and A1111
    ``lora_unet_<module, dots as _>`` + ``.lora_down.weight`` (A), ``.lora_up.weight`` (B) and
    ``.alpha`` (a scalar), with the ``ss_`` header fields Kohya tools show.

:func:`load_lora` reads both.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from dreamguide.atomic import save_safetensors

if TYPE_CHECKING:
    from dreamguide.models import DiffusionModel

#: Name of the personalized adapter on the UNet: what training adds and the sampler routes to.
ADAPTER_NAME = "subject"
#: UNet modules that get LoRA by default: the attention projections.
LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(
    unet,
    rank: int = 32,
    alpha: float | None = None,
    adapter_name: str = ADAPTER_NAME,
    target_modules: Sequence[str] = LORA_TARGETS,
    init: str | bool = "gaussian",
    dora: bool = False,
):
    """Add a trainable LoRA adapter to ``unet`` (alpha defaults to rank: scale 1); returns the unet.

    ``init="gaussian"`` starts B at zero, so the adapter is the identity until trained. ``dora``
    makes it a DoRA adapter (weight-decomposed), which cannot be routed per row at sampling time.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights=init,
        target_modules=list(target_modules),
        use_dora=dora,
    )
    with warnings.catch_warnings():  # PEFT warns on every adapter after the first; several are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        try:
            unet.add_adapter(config, adapter_name=adapter_name)
        except ValueError as error:
            if "not found" not in str(error) and "Target module" not in str(error):
                raise
            raise ValueError(
                f"lora.target_modules {list(target_modules)}: some match no layer of this UNet ({error}); name "
                f"layers it has, e.g. {list(LORA_TARGETS)}"
            ) from None
    return unet


def _require_adapter(unet, adapter_name: str) -> None:
    names = list(getattr(unet, "peft_config", {}) or {})
    if adapter_name not in names:
        raise ValueError(f"the UNet has no LoRA adapter {adapter_name!r}; it has {names or 'none'}")


def lora_state_dict(unet, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT naming without the adapter name (``<module>.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    _require_adapter(unet, adapter_name)
    return get_peft_model_state_dict(unet, adapter_name=adapter_name)


def lora_parameters(unet, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters themselves (what an optimizer steps), under the keys of the diffusers
    file: ``unet.`` + the keys of :func:`lora_state_dict`, in the same order."""
    # The state dict's tensors share their storage with the parameters.
    by_storage = {param.data_ptr(): param for param in unet.parameters()}
    return {f"unet.{key}": by_storage[tensor.data_ptr()] for key, tensor in lora_state_dict(unet, adapter_name).items()}


def save_lora(unet, path, adapter_name: str = ADAPTER_NAME, metadata: dict | None = None) -> Path:
    """Write the adapter as a diffusers-format LoRA file (``unet.<module>.lora_A.weight`` keys).

    The adapter's rank/alpha/targets go in the ``lora_adapter_metadata`` header as diffusers
    writes them, so ``pipe.load_lora_weights(path)`` and ``load_lora`` restore the same scale.
    Extra ``metadata`` (str values) is stored in the header too.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors; got {path}")
    _require_adapter(unet, adapter_name)
    config = unet.peft_config[adapter_name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    packed = {f"unet.{k}": v for k, v in config.items()}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True, default=str)}
    header.update(metadata or {})
    tensors = {f"unet.{k}": v for k, v in lora_state_dict(unet, adapter_name).items()}
    return save_safetensors(tensors, path, header)


#: Modules written under kohya's own (SGM UNet) names instead of the diffusers name with dots as
#: underscores: SDXL's added-conditioning MLP, whose diffusers spelling ``add_embedding_linear_1``
#: diffusers' Kohya reader (``_convert_unet_lora_key``) cannot tell back: it strips the last
#: index of every name holding "emb", so the module would be lost.
KOHYA_NATIVE_NAMES: dict[str, str] = {
    "add_embedding.linear_1": "label_emb_0_0",
    "add_embedding.linear_2": "label_emb_0_2",
}


def kohya_name(module: str) -> str:
    """The Kohya key prefix of a UNet module: ``lora_unet_`` + its name, dots as ``_`` (or kohya's
    own name, :data:`KOHYA_NATIVE_NAMES`)."""
    return "lora_unet_" + KOHYA_NATIVE_NAMES.get(module, module.replace(".", "_"))


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers LoRA keys -> Kohya keys: ``lora_unet_<module, dots as _>.lora_down/lora_up/alpha``
    (:func:`kohya_name`)."""
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.startswith("unet.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"unexpected LoRA key {key!r}; expected unet.<module>.lora_A/lora_B.weight")
        module, part = key[len("unet.") :].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        name = kohya_name(module)
        kohya[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return kohya


#: (A, B) key endings of one LoRA layer, in the layouts this module reads.
_HALVES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)


def check_lora_pairs(keys, source: str) -> None:
    """Every LoRA layer in ``keys`` must have both halves (A/down and B/up); in a layout with
    ``.alpha`` scalars (Kohya), every layer of a file that has any alpha must have its own and no
    alpha may stand alone. A missing half would otherwise be left at random weights."""
    keys = set(keys)
    layers: dict[str, tuple[str, str]] = {}
    for key in keys:
        for a, b in _HALVES:
            if key.endswith((a, b)):
                layers[key[: -len(a) if key.endswith(a) else -len(b)]] = (a, b)
    for layer, (a, b) in sorted(layers.items()):
        for have, missing in ((layer + a, layer + b), (layer + b, layer + a)):
            if have in keys and missing not in keys:
                raise ValueError(
                    f"{source} is incomplete: it has {have!r} but not {missing!r}, so that layer would load "
                    "with random weights; re-export the adapter (the file may be truncated or edited)"
                )
    alphas = {key[: -len(".alpha")] for key in keys if key.endswith(".alpha")}
    if not alphas:
        return
    for layer in sorted(alphas - set(layers)):
        raise ValueError(f"{source} has {layer + '.alpha'!r} but no LoRA weights for {layer!r}; re-export the adapter")
    for layer in sorted(set(layers) - alphas):
        raise ValueError(
            f"{source} is incomplete: {layer!r} has no {layer + '.alpha'!r} while other layers have one, "
            "so its scale would be wrong; re-export the adapter"
        )


def from_kohya(kohya: dict[str, torch.Tensor], module_names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Kohya keys -> (diffusers state dict, alpha per module). ``module_names`` are the UNet's module
    names (``unet.named_modules()``): they resolve which underscores were dots. Incomplete
    layers are refused (:func:`check_lora_pairs`)."""
    check_lora_pairs(kohya, "the Kohya state dict")
    lookup = {"lora_unet_" + name.replace(".", "_"): name for name in module_names}
    lookup.update({kohya_name(name): name for name in module_names})
    state_dict, alphas = {}, {}
    for key, tensor in kohya.items():
        name, rest = key.split(".", 1)
        if name not in lookup:
            raise ValueError(f"Kohya key {key!r} names no module of this UNet")
        module = lookup[name]
        if rest == "alpha":
            alphas[module] = float(tensor)
        elif rest == "lora_down.weight":
            state_dict[f"unet.{module}.lora_A.weight"] = tensor
        elif rest == "lora_up.weight":
            state_dict[f"unet.{module}.lora_B.weight"] = tensor
        else:
            raise ValueError(f"unexpected Kohya key {key!r}; expected lora_down.weight, lora_up.weight or alpha")
    return state_dict, alphas


def save_kohya_lora(unet, path, adapter_name: str = ADAPTER_NAME, metadata: dict | None = None) -> Path:
    """Write the adapter in the Kohya layout, with the ``ss_`` header fields Kohya tools show.

    ``sshs_model_hash`` is the SHA-256 of the file's tensor bytes (after the header), which
    A1111 reads as the LoRA's hash instead of hashing the file. Extra ``metadata`` (str values)
    is stored in the header too.
    """
    from safetensors.torch import save

    from dreamguide.provenance import addnet_hash_bytes

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors; got {path}")
    _require_adapter(unet, adapter_name)
    config = unet.peft_config[adapter_name]
    rank, alpha = config.r, config.lora_alpha
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    header.update(metadata or {})
    tensors = {f"unet.{k}": v for k, v in lora_state_dict(unet, adapter_name).items()}
    kohya = {k: v.detach().contiguous() for k, v in to_kohya(tensors, alpha).items()}
    header["sshs_model_hash"] = addnet_hash_bytes(save(kohya))
    return save_safetensors(kohya, path, header)


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(\.weight)?$")


def _check_lora_matches(unet, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Every key must name a Linear/Conv layer of ``unet`` with shapes that fit; else name the first that does not."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = dict(unet.named_modules())
    for key, tensor in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: key {key!r} is not a LoRA weight this loader understands (lora_A/lora_B)")
        name = match["module"]
        module = modules.get(name)
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"{path} does not match this UNet: key {key!r} targets {name!r}, which is {found} in this UNet "
                "(an adapter for a different model architecture?)"
            )
        fan_in, fan_out = (
            (module.in_features, module.out_features)
            if isinstance(module, torch.nn.Linear)
            else (module.in_channels, module.out_channels)
        )
        shape = tuple(tensor.shape)
        if match["part"] == "lora_A" and shape[1] != fan_in:
            expected = f"(rank, {fan_in}{', ...' if len(shape) > 2 else ''})"
        elif match["part"] == "lora_B" and shape[0] != fan_out:
            expected = f"({fan_out}, rank{', ...' if len(shape) > 2 else ''})"
        else:
            continue
        raise ValueError(
            f"{path} does not match this UNet: key {key!r} has shape {shape}, expected {expected} for "
            f"{name!r} (an adapter trained on a different base model?)"
        )


def read_safetensors_header(path: Path, what: str) -> list[str]:
    """The tensor names of a safetensors file (its header only); a file that is no safetensors file
    (empty, truncated, a renamed pickle ``.bin``/``.ckpt``) is a ValueError naming it and why."""
    from safetensors import safe_open

    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{what} file {path} is empty; write it again (a run killed while writing it?)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error types
        with open(path, "rb") as handle:
            start = handle.read(2)
        pickled = start[:1] == b"\x80" or start == b"PK"  # a pickle, or a zipped torch.save
        why = ("it is a pickle (torch.save) file renamed to .safetensors; dreamguide loads weights only from "
               "safetensors: convert it with safetensors.torch.save_file") if pickled else (
              f"it is not a complete safetensors file ({size} bytes; truncated or damaged: {error})")
        raise ValueError(f"{what} file {path}: {why}") from None


class NonFiniteWeights(ValueError):
    """A weight file holds NaN or infinite values: ``path``, and per bad tensor (key, bad values, all values)."""

    def __init__(self, what: str, path, bad: Sequence[tuple[str, int, int]]):
        super().__init__(what, path, bad)
        self.what, self.path, self.bad = what, Path(path), list(bad)

    def __str__(self) -> str:
        (key, count, total), rest = self.bad[0], [k for k, _, _ in self.bad[1:]]
        more = ""
        if rest:
            listed = ", ".join(repr(k) for k in rest[:3]) + (", ..." if len(rest) > 3 else "")
            more = f" (and {len(rest)} more tensor(s): {listed})"
        return (f"{self.what} file {self.path} holds NaN or infinite values: {key!r} has {count} of {total} values "
                f"non-finite{more}; did the training that wrote it diverge? Train it again (e.g. with a lower "
                "learning rate) or use an earlier checkpoint")


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(key, non-finite values, values) of every floating-point tensor with a NaN or inf, by key."""
    bad = []
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append((key, count, tensor.numel()))
    return bad


def check_finite_file(path, what: str) -> None:
    """Raise :class:`NonFiniteWeights` naming the tensors of a safetensors file that hold NaN or inf.

    Reads one tensor at a time, so a large file needs no more memory than its largest tensor.
    """
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for key in sorted(handle.keys()):
            bad += non_finite_tensors({key: handle.get_tensor(key)})
    if bad:
        raise NonFiniteWeights(what, path, bad)


def load_lora(model: "DiffusionModel", path, adapter_name: str = ADAPTER_NAME) -> None:
    """Load a LoRA ``.safetensors`` file into ``model.unet`` as adapter ``adapter_name``.

    Reads diffusers/PEFT files (``unet.<module>.lora_A.weight``, as ``save_lora`` and
    ``StableDiffusionXLPipeline.save_lora_weights`` write) and Kohya files (``lora_unet_..._lora_down``,
    ``..._lora_up``, ``.alpha``), converted by diffusers. Text-encoder LoRA weights are refused,
    and so is a file with a layer missing one half of its pair or its alpha (:func:`check_lora_pairs`), and
    one that holds NaN or infinite values (:class:`NonFiniteWeights`, naming the tensors).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA weights are read only from .safetensors files")
    check_lora_pairs(read_safetensors_header(path, "LoRA"), str(path))
    loader = StableDiffusionXLPipeline if model.kind == "sdxl" else StableDiffusionPipeline
    state_dict, network_alphas, metadata = loader.lora_state_dict(
        str(path.parent),
        weight_name=path.name,
        use_safetensors=True,
        local_files_only=True,
        unet_config=model.unet.config,
        return_lora_metadata=True,
    )
    foreign = [k for k in state_dict if not k.startswith("unet.")]
    if foreign:
        raise ValueError(
            f"{path} holds weights for other components than the UNet (first: {foreign[0]!r}); "
            "only UNet LoRA adapters are supported: re-save the adapter with the UNet weights only"
        )
    if adapter_name in (getattr(model.unet, "peft_config", None) or {}):
        raise ValueError(f"the UNet already has an adapter named {adapter_name!r}; pick another adapter_name")
    unet_state = convert_unet_state_dict_to_peft({k[len("unet.") :]: v for k, v in state_dict.items()})
    _check_lora_matches(model.unet, unet_state, path)
    check_finite_file(path, "LoRA")
    alphas = {k: v for k, v in (network_alphas or {}).items() if k.startswith("unet.")} or None
    model.unet.load_lora_adapter(
        {f"unet.{k}": v for k, v in unet_state.items()},
        prefix="unet",
        network_alphas=alphas,
        adapter_name=adapter_name,
        metadata=metadata or None,
    )
