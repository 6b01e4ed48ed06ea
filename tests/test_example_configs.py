"""The example configs shipped in configs/ load and validate with their own loaders."""

from pathlib import Path

import pytest

from dreamguide.evaluation.suites.dreambench_config import load_dreambench_config
from dreamguide.training import load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["sdxl-dco.toml", "sd15-dreambooth.toml"])
def test_training_configs_load(name):
    config = load_train_config(CONFIGS / name)
    assert config.train.method in ("dreambooth", "dreambooth-ti", "dco")
    assert config.model.pretrained


def test_dreambench_config_loads_and_trains_with_the_sdxl_config():
    config = load_dreambench_config(CONFIGS / "dreambench-sdxl.toml")
    assert Path(config.train.config).resolve() == (CONFIGS / "sdxl-dco.toml").resolve()
    assert Path(config.dreambench).resolve() == (CONFIGS.parent.parent / "shared" / "dreambench").resolve()
