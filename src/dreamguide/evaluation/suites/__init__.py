"""Evaluation suites: DreamBench (``dreambench_data``, ``dreambench_config``, ``dreambench``).

The miniature world's suite lives with the world: ``dreamguide.toyworld.bench_world``.
"""
