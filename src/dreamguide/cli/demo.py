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
  dreamguide demo --subject zwx --seeds 0-3 --output demo-zwx          # fine-tunes zwx first (~5 min on 2 cores)
  dreamguide demo --prompts "a zwx cup in the snow" "a neon sign of a zwx cup" --subject zwx
  dreamguide demo --retrain                                            # fine-tune the subject afresh
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="the method end to end in the bundled miniature world (CPU, no downloads)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--subject", default="sks",
                        help="subject token: sks (ball, bundled adapter), zwx, qlo, vrt, bny, mup (default sks)")
    parser.add_argument("--prompts", nargs="+", metavar="PROMPT",
                        help='token prompts in the world\'s grammar, e.g. "a pencil sketch of a sks ball" '
                             "(default: two background and two stylized prompts)")
    parser.add_argument("--seeds", default="0,1", help="seeds, e.g. 0,1 or 0-3 (default 0,1)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--w-text", type=float, default=None, help="text guidance weight (default: the demo's)")
    parser.add_argument("--w-cons", type=float, default=None, help="consistency guidance weight (default: the demo's)")
    parser.add_argument("--output", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument("--retrain", action="store_true", help="fine-tune the subject afresh instead of the bundled adapter")
    parser.add_argument("--retrain-steps", type=int, default=0, help="fine-tuning steps with --retrain (default: the toy default, 1000)")
    parser.add_argument("--method", default="dreambooth", choices=("dreambooth", "dreambooth-ti", "dco"),
                        help="fine-tuning method of the adapter (default dreambooth, the bundled one)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: the cores other programs leave idle, by the load average)")
    parser.set_defaults(func=run)
    return parser


def idle_cores() -> int:
    """CPU cores not busy with other programs (by the 1-minute load average), at least one.

    Oversubscribed intra-op threads spin against each other: on a 2-core machine with one other busy
    process, 2 threads ran a UNet forward 13x slower than 1 thread.
    """
    import os

    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, round(cores - busy + 0.5)))


def run(args) -> int:
    import torch

    from dreamguide.cli import CommandError
    from dreamguide.sampling import parse_seeds
    from dreamguide.toyworld.demo import DEMO_W_CONS, DEMO_W_TEXT, DemoSettings, run_demo
    from dreamguide.toyworld.world import SUBJECT_BY_TOKEN

    if args.subject not in SUBJECT_BY_TOKEN:
        raise CommandError(f"unknown subject {args.subject!r}; choose one of {', '.join(SUBJECT_BY_TOKEN)}")
    if args.steps <= 0:
        raise CommandError(f"--steps must be positive, got {args.steps}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads or idle_cores())
    settings = DemoSettings(
        subject=args.subject, prompts=tuple(args.prompts or ()), seeds=parse_seeds(args.seeds), steps=args.steps,
        w_text=DEMO_W_TEXT if args.w_text is None else args.w_text,
        w_cons=DEMO_W_CONS if args.w_cons is None else args.w_cons,
        output=args.output, retrain=args.retrain, retrain_steps=args.retrain_steps, method=args.method,
        device=args.device,
    )
    out = run_demo(settings)
    print()
    print(out["paths"]["metrics_md"].read_text(encoding="utf-8"))
    print(f"comparison grid:      {out['paths']['grid']}")
    print(f"metrics table:        {out['paths']['metrics_md']}  (per image: {out['paths']['metrics_csv']})")
    print(f"Consistency_p plot:   {out['paths']['consistency_p']}")
    print(f"images + settings:    {out['paths']['images']}  {out['paths']['record']}")
    print(f"took {out['record']['seconds']['total']:.0f}s")
    return 0
