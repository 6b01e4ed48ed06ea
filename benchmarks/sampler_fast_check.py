"""The sampler end to end with its fast path on and off: same images, and the time per step.

Samples the same seeds with ``Sampler(..., fast=True)`` (the default: sliced routing and
CUDA-graph replay, ``dreamguide.unet_rows.FastUNetCall``) and ``fast=False`` (PEFT
``adapter_names`` routing, eager) on the SDXL base architecture with random weights (``bench_throughput.sdxl_model``: UNet, VAE and text encoders)
and a random rank-32 LoRA, and reports wall time per call, seconds per step and the largest
pixel difference between the two.

    PYTHONPATH=src python benchmarks/sampler_fast_check.py --json sampler-fast.json      # one GPU
    PYTHONPATH=src python benchmarks/sampler_fast_check.py --tiny                        # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--modes", default="pr")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from bench_throughput import sdxl_model, tiny_model

    from dreamguide.lora_files import add_lora
    from dreamguide.sampling import SampleSettings, Sampler

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = (tiny_model if args.tiny else sdxl_model)(device, dtype)
    add_lora(model.unet, rank=4 if args.tiny else 32, adapter_name="subject", init=False)
    model.unet.to(device=device, dtype=dtype)
    size = 32 if args.tiny else 1024
    settings = SampleSettings(prompt="a photo of sks dog", token="sks", class_word="dog", modes=args.modes,
                              seeds=args.seeds, batch_size=len(args.seeds.split(",")), steps=args.steps,
                              height=size, width=size)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "steps": args.steps,
                    "modes": args.modes, "seeds": args.seeds, "size": size, "dtype": str(dtype), "runs": {}}
    images = {}
    for fast in (True, False, True):
        sampler = Sampler(model, fast=fast)  # routes to the UNet's one adapter
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = sampler.sample(settings, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        key = "fast" if fast else "no-fast"
        report["runs"].setdefault(key, []).append(seconds)
        images[key] = [np.asarray(r.image).astype(np.int16) for r in results]
        print(f"{key}: {seconds:.2f} s for {len(results)} images x {args.steps} steps", flush=True)
    report["max_pixel_diff"] = int(max(np.abs(a - b).max() for a, b in zip(images["fast"], images["no-fast"])))
    report["pixel_std"] = float(np.std(images["fast"][0]))
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
