"""``dreamguide toyworld``: build and measure the miniature world (base model, subjects, reproduction).

    dreamguide toyworld train-base --out runs/base --minutes 8      train the base text-to-image model
    dreamguide toyworld personalize --subject sks --method dco      fine-tune one subject adapter
    dreamguide toyworld reproduce --output runs/reproduce           the paper's experiments in this world
"""

from __future__ import annotations

import argparse
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
    train.set_defaults(func=_train_base)

    personalize = commands.add_parser("personalize", help="fine-tune a subject adapter on its reference photos")
    personalize.add_argument("--subject", default="sks", help="subject token (sks, zwx, qlo, vrt, bny, mup)")
    personalize.add_argument("--method", default="dreambooth", choices=("dreambooth", "dreambooth-ti", "dco"))
    personalize.add_argument("--out", required=True, help="output folder for the adapter")
    personalize.add_argument("--steps", type=int, default=0, help="training steps (default: the toy default, 1000)")
    personalize.add_argument("--lr", type=float, default=0.0, help="LoRA learning rate (default: the toy default, 2e-3)")
    personalize.add_argument("--rank", type=int, default=0, help="LoRA rank (default: the toy default, 32)")
    personalize.add_argument("--model", help="base model folder (default: the bundled model)")
    personalize.add_argument("--device")
    personalize.set_defaults(func=_personalize)

    reproduce = commands.add_parser("reproduce", help="the PR paper's experiments in this world (GPU: minutes)")
    reproduce.add_argument("--output", default="runs/reproduce", help="output folder")
    reproduce.add_argument("--budget-minutes", type=float, default=7.5,
                           help="generation time budget; later parts are skipped past it (default 7.5)")
    reproduce.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    reproduce.add_argument("--seeds", default="0-3", help="seeds per prompt (default 0-3)")
    reproduce.add_argument("--subjects", nargs="+", help="subject tokens (default: all)")
    reproduce.add_argument("--parts", nargs="+", default=["base", "main", "sweep", "variants"],
                           choices=["base", "main", "sweep", "variants"], help="which experiments (default: all)")
    reproduce.add_argument("--adapters-from", help="reuse the adapters of an earlier run (its adapters/ folder)")
    reproduce.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    reproduce.add_argument("--score-only", action="store_true", help="only score an existing --output folder")
    reproduce.add_argument("--bundle", choices=("dreambooth", "dreambooth-ti", "dco"),
                           help="also fine-tune sks with this method and keep it in OUTPUT/adapters (how the "
                                "demo's bundled adapter is made)")
    reproduce.add_argument("--workers", type=int, default=0,
                           help="processes, one (subject, method) job at a time each (default: one per job on a GPU, 1 on a CPU)")
    reproduce.add_argument("--device")
    reproduce.set_defaults(func=_reproduce)
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
    print(f"model: {args.out}  ({record['steps']} steps, final loss {record['final_loss']})")
    return 0


def _personalize(args) -> int:
    import dataclasses

    from dreamguide.toyworld.personalize import DEFAULTS, personalize

    overrides = {"steps": args.steps, "lr": args.lr, "rank": args.rank}
    settings = dataclasses.replace(DEFAULTS, **{k: v for k, v in overrides.items() if v})
    result = personalize(args.subject, args.method, args.out, settings, model_path=args.model, device=args.device,
                         progress=True)
    print(f"adapter: {result.lora_path}" + (f"  embeddings: {result.embeddings_path}" if result.embeddings_path else ""))
    return 0


def _reproduce(args) -> int:
    from dreamguide.sampling import parse_seeds
    from dreamguide.toyworld.reproduce import default_workers, generate, score
    from dreamguide.toyworld.world import SUBJECTS

    if not args.score_only:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        generate(args.output, subjects=args.subjects, seeds=parse_seeds(args.seeds), steps=args.steps,
                 budget_s=args.budget_minutes * 60, device=args.device, parts=args.parts,
                 adapters_from=args.adapters_from, bundle=args.bundle,
                 workers=args.workers or default_workers(args.device, len(args.subjects or SUBJECTS)))
    elif not Path(args.output, "rows.json").exists():
        from dreamguide.cli import CommandError

        raise CommandError(f"--score-only: {args.output} has no rows.json; run without --score-only first")
    score(args.output)
    print(f"results: {Path(args.output) / 'results.md'}  plots: pareto.png, timesteps.png")
    return 0
