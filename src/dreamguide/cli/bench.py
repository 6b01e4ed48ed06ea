"""``dreamguide bench``: evaluation suites and benchmarks as sub-commands (``dreamguide bench dreambench CONFIG``, ...).

Each is a function that adds its parser to the ``bench`` sub-parsers and sets ``func``,
registered in ``BENCHMARKS`` by ``@benchmark(name)``.
"""

from __future__ import annotations

import argparse
from typing import Callable

#: name -> function(subparsers) that adds the benchmark's parser (with ``func`` set).
BENCHMARKS: dict[str, Callable] = {}


def benchmark(name: str) -> Callable[[Callable], Callable]:
    def register(add: Callable) -> Callable:
        BENCHMARKS[name] = add
        return add

    return register


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="run a benchmark (dreambench, ...)",
                                   description="Run a benchmark: generate, score and summarize.")
    inner = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for add in BENCHMARKS.values():
        add(inner)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    return parser


@benchmark("sample")
def _add_sample(subparsers) -> argparse.ArgumentParser:
    """``bench sample ARGS``: runs ``python benchmarks/sample_speed.py ARGS`` of the source checkout."""
    parser = subparsers.add_parser(
        "sample", prefix_chars="+", add_help=False,  # every argument, --help too, goes to the benchmark
        help="milliseconds per guided denoising step (benchmarks/sample_speed.py of a source checkout)",
    )
    parser.add_argument("arguments", nargs="*")
    parser.set_defaults(func=_run_sample_benchmark)
    return parser


def _run_sample_benchmark(args: argparse.Namespace) -> int:
    import importlib.util
    from pathlib import Path

    from dreamguide.cli import CommandError

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "sample_speed.py"
    if not script.is_file():
        raise CommandError("the sampling speed benchmark is benchmarks/sample_speed.py of the source repository, "
                           "which this installation lacks; run it from a checkout: python benchmarks/sample_speed.py")
    spec = importlib.util.spec_from_file_location("sample_speed", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args.arguments, prog="dreamguide bench sample")


# ---------------------------------------------------------------------------------------------
# dreambench

DREAMBENCH_EXAMPLE = """\
example (one GPU, or several with accelerate):
  dreamguide bench dreambench bench.toml --output runs/dreambench
  accelerate launch --num_processes 2 -m dreamguide bench dreambench bench.toml --output runs/dreambench

A killed run resumes where it stopped when started again with the same config and output.
A subject whose adapter holds NaN (or whose samples become non-finite) is skipped: the others
are finished and reported, the skipped ones listed, and the exit status is 3.
The config format is in docs/EVALUATION.md.
"""


def _csv_list(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")

    return parse


@benchmark("dreambench")
def _add_dreambench(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dreambench",
        help="DreamBench: 30 subjects x (25 + 15 stylized) prompts x seeds x guidance settings, scored",
        description="Generate DreamBench images with per-subject adapters, score identity and text alignment, "
        "and write per-image results, bootstrap tables, a Pareto plot and a Consistency_p figure.",
        epilog=DREAMBENCH_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="benchmark config (TOML), see docs/EVALUATION.md")
    parser.add_argument("--output", help="output folder (default: the config's 'output', else runs/dreambench)")
    parser.add_argument("--dreambench", help="DreamBench folder (overrides the config)")
    parser.add_argument("--subjects", type=_csv_list(str), help="comma-separated subjects (default: config / all)")
    parser.add_argument("--prompts-per-set", type=int, help="only the first N prompts of each set (reduced runs)")
    parser.add_argument("--modes", type=_csv_list(str), help="comma-separated guidance modes (overrides the config)")
    parser.add_argument("--seeds", type=_csv_list(int), help="comma-separated seeds (overrides the config)")
    parser.add_argument("--w-cons", type=_csv_list(float), help="comma-separated w_cons sweep (overrides the config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set sampling.steps=30 (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="validate data, adapters and metric backbones, print the job count, generate nothing")
    parser.add_argument("--train-only", action="store_true",
                        help="with [train] in the config: train (or resume) the subjects' adapters, then stop")
    parser.add_argument("--report-only", action="store_true",
                        help="only merge finished results and rewrite tables and figures")
    parser.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill after N groups
    parser.set_defaults(func=run_dreambench)
    return parser


def run_dreambench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import sys

    from dreamguide.cli import EXIT_SKIPPED, CommandError, report_skipped
    from dreamguide.config import given
    from dreamguide.evaluation.report import write_report
    from dreamguide.evaluation.runner import build_jobs, group_jobs, merge_results, run_benchmark, skipped_adapters
    from dreamguide.evaluation.suites.dreambench import DreamBenchWorld
    from dreamguide.evaluation.suites.dreambench_config import load_dreambench_config, override

    flags = given(**{"dreambench": args.dreambench, "subjects": args.subjects, "prompts_per_set": args.prompts_per_set,
                     "sampling.modes": args.modes, "sampling.seeds": args.seeds, "sampling.w_cons": args.w_cons})
    config = load_dreambench_config(args.config, [*(override(k, v) for k, v in flags.items()), *args.overrides])
    output = Path(args.output or config.output or "runs/dreambench")
    world = DreamBenchWorld(config)
    if args.report_only:
        rows, missing = merge_results(world, config.plan, output)
        if missing:
            raise CommandError(f"{output}: {missing} images are not done yet; run the benchmark to finish them")
        skipped = skipped_adapters(world, config.plan, output)
        write_report(rows, world, config.plan, output, config.report, skipped=skipped)
        return report_skipped(skipped, output / "tables" / "skipped.csv")
    if args.train_only:
        if config.train is None:
            raise CommandError(f"{args.config} has no [train] section; --train-only trains the subjects it lists")
        trained = world.train_missing()
        print(f"trained {len(trained)} subjects; {len(world.untrained_subjects())} left")
        return 0
    if args.check:
        world.prepare()
        jobs = build_jobs(world, config.plan)
        print(f"ok: {len(world.load_data().subjects)} subjects, {len({j.case for j in jobs})} prompts, "
              f"{len(config.plan.settings())} guidance settings, {len(config.plan.seeds)} seeds: "
              f"{len(jobs)} images in {len(group_jobs(jobs))} sampler calls")
        for metric, backbone in world.metric_backbones().items():
            print(f"  {metric}: {backbone}")
        unusable = world.unusable_adapters()
        for error in unusable:
            print(f"warning: {error}; a run skips this subject", file=sys.stderr)
        return EXIT_SKIPPED if unusable else 0
    try:
        from dreamguide.locks import output_lock

        with output_lock(output, "bench dreambench"):
            rows = run_benchmark(world, config.plan, output, config.report, stop_after_groups=args.stop_after)
    except KeyboardInterrupt as stop:
        print(f"interrupted ({stop}); run the same command again to resume")
        return 130
    if rows is None:  # another process merges
        return 0
    return report_skipped(skipped_adapters(world, config.plan, output), output / "tables" / "skipped.csv")
