"""``dreamguide tune``: sweep a guidance mode's strength for one subject and recommend a setting.

Samples a small set of normal and stylized prompts at a few values of the mode's knob
(consistency: w_cons), scores text alignment and identity, and writes into --output:
points.jsonl (one line per finished value; an interrupted run resumes from it), run.json,
tune.json (every point), tune.png (the curve) and tuned.json (the knee of the curve, or with
--identity-floor the most text alignment at that identity), which `dreamguide sample --settings
tuned.json` reads. Defaults: 6 knob values, 4 normal + 4 stylized prompts, 2 seeds, 20 steps.
"""

from __future__ import annotations

import argparse

EXAMPLE = """\
examples:
  dreamguide tune --toyworld-subject sks --method dreambooth --output tune-sks
  dreamguide tune --model stabilityai/stable-diffusion-xl-base-1.0 --lora out/dog/lora.safetensors \\
      --embeddings out/dog/embeddings.safetensors --token "<sks>" --class-word dog \\
      --references photos/dog --identity-floor 0.6 --output tune-dog
  dreamguide sample --model ... --settings tune-dog/tuned.json --prompt "a <sks> dog in the snow" ...
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dreamguide.cli import MODEL_CONFIG_HELP, shaping_help
    from dreamguide.config import defaults
    from dreamguide.tune import DEFAULT_VALUES, TuneSettings

    default = defaults(TuneSettings)

    parser = subparsers.add_parser(
        "tune",
        help="sweep a guidance mode's strength for one subject and recommend a setting",
        description=__doc__.replace("``", ""),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subject = parser.add_argument_group("subject (a toy-world subject, or --model with an adapter)")
    subject.add_argument("--toyworld-subject", help="toy-world subject token, e.g. sks (bundled model, CPU)")
    subject.add_argument("--method", default="dreambooth", help="toy-world adapter method (default dreambooth)")
    subject.add_argument("--model", help="diffusers model folder, hub id or single-file .safetensors checkpoint "
                         "(SDXL, SD 1.x)")
    subject.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    subject.add_argument("--lora", help="the subject's LoRA (.safetensors)")
    subject.add_argument("--embeddings", help="the subject's learned token embeddings (.safetensors)")
    subject.add_argument("--token", help='identifier token, e.g. "<sks>"')
    subject.add_argument("--class-word", help='class of the subject, e.g. "dog"')
    subject.add_argument("--references", help="folder of the subject's reference photos (identity is scored "
                         "against them with DINO)")
    subject.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    subject.add_argument("--threads", type=int, default=0,
                         help="CPU threads (default: the cores other programs leave idle, by the load average)")
    subject.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), help="model weights dtype")

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--mode", help=f"guidance mode whose knob is swept (default {default['mode']})")
    sweep.add_argument("--values", help="comma-separated knob values (default: six per knob, e.g. w_cons "
                       f"{','.join(f'{v:g}' for v in DEFAULT_VALUES['w_cons'])})")
    sweep.add_argument("--w-text", type=float,
                       help=f"text guidance weight when it is not the knob (default {default['w_text']})")
    sweep.add_argument("--w-cons", type=float,
                       help=f"consistency weight when it is not the knob (default {default['w_cons']})")
    sweep.add_argument("--shaping", metavar="KEY=VALUE,...", help=shaping_help())
    sweep.add_argument("--steps", type=int, help=f"denoising steps (default {default['steps']})")
    sweep.add_argument("--seeds", help=f"seeds per prompt (default {','.join(map(str, default['seeds']))})")
    sweep.add_argument("--prompts-per-set", type=int, help="prompts from each of the normal and stylized sets "
                       f"(default {default['prompts_per_set']})")
    sweep.add_argument("--batch-size", type=int,
                       help=f"images per batched forward (default {default['batch_size']})")
    sweep.add_argument("--height", type=int, help="image height (default: the model's native size)")
    sweep.add_argument("--width", type=int, help="image width (default: the model's native size)")
    sweep.add_argument("--identity-floor", type=float,
                       help="recommend the most text alignment with identity >= this (default: the knee)")
    sweep.add_argument("--output", default="tune", help="output folder (default: tune)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _values(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--values must be comma-separated numbers, e.g. 0,1.5,3; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from dreamguide.cli import CommandError, shaping_switches
    from dreamguide.config import given
    from dreamguide.tune import TuneSettings, model_workbench, toyworld_workbench, tune

    if bool(args.toyworld_subject) == bool(args.model):
        raise CommandError("pass either --toyworld-subject (e.g. sks) or --model with the subject's adapter")
    if args.model_config and not args.model:
        raise CommandError("--model-config is the config folder of a single-file --model; the toy world's "
                           "model needs none")
    settings = TuneSettings(values=_values(args.values), height=args.height, width=args.width,
                            **given(mode=args.mode, steps=args.steps, seeds=args.seeds,
                                    prompts_per_set=args.prompts_per_set, batch_size=args.batch_size,
                                    w_text=args.w_text, w_cons=args.w_cons, shaping=shaping_switches(args.shaping)))
    if args.toyworld_subject:
        if (args.device or "cpu") == "cpu":
            from dreamguide.cpu_threads import use_idle_cores

            use_idle_cores(args.threads)
        bench = toyworld_workbench(args.toyworld_subject, args.method, settings.prompts_per_set,
                                   device=args.device or "cpu")
    else:
        if not args.references:
            raise CommandError("--references (a folder of the subject's photos) is needed to score identity")
        bench = model_workbench(args.model, token=args.token, class_word=args.class_word, references=args.references,
                                lora=args.lora, embeddings=args.embeddings, prompts_per_set=settings.prompts_per_set,
                                device=args.device, dtype=args.dtype, model_config=args.model_config)
    tune(bench, settings, args.output, identity_floor=args.identity_floor, progress=not args.no_progress)
    return 0
