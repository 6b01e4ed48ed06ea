"""UNet rows: every prediction a batch of images needs, from one batched UNet forward (SPEC section 2).

A guidance mode reads up to four predictions per image and step; each is one *row* of the UNet
batch, on one prompt and one set of weights (:data:`ROWS`):

    need                 prompt            weights
    uncond               negative prompt   pretrained   (adapter off)
    base                 base prompt       pretrained   (adapter off)
    personalized_uncond  negative prompt   personalized (adapter on)
    personalized         token prompt      personalized (adapter on)

A :class:`RowLayout` stacks the rows of a batch need-major, in that order: ``[uncond of every
image that needs it, base of ..., ...]``, so the personalized rows form one block at the end.
Each row has a *route*: ``BASE_ROUTE`` (pretrained weights) or the personalized weights' name.

Three ways to run the routed forward; :func:`row_function` picks the first that is exact:

* **sliced routing** (:func:`fast_routing`, :class:`FastUNetCall`): every LoRA layer adds its
  adapter's update to the static slice of its rows (one ``addmm_``; scattered rows get a 0/1
  row scale instead), so no indexing, no host sync and static shapes; on CUDA the forward is
  captured in a CUDA graph at the first step and replayed after. Base rows get the base layer's
  output bit for bit; adapter rows get ``base(x) + scaling * B(A(x))`` as PEFT does (the rounding
  of the sum may differ). Not exact for DoRA and other LoRA variants, LoRA biases, active
  dropout or LoRA on non-Linear layers (:func:`fast_routing_unsupported` says why).
* **PEFT routing** (:func:`routed_adapters`): a forward pre-hook passes ``adapter_names`` (one
  name per row) to every LoRA layer, which gathers and scatters each adapter's rows. Exact:
  rows never mix (the UNet has no batch-coupled layer).
* **a separate personalized UNet** (:func:`predict_rows` with ``personalized_unet``): one
  forward for the base rows (adapters of the base UNet off), one for the others, put back in
  row order.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from dreamguide.models import TextConditioning, take_rows

#: The route of rows on the pretrained weights (every adapter off).
BASE_ROUTE = "__base__"
#: The route of personalized rows when the personalized model is a separate UNet.
PERSONALIZED_UNET_ROUTE = "personalized"


class Row(NamedTuple):
    """Where a prediction comes from: ``prompt`` names the ``SampleItem`` field it is conditioned on."""

    prompt: str
    personalized: bool


#: Each prediction a guidance mode can read, in row order (pretrained rows first).
ROWS: dict[str, Row] = {
    "uncond": Row("negative_prompt", False),
    "base": Row("base_prompt", False),
    "personalized_uncond": Row("negative_prompt", True),
    "personalized": Row("prompt", True),
}


# ---------------------------------------------------------------------------------------------
# Row layout


@dataclass(frozen=True)
class RowLayout:
    """The rows of one UNet batch: for each need (in ``ROWS`` order), the images that read it."""

    images: int
    blocks: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, needs_per_image: Sequence[Sequence[str]]) -> "RowLayout":
        """The layout of a batch whose image ``j`` reads the predictions ``needs_per_image[j]``."""
        for needs in needs_per_image:
            unknown = [n for n in needs if n not in ROWS]
            if unknown:
                raise ValueError(f"unknown prediction(s) {unknown}; the UNet rows are {', '.join(ROWS)}")
        blocks = []
        for need in ROWS:
            images = tuple(j for j, needs in enumerate(needs_per_image) if need in needs)
            if images:
                blocks.append((need, images))
        return cls(len(needs_per_image), tuple(blocks))

    @property
    def rows(self) -> list[tuple[str, int]]:
        """(need, image) of every row, in order."""
        return [(need, image) for need, images in self.blocks for image in images]

    def __len__(self) -> int:
        return sum(len(images) for _, images in self.blocks)

    def routes(self, personalized: str | None) -> list[str] | None:
        """Per row: ``personalized`` for personalized rows, ``BASE_ROUTE`` for the others (None: no routing)."""
        if personalized is None:
            return None
        return [personalized if ROWS[need].personalized else BASE_ROUTE for need, _ in self.rows]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet input rows from one sample per image (slices, no index tensor)."""
        if all(len(images) == self.images for _, images in self.blocks):
            return x.repeat(len(self.blocks), *([1] * (x.ndim - 1)))
        return torch.cat([x if len(images) == self.images else take_rows(x, images) for _, images in self.blocks])

    def take(self, rows: torch.Tensor, need: str, images: Sequence[int]) -> torch.Tensor:
        """The rows of ``need`` for ``images`` (a slice, a view, when they are consecutive)."""
        start = 0
        for block_need, block_images in self.blocks:
            if block_need == need:
                return take_rows(rows, [start + block_images.index(j) for j in images])
            start += len(block_images)
        raise ValueError(f"no image of this batch reads the {need!r} prediction")


# ---------------------------------------------------------------------------------------------
# PEFT routing: adapter_names per row through forward pre-hooks


def lora_layers(unet) -> list[torch.nn.Module]:
    """The PEFT tuner layers (LoRA Linear/Conv wrappers) inside ``unet``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def check_routable(unet, routes: Sequence[str]) -> list[torch.nn.Module]:
    """Raise a ValueError saying how to fix it when rows cannot be routed per adapter; return the layers."""
    from peft.tuners.lora import LoraLayer

    wanted = sorted({name for name in routes if name != BASE_ROUTE})
    layers = lora_layers(unet)
    known = list(getattr(unet, "peft_config", None) or {})
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(
            f"adapter(s) {unknown} are not loaded on the UNet (it has {known or 'no adapters'}); "
            f"load them first or use {BASE_ROUTE!r} for rows without an adapter"
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
def routed_adapters(unet, routes: Sequence[str]):
    """Within the block, row i of every UNet forward uses adapter ``routes[i]`` (``BASE_ROUTE``: none).

    The hooks are removed on exit, also when the block raises.
    """
    names = list(routes)
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


def _timestep_rows(timestep, rows: Sequence[int], batch: int):
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 1 and timestep.shape[0] == batch > 1:
        return take_rows(timestep, rows)
    return timestep


def _forward(unet, sample, timestep, conditioning: TextConditioning) -> torch.Tensor:
    return unet(sample, timestep, return_dict=False, **conditioning.unet_kwargs())[0]


def predict_rows(
    unet,
    sample: torch.Tensor,
    timestep,
    conditioning: TextConditioning,
    routes: Sequence[str] | None = None,
    personalized_unet=None,
) -> torch.Tensor:
    """The UNet's prediction for every row of ``sample``, each row on its own weights (PEFT routing).

    ``routes``: one name per row; ``BASE_ROUTE`` rows use the base weights, the others the named
    LoRA adapter of ``unet`` (one batched forward), or, when ``personalized_unet`` is given, that
    full UNet (one forward for the base rows, adapters of ``unet`` off, one for the others; put
    back in row order). None: one plain forward with whatever adapters are active.
    No host-device synchronisation: rows are gathered by slicing, never by index tensors.
    """
    batch = sample.shape[0]
    if len(conditioning) != batch:
        raise ValueError(f"{len(conditioning)} conditioning rows for a batch of {batch} samples")
    if routes is None:
        return _forward(unet, sample, timestep, conditioning)
    routes = list(routes)
    if len(routes) != batch:
        raise ValueError(f"{len(routes)} row routes for a batch of {batch} samples")
    if personalized_unet is None:
        with routed_adapters(unet, routes):
            return _forward(unet, sample, timestep, conditioning)

    base_rows = [i for i, name in enumerate(routes) if name == BASE_ROUTE]
    other_rows = [i for i, name in enumerate(routes) if name != BASE_ROUTE]

    def rows_forward(model, rows):
        rows_timestep = _timestep_rows(timestep, rows, batch)
        return _forward(model, take_rows(sample, rows), rows_timestep, conditioning.select(rows))

    parts = []
    if base_rows:
        with routed_adapters(unet, [BASE_ROUTE] * len(base_rows)):  # adapters on the base UNet stay off
            parts.append(rows_forward(unet, base_rows))
    if other_rows:
        parts.append(rows_forward(personalized_unet, other_rows))
    if len(parts) == 1:
        return parts[0]
    # Back to row order: where each original row sits in the concatenation [base rows, other rows].
    position = {row: k for k, row in enumerate(base_rows + other_rows)}
    return take_rows(torch.cat(parts), [position[i] for i in range(batch)])


# ---------------------------------------------------------------------------------------------
# Sliced routing: the same function without indexing (compiles, CUDA-graph captures)

_STATE_ATTR = "_dreamguide_fast_routing"


@dataclass(frozen=True, eq=False)
class _Route:
    """One adapter's rows: the block ``start:stop``, or every row times ``row_scale`` (0/1 per row)."""

    adapter: str
    start: int
    stop: int
    row_scale: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class RowPlan:
    """How the rows of a batch map to adapters (built once per row layout and device, then reused)."""

    rows: int
    routes: tuple[_Route, ...]


def plan_rows(routes: Sequence[str], device: torch.device | str = "cpu") -> RowPlan:
    """The sliced-routing plan of ``routes`` (one name per row; ``BASE_ROUTE``: no adapter)."""
    names = list(routes)
    plan = []
    for adapter in dict.fromkeys(n for n in names if n != BASE_ROUTE):
        rows = [i for i, name in enumerate(names) if name == adapter]
        if rows == list(range(rows[0], rows[-1] + 1)):
            plan.append(_Route(adapter, rows[0], rows[-1] + 1))
        else:
            scale = torch.tensor([1.0 if name == adapter else 0.0 for name in names], device=device)
            plan.append(_Route(adapter, 0, len(names), scale))
    return RowPlan(len(names), tuple(plan))


class _RoutingState:
    """Shared by the patched LoRA layers of one UNet: the active plan and a cache of plans."""

    def __init__(self) -> None:
        self.plan: RowPlan | None = None
        self.plans: dict[tuple, RowPlan] = {}

    def plan_for(self, names: Sequence[str], device: torch.device) -> RowPlan:
        # Cached: the same layout reuses the same plan object (and row-scale tensor), so no
        # host-to-device copy per step and stable torch.compile guards.
        key = (tuple(names), str(device))
        if key not in self.plans:
            self.plans[key] = plan_rows(names, device)
        return self.plans[key]


def _lora_linear_type():
    from peft.tuners.lora import Linear

    return Linear


def _lora_layers(unet) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def fast_routing_unsupported(unet, routes: Sequence[str]) -> str | None:
    """Why sliced routing would not compute exactly what PEFT's per-row routing does, or None."""
    wanted = {name for name in routes if name != BASE_ROUTE}
    if not wanted:
        return None
    linear = _lora_linear_type()
    for name, layer in unet.named_modules():
        if not hasattr(layer, "lora_A"):
            continue
        used = [a for a in wanted if a in layer.lora_A]
        if not used:
            continue
        if not isinstance(layer, linear):
            return f"LoRA layer {name} is a {type(layer).__name__}; the fast path handles LoRA on Linear layers only"
        if getattr(layer, "merged", False):
            return f"LoRA layer {name} has its adapter merged into the base weights"
        for adapter in used:
            if layer.use_dora.get(adapter, False) or adapter in getattr(layer, "lora_variant", {}):
                return f"adapter {adapter!r} at {name} is a LoRA variant (e.g. DoRA), not plain LoRA"
            if getattr(layer, "lora_bias", {}).get(adapter, False):
                return f"adapter {adapter!r} at {name} has a LoRA bias"
            dropout = layer.lora_dropout[adapter]
            if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
                return f"adapter {adapter!r} at {name} has active dropout (call unet.eval() to sample)"
    return None


def _routed_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a PEFT LoRA Linear layer under a ``RowPlan`` (PEFT's own forward otherwise)."""
    plan = getattr(self, _STATE_ATTR).plan
    if plan is None or "adapter_names" in kwargs or self.disable_adapters:
        return type(self).forward(self, x, *args, **kwargs)
    if x.shape[0] != plan.rows:
        raise ValueError(
            f"fast_routing was given {plan.rows} adapter names but a LoRA layer got a batch of {x.shape[0]} rows; "
            "give one adapter name per row of the UNet batch"
        )
    result = self.base_layer(x, *args, **kwargs)
    if not result.is_contiguous():
        result = result.contiguous()
    for route in plan.routes:
        if route.adapter not in self.lora_A:
            continue  # this layer is not a target of that adapter
        down = self.lora_A[route.adapter].weight
        up = self.lora_B[route.adapter].weight
        scaling = self.scaling[route.adapter]
        rows_in = x[route.start : route.stop]
        rows_out = result[route.start : route.stop]
        low = F.linear(rows_in.to(down.dtype), down)
        if route.row_scale is not None:
            low = low * route.row_scale.to(low.dtype).view(-1, *([1] * (low.ndim - 1)))
        if up.dtype == result.dtype:
            # One GEMM that adds scaling * low @ up^T into the output rows in place.
            rows_out.view(-1, rows_out.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), up.t(), alpha=scaling)
        else:
            rows_out += (F.linear(low, up) * scaling).to(result.dtype)
    return result


def install_fast_routing(unet) -> _RoutingState:
    """Patch every PEFT LoRA Linear layer of ``unet`` to follow the routing plan (idempotent).

    While no plan is active the patched layers call PEFT's own forward, so the model behaves
    exactly as before; ``uninstall_fast_routing`` removes the patch.
    """
    state = getattr(unet, _STATE_ATTR, None)
    if state is None:
        state = _RoutingState()
        setattr(unet, _STATE_ATTR, state)
    linear = _lora_linear_type()
    for layer in _lora_layers(unet):
        if isinstance(layer, linear) and getattr(layer, _STATE_ATTR, None) is not state:
            setattr(layer, _STATE_ATTR, state)
            layer.forward = types.MethodType(_routed_lora_forward, layer)
    return state


def uninstall_fast_routing(unet) -> None:
    """Undo ``install_fast_routing``: every LoRA layer uses PEFT's forward again."""
    for layer in _lora_layers(unet):
        if getattr(layer, _STATE_ATTR, None) is not None:
            delattr(layer, _STATE_ATTR)
            layer.__dict__.pop("forward", None)
    if getattr(unet, _STATE_ATTR, None) is not None:
        delattr(unet, _STATE_ATTR)


def _planned(unet, names: list[str]) -> tuple[_RoutingState, RowPlan]:
    """Validate ``names`` for sliced routing, patch the UNet, and return its state and the plan."""
    check_routable(unet, names)
    reason = fast_routing_unsupported(unet, names)
    if reason is not None:
        raise ValueError(f"{reason}; route rows with dreamguide.unet_rows.routed_adapters instead")
    state = install_fast_routing(unet)
    return state, state.plan_for(names, next(unet.parameters()).device)


@contextmanager
def fast_routing(unet, routes: Sequence[str]) -> Iterator[None]:
    """Within the block, row i of every UNet forward uses adapter ``routes[i]`` (sliced routing).

    Same contract as :func:`routed_adapters`; raises ValueError when sliced routing would not be
    exact (see :func:`fast_routing_unsupported`) or the adapters are unknown. Enter it once around
    the denoising loop: the plan is cached, entering is cheap anyway.
    """
    state, plan = _planned(unet, list(routes))
    previous, state.plan = state.plan, plan
    try:
        yield
    finally:
        state.plan = previous


class FastUNetCall:
    """The UNet forward of every denoising step of one batch, on the fast path.

    Rows are routed with the sliced-routing plan (validated once here, switched on per call: no
    module walk per step), and on CUDA the forward is captured in a CUDA graph at the first call
    and replayed after (bit for bit the eager result, without Python and launch overhead; a
    capture that fails falls back to eager with a warning). Build it with ``create``, which
    returns None where the fast path would not be exact.
    """

    def __init__(self, unet, routes: Sequence[str] | None = None, cuda_graph: bool = True) -> None:
        self.unet = unet
        self.names = None if routes is None else list(routes)
        self.state = None
        self.plan = None
        if self.names is not None:
            self.state, self.plan = _planned(unet, self.names)
        # Offloading hooks move weights during the forward: not capturable.
        self.cuda_graph = cuda_graph and not any(hasattr(m, "_hf_hook") for m in unet.modules())
        self._graph = None

    @classmethod
    def create(cls, unet, routes: Sequence[str] | None = None, cuda_graph: bool = True) -> "FastUNetCall | None":
        """A ``FastUNetCall``, or None when the fast path would not be exact for these rows."""
        if routes is not None and fast_routing_unsupported(unet, routes) is not None:
            return None
        return cls(unet, routes, cuda_graph)

    def _forward(self, sample, timestep, kwargs):
        return self.unet(sample, timestep, return_dict=False, **kwargs)[0]

    def __call__(self, sample: torch.Tensor, timestep, conditioning) -> torch.Tensor:
        """The prediction for every row; ``conditioning``: a ``TextConditioning`` or UNet keyword arguments."""
        kwargs = conditioning.unet_kwargs() if hasattr(conditioning, "unet_kwargs") else conditioning
        if self.names is not None and len(self.names) != sample.shape[0]:
            raise ValueError(f"{len(self.names)} row routes for a batch of {sample.shape[0]} samples")
        previous = None
        if self.state is not None:
            previous, self.state.plan = self.state.plan, self.plan
        try:
            if self.cuda_graph and sample.is_cuda and isinstance(timestep, torch.Tensor) and timestep.is_cuda:
                return self._replay(sample, timestep, kwargs)
            return self._forward(sample, timestep, kwargs)
        finally:
            if self.state is not None:
                self.state.plan = previous

    def _replay(self, sample, timestep, kwargs) -> torch.Tensor:
        import warnings

        from dreamguide.cuda_graph import GraphedForward

        try:
            if self._graph is None or not self._graph.accepts(sample, timestep, kwargs):
                self._graph = None
                self._graph = GraphedForward(self._forward, sample, timestep, kwargs, warmup=1)
        except Exception as error:  # noqa: BLE001 - any capture failure: run eagerly instead
            warnings.warn(f"CUDA graph capture of the UNet failed ({error}); continuing without CUDA graphs")
            self.cuda_graph = False
            return self._forward(sample, timestep, kwargs)
        # A copy: the captured output buffer is overwritten by the next replay.
        return self._graph(sample, timestep, kwargs).clone()


# ---------------------------------------------------------------------------------------------
# The UNet call of a batch


def row_function(
    unet, routes: Sequence[str] | None, *, personalized_unet=None, fast: bool = True
) -> Callable[[torch.Tensor, object, TextConditioning], torch.Tensor]:
    """``f(sample, timestep, conditioning)``: the UNet's output for rows routed by ``routes``.

    The fast path (:class:`FastUNetCall`) where ``fast`` and it is exact, else
    :func:`predict_rows` (PEFT routing, or two forwards for a separate ``personalized_unet``).
    Build one per batch layout and call it at every step.
    """
    if fast and personalized_unet is None:
        call = FastUNetCall.create(unet, routes)
        if call is not None:
            return call
    return partial(predict_rows, unet, routes=routes, personalized_unet=personalized_unet)
