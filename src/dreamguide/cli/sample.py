"""``dreamguide sample``: sample images with consistency / parallel-rescaled guidance.

Writes one PNG per (mode, seed) with its settings in the PNG metadata, a labelled grid
(columns = modes, rows = seeds) when there is more than one image, ``settings.json`` (the
run's settings and files) and, with ``--trace``, ``trace.json`` (per-step Consistency_p stats).
Options left out take the library's defaults (``dreamguide.sampling.SampleSettings``). With
``--settings tuned.json`` (from ``dreamguide tune``) the file's mode, weights and switches replace
those defaults; flags given explicitly still win over the file (flags > file > defaults).
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dreamguide import guidance
    from dreamguide.cli import MODEL_CONFIG_HELP, shaping_help
    from dreamguide.config import defaults
    from dreamguide.sampling import SCHEDULERS, SampleSettings

    default = defaults(SampleSettings)
    pr = default["pr"]
    default_steps = default["personalized_steps"].describe()
    parser = subparsers.add_parser(
        "sample",
        help="sample images with (parallel-rescaled) consistency guidance",
        description=__doc__.replace("``", ""),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="diffusers model folder, hub id or single-file .safetensors "
                       "checkpoint (SDXL, SD 1.x/2.x, pixel)")
    model.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    model.add_argument("--lora", help="personalized LoRA (.safetensors, diffusers/PEFT format)")
    model.add_argument("--embeddings", help="textual-inversion embeddings (.safetensors) for --token")
    model.add_argument("--personalized-unet", help="folder of a fully fine-tuned UNet (instead of a LoRA)")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    model.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="weights dtype (default auto: float16 on GPU, float32 on CPU)",
    )

    prompt = parser.add_argument_group("prompts")
    prompt.add_argument("--prompt", required=True, help='token prompt, e.g. "a photo of <sks> dog in the snow"')
    prompt.add_argument("--token", help='identifier token of the subject, e.g. "<sks>"')
    prompt.add_argument("--class-word", help='class of the subject, e.g. "dog" (derives the base prompt)')
    prompt.add_argument("--base-prompt", help="prompt for the pretrained model (default: token -> class word)")
    prompt.add_argument("--negative-prompt", help=f"negative prompt (default: {default['negative_prompt']!r})")

    guide = parser.add_argument_group("guidance")
    guide.add_argument("--settings", help="tuned.json from `dreamguide tune`: its mode, w_text, w_cons, PR and "
                       "shaping switches (flags given explicitly win)")
    modes = [*guidance.MODES, *guidance.ALIASES]
    guide.add_argument(
        "--modes",
        help=f"comma-separated guidance modes: {', '.join(modes)} (default: {','.join(default['modes'])})",
    )
    guide.add_argument("--w-text", type=float, help=f"text guidance weight (default {default['w_text']})")
    guide.add_argument("--w-cons", type=float, help=f"consistency guidance weight (default {default['w_cons']})")
    guide.add_argument("--pr-granularity", choices=guidance.GRANULARITIES,
                       help=f"PR projection scope (default {pr.granularity})")
    guide.add_argument("--pr-normalization", choices=guidance.NORMALIZATIONS,
                       help=f"PR rule for k (default {pr.normalization})")
    guide.add_argument("--pr-rescale", type=float, help=f"PR rescale factor lambda (default {pr.rescale})")
    guide.add_argument("--pr-eps", type=float, help=f"PR epsilon (default {pr.eps})")
    guide.add_argument("--shaping", metavar="KEY=VALUE,...", help=shaping_help())
    steps = guide.add_mutually_exclusive_group()
    steps.add_argument(
        "--personalized-steps", metavar="SCHEDULE",
        help="steps that run the personalized row of the consistency modes: N (every N steps, the others reuse "
        "the last consistency term) or key=value pairs of every, start, stop, reuse (hold|extrapolate), carry "
        f"(g_cons|parts), e.g. every=3,stop=0.8 (default: {default_steps}; docs/SAMPLING.md)",
    )
    steps.add_argument("--every-step", action="store_true", default=None,
                       help="run the personalized row at every step (the schedule off)")

    run_ = parser.add_argument_group("sampling")
    seeds = ",".join(map(str, default["seeds"]))
    run_.add_argument("--seeds", help=f"seeds, one image each per mode: 0,1,2,3 or 0-3 (default {seeds})")
    run_.add_argument(
        "--batch-size",
        type=int,
        help=f"images per batched UNet forward, modes and seeds packed together (default {default['batch_size']})",
    )
    run_.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    run_.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    run_.add_argument("--steps", type=int, help=f"denoising steps (default {default['steps']})")
    run_.add_argument("--scheduler", choices=SCHEDULERS, help=f"default {default['scheduler']!r}: the model's own")
    run_.add_argument("--output", default="samples", help="output folder (default: samples)")
    run_.add_argument("--overwrite", action="store_true",
                      help="replace another run's images in --output (default: refuse such a folder)")
    run_.add_argument("--trace", action="store_true", default=None,
                      help="write per-step Consistency_p stats to trace.json")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_.add_argument(
        "--no-fast",
        action="store_true",
        help="route rows with PEFT's adapter_names and run the UNet eagerly (default: the fast path, "
        "same predictions: see docs/PERFORMANCE.md)",
    )
    parser.set_defaults(func=run)
    return parser


def check_output_folder(output, settings, overwrite: bool = False) -> bool:
    """``output`` can take this run's images: a writable folder (or one that can be made) that holds no
    other run's images, unless ``overwrite``. Raises a ValueError (the path) or CommandError (another
    run) naming the problem and the fix;
    returns True when ``overwrite`` replaces another run's files (remove them first)."""
    import json
    from pathlib import Path

    from dreamguide.cli import CommandError
    from dreamguide.locks import check_output_path

    output = Path(output)
    check_output_path(output, "the images")
    if not output.is_dir():
        return False
    record = output / "settings.json"
    images = sorted(p.name for p in output.glob("*.png"))
    if record.is_file():
        try:  # compared as settings, not as text: a record made before a setting existed reads its default
            earlier = type(settings).from_dict(json.loads(record.read_text(encoding="utf-8")).get("settings", {}))
        except (OSError, ValueError, TypeError):
            earlier = None
        if earlier == settings:
            return False  # the same run again: the same files are rewritten in place
        if overwrite:
            return True
        ours, theirs = settings.to_dict(), earlier.to_dict() if earlier is not None else {}
        changed = sorted(k for k in ours if theirs.get(k) != ours[k])
        raise CommandError(
            f"--output {output} holds the images of another run (settings.json differs in {', '.join(changed)}); "
            "pass --overwrite to replace them, or choose a new folder"
        )
    if images and not overwrite:
        raise CommandError(f"--output {output} holds {len(images)} PNG images of an unknown run (e.g. {images[0]}); "
                           "pass --overwrite to replace them, or choose a new folder")
    return bool(images)


def _clear_earlier_run(output) -> None:
    """Remove the files an earlier run listed in ``settings.json`` (with its grid and trace), so no stale
    image of a larger earlier run sits beside the new ones."""
    import json

    record = output / "settings.json"
    try:
        files = json.loads(record.read_text(encoding="utf-8")).get("files", []) if record.is_file() else None
    except (OSError, ValueError):
        files = None
    if files is None:  # no record of what the earlier run wrote: its PNGs
        files = [p.name for p in output.glob("*.png")]
    for name in [*files, "grid.png", "trace.json", "settings.json"]:
        path = output / name
        if path.parent == output and path.is_file():
            path.unlink()


def settings_from_args(args: argparse.Namespace):
    """``SampleSettings`` from the flags that were given; the others keep the dataclass defaults."""
    from dreamguide.cli import shaping_switches
    from dreamguide.config import given
    from dreamguide.guidance import ParallelRescaling
    from dreamguide.sampling import SampleSettings

    pr = given(granularity=args.pr_granularity, normalization=args.pr_normalization, rescale=args.pr_rescale,
               eps=args.pr_eps)
    tuned: dict = {}
    if getattr(args, "settings", None):
        from dreamguide.tune import load_tuned

        tuned = load_tuned(args.settings)
        pr = {**tuned.pop("pr").to_dict(), **pr}
    shaping = shaping_switches(getattr(args, "shaping", None), tuned.pop("shaping", None))
    return SampleSettings(
        prompt=args.prompt,
        **tuned
        | given(
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
            pr=ParallelRescaling(**pr) if pr else None,
            shaping=shaping,
            personalized_steps=_personalized_steps(args),
            scheduler=args.scheduler,
            trace=args.trace,
        ),
    )


def _personalized_steps(args: argparse.Namespace):
    """The ``--personalized-steps`` / ``--every-step`` schedule, or None when neither was given."""
    from dreamguide.personalized_steps import EVERY_STEP, PersonalizedSteps

    if getattr(args, "every_step", None):
        return EVERY_STEP
    text = getattr(args, "personalized_steps", None)
    if text is None:
        return None
    try:
        return PersonalizedSteps.parse(text)
    except ValueError as error:
        raise ValueError(f"--personalized-steps {text!r}: {error}") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dreamguide.cli import CommandError
    from dreamguide.locks import output_lock
    from dreamguide.sampling import Sampler, no_personalization_message, save_results

    settings = settings_from_args(args)
    replace = check_output_folder(Path(args.output), settings, overwrite=args.overwrite)  # before any model loads
    if settings.needs_personalized and not (args.lora or args.embeddings or args.personalized_unet):
        raise CommandError(no_personalization_message(settings.modes))  # before loading a large model for nothing
    sampler = Sampler.from_pretrained(
        args.model,
        lora=args.lora,
        embeddings=args.embeddings,
        personalized_unet=args.personalized_unet,
        token=args.token,
        dtype=args.dtype,
        device=args.device,
        fast=not args.no_fast,
        model_config=args.model_config,
    )
    output = Path(args.output)
    with output_lock(output, "sample"):
        if replace:
            _clear_earlier_run(output)
        done: list = []
        written: dict = {}

        def keep(batch: list) -> None:
            # Each batch's images are written as soon as they are done, the grid, trace and
            # settings.json rewritten to match: a kill, a later error or a full disk loses nothing
            # already sampled.
            nonlocal written
            saved = len(done)
            done.extend(batch)
            written = save_results(done, output, settings=settings, sampler=sampler, saved=saved)

        sampler.sample(settings, progress=not args.no_progress, on_batch=keep)
    for kind, paths in written.items():
        for path in paths:
            print(f"{kind}: {path}")
    return 0
