"""DreamBench throughput: images per hour of generation + scoring, on one GPU or several.

Runs the real benchmark path (``DreamBenchWorld`` + ``evaluation.runner``: shards, per-subject LoRA
loading, ``Sampler`` in ``pr`` mode with its 3-row routed UNet forward, VAE decode, PNG +
manifest writes, all five metrics) on models built in code with random weights, because
timing does not depend on the weights and nothing can be downloaded:

    UNet           the SDXL base architecture (2.57 B parameters), 1024 px (128x128 latents)
    VAE            the SDXL VAE architecture (decoding 1024 px images)
    text encoders  the SDXL shapes (CLIP ViT-L text, OpenCLIP bigG text) over a small tokenizer
    LoRA           rank 32 on to_q/to_k/to_v/to_out.0, one file per subject
    metrics        DINO ViT-S/16, DINOv2-small, CLIP ViT-B/32, SigLIP base/16 shapes at 224 px

References are the DreamBench photos (``--dreambench``; a synthetic folder of the same shape when
it is missing). The clock runs from after model
loading and one warm-up sampler call per process to the end of the last shard (all processes
synchronized), so it measures steady-state generation + scoring + writes.

    python benchmarks/bench_throughput.py --json results/one.json                    # one GPU
    accelerate launch --multi_gpu --num_processes 2 benchmarks/bench_throughput.py --json results/two.json
    python benchmarks/bench_throughput.py --tiny                                   # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from architectures import SDXL_SCHEDULER_CONFIG, SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

REPO = Path(__file__).resolve().parents[1]


def sdxl_model(device, dtype):
    """A DiffusionModel with the SDXL base architecture and random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_clip_tokenizer

    tokenizers = [tiny_clip_tokenizer(), tiny_clip_tokenizer()]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in the run dtype: half the peak memory
    try:
        with torch.device(device):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
            vae = AutoencoderKL(**SDXL_VAE_CONFIG)
            encoders = []
            encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection)
            for tokenizer, shape, cls in zip(tokenizers, SDXL_TEXT_ENCODER_CONFIGS, encoder_classes):
                config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id, **shape)
                encoders.append(cls(config))
    finally:
        torch.set_default_dtype(default_dtype)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    for module in (unet, vae, *encoders):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return DiffusionModel(kind="sdxl", unet=unet, scheduler=scheduler, tokenizers=tokenizers, text_encoders=encoders,
                          vae=vae, source="random-sdxl", force_zeros_for_empty_prompt=True)


def tiny_model(device, dtype):
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sdxl_pipeline

    model = DiffusionModel.from_pipeline(tiny_sdxl_pipeline(0), source="tiny-sdxl")
    for module in (model.unet, model.vae, *model.text_encoders):
        module.to(device=device, dtype=dtype)
    return model


def save_subject_lora(model, path: Path, rank: int) -> Path:
    """A random LoRA (B nonzero, so the adapter really runs) written like a trained one, then removed."""
    from dreamguide import lora_files

    lora_files.add_lora(model.unet, rank=rank, adapter_name="bench")
    with torch.no_grad():
        for name, parameter in model.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 1e-3)
    lora_files.save_lora(model.unet, path, "bench")
    model.unet.delete_adapters("bench")
    return path


def synthetic_dreambench(folder: Path, subjects: int, seed: int = 0) -> Path:
    """A DreamBench-shaped folder (5 random 512 px photos per subject, 25 prompts per list) for machines
    without the dataset; timing does not depend on the photos or the prompt wording."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [f"subject{i:02d}" for i in range(subjects)]
    for name in names:
        (folder / name).mkdir(parents=True)
        for k in range(5):
            pixels = (rng.random((512, 512, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(folder / name / f"{k:02d}.jpg", quality=95)
    prompts = "\n".join(f"'a {{0}} {{1}} in scene number {i}'.format(unique_token, class_token)," for i in range(25))
    table = "\n".join(f"{name},toy" for name in names)
    text = (f"Classes\n\nsubject_name,class\n{table}\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n{prompts}\n]\n\n"
            f"Live Subject Prompts\n\nprompt_list = [\n{prompts}\n]\n")
    (folder / "prompts_and_classes.txt").write_text(text)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dreambench", default=str(REPO / ".." / "shared" / "dreambench"),
                        help="DreamBench folder; if it is missing, a synthetic one of the same shape is made")
    parser.add_argument("--subjects", type=int, default=4, help="first N DreamBench subjects (default 4)")
    parser.add_argument("--prompts-per-set", type=int, default=1, help="prompts per set: DreamBench + stylized")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4, as the protocol)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4, help="images per batched forward (3 UNet rows each)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                        help="model dtype (default bfloat16: its wide range keeps random activations finite)")
    parser.add_argument("--output", default="/tmp/dreamguide-bench-throughput", help="scratch folder (wiped)")
    parser.add_argument("--json", help="write the figures here (main process)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU, 2 steps: checks the script")
    args = parser.parse_args()

    from accelerate import PartialState

    from dreamguide.evaluation.protocol import Plan
    from dreamguide.evaluation.runner import build_jobs, group_jobs, run_shard, shard
    from dreamguide.evaluation.suites.dreambench import DreamBenchWorld
    from dreamguide.evaluation.suites.dreambench_config import dreambench_config_from_dict
    from dreamguide.evaluation.tiny_backbones import save_tiny_backbones

    state = PartialState(cpu=args.tiny)
    device = torch.device("cpu") if args.tiny else state.device
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    output = Path(args.output)
    scratch = output / "assets"
    if state.is_main_process:
        shutil.rmtree(output, ignore_errors=True)
        scratch.mkdir(parents=True)
        save_tiny_backbones(scratch / "backbones", size="tiny" if args.tiny else "base")
        if not Path(args.dreambench).is_dir():
            print(f"{args.dreambench} is missing: using a synthetic DreamBench-shaped folder")
            synthetic_dreambench(scratch / "dreambench", args.subjects)
    state.wait_for_everyone()
    if not Path(args.dreambench).is_dir():
        args.dreambench = str(scratch / "dreambench")

    build = time.perf_counter()
    model = (tiny_model if args.tiny else sdxl_model)(device, dtype)
    subjects = sorted(p.name for p in Path(args.dreambench).iterdir() if p.is_dir())[: args.subjects]
    if state.is_main_process:
        save_subject_lora(model, scratch / "lora.safetensors", 2 if args.tiny else args.lora_rank)
    state.wait_for_everyone()
    steps = 2 if args.tiny else args.steps
    size = None if args.tiny else args.size
    backbones = {k: str(scratch / "backbones" / k) for k in ("dino", "dinov2", "clip", "siglip")}
    config = dreambench_config_from_dict({
        "dreambench": args.dreambench, "subjects": subjects, "prompts_per_set": args.prompts_per_set,
        "model": {"base": "random-sdxl"},
        "sampling": {"modes": ["pr"], "seeds": list(range(1 if args.tiny else args.seeds)), "w_cons": [3.0],
                     "steps": steps, "batch_size": args.batch_size, "trace": False,
                     **({"height": size, "width": size} if size else {})},
        "adapters": {"subjects": {s: {"lora": str(scratch / "lora.safetensors")} for s in subjects}},
        "metrics": {"backbones": backbones, "device": str(device)},
    }, REPO, "bench_throughput")
    world = DreamBenchWorld(config)
    world._model = model  # the in-memory random model stands in for loading a checkpoint
    world.prepare()
    plan: Plan = config.plan
    jobs = build_jobs(world, plan)
    mine = shard(group_jobs(jobs), state.process_index, state.num_processes)
    warm = world.generate(mine[0])  # warm-up: kernels, allocator, reference embeddings
    world.score(mine[0], [g.image for g in warm])
    if device.type == "cuda":
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - build

    state.wait_for_everyone()
    start = time.perf_counter()
    result = run_shard(world, plan, output / "run", state.process_index, state.num_processes,
                       log=lambda message: None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    own_s = time.perf_counter() - start
    state.wait_for_everyone()
    wall_s = time.perf_counter() - start

    if not state.is_main_process:
        return
    images = len(jobs)
    record = {
        "dreambench": "synthetic" if args.dreambench == str(scratch / "dreambench") else args.dreambench,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "processes": state.num_processes,
        "torch": torch.__version__,
        "images": images,
        "subjects": len(subjects),
        "prompts": len({j.case for j in jobs}),
        "steps": steps,
        "size": size or "native (tiny)",
        "batch_size": args.batch_size,
        "mode": "parallel-rescaled",
        "dtype": str(dtype).removeprefix("torch."),
        "wall_s": round(wall_s, 2),
        "main_process_s": round(own_s, 2),
        "main_process_images": result["images"],
        "seconds_per_image": round(wall_s / images, 3),
        "images_per_hour": round(images / wall_s * 3600, 1),
        "setup_s": round(setup_s, 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else None,
    }
    print(f"{record['device']} x{record['processes']}: {images} images ({record['prompts']} prompts x "
          f"{len(plan.seeds)} seeds, pr, {steps} steps, {record['size']} px) in {wall_s:.1f} s "
          f"-> {record['images_per_hour']} images/hour ({record['seconds_per_image']} s/image)")
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
