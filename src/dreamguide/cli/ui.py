"""``dreamguide ui``: a local web app to personalize a subject and compare guidance modes in the browser.

Without --model it opens on the bundled miniature world (CPU, no downloads): its base model,
subjects and subject adapter, ready to sample. With --model it works on an SDXL or SD 1.x
model: a hub id, a diffusers folder, or a single-file .safetensors checkpoint (with --model-config,
the config folder of its architecture). Needs the optional extra: pip install -e ".[ui]".
Everything the app writes (samples, training runs, uploaded adapters) goes under --output.
"""

from __future__ import annotations

import argparse

EXAMPLE = """\
examples:
  dreamguide ui                                   # the miniature world on http://127.0.0.1:7860
  dreamguide ui --model stabilityai/stable-diffusion-xl-base-1.0 --port 8080
  dreamguide ui --host 0.0.0.0                    # reachable from other machines on the network
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dreamguide.cli import MODEL_CONFIG_HELP

    parser = subparsers.add_parser(
        "ui",
        help="a local web app: personalize a subject and compare guidance modes in the browser",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="diffusers model folder, hub id or single-file .safetensors checkpoint "
                        "(SDXL, SD 1.x); default: the miniature world")
    parser.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio share link (off)")
    parser.add_argument("--output", default="ui-output",
                        help="folder for samples, runs and uploads (default ui-output)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        help="weights dtype (default auto: float16 on GPU, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: the cores other programs leave idle, by the load average)")
    parser.set_defaults(func=run)
    return parser


def missing_gradio_message() -> str | None:
    """Why the app cannot start without its optional extra, or None when gradio is installed."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        return 'dreamguide ui needs the web framework Gradio: pip install -e ".[ui]" (or pip install "dreamguide[ui]")'
    return None


def run(args: argparse.Namespace) -> int:
    from dreamguide.cli import CommandError

    if args.port is not None and not 0 < args.port < 65536:
        raise CommandError(f"--port must be between 1 and 65535, got {args.port}")
    if args.model_config and not args.model:
        raise CommandError("--model-config is the config folder of a single-file --model; the miniature world's "
                           "model needs none")
    if args.model:
        from pathlib import Path

        from dreamguide.single_file import CHECKPOINT_SUFFIXES

        if Path(args.model).suffix.lower() in CHECKPOINT_SUFFIXES:
            from dreamguide.single_file import check_checkpoint

            # The app loads the model when a subject is loaded: a checkpoint that cannot load fails now, not then.
            check_checkpoint(args.model, args.model_config)
    message = missing_gradio_message()
    if message:
        raise CommandError(message)
    import torch

    from dreamguide.cpu_threads import use_idle_cores
    from dreamguide.ui.app import launch
    from dreamguide.ui.forms import FieldErrors
    from dreamguide.ui.workspace import Workspace

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        use_idle_cores(args.threads)
    workspace = Workspace(args.model, output=args.output, device=device, dtype=args.dtype,
                          model_config=args.model_config)
    try:
        if workspace.toy:
            workspace.use_toy_subject("sks")
    except FieldErrors as error:
        raise CommandError(str(error)) from None
    print(f"dreamguide ui: {'the miniature world' if workspace.toy else args.model}; writing to {workspace.output}")
    launch(workspace, host=args.host, port=args.port, share=args.share)
    return 0
