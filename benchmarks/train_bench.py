"""Training step time and peak GPU memory: ``dreambooth`` vs ``dco`` on the SDXL UNet.

The UNet is built from the SDXL base configuration with random weights (timing does not depend
on the weights, and nothing is downloaded). One step is what the trainer runs per batch with
cached latents and text embeddings: ``training_loss`` (the trainer's own function: the LoRA
forward, plus for DCO the adapter-off reference forward without gradients), backward, gradient
clipping, AdamW on the float32 LoRA weights. Frozen weights in bf16 under bf16 autocast.

    python benchmarks/train_bench.py --json outputs/train_bench.json          # GPU, 1024 px
    python benchmarks/train_bench.py --tiny --steps 2 --warmup 1                # CPU smoke test

Prints a table and writes JSON. Targets: dco step time <= 1.3x dreambooth in the same run;
peak memory <= 24 GB with gradient checkpointing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from architectures import SDXL_POOLED_DIM, SDXL_UNET_CONFIG

#: A few-thousand-parameter stand-in with the same structure, for checking the script on CPU.
TINY_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG,
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 4),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)
TINY_POOLED_DIM = 32


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, rank: int, alpha: float):
    from diffusers import UNet2DConditionModel

    from dreamguide.lora_files import LORA_TARGETS
    from dreamguide.training.trainer import add_trainable_lora

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False).to(dtype)
    lora = add_trainable_lora(unet, rank, alpha, LORA_TARGETS)
    unet.train()
    return unet, list(lora.values())


def make_batch(config: dict, pooled_dim: int, batch: int, device, resolution: int) -> dict:
    g = torch.Generator().manual_seed(0)
    size = config["sample_size"]
    latents = torch.randn(batch, config["in_channels"], size, size, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    abar = torch.linspace(0.99, 0.01, 1000)[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)

    def cond():
        from dreamguide.models import TextConditioning

        return TextConditioning(
            torch.randn(batch, 77, config["cross_attention_dim"], generator=g).to(device),
            torch.randn(batch, pooled_dim, generator=g).to(device),
            time_ids.to(device),
        )

    return dict(
        noisy=noisy.to(device), timesteps=timesteps.to(device), target=noise.to(device), cond=cond(), reference_cond=cond()
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(unet, params, batch: dict, method: str, device, dtype, warmup: int, steps: int) -> dict:
    from dreamguide.training.trainer import training_loss

    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=1e-4)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> float:
        with autocast:
            loss = training_loss(
                unet, unet, method, batch["noisy"], batch["timesteps"], batch["target"], batch["cond"],
                batch["reference_cond"], dtype=dtype,
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()  # float() of the loss synchronizes
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    result = {
        "step_s_median": times[len(times) // 2],
        "step_s_mean": sum(times) / len(times),
        "step_s_min": times[0],
        "last_loss": loss,
    }
    if device.type == "cuda":
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    del optimizer
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet (CPU smoke test) instead of SDXL")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = TINY_UNET_CONFIG if args.tiny else SDXL_UNET_CONFIG
    pooled = TINY_POOLED_DIM if args.tiny else SDXL_POOLED_DIM
    resolution = config["sample_size"] * 8
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    unet, params = build_unet(config, device, dtype, args.rank, args.rank)
    batch = make_batch(config, pooled, args.batch_size, device, resolution)
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        for method in ("dreambooth", "dco"):
            result = bench_one(unet, params, batch, method, device, dtype, args.warmup, args.steps)
            rows.append({"method": method, "gradient_checkpointing": checkpointing, **result})
            print(f"  {method:10s} checkpointing={checkpointing!s:5s} {result['step_s_median'] * 1000:9.1f} ms/step"
                  + (f"  peak {result['peak_allocated_gb']:.2f} GB" if "peak_allocated_gb" in result else ""), flush=True)

    def ratio(checkpointing: bool) -> float:
        by = {r["method"]: r["step_s_median"] for r in rows if r["gradient_checkpointing"] == checkpointing}
        return by["dco"] / by["dreambooth"]

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "unet": "tiny" if args.tiny else "SDXL base architecture, random weights",
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "lora_parameters": sum(p.numel() for p in params),
        "resolution_px": resolution,
        "latent_size": config["sample_size"],
        "batch_size": args.batch_size,
        "lora_rank": args.rank,
        "dtype": args.dtype,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "results": rows,
        "dco_over_dreambooth": {"no_checkpointing": ratio(False), "checkpointing": ratio(True)},
    }
    print()
    print(f"{'method':10s} | {'grad ckpt':9s} | {'ms/step (median)':>16s} | {'peak alloc GB':>13s} | {'peak reserved GB':>16s}")
    print("-" * 78)
    for r in rows:
        print(
            f"{r['method']:10s} | {'on' if r['gradient_checkpointing'] else 'off':9s} | {r['step_s_median'] * 1000:16.1f} | "
            f"{r.get('peak_allocated_gb', float('nan')):13.2f} | {r.get('peak_reserved_gb', float('nan')):16.2f}"
        )
    print(f"dco / dreambooth step time: {ratio(False):.3f} without, {ratio(True):.3f} with gradient checkpointing")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
