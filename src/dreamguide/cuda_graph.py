"""A forward captured once in a CUDA graph and replayed: no Python or kernel-launch overhead.

The sampler's UNet call (:class:`dreamguide.unet_rows.FastUNetCall`) captures the forward of a
batch at its first step and replays it for the others; the replay computes bit for bit what
the eager forward computes. Usage and measured figures: docs/PERFORMANCE.md, docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphedForward:
    """``fn(*args, **kwargs)`` captured once in a CUDA graph for fixed shapes, then replayed.

    Each call copies its tensors into the captured inputs and replays the graph; the result is
    the captured output buffer, overwritten by the next call (use it, or clone it, first).
    Non-tensor arguments are frozen at capture. Everything ``fn`` does must be capturable:
    no host syncs, no CPU tensors created per call (``unet_rows.fast_routing`` qualifies; PEFT's
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
