"""``dreamguide demo``: personalized sampling with dreambooth, consistency and PR guidance, on a CPU.

Uses the bundled toy-world model and subject adapter (no downloads) and writes into --output a
labelled comparison grid, a metrics table per mode (text alignment, identity) and a plot of
Consistency_p per denoising step (normal vs stylized prompts).
"""

from __future__ import annotations

import argparse

EXAMPLE = """\
examples:
  dreamguide demo
  dreamguide demo --subject zwx --seeds 0-3 --output demo-zwx          # fine-tunes zwx first
  dreamguide demo --prompts "a zwx cup in the snow" "a neon sign of a zwx cup" --subject zwx
  dreamguide demo --retrain                                            # fine-tune the subject afresh
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dreamguide.config import defaults
    from dreamguide.toyworld.demo import DemoSettings

    default = defaults(DemoSettings)
    parser = subparsers.add_parser(
        "demo",
        help="the method end to end in the bundled miniature world (CPU, no downloads)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--subject",
                        help="subject token: sks (ball, bundled adapter), zwx, qlo, vrt, bny, mup "
                             f"(default {default['subject']})")
    parser.add_argument("--prompts", nargs="+", metavar="PROMPT",
                        help='token prompts in the world\'s grammar, e.g. "a pencil sketch of a sks ball" '
                             "(default: two background and two stylized prompts)")
    parser.add_argument("--seeds", help=f"seeds, e.g. 0,1 or 0-3 (default {','.join(map(str, default['seeds']))})")
    parser.add_argument("--steps", type=int, help=f"denoising steps (default {default['steps']})")
    parser.add_argument("--w-text", type=float, help=f"text guidance weight (default {default['w_text']})")
    parser.add_argument("--w-cons", type=float, help=f"consistency guidance weight (default {default['w_cons']})")
    parser.add_argument("--curve-w-cons", metavar="W,W",
                        help="further w_cons values the consistency modes are sampled at for the trade-off plot; "
                             f"'' for none (default {','.join(f'{w:g}' for w in default['curve_w_cons'])})")
    parser.add_argument("--output", help=f"output folder (default {default['output']})")
    parser.add_argument("--retrain", action="store_true",
                        help="fine-tune the subject afresh instead of the bundled adapter")
    parser.add_argument("--retrain-steps", type=int,
                        help="fine-tuning steps with --retrain (default: the toy world's personalization default)")
    parser.add_argument("--method", choices=("dreambooth", "dreambooth-ti", "dco"),
                        help=f"fine-tuning method of the adapter (default {default['method']}, the bundled one)")
    parser.add_argument("--device", help=f"torch device (default {default['device']})")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: the cores other programs leave idle, by the load average)")
    parser.set_defaults(func=run)
    return parser


def _weights(text: str | None) -> tuple[float, ...] | None:
    """``"1,2"`` -> (1.0, 2.0); ``""`` -> (); None (not given) -> None."""
    import math

    from dreamguide.cli import CommandError

    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CommandError(f"--curve-w-cons {text!r}: write comma-separated numbers, e.g. 1,2") from None
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise CommandError(f"--curve-w-cons {text!r}: weights must be finite and >= 0, got {bad[0]}")
    return values


def run(args) -> int:
    from dreamguide.cli import CommandError
    from dreamguide.config import given
    from dreamguide.cpu_threads import use_idle_cores
    from dreamguide.sampling import parse_seeds
    from dreamguide.toyworld.demo import DemoSettings, run_demo
    from dreamguide.toyworld.world import SUBJECT_BY_TOKEN

    settings = DemoSettings(**given(
        subject=args.subject, prompts=tuple(args.prompts) if args.prompts else None,
        seeds=None if args.seeds is None else parse_seeds(args.seeds), steps=args.steps, w_text=args.w_text,
        w_cons=args.w_cons, output=args.output, retrain=args.retrain or None, retrain_steps=args.retrain_steps,
        method=args.method, device=args.device, curve_w_cons=_weights(args.curve_w_cons),
    ))
    if settings.subject not in SUBJECT_BY_TOKEN:
        raise CommandError(f"unknown subject {settings.subject!r}; choose one of {', '.join(SUBJECT_BY_TOKEN)}")
    if settings.steps <= 0:
        raise CommandError(f"--steps must be positive, got {settings.steps}")
    if settings.device == "cpu":
        use_idle_cores(args.threads)
    out = run_demo(settings)
    print()
    print(out["paths"]["metrics_md"].read_text(encoding="utf-8"))
    print(f"comparison grid:      {out['paths']['grid']}")
    print(f"metrics table:        {out['paths']['metrics_md']}  (per image: {out['paths']['metrics_csv']})")
    print(f"Consistency_p plot:   {out['paths']['consistency_p']}")
    print(f"trade-off plot:       {out['paths']['tradeoff']}")
    print(f"images + settings:    {out['paths']['images']}  {out['paths']['record']}")
    print(f"took {out['record']['seconds']['total']:.0f}s")
    return 0
