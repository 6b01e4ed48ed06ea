"""``dreamguide demo`` on the bundled model: a reduced run (2 prompts, 1 seed, few steps) on CPU."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from dreamguide.toyworld.model import BUNDLED_MODEL_DIR
from dreamguide.toyworld.personalize import adapter_dir

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "model_index.json").exists() or not adapter_dir().exists(),
    reason="bundled toy-world weights not built",
)

PROMPTS = ("a sks ball in the snow", "a pencil sketch of a sks ball")


def _evaluators():
    """The bundled evaluators, or random ones of the same architecture when they are not built."""
    from dreamguide.toyworld import evaluators as ev

    try:
        return ev.ToyEvaluators.load()
    except FileNotFoundError:
        torch.manual_seed(0)
        return ev.ToyEvaluators(ev.ImageTextModel(), ev.IdentityEncoder(), ev.AttributeClassifier())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dreamguide.toyworld.demo import DemoSettings, run_demo

    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(prompts=PROMPTS, seeds=(3,), steps=3, output=str(out))
    return run_demo(settings, log=lambda *_: None, evaluators=_evaluators()), out


def test_demo_writes_grid_metrics_and_plot(demo):
    result, out = demo
    for name in ("grid.png", "metrics.md", "metrics.csv", "consistency_p.png", "demo.json"):
        assert (out / name).is_file(), name
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 3 * 96 and grid.height >= 2 * 96  # 3 mode columns, 2 prompt rows, 3x upscaled
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert sorted((r["mode"], r["prompt_set"]) for r in rows) == sorted(
        (m, s) for m in ("dreambooth", "consistency", "pr") for s in ("normal", "stylized"))
    assert all(r["base_prompt"] in ("a ball in the snow", "a pencil sketch of a ball") for r in rows)
    summary = {(s["mode"], s["prompt_set"]): s for s in result["summary"]}
    assert len(summary) == 6 and all(s["images"] == 1 for s in summary.values())
    md = (out / "metrics.md").read_text()
    assert "| stylized | pr |" in md and "base prompt" in md
    assert len(list((out / "images").glob("*.png"))) == 6


def test_demo_draws_each_modes_trade_off_curve(demo):
    """The consistency modes are also sampled at curve_w_cons: three points each, dreambooth one."""
    result, out = demo
    assert (out / "tradeoff.png").is_file()
    record = json.loads((out / "demo.json").read_text())
    points = {(p["prompt_set"], p["mode"]): [] for p in record["curve"]}
    for p in record["curve"]:
        points[(p["prompt_set"], p["mode"])].append(p["w_cons"])
    assert points[("stylized", "consistency")] == [1.0, 2.0, 3.0] == points[("normal", "pr")]
    assert points[("normal", "dreambooth")] == [None]
    main = next(p for p in record["curve"] if p["prompt_set"] == "normal" and p["mode"] == "pr" and p["w_cons"] == 3.0)
    row = next(r for r in record["rows"] if r["prompt_set"] == "normal" and r["mode"] == "pr")
    assert main["text_alignment"] == round(row["text_alignment"], 4)  # the grid's images are the curve's w_cons 3 point
    assert len(record["curve_rows"]) == 2 * 2 * 2  # 2 weights x 2 consistency modes x 2 prompts x 1 seed


def test_demo_traces_consistency_p_for_consistency_modes(demo):
    result, out = demo
    record = json.loads((out / "demo.json").read_text())
    assert record["steps"] == 3 and record["seeds"] == [3]
    assert {p["set"] for p in record["prompts"]} == {"normal", "stylized"}


def test_consistency_and_pr_coincide_without_consistency_weight(tmp_path):
    """With w_cons = 0 both modes are plain text guidance of the base model: identical images."""
    from dreamguide.toyworld.demo import DemoSettings, run_demo

    settings = DemoSettings(prompts=PROMPTS[1:], seeds=(0,), steps=2, w_cons=0.0, output=str(tmp_path),
                            modes=("consistency", "parallel-rescaled"))
    run_demo(settings, log=lambda *_: None, evaluators=_evaluators())
    a, b = sorted((tmp_path / "images").glob("*.png"))
    assert list(Image.open(a).getdata()) == list(Image.open(b).getdata())


def test_demo_rejects_prompts_outside_the_grammar(tmp_path):
    from dreamguide.toyworld.demo import DemoSettings, run_demo

    with pytest.raises(ValueError, match="outside the toy world's grammar"):
        run_demo(DemoSettings(prompts=("a sks ball riding a bicycle",), output=str(tmp_path)), log=lambda *_: None)


def test_cli_demo_unknown_subject_is_an_error(capsys):
    from dreamguide.cli import main

    assert main(["demo", "--subject", "nope", "--output", "unused"]) == 2
    assert "unknown subject 'nope'" in capsys.readouterr().err
