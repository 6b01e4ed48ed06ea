"""Sampling speed benchmark: milliseconds per guided denoising step.

    python benchmarks/sample_speed.py --json bench-sample.json     # or: dreamguide bench sample ...
    python benchmarks/sample_speed.py --tiny --iters 2             # CPU check of the script

Times one step of the project's denoising loop (``dreamguide.denoise.denoise``: scheduler input
scaling, the UNet forward over every row a guidance mode needs, the guidance math, the
scheduler step) for ``cfg``, ``dreambooth``, ``consistency``
and ``pr`` at several batch sizes, on the SDXL base UNet architecture built from its config
with random weights (timing does not depend on the weights; nothing is downloaded) and a
random rank-32 LoRA on to_q, to_k, to_v, to_out.0. Text encoders are not run: the prompt
embeddings are random tensors of SDXL's shapes ([77, 2048] tokens, [1280] pooled, 6 time ids).

Ways of getting the predictions (``--variants``):

    peft       one routed forward, PEFT ``adapter_names`` per row (unet_rows.routed_adapters)
    fast       one routed forward, sliced routing (unet_rows.fast_routing: no indexing, no host sync)
    graph      ``fast`` captured in a CUDA graph and replayed (no compile time)
    compiled   ``fast`` under torch.compile (``--compile``; persistent cache, compile_cache.py)
    dco        the DCO reference ordering: per image a base call of 2 rows (adapter off),
               then an adapter call of 1 row
    two-call   the DCO ordering batched over images: one base call, one adapter call

Model FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward
(base rows and adapter rows counted separately) and compared with a bf16 matmul timed in
the same run. ``--tiny`` runs a miniature SDXL-shaped UNet (CPU is fine) to check the script.
The targets in ``summarize`` are those of the sampling-speed work (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared modules, also when imported

from architectures import SDXL_POOLED_DIM, SDXL_SCHEDULER_CONFIG, SDXL_TOKENS, SDXL_UNET_CONFIG  # noqa: E402

from dreamguide.unet_rows import BASE_ROUTE, ROWS  # noqa: E402

#: A miniature of the same architecture (3 levels, text_time conditioning) for ``--tiny``.
TINY_UNET_CONFIG: dict = {
    **SDXL_UNET_CONFIG,
    "sample_size": 16,
    "block_out_channels": (32, 64, 64),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 2, 4),
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}
TINY_POOLED_DIM = 32
TINY_TOKENS = 8

MODES: tuple[str, ...] = ("cfg", "dreambooth", "consistency", "pr")
#: SDPA backends (torch.nn.attention.SDPBackend names) that ``--attention`` can pin.
ATTENTION_BACKENDS: dict[str, str] = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
}
ATTENTION_CHOICES: tuple[str, ...] = ("default", *ATTENTION_BACKENDS, "auto")
VARIANTS: tuple[str, ...] = ("peft", "fast", "graph", "compiled", "dco", "two-call")
#: Variants that only make sense for the 3-prediction modes (base rows + adapter rows).
SPLIT_VARIANTS: tuple[str, ...] = ("dco", "two-call")
#: The benchmark's own random LoRA adapter.
ADAPTER = "subject"
#: Personalized-steps schedules the trajectories time besides every step (``--schedules``).
SCHEDULES: tuple[str, ...] = ("every=3", "every=4", "every=2,stop=0.6")
#: The three prompts of a step, in the order their random embeddings are drawn.
PROMPTS: tuple[str, ...] = ("negative_prompt", "base_prompt", "prompt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="1,4", help="images per step, comma-separated (default 1,4)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"guidance modes (default {','.join(MODES)})")
    parser.add_argument(
        "--variants",
        default="peft,fast,graph,dco,two-call",
        help=f"ways to get the predictions, of {','.join(VARIANTS)} (default: all but compiled; --compile adds it)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the fast path")
    parser.add_argument(
        "--compile-configs",
        default="pr:4",
        help="MODE:BATCH pairs to compile, comma-separated (default pr:4; each takes minutes cold)",
    )
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    parser.add_argument(
        "--compile-cache",
        default=None,
        help="compile cache folder (default $DREAMGUIDE_COMPILE_CACHE or ~/.cache/dreamguide/torch-compile)",
    )
    parser.add_argument("--no-channels-last", action="store_true", help="compile without channels-last weights")
    parser.add_argument(
        "--attention",
        default="default",
        choices=ATTENTION_CHOICES,
        help="scaled-dot-product attention kernel: torch's default choice, one backend, or 'auto' (time "
        "each on the fast path at the largest batch and keep the fastest if it beats the default by 2%%)",
    )
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="image size in pixels (default 1024; 128 with --tiny)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement (default 3)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per measurement; the median is reported")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--tiny", action="store_true", help="a miniature SDXL-shaped UNet: checks the script on CPU")
    parser.add_argument(
        "--matmul-size", type=int, default=None, help="square matmul size (default 8192; 256 with --tiny)"
    )
    parser.add_argument(
        "--json", default="bench-sample.json", help="where to write the results (default bench-sample.json)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trajectory-steps", type=int, default=30,
                        help="also time whole trajectories of this many steps per image through the sampler, "
                        "prompt encoding and VAE decode included (0: skip; default 30)")
    parser.add_argument("--trajectory-modes", default="cfg,dreambooth,consistency,pr",
                        help="modes of the trajectories (default cfg,dreambooth,consistency,pr)")
    parser.add_argument("--schedules", default=";".join(SCHEDULES),
                        help="personalized-steps schedules timed for the consistency modes, ';'-separated, "
                        f"as `dreamguide sample --personalized-steps` takes them (default {';'.join(SCHEDULES)})")
    parser.add_argument("--schedule-modes", default="pr",
                        help="consistency modes timed with each of --schedules (default pr: the others of the "
                        "consistency family run the same rows)")
    parser.add_argument("--trajectory-repeats", type=int, default=3, help="timed trajectories per configuration")
    parser.add_argument("--graphs", choices=("per-call", "kept", "both"), default="both",
                        help="trajectories with CUDA graphs captured in each sampling call (as one `dreamguide "
                        "sample` run), kept between calls (repeated sampling), or both (default)")
    parser.add_argument("--trajectories-only", action="store_true", help="skip the per-step timings")


def _csv(text: str, valid: tuple[str, ...] | None, what: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if valid is not None:
        bad = [item for item in items if item not in valid]
        if bad:
            raise ValueError(f"unknown {what} {bad}; choose from {', '.join(valid)}")
    return items


def _mode_needs(mode: str) -> tuple[str, ...]:
    from dreamguide.guidance import get_mode

    return get_mode(mode).needs


def _write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


class Bench:
    """The model, inputs and timers of one benchmark run."""

    def __init__(self, args) -> None:
        import torch

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        default_dtype = "bfloat16" if self.cuda else "float32"
        self.dtype = getattr(torch, args.dtype or default_dtype)
        self.config = TINY_UNET_CONFIG if args.tiny else SDXL_UNET_CONFIG
        self.pooled_dim = TINY_POOLED_DIM if args.tiny else SDXL_POOLED_DIM
        self.tokens = TINY_TOKENS if args.tiny else SDXL_TOKENS
        self.resolution = args.resolution or (128 if args.tiny else 1024)
        self.latent = self.resolution // 8
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.unet = self._build_unet()
        self.scheduler = self._scheduler()
        self.generator = torch.Generator(self.device).manual_seed(args.seed)
        self.stack = ExitStack()  # run-wide settings (the attention backend)

    # -- model and inputs ---------------------------------------------------------------------

    def _build_unet(self):
        from diffusers import UNet2DConditionModel

        from dreamguide.lora_files import add_lora

        torch = self.torch
        torch.manual_seed(self.args.seed)
        with torch.device(self.device):  # initialise on the device: seconds instead of minutes for SDXL
            unet = UNet2DConditionModel(**self.config)
        # init=False: random A and B, so the adapter changes the output (B = 0 would hide routing bugs).
        add_lora(unet, rank=self.args.rank, adapter_name=ADAPTER, init=False)
        unet.to(self.device, self.dtype).eval().requires_grad_(False)
        return unet

    def _scheduler(self):
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)

    def randn(self, *shape, dtype=None):
        return self.torch.randn(*shape, generator=self.generator, device=self.device, dtype=dtype or self.dtype)

    def conditioning(self, batch: int, needs: tuple[str, ...]) -> dict:
        """UNet keyword arguments for the rows ``[need_0 x batch, need_1 x batch, ...]``."""
        torch = self.torch
        prompts = [
            (
                self.randn(batch, self.tokens, self.config["cross_attention_dim"]),
                self.randn(batch, self.pooled_dim),
            )
            for _ in range(3)
        ]
        size = float(self.resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=self.device, dtype=self.dtype)
        which = [PROMPTS.index(ROWS[need].prompt) for need in needs]
        hidden = torch.cat([prompts[k][0] for k in which])
        pooled = torch.cat([prompts[k][1] for k in which])
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(len(hidden), 6).contiguous()},
        }

    @staticmethod
    def row_names(batch: int, needs: tuple[str, ...]) -> list[str]:
        return [ADAPTER if ROWS[need].personalized else BASE_ROUTE for need in needs for _ in range(batch)]

    # -- ways to get the predictions ----------------------------------------------------------

    def unet_call(self, sample, timestep, kwargs):
        return self.unet(sample, timestep, return_dict=False, **kwargs)[0]

    def forward_and_context(self, variant: str, batch: int, needs: tuple[str, ...], compiled=None):
        """(context manager to hold around the steps, forward(sample_rows, t, kwargs) -> rows)."""
        from dreamguide.cuda_graph import GraphedForward
        from dreamguide.unet_rows import fast_routing, routed_adapters

        names = self.row_names(batch, needs)
        if variant == "peft":
            return routed_adapters(self.unet, names), self.unet_call
        if variant == "fast":
            return fast_routing(self.unet, names), self.unet_call
        if variant == "compiled":
            return fast_routing(self.unet, names), lambda s, t, kw: compiled(s, t, return_dict=False, **kw)[0]
        if variant == "graph":
            graphed: dict = {}

            def forward(sample, timestep, kwargs):
                if "fn" not in graphed:
                    graphed["fn"] = GraphedForward(self.unet_call, sample, timestep, kwargs)
                return graphed["fn"](sample, timestep, kwargs)

            return fast_routing(self.unet, names), forward
        if variant in SPLIT_VARIANTS:
            return nullcontext(), self._split_forward(batch, needs, per_image=variant == "dco")
        raise ValueError(f"unknown variant {variant!r}")

    def _split_forward(self, batch: int, needs: tuple[str, ...], per_image: bool) -> Callable:
        """Base rows with the adapter off, then adapter rows with it on: separate UNet calls."""
        from dreamguide.models import take_rows

        torch = self.torch
        names = self.row_names(batch, needs)
        base_rows = [i for i, n in enumerate(names) if n == BASE_ROUTE]
        adapter_rows = [i for i, n in enumerate(names) if n != BASE_ROUTE]
        if per_image:
            # Rows are need-major, so image j owns the rows r with r % batch == j.
            groups = [
                ([r for r in base_rows if r % batch == j], [r for r in adapter_rows if r % batch == j])
                for j in range(batch)
            ]
        else:
            groups = [(base_rows, adapter_rows)]
        order = [r for group in groups for rows in group for r in rows]
        back = [order.index(i) for i in range(len(names))]

        def select(kwargs, rows):
            return {
                "encoder_hidden_states": take_rows(kwargs["encoder_hidden_states"], rows),
                "added_cond_kwargs": {k: take_rows(v, rows) for k, v in kwargs["added_cond_kwargs"].items()},
            }

        def forward(sample, timestep, kwargs):
            parts = []
            for base, adapter in groups:
                for rows, enabled in ((base, False), (adapter, True)):
                    if not rows:
                        continue
                    (self.unet.enable_adapters if enabled else self.unet.disable_adapters)()
                    parts.append(self.unet_call(take_rows(sample, rows), timestep, select(kwargs, rows)))
            self.unet.enable_adapters()
            return take_rows(torch.cat(parts), back)

        return forward

    # -- timing -------------------------------------------------------------------------------

    def run_steps(
        self, mode: str, batch: int, forward: Callable, kwargs: dict, steps: int, timed: bool, watch_syncs: bool = False
    ):
        """Run ``steps`` denoising steps from fresh noise; returns (milliseconds per step, final latents).

        The steps are those of ``dreamguide.denoise.denoise``, the sampler's loop, at the default
        guidance weights; ``watch_syncs``: CUDA's sync debug mode is on for the steps (not the
        scheduler set-up).
        """
        from dreamguide.denoise import denoise
        from dreamguide.guidance import Predictions, guide

        torch = self.torch
        needs = _mode_needs(mode)
        scheduler = self.scheduler
        scheduler.set_timesteps(50, device=self.device)
        scheduler.set_begin_index(0)  # no timestep search (a host sync) on the first step
        x = self.randn(batch, 4, self.latent, self.latent, dtype=torch.float32) * scheduler.init_noise_sigma

        def rows(x_in, t):
            return forward(x_in.repeat(len(needs), 1, 1, 1).to(self.dtype), t, kwargs).float()

        def combine(output, i, n):
            return guide(mode, Predictions(**dict(zip(needs, output.chunk(len(needs))))))

        marks: list = []

        def mark(step=None) -> None:  # the end of each step (and the start of the first)
            if self.cuda:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            else:
                marks.append(time.perf_counter())

        if timed:
            mark()
        if watch_syncs:
            torch.cuda.set_sync_debug_mode("warn")
        timesteps = scheduler.timesteps[:steps]
        x = denoise(rows, x, scheduler, combine, timesteps=timesteps, callbacks=[mark] if timed else [])
        if watch_syncs:
            torch.cuda.set_sync_debug_mode("default")
        if not timed:
            return [], x
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])], x
        return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])], x

    def time_config(
        self, variant: str, mode: str, batch: int, compiled=None, iters: int | None = None, count_syncs: bool = True
    ) -> dict:
        needs = _mode_needs(mode)
        kwargs = self.conditioning(batch, needs)
        context, forward = self.forward_and_context(variant, batch, needs, compiled)
        with context:
            self.run_steps(mode, batch, forward, kwargs, self.args.warmup, timed=False)
            times, _ = self.run_steps(mode, batch, forward, kwargs, iters or self.args.iters, timed=True)
            self.sync_sites = []
            syncs = self.count_syncs(mode, batch, forward, kwargs) if count_syncs else None
        forward = None
        self.release()
        return {
            "variant": variant,
            "mode": mode,
            "batch": batch,
            "rows": batch * len(needs),
            "adapter_rows": sum(n != BASE_ROUTE for n in self.row_names(batch, needs)),
            "ms": statistics.median(times),
            "ms_min": min(times),
            "ms_max": max(times),
            "host_syncs_per_step": syncs,
            "host_sync_sites": self.sync_sites,
        }

    def count_syncs(self, mode, batch, forward, kwargs) -> int | None:
        """Host-device synchronisations per step, counted over 2 steps (CUDA's sync debug mode); None on CPU."""
        torch = self.torch
        if not self.cuda:
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.run_steps(mode, batch, forward, kwargs, 2, timed=False, watch_syncs=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        self.sync_sites = Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs).most_common(3)
        return len(syncs) / 2

    def attention_sweep(self, batch: int) -> dict:
        """Milliseconds per ``pr`` step on the fast path with each SDPA backend (or the error it gave)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sweep = {}
        for name in ("default", *ATTENTION_BACKENDS):
            backend = None if name == "default" else getattr(SDPBackend, ATTENTION_BACKENDS[name])
            context = nullcontext() if backend is None else sdpa_kernel([backend])
            with context:
                row = _attempt(self, lambda: self.time_config("fast", "pr", batch, iters=5, count_syncs=False), {})
            sweep[name] = row.get("ms", row.get("error"))
            print(f"  attention {name:>9}: {sweep[name]}", flush=True)
        return sweep

    def release(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def elapsed_ms(self, fn: Callable, repeats: int) -> float:
        """Median milliseconds of ``fn()`` (device events on CUDA)."""
        torch = self.torch
        fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    # -- reference figures --------------------------------------------------------------------

    def matmul_tflops(self) -> dict:
        n = self.args.matmul_size or (256 if self.args.tiny else 8192)
        a, b = (self.randn(n, n) for _ in range(2))
        ms = self.elapsed_ms(lambda: a @ b, 10)
        del a, b
        self.release()
        return {"size": n, "dtype": str(self.dtype).removeprefix("torch."), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}

    def count_flops(self) -> dict:
        """FLOPs of one forward per row: adapter off (base) and adapter on (personalized)."""
        from torch.utils.flop_counter import FlopCounterMode

        torch = self.torch
        kwargs = self.conditioning(1, ("uncond",))
        sample = self.randn(1, 4, self.latent, self.latent)
        t = torch.tensor(500.0, device=self.device)
        counts = {}
        for name, enabled in (("base", False), ("personalized", True)):
            (self.unet.enable_adapters if enabled else self.unet.disable_adapters)()
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                self.unet_call(sample, t, kwargs)
            counts[name] = counter.get_total_flops()
        self.unet.enable_adapters()
        return {"base_row": counts["base"], "adapter_row": counts["personalized"]}

    def check_outputs(self, compiled=None, compiled_config: tuple[str, int] | None = None) -> dict:
        """Relative errors ||a - b|| / ||b|| of one forward, each way of routing against the others and
        against PEFT routing in float32 (the reference: bf16 rounding compounds over the random network,
        so two correct bf16 paths differ by about as much as each differs from float32).

        Without ``compiled``: ``pr`` at batch 1 for every eager way; with it: ``compiled_config``.
        """
        torch = self.torch
        t = torch.tensor(500.0, device=self.device)

        def rel(a, b):
            return float((a - b).norm() / b.norm())

        if compiled is not None:
            mode, batch = compiled_config
            needs = _mode_needs(mode)
            sample = self.randn(len(needs) * batch, 4, self.latent, self.latent)
            kwargs = self.conditioning(batch, needs)
            eager = self._forward_once("fast", batch, needs, sample, t, kwargs)
            fast_compiled = self._forward_once("compiled", batch, needs, sample, t, kwargs, compiled)
            reference = self._float32_reference(batch, needs, sample, t, kwargs)
            return {
                "compiled_vs_fast": rel(fast_compiled, eager),
                "compiled_vs_float32": rel(fast_compiled, reference),
                "fast_vs_float32_at_compiled_config": rel(eager, reference),
            }
        needs, batch = _mode_needs("pr"), 1
        sample, kwargs = self.randn(len(needs) * batch, 4, self.latent, self.latent), self.conditioning(batch, needs)
        ways = ["peft", "fast", "two-call", "dco"] + (["graph"] if self.cuda else [])
        outputs = {way: self._forward_once(way, batch, needs, sample, t, kwargs) for way in ways}
        reference = self._float32_reference(batch, needs, sample, t, kwargs)
        fast, peft = outputs["fast"], outputs["peft"]
        # The same rows with every adapter off: how much the adapter changes its rows (a
        # routing bug that dropped the adapter would show up as ~0 here).
        adapter_off = self._forward_once("two-call", batch, ("uncond",) * len(needs), sample, t, kwargs)
        result = {f"{way}_vs_float32": rel(out, reference) for way, out in outputs.items()}
        result.update(
            {
                "fast_vs_peft": rel(fast, peft),
                "fast_base_rows_max_abs_diff": float((fast[:2] - peft[:2]).abs().max()),
                "separate_calls_vs_peft": rel(outputs["two-call"], peft),
                "adapter_effect": rel(fast[2:], adapter_off[2:]),
                "finite": bool(torch.isfinite(fast).all()),
            }
        )
        if "graph" in outputs:
            result["graph_vs_fast"] = rel(outputs["graph"], fast)
        self.release()
        return result

    def _float32_reference(self, batch, needs, sample, t, kwargs):
        """PEFT-routed forward of a float32 copy of the UNet (the UNet itself when already float32)."""
        import copy

        from dreamguide.unet_rows import routed_adapters

        torch = self.torch
        unet = self.unet if self.dtype == torch.float32 else copy.deepcopy(self.unet).float()
        wide = {
            "encoder_hidden_states": kwargs["encoder_hidden_states"].float(),
            "added_cond_kwargs": {k: v.float() for k, v in kwargs["added_cond_kwargs"].items()},
        }
        with torch.no_grad(), routed_adapters(unet, self.row_names(batch, needs)):
            out = unet(sample.float(), t, return_dict=False, **wide)[0].float()
        del unet
        self.release()
        return out

    def _forward_once(self, variant, batch, needs, sample, t, kwargs, compiled=None):
        context, forward = self.forward_and_context(variant, batch, needs, compiled)
        with context, self.torch.no_grad():
            return forward(sample, t, kwargs).float().clone()

    def guidance_ms(self, mode: str, batch: int) -> float:
        from dreamguide.guidance import Predictions, guide

        shape = (batch, 4, self.latent, self.latent)
        preds = Predictions(*(self.randn(*shape, dtype=self.torch.float32) for _ in range(4)))
        return self.elapsed_ms(lambda: guide(mode, preds), 50)


def _versions() -> dict:
    import diffusers
    import peft
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _find(results: list[dict], variant: str, mode: str, batch: int) -> dict | None:
    for r in results:
        if r["variant"] == variant and r["mode"] == mode and r["batch"] == batch and "ms" in r:
            return r
    return None


def _attempt(bench: Bench, fn: Callable, record: dict) -> dict:
    """``fn()``, or ``record`` with the error when it fails (one broken variant must not end the run)."""
    import traceback

    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON and printed, the run goes on
        traceback.print_exc()
        bench.release()
        return {**record, "error": f"{type(error).__name__}: {error}"}


def summarize(document: dict) -> dict:
    """Ratios, utilisation and the issue's targets from the measured rows."""
    results = document["results"]
    flops = document.get("flops")
    matmul = document.get("matmul")
    for r in results:
        if flops and matmul and "ms" in r:
            base_rows = r["rows"] - r["adapter_rows"]
            model_flops = base_rows * flops["base_row"] + r["adapter_rows"] * flops["adapter_row"]
            r["model_tflop"] = model_flops / 1e12
            r["tflops"] = model_flops / (r["ms"] / 1e3) / 1e12
            r["mfu"] = r["tflops"] / matmul["tflops"]
    summary: dict = {"pr_over_cfg": {}, "dco_over_pr": {}, "targets": []}
    batches = sorted({r["batch"] for r in results})
    for variant in ("peft", "fast", "graph", "compiled"):
        for b in batches:
            pr, cfg = _find(results, variant, "pr", b), _find(results, variant, "cfg", b)
            if pr and cfg:
                summary["pr_over_cfg"][f"{variant}@{b}"] = pr["ms"] / cfg["ms"]
                if "model_tflop" in pr:
                    summary.setdefault("pr_over_cfg_model_flops", {})[f"{b}"] = pr["model_tflop"] / cfg["model_tflop"]
            dco = _find(results, "dco", "pr", b)
            if pr and dco:
                summary["dco_over_pr"][f"{variant}@{b}"] = dco["ms"] / pr["ms"]
    targets = summary["targets"]
    fast4_pr, fast4_cfg = _find(results, "fast", "pr", 4), _find(results, "fast", "cfg", 4)
    if fast4_pr and fast4_cfg:
        ratio = fast4_pr["ms"] / fast4_cfg["ms"]
        floor = fast4_pr["rows"] / fast4_cfg["rows"]
        targets.append(
            {"target": "pr step <= 1.10x cfg step at batch 4 (fast, eager)", "value": ratio, "goal": 1.10,
             "met": ratio <= 1.10, "note": f"rows {fast4_pr['rows']} vs {fast4_cfg['rows']}: FLOP ratio {floor:.2f}"}
        )
    comp = _find(results, "compiled", "pr", 4)
    if comp and "mfu" in comp:
        targets.append(
            {"target": "compiled pr batch 4 MFU >= 55% of measured matmul", "value": comp["mfu"], "goal": 0.55,
             "met": comp["mfu"] >= 0.55}
        )
    for b, goal in ((1, 1.6), (4, 1.0)):
        pr, dco = _find(results, "fast", "pr", b), _find(results, "dco", "pr", b)
        if pr and dco:
            speedup = dco["ms"] / pr["ms"]
            targets.append(
                {"target": f"eager pr >= {goal}x faster than DCO ordering at batch {b}", "value": speedup,
                 "goal": goal, "met": speedup >= goal}
            )
    trajectory_rows = (document.get("trajectories") or {}).get("rows") or []
    for kept, b in sorted({(r.get("graphs_kept", False), r["batch"]) for r in trajectory_rows}):
        skipping = [r for r in trajectory_rows if r["batch"] == b and r.get("graphs_kept", False) == kept
                    and r["mode"] == "pr" and "vs_cfg" in r and r["evaluated_fraction"] is not None
                    and r["evaluated_fraction"] <= 1 / 3 + 1e-9]
        if skipping:
            best = min(skipping, key=lambda r: r["vs_cfg"])
            graphs = "graphs kept between calls" if kept else "graphs captured per call"
            targets.append(
                {"target": f"pr per image ({best['steps']}-step trajectory, {graphs}) <= 1.15x cfg at batch {b}, "
                 "personalized row on <= 1/3 of the steps", "value": best["vs_cfg"], "goal": 1.15,
                 "met": best["vs_cfg"] <= 1.15, "note": f"fastest such schedule: {best['schedule']}"}
            )
    return summary


def format_table(document: dict) -> str:
    results = document["results"]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    keys = sorted({(r["batch"], MODES.index(r["mode"])) for r in results})
    lines = [f"{'batch':>5} {'mode':<12} {'rows':>4} " + " ".join(f"{v:>10}" for v in variants) + "   (ms per step)"]
    for b, m in keys:
        mode = MODES[m]
        cells, rows = [], ""
        for v in variants:
            r = _find(results, v, mode, b)
            cells.append(f"{r['ms']:>10.2f}" if r else f"{'-':>10}")
            if r and v not in SPLIT_VARIANTS:
                rows = r["rows"]
        lines.append(f"{b:>5} {mode:<12} {rows:>4} " + " ".join(cells))
    if document.get("matmul"):
        mm = document["matmul"]
        lines.append(f"matmul {mm['size']}^3 {mm['dtype']}: {mm['tflops']:.1f} TFLOP/s")
    if document.get("flops"):
        f = document["flops"]
        lines.append(
            f"model: {f['base_row'] / 1e12:.3f} TFLOP per base row, {f['adapter_row'] / 1e12:.3f} per adapter row"
        )
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']} {r['mode']} batch {r['batch']} failed: {r['error']}")
    util = [r for r in results if "mfu" in r and r["mode"] == "pr" and r["variant"] not in SPLIT_VARIANTS]
    for r in util:
        lines.append(
            f"pr batch {r['batch']} {r['variant']}: {r['tflops']:.1f} TFLOP/s = {100 * r['mfu']:.1f}% of matmul"
        )
    summary = document.get("summary", {})
    for key, value in summary.get("pr_over_cfg", {}).items():
        lines.append(f"pr/cfg {key}: {value:.3f}")
    for key, value in summary.get("dco_over_pr", {}).items():
        lines.append(f"DCO ordering / pr {key}: {value:.2f}x")
    for key, value in document.get("guidance_ms", {}).items():
        lines.append(f"guidance math {key}: {value:.3f} ms")
    for target in summary.get("targets", []):
        state = "met" if target["met"] else "MISSED"
        lines.append(f"target {target['target']}: {target['value']:.3f} (goal {target['goal']}) {state}")
    if document.get("compile"):
        c = document["compile"]
        lines.append(f"compile: {json.dumps(c)}")
    if document.get("checks"):
        lines.append(f"checks: {json.dumps(document['checks'])}")
    return "\n".join(lines)


def run(args) -> dict:
    """Run the benchmark described by ``args`` (see ``add_arguments``); returns the JSON document."""
    batches = [int(b) for b in _csv(args.batches, None, "batch")]
    modes = [{"parallel-rescaled": "pr"}.get(m, m) for m in _csv(args.modes, MODES + ("parallel-rescaled",), "mode")]
    variants = _csv(args.variants, VARIANTS, "variant")
    if args.compile and "compiled" not in variants:
        variants.append("compiled")
    compile_configs = []
    if "compiled" in variants:
        for item in _csv(args.compile_configs, None, "compile config"):
            mode, _, batch = item.partition(":")
            if mode not in MODES or not batch.isdigit():
                raise ValueError(f"--compile-configs item {item!r} must be MODE:BATCH with MODE in {', '.join(MODES)}")
            compile_configs.append((mode, int(batch)))

    import torch

    out_path = Path(args.json)
    started = time.perf_counter()
    bench = Bench(args)
    if "graph" in variants and not bench.cuda:
        variants.remove("graph")
    document: dict = {
        "benchmark": "dreamguide bench sample",
        "device": torch.cuda.get_device_name(bench.device) if bench.cuda else platform.processor() or "cpu",
        "versions": _versions(),
        "model": "tiny SDXL-shaped UNet" if args.tiny else "SDXL base UNet architecture, random weights",
        "resolution": bench.resolution,
        "dtype": str(bench.dtype).removeprefix("torch."),
        "lora": {"rank": args.rank, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "prompt_embeddings": "random tensors of the encoders' output shapes (text encoders not timed)",
        "steps": {"warmup": args.warmup, "timed": args.iters, "statistic": "median"},
        "results": [],
    }

    try:
        return _run(bench, args, document, batches, modes, variants, compile_configs, started, out_path)
    finally:
        bench.stack.close()


def _run(bench, args, document, batches, modes, variants, compile_configs, started, out_path) -> dict:
    import torch

    def save():
        document["summary"] = summarize(document)
        document["elapsed_s"] = time.perf_counter() - started
        _write_json(out_path, document)

    bench.stack.enter_context(torch.no_grad())
    if not args.trajectories_only:
        _per_step(bench, args, document, batches, modes, variants, compile_configs, started, save)
    if args.trajectory_steps > 0:
        document["trajectories"] = {"rows": []}
        result = _attempt(bench, lambda: trajectories(bench, args, batches, document["trajectories"], save), {})
        document["trajectories"].update({k: v for k, v in result.items() if k != "rows"})
        save()
    return document


def _per_step(bench, args, document, batches, modes, variants, compile_configs, started, save) -> None:
    """The per-step timings: attention backend, matmul ceiling, FLOPs, output checks, every variant."""
    import torch

    chosen = args.attention
    if args.attention == "auto":
        chosen = "default"
        if bench.cuda:
            sweep = document["attention_sweep"] = bench.attention_sweep(max(batches))
            timed = {name: ms for name, ms in sweep.items() if isinstance(ms, float)}
            best = min(timed, key=timed.get)
            if "default" not in timed or timed[best] < 0.98 * timed["default"]:
                chosen = best
    if chosen != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        bench.stack.enter_context(sdpa_kernel([getattr(SDPBackend, ATTENTION_BACKENDS[chosen])]))
    document["attention"] = chosen
    document["matmul"] = bench.matmul_tflops()
    document["flops"] = bench.count_flops()
    with torch.no_grad():
        document["checks"] = _attempt(bench, bench.check_outputs, {})
    save()
    print(f"  setup, matmul, FLOP count and output checks done [{time.perf_counter() - started:.0f} s]", flush=True)
    with torch.no_grad():
        for batch in batches:
            for mode in modes:
                for variant in variants:
                    # The split orderings cost the same for consistency and pr: time them once, for pr.
                    if variant == "compiled" or (variant in SPLIT_VARIANTS and mode != "pr"):
                        continue
                    row = _attempt(bench, lambda: bench.time_config(variant, mode, batch),
                                   {"variant": variant, "mode": mode, "batch": batch})
                    document["results"].append(row)
                    if "ms" in row:
                        print(f"  {variant:>9} {mode:<12} batch {batch}: {row['ms']:8.2f} ms/step, "
                              f"{row['host_syncs_per_step']} host syncs  [{time.perf_counter() - started:.0f} s]",
                              flush=True)
                    save()
        document["guidance_ms"] = {f"{m}@{b}": bench.guidance_ms(m, b) for b in batches for m in ("cfg", "pr")}
        save()
        if compile_configs:
            document["compile"] = _attempt(
                bench, lambda: compile_and_time(bench, compile_configs, args, document, save), {}
            )
    save()


def trajectories(bench: Bench, args, batches, record: dict, save: Callable) -> dict:
    """Whole trajectories per image (``trajectory_speed``): every mode at every step, the consistency
    modes also with each ``--schedules`` schedule."""
    from trajectory_speed import time_trajectories

    from dreamguide.guidance import get_mode
    from dreamguide.personalized_steps import EVERY_STEP, PersonalizedSteps

    schedules = [PersonalizedSteps.parse(text) for text in args.schedules.split(";") if text.strip()]
    scheduled = {get_mode(m).name for m in _csv(args.schedule_modes, None, "mode")}
    configs = []
    for mode in _csv(args.trajectory_modes, MODES + ("parallel-rescaled",), "mode"):
        mode = {"parallel-rescaled": "pr"}.get(mode, mode)
        configs.append((mode, EVERY_STEP))
        if get_mode(mode).has_consistency and get_mode(mode).name in scheduled:
            configs += [(mode, schedule) for schedule in schedules]
    bench.unet = None  # the trajectories build their own model
    bench.release()
    record.update({"steps": args.trajectory_steps, "repeats": args.trajectory_repeats})
    time_trajectories(str(bench.device), bench.dtype, batches, configs, args.trajectory_steps,
                      args.trajectory_repeats, args.rank, args.tiny, rows=record["rows"], on_row=save,
                      keep_graphs={"per-call": (False,), "kept": (True,), "both": (False, True)}[args.graphs])
    return {"model": "tiny SDXL pipeline" if args.tiny else "SDXL base architecture (UNet, VAE, text encoders), "
            "random weights", "resolution": None if args.tiny else 1024, "rows": record["rows"]}


def compile_and_time(bench: Bench, configs, args, document: dict, save: Callable) -> dict:
    """Compile the fast path for each (mode, batch), time it, and record compile cost and payoff."""
    import torch

    from compile_cache import compile_unet, save_compile_cache, use_compile_cache

    from dreamguide.unet_rows import fast_routing

    cache = use_compile_cache(args.compile_cache)
    warm = (cache / "artifacts.bin").is_file()
    compiled = compile_unet(bench.unet, mode=args.compile_mode, channels_last=not args.no_channels_last)
    info: dict = {"cache": str(cache), "cache_was_warm": warm, "mode": args.compile_mode or "default",
                  "channels_last": not args.no_channels_last, "configs": []}
    t = torch.tensor(500.0, device=bench.device)
    for mode, batch in configs:
        needs = _mode_needs(mode)
        kwargs = bench.conditioning(batch, needs)
        sample = bench.randn(len(needs) * batch, 4, bench.latent, bench.latent)
        with fast_routing(bench.unet, bench.row_names(batch, needs)):
            start = time.perf_counter()
            compiled(sample, t, return_dict=False, **kwargs)
            if bench.cuda:
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
        print(f"  compiled {mode} batch {batch} in {compile_s:.1f} s (cache {'warm' if warm else 'cold'})", flush=True)
        row = _attempt(bench, lambda: bench.time_config("compiled", mode, batch, compiled),
                       {"variant": "compiled", "mode": mode, "batch": batch})
        document["results"].append(row)
        if "ms" not in row:
            continue
        entry = {"mode": mode, "batch": batch, "compile_s": compile_s, "ms": row["ms"]}
        for way in ("fast", "graph"):  # against eager, and against CUDA-graph replay (no compile time)
            eager = _find(document["results"], way, mode, batch)
            if eager and eager["ms"] > row["ms"]:
                saved_per_image_s = (eager["ms"] - row["ms"]) * 50 / batch / 1e3
                entry[f"saving_per_image_s_at_50_steps_vs_{way}"] = saved_per_image_s
                entry[f"pays_off_after_images_vs_{way}"] = compile_s / saved_per_image_s
        info["configs"].append(entry)
        document["compile"] = info
        save()
    saved = save_compile_cache(cache)
    info["artifacts"] = None if saved is None else {"path": str(saved), "bytes": saved.stat().st_size}
    with torch.no_grad():
        mode, batch = configs[0]
        document["checks"].update(_attempt(bench, lambda: bench.check_outputs(compiled, (mode, batch)), {}))
    return info


EXAMPLE = """\
examples:
  python benchmarks/sample_speed.py --json bench-sample.json             # eager variants, batch 1 and 4
  python benchmarks/sample_speed.py --compile --json bench-sample.json   # + torch.compile of pr at batch 4
  python benchmarks/sample_speed.py --tiny --iters 2                     # miniature UNet: checks the script on CPU
"""


def main(argv: list[str] | None = None, prog: str = "sample_speed.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n")[0], epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    document = run(args)
    print(format_table(document))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
