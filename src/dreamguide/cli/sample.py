"""``dreamguide sample``: sample images with consistency / parallel-rescaled guidance.

Writes one PNG per (mode, seed) with its settings in the PNG metadata, a labelled grid
(columns = modes, rows = seeds) when there is more than one image, ``settings.json`` (the
run's settings and files) and, with ``--trace``, ``trace.json`` (per-step Consistency_p stats).
"""

from __future__ import annotations

import argparse

EXAMPLE = """\
example:
  dreamguide sample --model stabilityai/stable-diffusion-xl-base-1.0 \\
      --lora out/dog/lora.safetensors --embeddings out/dog/embeddings.safetensors \\
      --token "<sks>" --class-word dog --prompt "a watercolor painting of <sks> dog" \\
      --modes cfg,consistency,pr --seeds 0-3 --output samples/dog
"""


# Spelled out here so that ``--help`` does not import torch; tests check them against the library.
MODE_NAMES = (
    "cfg", "dreambooth", "consistency", "parallel-rescaled", "pr", "orthogonal", "recentred", "spread-capped",
    "norm-bounded", "magnitude-weighted", "adaptive-parallel", "late-pr",
)
GRANULARITIES = ("location", "sample")
NORMALIZATIONS = ("standardize", "none", "zero", "clip-negative")
SCHEDULERS = ("default", "euler", "euler-a", "ddim", "dpm++", "ddpm")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sample",
        help="sample images with (parallel-rescaled) consistency guidance",
        description=__doc__.replace("``", ""),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="diffusers model folder or hub id (SDXL, SD 1.x/2.x, pixel)")
    model.add_argument("--lora", help="personalized LoRA (.safetensors, diffusers/PEFT format)")
    model.add_argument("--embeddings", help="textual-inversion embeddings (.safetensors) for --token")
    model.add_argument("--personalized-unet", help="folder of a fully fine-tuned UNet (instead of a LoRA)")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    model.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="weights dtype (default auto: float16 on GPU, float32 on CPU)",
    )

    prompt = parser.add_argument_group("prompts")
    prompt.add_argument("--prompt", required=True, help='token prompt, e.g. "a photo of <sks> dog in the snow"')
    prompt.add_argument("--token", help='identifier token of the subject, e.g. "<sks>"')
    prompt.add_argument("--class-word", help='class of the subject, e.g. "dog" (derives the base prompt)')
    prompt.add_argument("--base-prompt", help="prompt for the pretrained model (default: token -> class word)")
    prompt.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")

    guide = parser.add_argument_group("guidance")
    guide.add_argument(
        "--modes",
        default="parallel-rescaled",
        help=f"comma-separated guidance modes: {', '.join(MODE_NAMES)} (default: parallel-rescaled)",
    )
    guide.add_argument("--w-text", type=float, default=7.5, help="text guidance weight (default 7.5)")
    guide.add_argument("--w-cons", type=float, default=3.0, help="consistency guidance weight (default 3.0)")
    guide.add_argument("--pr-granularity", default="location", choices=GRANULARITIES, help="PR projection scope")
    guide.add_argument("--pr-normalization", default="standardize", choices=NORMALIZATIONS, help="PR rule for k")
    guide.add_argument("--pr-rescale", type=float, default=1.0, help="PR rescale factor lambda (default 1.0)")
    guide.add_argument("--pr-eps", type=float, default=1e-6, help="PR epsilon (default 1e-6)")

    run_ = parser.add_argument_group("sampling")
    run_.add_argument("--seeds", default="0", help="seeds, one image each: 0,1,2,3 or 0-3 (default 0)")
    run_.add_argument("--batch-size", type=int, default=1, help="images per batched forward (default 1)")
    run_.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    run_.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    run_.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    run_.add_argument("--scheduler", default="default", choices=SCHEDULERS, help="default: the model's own")
    run_.add_argument("--output", default="samples", help="output folder (default: samples)")
    run_.add_argument("--trace", action="store_true", help="write per-step Consistency_p stats to trace.json")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_.add_argument(
        "--no-fast",
        action="store_true",
        help="route rows with PEFT's adapter_names and run the UNet eagerly (default: the fast path, "
        "same predictions: see docs/PERFORMANCE.md)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dreamguide.guidance import ParallelRescaling
    from dreamguide.cli import CommandError
    from dreamguide.sampling import SampleSettings, Sampler, no_personalization_message, save_results

    pr = ParallelRescaling(
        granularity=args.pr_granularity, normalization=args.pr_normalization, rescale=args.pr_rescale, eps=args.pr_eps
    )
    settings = SampleSettings(
        prompt=args.prompt,
        token=args.token,
        class_word=args.class_word,
        base_prompt=args.base_prompt,
        negative_prompt=args.negative_prompt,
        modes=args.modes,
        seeds=args.seeds,
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
        steps=args.steps,
        w_text=args.w_text,
        w_cons=args.w_cons,
        pr=pr,
        scheduler=args.scheduler,
        trace=args.trace,
    )
    if settings.needs_personalized and not (args.lora or args.embeddings or args.personalized_unet):
        raise CommandError(no_personalization_message(settings))  # before loading a large model for nothing
    sampler = Sampler.from_pretrained(
        args.model,
        lora=args.lora,
        embeddings=args.embeddings,
        personalized_unet=args.personalized_unet,
        token=args.token,
        dtype=args.dtype,
        device=args.device,
        fast=not args.no_fast,
    )
    results = sampler.sample(settings, progress=not args.no_progress)
    written = save_results(results, Path(args.output), settings=settings, sampler=sampler)
    for kind, paths in written.items():
        for path in paths:
            print(f"{kind}: {path}")
    return 0
