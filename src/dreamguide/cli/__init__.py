"""The ``dreamguide`` command line: a thin layer over the Python API.

Each sub-command lives in a module of this package that defines ``add_parser(subparsers)``;
the parser it adds sets ``func`` to the function that runs the command. Only the command being
run builds its parser (which may import torch, e.g. to show the library's defaults); the others
are listed with the first line of their module docstring, so ``dreamguide --help`` stays light.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from dreamguide import __version__


#: Exit status of a benchmark that finished but skipped subjects (an unusable adapter): the results and
#: tables hold the others, the skipped ones are listed on stderr and in the report. Bad input exits with 2,
#: an interrupted run with 130.
EXIT_SKIPPED = 3
#: ``--model-config``, for every command that takes ``--model``.
MODEL_CONFIG_HELP = ("for a single-file --model: the folder (or hub id) of a diffusers model of its architecture, "
                     "for its configs and tokenizers (default: its architecture's reference model, from the hub "
                     "cache when offline)")

def shaping_help() -> str:
    """The ``--shaping`` help, from ``ConsistencyShaping``'s fields and the schedules (imports torch: call it
    from a sub-command's ``add_parser``)."""
    from dataclasses import fields

    from dreamguide.guidance import SCHEDULES, ConsistencyShaping

    return (f"when and how strongly the consistency term acts: key=value pairs of ConsistencyShaping "
            f"({', '.join(f.name for f in fields(ConsistencyShaping))}), e.g. schedule=cosine-decrease,floor=0.25: "
            f"w_cons falls along a half cosine to a quarter of itself (docs/METHOD.md); schedules: "
            f"{', '.join(SCHEDULES)}; 'none' lifts a cap ({', '.join(_SHAPING_CAPS)}) (default: constant w_cons "
            f"at every step)")


#: The ConsistencyShaping fields that take None (no cap).
_SHAPING_CAPS = ("spread_cap", "norm_bound", "magnitude_ratio")


def parse_shaping(text: str) -> dict:
    """``--shaping`` text (``schedule=cosine-decrease,floor=0.25``) -> the fields given, as a dict.

    Numbers are read as floats, ``none`` as None for a cap; the values are checked when a
    ``ConsistencyShaping`` is built from them. Errors name the item and the fix.
    """
    from dataclasses import fields

    from dreamguide.config import key_value_pairs
    from dreamguide.guidance import ConsistencyShaping

    given = key_value_pairs(text, [f.name for f in fields(ConsistencyShaping)], "shaping",
                            "schedule=cosine-decrease,floor=0.25")
    values: dict = {}
    for key, value in given.items():
        if key == "schedule":
            values[key] = value
        elif value.lower() == "none" and key in _SHAPING_CAPS:
            values[key] = None
        else:
            try:
                values[key] = float(value)
            except ValueError:
                lift = " (or none for no cap)" if key in _SHAPING_CAPS else ""
                raise ValueError(f"shaping {key}={value!r} must be a number{lift}, e.g. {key}=0.5") from None
    return values


def shaping_switches(text: str | None, over=None):
    """``--shaping`` text over ``over`` (a ``ConsistencyShaping``, e.g. a tuned file's): the merged switches,
    None when neither is given; a bad setting is a ValueError naming the flag."""
    from dreamguide.guidance import ConsistencyShaping

    if text is None:
        return over
    try:
        return ConsistencyShaping(**{**(over.to_dict() if over else {}), **parse_shaping(text)})
    except ValueError as error:
        raise ValueError(f"--shaping {text!r}: {error}") from None


class CommandError(Exception):
    """Bad input found by a command: printed as ``error: ...`` without a traceback."""


def report_skipped(skipped, output) -> int:
    """Print the subjects a benchmark skipped to stderr; returns :data:`EXIT_SKIPPED`, or 0 when none."""
    from dreamguide.evaluation.protocol import adapter_label

    if not skipped:
        return 0
    lines = [f"  {adapter_label(s['subject'], s['adapter'])}{' in plan ' + s['plan'] if s.get('plan') else ''}: "
             f"{s['missing']} of {s['images']} images not made: {s['reason']}" for s in skipped]
    print(f"warning: not every subject was scored; {len(skipped)} skipped (the results and tables leave them out, "
          f"{output} lists them):", *lines, "fix their adapters and run the same command again: the missing images "
          "are made and scored, the finished ones kept", sep="\n", file=sys.stderr)
    return EXIT_SKIPPED


def _summary(module) -> str:
    """``"``dreamguide x``: does y."`` -> ``"does y"``: the one-line help of a command."""
    first = (module.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(first.split(": ", 1)[-1].replace("``", "").split()).rstrip(".")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the sub-command it names gets its full parser."""
    parser = argparse.ArgumentParser(
        prog="dreamguide",
        description="Personalized text-to-image diffusion with parallel-rescaled consistency guidance.",
    )
    parser.add_argument("--version", action="version", version=f"dreamguide {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [info.name for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)]
    names = [name for name in names if not name.startswith("_")]
    chosen = next((arg for arg in (argv or []) if not arg.startswith("-")), None)
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        if argv is None or name == chosen:
            module.add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=_summary(module))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from dreamguide.atomic import DiskFull
    from dreamguide.locks import OutputLocked

    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError, FileNotFoundError, OutputLocked, DiskFull) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
