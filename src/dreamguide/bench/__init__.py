"""Benchmarks: DreamBench (and other worlds) generated, scored and summarized by one runner.

    dreambench        the DreamBench folder: subjects, reference photos, prompt lists, SPEC's stylized set
    world             the ``World`` protocol a benchmark implements, and the jobs built from it
    runner            shards, manifest (resume), generate + score, merged results
    report            bootstrap tables, comparisons, Pareto and Consistency_p figures
    dreambench_world  DreamBench with a base model + per-subject adapters, scored by ``dreamguide.metrics``
    tiny_backbones    tiny random metric backbones for tests and dry runs

See docs/EVALUATION.md.
"""
