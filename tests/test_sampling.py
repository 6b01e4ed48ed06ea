"""Sampler, sample settings and image writing, on tiny random SD 1.x / SDXL / pixel models (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dreamguide import images
from dreamguide.guidance import ParallelRescaling
from dreamguide.sampling import SampleSettings, parse_modes, parse_seeds

# ---------------------------------------------------------------------------------------------
# Settings


def test_parse_seeds_and_modes():
    assert parse_seeds("0,1,2,3") == (0, 1, 2, 3)
    assert parse_seeds("0-3") == (0, 1, 2, 3)
    assert parse_seeds("5, 0-1") == (5, 0, 1)
    assert parse_seeds(7) == (7,)
    assert parse_modes("cfg, pr,consistency,parallel-rescaled") == ("cfg", "parallel-rescaled", "consistency")
    with pytest.raises(ValueError, match=r"bad seed 'x'.*0,1,2,3 or 0-3"):
        parse_seeds("0,x")
    with pytest.raises(ValueError, match=r"seed range '3-1' runs backwards; write it as 1-3"):
        parse_seeds("3-1")
    with pytest.raises(ValueError, match=r"seeds \[1\] are given more than once"):
        parse_seeds("0-2,1")


def test_settings_derive_base_prompt_and_canonical_modes():
    s = SampleSettings(prompt="a <sks> dog in the snow", token="<sks>", class_word="dog", modes="cfg,pr", seeds="0-1")
    assert s.base_prompt == "a dog in the snow"
    assert s.modes == ("cfg", "parallel-rescaled")
    assert s.seeds == (0, 1)
    assert s.needs_personalized
    assert not SampleSettings(prompt="a dog", modes="cfg").needs_personalized
    assert SampleSettings(prompt="a dog", modes="cfg").base_prompt == "a dog"
    given = SampleSettings(prompt="a <sks> dog", token="<sks>", base_prompt="a puppy")
    assert given.base_prompt == "a puppy"
    data = s.to_dict()
    assert data["pr"] == ParallelRescaling().to_dict() and data["modes"] == ["cfg", "parallel-rescaled"]
    json.dumps(data)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(modes="cfg,fancy"), r"unknown guidance mode 'fancy'; choose one of cfg, dreambooth, consistency, "
                                  r"parallel-rescaled, orthogonal, pr"),
        (dict(prompt="a dog in the snow"), r"the prompt 'a dog in the snow' does not contain the token '<sks>'; "
                                           r"write it into the prompt, e\.g\. 'a photo of <sks> dog'"),
        (dict(class_word=None), r"without a class word; pass class_word \(--class-word"),
        (dict(steps=0), r"steps must be a positive integer, got 0"),
        (dict(steps=-3), r"steps must be a positive integer, got -3"),
        (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
        (dict(height=-8), r"height must be a positive integer"),
        (dict(w_cons=float("nan")), r"w_cons must be a finite number"),
        (dict(scheduler="heun"), r"unknown scheduler 'heun'; choose one of default, euler, euler-a, ddim, dpm\+\+"),
        (dict(prompt="  "), r"the prompt is empty"),
    ],
)
def test_settings_errors_name_value_and_fix(kwargs, message):
    base = dict(prompt="a <sks> dog", token="<sks>", class_word="dog")
    with pytest.raises(ValueError, match=message):
        SampleSettings(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------------
# Images: PNG metadata, grid, atomic writes


def test_png_metadata_roundtrip_and_a1111_parameters(tmp_path):
    meta = {
        "prompt": "a <sks> dog, in the snow",
        "base_prompt": "a dog, in the snow",
        "negative_prompt": "blurry",
        "mode": "parallel-rescaled",
        "w_text": 7.5,
        "w_cons": 3.0,
        "pr": ParallelRescaling().to_dict(),
        "seed": 3,
        "steps": 30,
        "scheduler": "default",
        "scheduler_class": "EulerDiscreteScheduler",
        "model": "stabilityai/stable-diffusion-xl-base-1.0",
        "height": 64,
        "width": 96,
    }
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    path = images.save_png(image, tmp_path / "sub" / "x.png", meta)
    assert images.read_png_metadata(path) == meta
    params = images.read_png_parameters(path).splitlines()
    assert params[0] == "a <sks> dog, in the snow"
    assert params[1] == "Negative prompt: blurry"
    assert "Steps: 30, Sampler: default, CFG scale: 7.5, Seed: 3, Size: 96x64" in params[2]
    assert 'Base prompt: "a dog, in the snow"' in params[2]
    assert "Guidance: parallel-rescaled" in params[2] and "PR normalization: standardize" in params[2]
    with Image.open(path) as back:
        assert back.size == (96, 64) and back.getpixel((5, 5)) == (10, 20, 30)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary file left behind


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with images.atomic_open(tmp_path / "a.json", "w") as handle:
            handle.write("{")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_image_grid_layout():
    red, green = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "green")
    grid = images.image_grid([[red, green], [green, red]], ["cfg", "parallel-rescaled"], ["seed 0", "seed 1"])
    pixels = np.asarray(grid)
    assert grid.width > 2 * 16 and grid.height > 2 * 16
    # Each image appears exactly once per cell: 4 blocks of 16x16 pixels of pure colour.
    assert (pixels == [255, 0, 0]).all(axis=-1).sum() == 2 * 256
    assert (pixels == [0, 128, 0]).all(axis=-1).sum() == 2 * 256
    assert (pixels < 128).all(axis=-1).any()  # labels drawn in black
    with pytest.raises(ValueError, match="every grid row needs 2 images"):
        images.image_grid([[red, green], [red]])
