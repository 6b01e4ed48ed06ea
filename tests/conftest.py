"""Shared pytest fixtures: tiny random models, each built and saved once per test session (offline)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download anything
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread is as fast as several, and several threads spin against
# each other (and any parallel work) on a small machine. Set OMP_NUM_THREADS to override.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A saved tiny SDXL model folder (diffusers layout, safetensors); do not modify it."""
    from dreamguide.testing import save_tiny_pipeline, tiny_sdxl_pipeline

    return save_tiny_pipeline(tiny_sdxl_pipeline(seed=0), tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A saved tiny SD 1.x model folder (diffusers layout, safetensors); do not modify it."""
    from dreamguide.testing import save_tiny_pipeline, tiny_sd15_pipeline

    return save_tiny_pipeline(tiny_sd15_pipeline(seed=0), tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory):
    """A saved tiny pixel-space model folder (unet/, text_encoder/, tokenizer/, scheduler/); do not modify it."""
    from dreamguide.testing import save_tiny_pipeline, tiny_pixel_model

    return save_tiny_pipeline(tiny_pixel_model(seed=0), tmp_path_factory.mktemp("models") / "tiny-pixel")
