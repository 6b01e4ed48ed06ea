"""The fast path of guided sampling: per-row LoRA routing without indexing, compile and CUDA graphs.

PEFT routes the rows of one batch to different adapters through ``adapter_names`` (what
``dreamguide.routing.routed_adapters`` passes): every LoRA layer builds Python index lists,
gathers each adapter's rows, runs the adapter on them and scatters the result back. That is
exact, but in an SDXL UNet with LoRA on the attention projections it happens in 560 layers
per step, each gather and scatter with a host-to-device copy of an index list: 1,680 host
syncs per step, and data-dependent indexing that ``torch.compile`` cannot fuse.

``fast_routing(unet, adapter_names)`` computes the same function another way. For each
adapter used by some rows:

* rows that form one contiguous block (the sampler's layout ``[uncond, base, personalized]``
  puts the personalized rows last): the adapter runs on that static slice only and its update
  is added in place to the same slice of the base output (one fused ``addmm_``);
* any other layout: the adapter runs on every row and its low-rank activations are multiplied
  by a per-row 0/1 vector before the up-projection, so rows without the adapter add exactly 0.

Rows without an adapter get the base layer's output bit for bit; rows with one get
``base(x) + scaling * B(A(x))`` as PEFT does (the rounding of the sum may differ: bf16
tolerance). No indexing, no host sync, static shapes: the layer compiles into plain matmuls
and CUDA-graph captures. ``fast_routing_unsupported`` says when the fast path would not be
exact (DoRA and other LoRA variants, LoRA biases, active dropout, LoRA on non-Linear layers);
callers fall back to ``routed_adapters`` then.

Also here: ``FastUNetCall`` (the sampler's per-step UNet call: fast routing plus CUDA-graph
replay), ``GraphedForward`` (a forward captured once in a CUDA graph and replayed: no launch
overhead, no compile time) and ``compile_unet`` (``torch.compile`` with a persistent cache, see
``use_compile_cache``). Measured figures: docs/BENCHMARKS.md; usage: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

BASE = "__base__"

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


def plan_rows(adapter_names: Sequence[str], device: torch.device | str = "cpu") -> RowPlan:
    """The routing plan of ``adapter_names`` (one name per row; ``"__base__"``: no adapter)."""
    names = list(adapter_names)
    routes = []
    for adapter in dict.fromkeys(n for n in names if n != BASE):
        rows = [i for i, name in enumerate(names) if name == adapter]
        if rows == list(range(rows[0], rows[-1] + 1)):
            routes.append(_Route(adapter, rows[0], rows[-1] + 1))
        else:
            scale = torch.tensor([1.0 if name == adapter else 0.0 for name in names], device=device)
            routes.append(_Route(adapter, 0, len(names), scale))
    return RowPlan(len(names), tuple(routes))


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


def fast_routing_unsupported(unet, adapter_names: Sequence[str]) -> str | None:
    """Why ``fast_routing`` would not compute exactly what PEFT's per-row routing does, or None."""
    wanted = {name for name in adapter_names if name != BASE}
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


@contextmanager
def fast_routing(unet, adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, row i of every UNet forward uses adapter ``adapter_names[i]`` (fast path).

    Same contract as ``dreamguide.routing.routed_adapters``; raises ValueError when the fast
    path would not be exact (see ``fast_routing_unsupported``) or the adapters are unknown.
    Enter it once around the denoising loop: the plan is cached, entering is cheap anyway.
    """
    from dreamguide.routing import check_routable

    names = list(adapter_names)
    check_routable(unet, names)
    reason = fast_routing_unsupported(unet, names)
    if reason is not None:
        raise ValueError(f"{reason}; route rows with dreamguide.routing.routed_adapters instead")
    state = install_fast_routing(unet)
    device = next(unet.parameters()).device
    previous, state.plan = state.plan, state.plan_for(names, device)
    try:
        yield
    finally:
        state.plan = previous


class FastUNetCall:
    """The UNet forward of every denoising step of one batch, on the fast path.

    Rows are routed with the fast path's plan (validated once here, switched on per call: no
    module walk per step), and on CUDA the forward is captured in a CUDA graph at the first call
    and replayed after (bit for bit the eager result, without Python and launch overhead; a
    capture that fails falls back to eager with a warning). Build it with ``create``, which
    returns None where the fast path would not be exact; callers then use
    ``dreamguide.routing.predict_noise``.
    """

    def __init__(self, unet, row_adapters: Sequence[str] | None = None, cuda_graph: bool = True) -> None:
        from dreamguide.routing import check_routable

        self.unet = unet
        self.names = None if row_adapters is None else list(row_adapters)
        self.state = None
        self.plan = None
        if self.names is not None:
            check_routable(unet, self.names)
            reason = fast_routing_unsupported(unet, self.names)
            if reason is not None:
                raise ValueError(f"{reason}; route rows with dreamguide.routing.routed_adapters instead")
            self.state = install_fast_routing(unet)
            self.plan = self.state.plan_for(self.names, next(unet.parameters()).device)
        # Offloading hooks move weights during the forward: not capturable.
        self.cuda_graph = cuda_graph and not any(hasattr(m, "_hf_hook") for m in unet.modules())
        self._graph: GraphedForward | None = None

    @classmethod
    def create(cls, unet, row_adapters: Sequence[str] | None = None, cuda_graph: bool = True) -> "FastUNetCall | None":
        """A ``FastUNetCall``, or None when the fast path would not be exact for these rows."""
        if row_adapters is not None and fast_routing_unsupported(unet, row_adapters) is not None:
            return None
        return cls(unet, row_adapters, cuda_graph)

    def _forward(self, sample, timestep, kwargs):
        return self.unet(sample, timestep, return_dict=False, **kwargs)[0]

    def __call__(self, sample: torch.Tensor, timestep, conditioning) -> torch.Tensor:
        """The prediction for every row; ``conditioning``: a ``TextConditioning`` or UNet keyword arguments."""
        kwargs = conditioning.unet_kwargs() if hasattr(conditioning, "unet_kwargs") else conditioning
        if self.names is not None and len(self.names) != sample.shape[0]:
            raise ValueError(f"{len(self.names)} row adapters for a batch of {sample.shape[0]} samples")
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
# torch.compile with a persistent cache

CACHE_ARTIFACTS = "artifacts.bin"


def default_compile_cache() -> Path:
    """``$DREAMGUIDE_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/dreamguide/torch-compile`` (~/.cache/...)."""
    if os.environ.get("DREAMGUIDE_COMPILE_CACHE"):
        return Path(os.environ["DREAMGUIDE_COMPILE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dreamguide" / "torch-compile"


def use_compile_cache(directory: str | os.PathLike | None = None) -> Path:
    """Keep torch.compile's caches in ``directory`` so a later run skips the compile work.

    Points inductor's on-disk cache (compiled graphs, Triton kernels, autotuning) there
    before anything is compiled, and hot-loads ``artifacts.bin`` from it when present (a
    portable bundle written by ``save_compile_cache``: copy the folder to another machine
    with the same GPU and torch version and it is warm there too). Returns the folder.
    """
    folder = Path(directory).expanduser() if directory else default_compile_cache()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    artifacts = folder / CACHE_ARTIFACTS
    if artifacts.is_file():
        torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    return folder


def save_compile_cache(directory: str | os.PathLike) -> Path | None:
    """Write what this process compiled as a portable ``artifacts.bin`` in ``directory`` (atomic)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    folder = Path(directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CACHE_ARTIFACTS
    temporary = target.with_name(target.name + f".tmp{os.getpid()}")
    temporary.write_bytes(saved[0])
    os.replace(temporary, target)
    return target


def compile_unet(unet, mode: str | None = None, channels_last: bool = True, fullgraph: bool = False):
    """``torch.compile`` the UNet for static shapes (one compile per batch size and row layout).

    Routing through ``fast_routing`` compiles (no data-dependent indexing); PEFT's own
    ``adapter_names`` path does not fuse. ``channels_last`` stores conv weights NHWC (cuDNN's
    native layout for bf16). Call ``use_compile_cache`` first to persist the work.
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return torch.compile(unet, mode=mode, fullgraph=fullgraph, dynamic=False)


# ---------------------------------------------------------------------------------------------
# CUDA graphs


class GraphedForward:
    """``fn(*args, **kwargs)`` captured once in a CUDA graph for fixed shapes, then replayed.

    Each call copies its tensors into the captured inputs and replays the graph; the result is
    the captured output buffer, overwritten by the next call (use it, or clone it, first).
    Non-tensor arguments are frozen at capture. Everything ``fn`` does must be capturable:
    no host syncs, no CPU tensors created per call (``fast_routing`` qualifies; PEFT's
    ``adapter_names`` routing does not).
    """

    def __init__(self, fn: Callable, *args, warmup: int = 2, **kwargs) -> None:
        from torch.utils._pytree import tree_flatten

        self._fn = fn
        flat, self._spec = tree_flatten((args, kwargs))
        self._static = [a.clone() if isinstance(a, torch.Tensor) else a for a in flat]
        static_args, static_kwargs = self._unflatten(self._static)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._output = fn(*static_args, **static_kwargs)

    def _unflatten(self, flat):
        from torch.utils._pytree import tree_unflatten

        return tree_unflatten(flat, self._spec)

    def accepts(self, *args, **kwargs) -> bool:
        """True when a call with these arguments can replay the graph (same structure, shapes, dtypes)."""
        from torch.utils._pytree import tree_flatten

        flat, spec = tree_flatten((args, kwargs))
        if spec != self._spec:
            return False
        for static, value in zip(self._static, flat):
            if isinstance(static, torch.Tensor):
                if not isinstance(value, torch.Tensor) or value.shape != static.shape or value.dtype != static.dtype:
                    return False
                if value.device != static.device:
                    return False
            elif value != static:
                return False
        return True

    def __call__(self, *args, **kwargs):
        from torch.utils._pytree import tree_flatten

        if not self.accepts(*args, **kwargs):
            raise ValueError("GraphedForward called with arguments of another structure, shape or dtype "
                             "than at capture")
        flat, _ = tree_flatten((args, kwargs))
        for static, value in zip(self._static, flat):
            if isinstance(static, torch.Tensor) and value.data_ptr() != static.data_ptr():
                static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self._output
