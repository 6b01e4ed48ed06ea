"""torch.compile of the UNet with a persistent cache, for the speed benchmark (``sample_speed.py --compile``).

The sampler does not compile (CUDA-graph replay of the eager forward gets most of the speed with no
compile time: docs/PERFORMANCE.md); these helpers show how to when many images pay off the compile.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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

    Sliced routing (``dreamguide.unet_rows.fast_routing``) compiles (no data-dependent indexing);
    PEFT's own ``adapter_names`` path does not fuse. ``channels_last`` stores conv weights NHWC
    (cuDNN's native layout for bf16). Call ``use_compile_cache`` first to persist the work.
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return torch.compile(unet, mode=mode, fullgraph=fullgraph, dynamic=False)
