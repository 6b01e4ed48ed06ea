"""Time per image of whole trajectories through the real sampler: prompt encoding, denoising, VAE decode.

Part of ``dreamguide bench sample`` (benchmarks/sample_speed.py, ``--trajectory-steps``): the
per-step figures leave out what a user waits for besides the UNet, and a schedule that skips the
personalized row (``dreamguide.personalized_steps``) changes the cost of some steps only. Here
``Sampler.sample_items`` samples ``batch`` images of one mode and schedule, on the SDXL base
architecture with random weights (UNet, VAE and both text encoders: ``bench_throughput.sdxl_model``,
``--tiny``: the miniature SDXL pipeline) and a random rank-``rank`` LoRA; the sampler's fast path
(sliced routing, CUDA graphs captured in each call as one ``dreamguide sample`` run does, or kept
between calls with ``Sampler(keep_graphs=True)``). One untimed call per configuration first; the
median of ``repeats`` timed calls is reported, split into prompt encoding, VAE decode and the rest
(the denoising loop: UNet rows, guidance, scheduler).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def _clock(cuda: bool) -> Callable[[], float]:
    import torch

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


class _Timed:
    """Wraps a sampler method, adding the seconds its calls take to ``total``."""

    def __init__(self, fn, now) -> None:
        self.fn, self.now, self.total = fn, now, 0.0

    def __call__(self, *args, **kwargs):
        start = self.now()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += self.now() - start


def time_trajectories(device: str, dtype, batches, configs, steps: int, repeats: int, rank: int, tiny: bool,
                      log=print, rows: list | None = None, on_row=None, keep_graphs=(False,)) -> list[dict]:
    """Per ``(mode, schedule)`` of ``configs`` and batch size: milliseconds per image of a ``steps``-step
    trajectory, and its parts. ``schedule`` is a ``PersonalizedSteps``. ``keep_graphs``: each value times
    every configuration once more, False with CUDA graphs captured in each call (as one ``dreamguide
    sample`` run), True with the graphs kept between calls (the steady state of repeated sampling).
    Rows are appended to ``rows`` (a new list if None) as they are measured, ``on_row()`` called after
    each (to save partial results)."""
    import torch

    from bench_throughput import sdxl_model, tiny_model
    from dreamguide import lora_files
    from dreamguide.sampling import SampleItem, Sampler

    cuda = str(device).startswith("cuda")
    model = (tiny_model if tiny else sdxl_model)(device, dtype)
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(0)
        lora_files.add_lora(model.unet, rank=rank, adapter_name="subject")
        with torch.no_grad():
            for name, parameter in model.unet.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 1e-3)  # B nonzero: the adapter really runs
    now = _clock(cuda)
    rows = [] if rows is None else rows
    for keep, batch, (mode, schedule) in ((k, b, c) for k in keep_graphs for b in batches for c in configs):
        sampler = Sampler(model, adapter_name="subject", keep_graphs=keep)
        encode, decode = _Timed(sampler._encode, now), _Timed(sampler._to_image, now)
        sampler._encode, sampler._to_image = encode, decode
        items = [SampleItem(prompt="a photo of sks dog", base_prompt="a photo of a dog", mode=mode, seed=seed,
                            token="sks", class_word="dog", personalized_steps=schedule)
                 for seed in range(batch)]

        def call():
            return sampler.sample_items(items, steps=steps, batch_size=batch, progress=False)

        call()  # untimed: cuDNN picks its kernels; with kept graphs, this call captures them
        totals, encodes, decodes = [], [], []
        for _ in range(repeats):
            encode.total = decode.total = 0.0
            start = now()
            call()
            totals.append(now() - start)
            encodes.append(encode.total)
            decodes.append(decode.total)
        total, enc, dec = (statistics.median(v) * 1e3 / batch for v in (totals, encodes, decodes))
        row = {"mode": mode, "schedule": schedule.describe(), "graphs_kept": keep,
               "schedule_settings": schedule.to_dict(),
               "evaluated_fraction": schedule.evaluated_fraction(steps) if mode != "cfg" else None,
               "batch": batch, "steps": steps, "ms_per_image": round(total, 2),
               "encode_ms_per_image": round(enc, 2), "decode_ms_per_image": round(dec, 2),
               "denoise_ms_per_image": round(total - enc - dec, 2),
               "ms_per_image_min": round(min(totals) * 1e3 / batch, 2), "repeats": repeats}
        cfg = next((r for r in rows if r["mode"] == "cfg" and r["batch"] == batch and r["graphs_kept"] == keep),
                   row if mode == "cfg" else None)
        if cfg is not None:
            row["vs_cfg"] = round(row["ms_per_image"] / cfg["ms_per_image"], 3)
            row["denoise_vs_cfg"] = round(row["denoise_ms_per_image"] / cfg["denoise_ms_per_image"], 3)
        rows.append(row)
        if on_row is not None:
            on_row()
        log(f"  trajectory {mode:<12} {row['schedule']:<40} batch {batch}{' kept' if keep else ''}: "
            f"{total:8.1f} ms/image (encode {enc:.1f}, denoise {total - enc - dec:.1f}, decode {dec:.1f})")
    return rows
