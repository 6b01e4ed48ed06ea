"""dreamguide: personalized text-to-image diffusion with parallel-rescaled consistency guidance.

The main entry points, imported lazily so ``import dreamguide`` stays light::

    from dreamguide import Sampler, SampleItem, SampleSettings, ParallelRescaling
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Sampler": "dreamguide.sampling",
    "SampleSettings": "dreamguide.sampling",
    "SampleItem": "dreamguide.sampling",
    "SampleResult": "dreamguide.sampling",
    "save_results": "dreamguide.sampling",
    "ParallelRescaling": "dreamguide.guidance",
    "guide": "dreamguide.guidance",
    "load_model": "dreamguide.models",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dreamguide' has no attribute {name!r}")
