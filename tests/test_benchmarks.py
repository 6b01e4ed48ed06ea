"""The speed benchmark under benchmarks/ (sample_speed.py, compile_cache.py): its loop, its maths, its command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny_bench():
    """The benchmark's miniature SDXL-shaped UNet with its random LoRA, at 32 px on the CPU."""
    import sample_speed

    parser = argparse.ArgumentParser()
    sample_speed.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--resolution", "32", "--device", "cpu", "--warmup", "1", "--iters", "2"])
    with torch.random.fork_rng(devices=[]):
        return sample_speed.Bench(args)


def test_benchmark_steps_run_the_sampler_loop_and_routings_agree(tiny_bench):
    """Every way of getting the predictions gives the same denoised latents (the loop is ``denoise``)."""
    bench = tiny_bench
    needs = ("uncond", "base", "personalized")
    kwargs = bench.conditioning(2, needs)
    finals = {}
    with torch.no_grad():
        for variant in ("peft", "fast", "two-call"):
            context, forward = bench.forward_and_context(variant, 2, needs)
            with context:
                bench.generator.manual_seed(0)  # the same initial noise for every variant
                times, finals[variant] = bench.run_steps("pr", 2, forward, kwargs, steps=3, timed=True)
            assert len(times) == 3 and all(t > 0 for t in times)
    assert finals["peft"].shape == (2, 4, 4, 4) and torch.isfinite(finals["peft"]).all()
    for variant in ("fast", "two-call"):
        torch.testing.assert_close(finals[variant], finals["peft"], rtol=1e-4, atol=1e-4)
    # The adapter matters: the same steps with every row on the base weights end elsewhere.
    context, forward = bench.forward_and_context("fast", 2, ("uncond", "base", "base"))
    with context, torch.no_grad():
        bench.generator.manual_seed(0)
        _, base_only = bench.run_steps("pr", 2, forward, kwargs, steps=3, timed=False)
    assert (base_only - finals["peft"]).abs().max() > 1e-3


def test_dreamguide_bench_sample_runs_the_checkout_benchmark(capsys):
    from dreamguide.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["bench", "sample", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dreamguide bench sample") and "--variants" in out and "--compile" in out


def test_compile_cache_folder(tmp_path, monkeypatch):
    from compile_cache import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")
    folder = use_compile_cache(tmp_path / "cache")
    assert folder == tmp_path / "cache" and folder.is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")


def test_sampling_speed_summary_math():
    """Utilisation, ratios and targets of ``dreamguide bench sample`` from measured rows."""
    from sample_speed import format_table, summarize

    def row(variant, mode, ms, rows, adapter_rows, batch=4):
        return {"variant": variant, "mode": mode, "batch": batch, "rows": rows, "adapter_rows": adapter_rows, "ms": ms}

    document = {
        "matmul": {"size": 8192, "dtype": "bfloat16", "ms": 1.0, "tflops": 800.0},
        "flops": {"base_row": 6e12, "adapter_row": 7e12},
        "results": [
            row("fast", "cfg", 100.0, 8, 0),
            row("fast", "pr", 160.0, 12, 4),
            row("compiled", "pr", 200.0, 12, 4),
            row("dco", "pr", 400.0, 12, 4),
            row("fast", "pr", 50.0, 3, 1, batch=1),
            row("dco", "pr", 75.0, 3, 1, batch=1),
            {"variant": "graph", "mode": "pr", "batch": 4, "error": "RuntimeError: capture failed"},
        ],
    }
    summary = summarize(document)
    compiled = document["results"][2]
    assert compiled["model_tflop"] == pytest.approx(8 * 6 + 4 * 7)  # base rows + adapter rows
    assert compiled["tflops"] == pytest.approx(76 / 0.2)
    assert compiled["mfu"] == pytest.approx(76 / 0.2 / 800)
    assert summary["pr_over_cfg"] == {"fast@4": pytest.approx(1.6)}
    assert summary["pr_over_cfg_model_flops"]["4"] == pytest.approx(76 / 48)
    assert summary["dco_over_pr"]["fast@1"] == pytest.approx(1.5)
    met = {t["target"]: t["met"] for t in summary["targets"]}
    assert met == {
        "pr step <= 1.10x cfg step at batch 4 (fast, eager)": False,
        "compiled pr batch 4 MFU >= 55% of measured matmul": False,  # 47.5%
        "eager pr >= 1.6x faster than DCO ordering at batch 1": False,  # 1.5x
        "eager pr >= 1.0x faster than DCO ordering at batch 4": True,
    }
    document["summary"] = summary
    table = format_table(document)
    assert "graph pr batch 4 failed: RuntimeError: capture failed" in table
    assert "    4 pr             12 " in table
