"""Milliseconds per guided denoising step on the SDXL UNet architecture: ``dreamguide bench sample``.

The same benchmark as the CLI command, runnable from a checkout without installing:

    PYTHONPATH=src python benchmarks/sample_bench.py --compile --json bench-sample.json   # one GPU
    PYTHONPATH=src python benchmarks/sample_bench.py --tiny --iters 2                     # CPU smoke test

Options, variants and the JSON it writes: ``dreamguide.sampling_speed`` and docs/PERFORMANCE.md.
"""

import sys

from dreamguide.sampling_speed import main

if __name__ == "__main__":
    sys.exit(main())
