"""``dreamguide toyworld``: build and measure the miniature world (base model, subjects, reproduction).

    dreamguide toyworld train-base --out runs/base --minutes 8      train the base text-to-image model
    dreamguide toyworld evaluate-base --model runs/base             the prompt-fidelity bar (classifiers)
    dreamguide toyworld personalize --subject sks --method dco      fine-tune one subject adapter
    dreamguide toyworld reproduce --output runs/reproduce           the paper's experiments in this world
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "toyworld",
        help="the miniature world: train its base model, personalize subjects, reproduce the paper",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="toyworld_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    train = commands.add_parser("train-base", help="train the base text-to-image model on generated images")
    train.add_argument("--out", required=True, help="output model folder (pixel format + training.json)")
    train.add_argument("--minutes", type=float, default=8.0, help="training time budget (default 8)")
    train.add_argument("--steps", type=int, default=0, help="stop after this many steps (default: no limit)")
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--warmup-steps", type=int, default=300)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=0, help="data processes (default: CPU cores - 1)")
    train.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--init", help="start from this model folder's weights")
    train.add_argument("--evaluate", type=int, default=0, metavar="N",
                       help="after training, score N prompts with the world's classifiers (0: skip)")
    train.set_defaults(func=_train_base)

    evaluate = commands.add_parser("evaluate-base", help="prompt fidelity of a base model by the classifiers")
    evaluate.add_argument("--model", help="model folder (default: the bundled model)")
    evaluate.add_argument("--prompts", type=int, default=256, help="number of random normal prompts")
    evaluate.add_argument("--steps", type=int, default=30)
    evaluate.add_argument("--w-text", type=float, default=5.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device")
    evaluate.add_argument("--out", help="write the figures as JSON here")
    evaluate.set_defaults(func=_evaluate_base)
    return parser


def _train_base(args) -> int:
    from dreamguide.cli import CommandError
    from dreamguide.toyworld.train_base import BaseRecipe, train_base

    if args.minutes <= 0 and args.steps <= 0:
        raise CommandError("give a positive --minutes or --steps")
    recipe = BaseRecipe(
        seed=args.seed, minutes=args.minutes if args.minutes > 0 else 1e9, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, workers=args.workers,
    )
    if args.init and not Path(args.init, "model_index.json").exists():
        raise CommandError(f"--init {args.init}: not a model folder (no model_index.json)")
    record = train_base(args.out, recipe, device=args.device, init=args.init)
    if args.evaluate:
        from dreamguide.toyworld.train_base import evaluate_base, update_record

        figures = evaluate_base(args.out, prompts=args.evaluate, device=args.device, seed=args.seed)
        update_record(args.out, {"evaluation": figures})
        print(json.dumps(figures["summary"], indent=2))
    print(f"model: {args.out}  ({record['steps']} steps, final loss {record['final_loss']})")
    return 0


def _evaluate_base(args) -> int:
    from dreamguide.toyworld.train_base import evaluate_base

    figures = evaluate_base(args.model, prompts=args.prompts, steps=args.steps, w_text=args.w_text,
                            device=args.device, seed=args.seed)
    text = json.dumps(figures, indent=2)
    if args.out:
        from dreamguide.images import write_json

        write_json(args.out, figures)
    print(json.dumps(figures["summary"], indent=2), file=sys.stdout)
    return 0
