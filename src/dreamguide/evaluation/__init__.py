"""Evaluation: suites of subjects and prompts generated, scored and summarized by one runner.

    protocol   what a suite provides (``World``) and what the runner builds from it: ``PromptCase``,
               ``Plan`` (modes, weights, variants, seeds), ``Setting``, ``Variant``, ``Job``, ``Generated``
    runner     jobs -> shards -> generate + score -> manifest (resume) -> merged results; ``rescore``
    report     unit means, bootstrap intervals, paired differences; tables, Markdown, Pareto and
               Consistency_p figures
    suites     DreamBench: its folder (``dreambench_data``), run config (``dreambench_config``) and
               world (``dreambench``). The miniature world's suite is ``dreamguide.toyworld.bench_world``,
               its experiments (a few plans each) ``dreamguide.toyworld.experiment`` and ``reproduce``.
    tiny_backbones   tiny random metric backbones for tests and dry runs

A new experiment is a world (or an existing one) and a ``Plan``:
``run_benchmark(world, plan, output, ReportSettings(...))``. See docs/EVALUATION.md.
"""
