"""``dreamguide toyworld``: build and measure the miniature world (base model, subjects, reproduction).

    dreamguide toyworld train-base --out runs/base --minutes 8      train the base text-to-image model
    dreamguide toyworld personalize --subject sks --method dco      fine-tune one subject adapter
    dreamguide toyworld reproduce --output runs/reproduce           the paper's experiments in this world
    dreamguide toyworld reproduce --config my.toml --output runs/x  any experiment written as a config
    dreamguide toyworld frontier --output runs/frontier            every rule's curve against the w_cons knob
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
    personalize.add_argument("--checkpoint-every", type=int, default=100,
                             help="write a resumable checkpoint every this many steps (default 100; 0: none)")
    personalize.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    personalize.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    personalize.add_argument("--device")
    personalize.set_defaults(func=_personalize)

    reproduce = commands.add_parser(
        "reproduce", help="run an experiment of plans in this world (default: the PR paper's; GPU: minutes)",
        description="Fine-tune the subjects' adapters, run the experiment's plans on the evaluation runner "
        "(resumable, one shard per worker), score the images and write results.md/json, pareto.png and "
        "timesteps.png. The experiment is a TOML config (configs/toyworld-reproduce.toml spells out the "
        "default one; docs/TOYWORLD.md).")
    reproduce.add_argument("--config", help="experiment config (TOML; default: the run's own, else the PR paper's)")
    reproduce.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config key, e.g. --set steps=10 (repeatable)")
    reproduce.add_argument("--output", default="runs/reproduce", help="output folder")
    reproduce.add_argument("--plans", nargs="+", help="run only these plans of the config (default: all)")
    reproduce.add_argument("--budget-minutes", type=float,
                           help="no new sampler call past this time; run again to continue (default: no limit)")
    reproduce.add_argument("--steps", type=int, help="denoising steps (overrides the config: steps)")
    reproduce.add_argument("--seeds", help="seeds per prompt, e.g. 0-3 (overrides the config: seeds)")
    reproduce.add_argument("--subjects", nargs="+", help="subject tokens (overrides the config: subjects)")
    reproduce.add_argument("--adapters-from", help="sample with the adapters of an earlier run (its adapters/ folder)")
    reproduce.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    reproduce.add_argument("--score-only", action="store_true",
                           help="only score the stored images of --output (also a folder of the earlier "
                                "images.npz layout) and rewrite the results")
    reproduce.add_argument("--bundle", choices=("dreambooth", "dreambooth-ti", "dco"),
                           help="also fine-tune sks with this method and keep it in OUTPUT/adapters (how the "
                                "demo's bundled adapter is made)")
    reproduce.add_argument("--workers", type=int, default=0,
                           help="processes (default: one per adapter on a GPU, 1 on a CPU)")
    reproduce.add_argument("--device")
    reproduce.set_defaults(func=_reproduce)

    frontier = commands.add_parser(
        "frontier", help="each guidance rule's trade-off curve against the w_cons knob (GPU: minutes)",
        description="Sweep every rule's strength knob, score text alignment and identity, and compare each "
        "rule's curve with the baseline's (consistency guidance, w_cons swept) at matched text alignment, per "
        "adapter kind and prompt set, with paired bootstrap intervals. Writes frontier.md, frontier.json and "
        "frontier.png. The rules are a TOML config (configs/toyworld-frontier.toml spells out the defaults).",
    )
    frontier.add_argument("--config", help="frontier config (TOML; default: the built-in rules)")
    frontier.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config key, e.g. --set seeds=[0,1]")
    frontier.add_argument("--output", default="runs/frontier", help="output folder")
    frontier.add_argument("--budget-minutes", type=float, help="start no new group after this long (resumable)")
    frontier.add_argument("--adapters-from", help="sample with the adapters of an earlier run (its adapters/ folder)")
    frontier.add_argument("--score-only", action="store_true", help="analyse the finished images of --output only")
    frontier.add_argument("--workers", type=int, default=0, help="processes (default: one per adapter on a GPU)")
    frontier.add_argument("--device")
    frontier.set_defaults(func=_frontier)
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
    from dreamguide.locks import output_lock

    with output_lock(args.out, "toyworld personalize"):
        result = personalize(args.subject, args.method, args.out, settings, model_path=args.model,
                             device=args.device, progress=True, resume="latest" if args.resume else None,
                             overwrite=args.overwrite, checkpoint_every=args.checkpoint_every)
    print(f"adapter: {result.lora_path}" + (f"  embeddings: {result.embeddings_path}" if result.embeddings_path else ""))
    return 0


def _reproduce(args) -> int:
    import json

    from dreamguide.cli import CommandError, report_skipped
    from dreamguide.config import given
    from dreamguide.sampling import parse_seeds
    from dreamguide.toyworld.experiment import EXPERIMENT_FILE, load_toy_experiment
    from dreamguide.toyworld.reproduce import default_workers, generate, needed_adapters, score

    flags = given(steps=args.steps, seeds=None if args.seeds is None else list(parse_seeds(args.seeds)),
                  subjects=args.subjects)
    overrides = [*(f"{key}={json.dumps(value)}" for key, value in flags.items()), *args.overrides]
    stored = Path(args.output) / EXPERIMENT_FILE
    experiment = load_toy_experiment(args.config or (stored if stored.is_file() else None), overrides)
    if not args.score_only:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        workers = args.workers or default_workers(args.device, len(needed_adapters(experiment,
                                                                                   experiment.chosen(args.plans))))
        generate(experiment, args.output, plans=args.plans, workers=workers, device=args.device,
                 budget_s=None if args.budget_minutes is None else args.budget_minutes * 60,
                 adapters_from=args.adapters_from, bundle=args.bundle)
    elif not Path(args.output).is_dir():
        raise CommandError(f"--score-only: {args.output} does not exist; run without --score-only first")
    results = score(experiment, args.output)
    print(f"results: {Path(args.output) / 'results.md'}  plots: pareto.png, timesteps.png")
    skipped = [{**entry, "plan": name} for name, plan in results["plans"].items() for entry in plan.get("skipped", [])]
    return report_skipped(skipped, Path(args.output) / "results.md")


def _frontier(args) -> int:
    from dreamguide.cli import CommandError, report_skipped
    from dreamguide.toyworld.frontier import load_frontier_experiment, write_frontier_results
    from dreamguide.toyworld.reproduce import default_workers, generate, needed_adapters

    frontier = load_frontier_experiment(args.config, args.overrides)
    experiment = frontier.experiment()
    if not args.score_only:
        workers = args.workers or default_workers(args.device, len(needed_adapters(experiment, experiment.plans)))
        generate(experiment, args.output, workers=workers, device=args.device,
                 budget_s=None if args.budget_minutes is None else args.budget_minutes * 60,
                 adapters_from=args.adapters_from)
    elif not Path(args.output).is_dir():
        raise CommandError(f"--score-only: {args.output} does not exist; run without --score-only first")
    results = write_frontier_results(frontier, args.output)
    skipped = [{**entry, "plan": rule} for rule, entries in results.get("skipped", {}).items() for entry in entries]
    return report_skipped(skipped, Path(args.output) / "frontier.json")
