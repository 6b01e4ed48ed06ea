"""``dreamguide train``: fine-tune a model on a subject (DreamBooth LoRA, pivotal TI or DCO)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA (and optionally token embeddings) on a few photos of a subject",
        description=(
            "Fine-tune a diffusers model on a folder of subject images, as one TOML config describes "
            "(see configs/ and docs/TRAINING.md). Methods: dreambooth, dreambooth-ti, dco. "
            "Runs on CPU, one GPU, or several with `accelerate launch -m dreamguide train ...`."
        ),
    )
    parser.add_argument("--config", required=True, help="run config (TOML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.steps=500 --set data.token=ohwx (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="continue from the newest checkpoint in output.dir ('latest') or from a checkpoint-<step>/ folder",
    )
    parser.add_argument(
        "--allow-upscale",
        action="store_true",
        help="accept images smaller than half the training size (same as --set data.allow_upscale=true)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from dreamguide.filenames import CONFIG_FILE
    from dreamguide.locks import output_lock
    from dreamguide.training import load_train_config, train

    overrides = list(args.overrides) + (["data.allow_upscale=true"] if args.allow_upscale else [])
    config = load_train_config(args.config, overrides)
    with output_lock(config.output.dir, "train"):
        result = train(config, resume=args.resume, progress=not args.no_progress)
    if not PartialState().is_main_process:
        return 0
    print(f"LoRA:        {result.lora_path}")
    print(f"Kohya LoRA:  {result.kohya_path}")
    if result.embeddings_path is not None:
        print(f"embeddings:  {result.embeddings_path}  (token {config.data.token})")
    print(f"config:      {result.output_dir / CONFIG_FILE}")
    return 0
