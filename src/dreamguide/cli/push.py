"""``dreamguide push``: share a training run on the Hugging Face Hub.

Writes the model card (README.md: base model, trigger, method, the guidance settings of the
run's sample images, training settings, sample grid) into the run folder and uploads it with
the LoRA files, learned-token file and newest sample images. config.toml, checkpoints and logs
stay local. The token comes from `hf auth login` or HF_TOKEN.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLE = """\
example:
  dreamguide push outputs/dog --repo my-name/dog-lora --base-model stabilityai/stable-diffusion-xl-base-1.0
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="write a model card and upload a training run to the Hugging Face Hub",
        description=__doc__.replace("``", ""),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the output.dir of a training run")
    parser.add_argument("--repo", required=True, help="Hub model repo, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--base-model", help="Hub id of the base model, when the run used a local folder")
    parser.add_argument("--license", help="license id for the card's metadata (default: none)")
    parser.add_argument("--message", help="commit message")
    parser.add_argument("--keep-card", action="store_true", help="upload the run's README.md as it is")
    parser.add_argument("--dry-run", action="store_true", help="write the card and list the files; upload nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dreamguide import hub
    from dreamguide.cli import CommandError

    hub.check_repo_id(args.repo)
    if args.dry_run:
        if not args.keep_card:
            title = args.repo.split("/")[1]
            card = hub.write_model_card(args.run_dir, base_model=args.base_model, title=title, license=args.license)
            print(f"card:  {card}")
        run_ = hub.read_run(args.run_dir)
        for line in hub.local_paths(run_):
            print(f"warning: local path in a shared file: {line}", file=sys.stderr)
        print("files (not uploaded, --dry-run):")
        for name in hub.shared_files(run_):
            print(f"  {name}")
        return 0

    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        result = hub.push_run(
            args.run_dir,
            args.repo,
            private=True if args.private else None,
            base_model=args.base_model,
            license=args.license,
            keep_card=args.keep_card,
            commit_message=args.message,
        )
    except OfflineModeIsEnabled as error:
        raise CommandError(f"cannot push while HF_HUB_OFFLINE is set ({error}); unset it, or use --dry-run") from error
    except HfHubHTTPError as error:
        raise CommandError(f"the Hub refused the push to {args.repo}: {error}") from error
    for line in result.local_paths:
        print(f"warning: local path in a shared file: {line}", file=sys.stderr)
    print(f"pushed: {result.url}")
    for name in result.files:
        print(f"  {name}")
    return 0
