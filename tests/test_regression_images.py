"""Pinned outputs: the exact images (and Consistency_p traces) the sampler and the toy model make today.

The other sampling tests check behaviour, often up to a grey level; this one checks that a change
to the sampling code leaves its output bit for bit the same. It samples, on the CPU in float32 with one thread:

* the tiny SD 1.x model, the tiny SDXL model (with a learned ``<sks>`` token) and the bundled
  toy-world model, each with a LoRA whose B is non-zero (random for the tiny models, the bundled
  ``sks`` adapter for the toy world), through ``Sampler`` / ``SampleSettings``: each of
  the five original guidance modes, two non-default parallel-rescaling variants, a traced run (its
  Consistency_p statistics are pinned value for value) and, for SD 1.x, the plain PEFT routing
  (``fast=False``) and a stochastic scheduler (``euler-a``); two seeds in one batch of two, 3 steps;
* the toy model's own CFG sampler, ``toyworld.model.sample_cfg`` (its float32 output is pinned too).

Images are compared by the SHA-256 of their uint8 pixel array (``numpy`` ``tobytes``) and its
shape, against ``tests/data/regression_images.json``; a failure lists every model / case / mode /
seed that changed. Float rounding depends on the torch build and the CPU, so the file records the
versions it was made with, and the failure message says when this run's differ.

To pin the current behaviour (after an intended change, or on a new torch), regenerate the file
with the code as it is and commit it::

    DREAMGUIDE_REGEN_REGRESSION=1 PYTHONPATH=src python -m pytest -p no:cacheprovider tests/test_regression_images.py

Then each test writes its section of the file instead of asserting (and reports itself skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamguide.atomic import atomic_write_text
from dreamguide.guidance import ParallelRescaling

#: The modes pinned: those that existed when the pins were taken (later modes get pins of their own).
MODES = ("cfg", "dreambooth", "consistency", "parallel-rescaled", "orthogonal")
from dreamguide.sampling import Sampler, SampleSettings

PIN_FILE = Path(__file__).parent / "data" / "regression_images.json"
REGEN_VARIABLE = "DREAMGUIDE_REGEN_REGRESSION"
REGENERATE = os.environ.get(REGEN_VARIABLE) == "1"
REGEN_COMMAND = f"{REGEN_VARIABLE}=1 PYTHONPATH=src python -m pytest tests/test_regression_images.py"

SEEDS = (0, 1)
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Float sums may be split differently with more threads: pin and compare with exactly one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# The models (global RNG state is restored afterwards, so other tests see no difference)


def _sd15():
    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.testing import tiny_sd15_pipeline

    model = DiffusionModel.from_pipeline(tiny_sd15_pipeline(seed=0))
    torch.manual_seed(10)
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)  # random A and B: not the identity
    return model


def _sdxl():
    from dreamguide.lora_files import add_lora
    from dreamguide.models import DiffusionModel
    from dreamguide.token_files import add_tokens
    from dreamguide.testing import tiny_sdxl_pipeline

    model = DiffusionModel.from_pipeline(tiny_sdxl_pipeline(seed=0))
    torch.manual_seed(11)
    add_lora(model.unet, rank=4, adapter_name="subject", init=False)
    add_tokens(model, "<sks>", "dog")
    for encoder, tokenizer in zip(model.text_encoders, model.tokenizers):
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[tokenizer.convert_tokens_to_ids("<sks>")] += torch.randn(weight.shape[1])
    return model


def _toyworld():
    from dreamguide.toyworld.model import load_toyworld_model
    from dreamguide.toyworld.personalize import load_personalized

    model, _ = load_personalized(model=load_toyworld_model(device="cpu", dtype=torch.float32))
    return model


def build(name: str):
    builders = {"sd15": _sd15, "sdxl": _sdxl, "toyworld": _toyworld}
    with torch.random.fork_rng(devices=[]):
        return builders[name]()


# ---------------------------------------------------------------------------------------------
# What is sampled


@dataclass(frozen=True)
class Case:
    """One ``Sampler.sample`` call: settings on top of the model's prompt, and Sampler options."""

    name: str
    settings: dict
    fast: bool = True
    size: dict | None = None  # height and width; None: the model's pinned size


CLIP_NEGATIVE = ParallelRescaling(normalization="clip-negative", rescale=0.5)
PER_SAMPLE = ParallelRescaling(granularity="sample", normalization="none", rescale=2.0)

COMMON_CASES = (
    Case("modes", dict(modes=tuple(MODES))),
    Case("pr-clip-negative-rescale0.5", dict(modes=("parallel-rescaled",), pr=CLIP_NEGATIVE, w_cons=2.5)),
    Case("pr-sample-none-rescale2", dict(modes=("parallel-rescaled",), pr=PER_SAMPLE)),
    Case("trace", dict(modes=("cfg", "consistency", "parallel-rescaled", "orthogonal"), trace=True)),
)


@dataclass(frozen=True)
class PinnedModel:
    name: str
    prompt: dict
    cases: tuple[Case, ...] = COMMON_CASES
    size: dict = field(default_factory=dict)


PINNED_MODELS = {
    m.name: m
    for m in (
        PinnedModel(
            "sd15",
            dict(prompt="a sks dog in the snow", token="sks", class_word="dog"),
            COMMON_CASES
            + (
                Case("modes-peft-routing", dict(modes=tuple(MODES)), fast=False),
                Case("euler-a", dict(modes=("parallel-rescaled",), scheduler="euler-a")),
            ),
            dict(height=16, width=16),
        ),
        PinnedModel(
            "sdxl",
            dict(prompt="a <sks> dog in the snow", token="<sks>", class_word="dog", negative_prompt="blurry"),
            size=dict(height=16, width=24),
        ),
        PinnedModel(  # every mode at the native 32 px, the variants and the trace at 16 px (faster)
            "toyworld",
            dict(prompt="a sks ball in the snow", token="sks", class_word="ball"),
            COMMON_CASES[:1] + tuple(replace(c, size=dict(height=16, width=16)) for c in COMMON_CASES[1:]),
        ),
    )
}

#: The toy model's CFG sampler: (prompt, seed) pairs, two per batch.
SAMPLE_CFG_PROMPTS = ("a ball in the snow", "a pencil sketch of a ball") * 2
SAMPLE_CFG_SEEDS = (0, 0, 1, 1)


# ---------------------------------------------------------------------------------------------
# Pins: digests, trace values, the file


def image_pin(array: np.ndarray) -> dict:
    """Shape, SHA-256 of the bytes, and the mean pixel (only to say how big a change is)."""
    array = np.ascontiguousarray(array)
    assert array.dtype == np.uint8
    return {
        "shape": list(array.shape),
        "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        "mean": round(float(array.mean()), 4),
    }


def environment() -> dict:
    import diffusers
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def load_pins() -> dict:
    if not PIN_FILE.exists():
        return {"format": "dreamguide.regression/1", "regenerate": REGEN_COMMAND, "sections": {}}
    return json.loads(PIN_FILE.read_text(encoding="utf-8"))


def _format(value, depth: int = 0) -> str:
    """JSON with one image pin or one trace step per line (readable diffs when pins change)."""
    flat_list = isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value)
    leaf = (depth >= 4 and isinstance(value, dict)) or flat_list
    if leaf or not isinstance(value, (dict, list)) or not value:
        return json.dumps(value)
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_format(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    return "[\n" + ",\n".join(f"{inner}{_format(v, depth + 1)}" for v in value) + f"\n{pad}]"


def check_or_regenerate(section: str, pins: dict) -> None:
    """Compare ``pins`` with the file's ``section``; or, when regenerating, write them there."""
    pins = {"environment": environment(), **json.loads(json.dumps(pins))}  # floats as the file stores them
    if REGENERATE:
        document = load_pins()
        document["sections"][section] = pins
        document["sections"] = dict(sorted(document["sections"].items()))
        atomic_write_text(PIN_FILE, _format(document) + "\n")
        pytest.skip(f"{REGEN_VARIABLE}=1: wrote the pins of {section} to {PIN_FILE}")
    expected = load_pins()["sections"].get(section)
    if expected is None:
        pytest.fail(f"{PIN_FILE} has no pins for {section!r}; make them with the current code: {REGEN_COMMAND}")
    changes = compare(section, expected, pins)
    if changes:
        lines = [f"{len(changes)} pinned output(s) of {section} changed:", *(f"  {c}" for c in changes)]
        if expected["environment"] != pins["environment"]:
            lines.append(
                f"the pins were made with {expected['environment']}, this run has {pins['environment']}: "
                "float rounding differs between builds and CPUs"
            )
        lines.append(f"if the change is intended, regenerate the pins: {REGEN_COMMAND}")
        pytest.fail("\n".join(lines), pytrace=False)


def compare(section: str, expected: dict, got: dict) -> list[str]:
    """One line per image or trace that differs from its pin, naming model, case, mode and seed."""
    changes = []
    for key in sorted((set(expected) | set(got)) - {"environment", "images", "traces"}):
        if expected.get(key) != got.get(key):
            changes.append(f"{section} {key}: {got.get(key)!r} != pinned {expected.get(key)!r}")
    for key in dict.fromkeys([*expected["images"], *got["images"]]):
        old, new = expected["images"].get(key), got["images"].get(key)
        if old is None:
            changes.append(f"{section} {key}: new image, not pinned")
        elif new is None:
            changes.append(f"{section} {key}: pinned image no longer made")
        elif old["shape"] != new["shape"]:
            changes.append(f"{section} {key}: shape {new['shape']} != pinned {old['shape']}")
        elif old["sha256"] != new["sha256"]:
            changes.append(
                f"{section} {key}: pixels changed (sha256 {new['sha256'][:12]} != pinned {old['sha256'][:12]}; "
                f"mean pixel {new['mean']} vs {old['mean']})"
            )
        for extra in sorted(set(old or {}) - {"shape", "sha256", "mean"}):  # e.g. float32_sha256
            if new is not None and old[extra] != new.get(extra):
                changes.append(f"{section} {key}: {extra} changed ({new.get(extra)} != pinned {old[extra]})")
    for key in dict.fromkeys([*expected["traces"], *got["traces"]]):
        old, new = expected["traces"].get(key), got["traces"].get(key)
        if old is None or new is None:
            changes.append(f"{section} {key}: trace {'not pinned' if old is None else 'no longer made'}")
        elif len(old) != len(new):
            changes.append(f"{section} {key}: trace has {len(new)} steps, pinned {len(old)}")
        else:
            for step, (a, b) in enumerate(zip(old, new)):
                fields = [f for f in dict.fromkeys([*a, *b]) if a.get(f) != b.get(f)]
                if fields:
                    f = fields[0]
                    changes.append(
                        f"{section} {key}: Consistency_p trace step {step} differs in {', '.join(fields)} "
                        f"({f}: {b.get(f)!r} != pinned {a.get(f)!r})"
                    )
                    break
    return changes


# ---------------------------------------------------------------------------------------------
# The tests


def trace_step_pin(step: dict) -> dict:
    """A traced step's values as they are, with only the histogram counts (the edges are pinned once)."""
    pin = {key: value for key, value in step.items() if key != "histogram"}
    pin["histogram_counts"] = step["histogram"]["counts"]
    return pin


def sample_pins(pinned: PinnedModel, model) -> dict:
    """Image pins and Consistency_p traces by ``case/mode/seed``; the trace's histogram edges once."""
    images: dict[str, dict] = {}
    traces: dict[str, list] = {}
    edges = set()
    for case in pinned.cases:
        sampler = Sampler(model, adapter_name="subject", fast=case.fast)
        size = pinned.size if case.size is None else case.size
        settings = SampleSettings(**pinned.prompt, **size, **case.settings, seeds=SEEDS, batch_size=2, steps=STEPS)
        for result in sampler.sample(settings, progress=False):
            key = f"{case.name}/{result.mode}/seed{result.seed}"
            images[key] = image_pin(np.asarray(result.image))
            if settings.trace:
                traces[key] = [trace_step_pin(step) for step in result.trace]
                edges.update(tuple(step["histogram"]["edges"]) for step in result.trace)
    assert len(edges) == 1, f"every traced step should share one set of histogram edges, got {len(edges)}"
    return {"images": images, "traces": traces, "histogram_edges": list(edges.pop())}


def assert_pins_are_informative(pins: dict) -> None:
    """Refuse pins that could not catch a change: modes, variants and personalization must all differ."""
    images, traces = pins["images"], pins["traces"]
    for seed in SEEDS:
        digests = {key: p["sha256"] for key, p in images.items() if key.endswith(f"/seed{seed}")}
        by_mode = {mode: digests[f"modes/{mode}/seed{seed}"] for mode in MODES}
        assert len(set(by_mode.values())) == len(MODES), f"two modes gave the same image for seed {seed}: {by_mode}"
        for variant in ("pr-clip-negative-rescale0.5", "pr-sample-none-rescale2"):
            assert digests[f"{variant}/parallel-rescaled/seed{seed}"] != by_mode["parallel-rescaled"], variant
    assert images["modes/cfg/seed0"]["sha256"] != images["modes/cfg/seed1"]["sha256"]
    for key, trace in traces.items():
        assert (trace == []) == key.startswith("trace/cfg/"), key  # cfg has no consistency term
        assert len(trace) in (0, STEPS)


@pytest.mark.parametrize("name", list(PINNED_MODELS))
def test_sampler_images_are_pinned(name):
    pins = sample_pins(PINNED_MODELS[name], build(name))
    assert_pins_are_informative(pins)
    check_or_regenerate(f"sampler/{name}", pins)


def test_toyworld_sample_cfg_is_pinned():
    from dreamguide.toyworld.model import sample_cfg

    model = build("toyworld")
    x = sample_cfg(model, SAMPLE_CFG_PROMPTS, SAMPLE_CFG_SEEDS, steps=STEPS, batch_size=2)
    assert x.shape == (len(SAMPLE_CFG_PROMPTS), 3, 32, 32) and x.dtype == torch.float32
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = {}
    for i, (prompt, seed) in enumerate(zip(SAMPLE_CFG_PROMPTS, SAMPLE_CFG_SEEDS)):
        pin = image_pin(pixels[i])
        pin["float32_sha256"] = hashlib.sha256(x[i].contiguous().numpy().tobytes()).hexdigest()
        images[f"{i}:{prompt}/seed{seed}"] = pin
    assert len({p["sha256"] for p in images.values()}) == len(images)
    check_or_regenerate("toyworld/sample_cfg", {"images": images, "traces": {}})


def test_pin_file_has_exactly_the_pinned_sections():
    if REGENERATE:
        pytest.skip(f"{REGEN_VARIABLE}=1: the pins are being written")
    sections = set(load_pins()["sections"])
    wanted = {f"sampler/{name}" for name in PINNED_MODELS} | {"toyworld/sample_cfg"}
    assert sections == wanted, (
        f"{PIN_FILE} has sections {sorted(sections)}, the tests pin {sorted(wanted)}; "
        f"drop stale ones or regenerate: {REGEN_COMMAND}"
    )
