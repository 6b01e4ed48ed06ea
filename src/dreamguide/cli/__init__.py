"""The ``dreamguide`` command line: a thin layer over the Python API.

Each sub-command lives in a module of this package that defines ``add_parser(subparsers)``;
the parser it adds sets ``func`` to the function that runs the command. Modules import their
heavy dependencies (torch, diffusers) inside that function so ``dreamguide --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from dreamguide import __version__


class CommandError(Exception):
    """Bad input found by a command: printed as ``error: ...`` without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamguide",
        description="Personalized text-to-image diffusion with parallel-rescaled consistency guidance.",
    )
    parser.add_argument("--version", action="version", version=f"dreamguide {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
