"""Packaging: the build asks for a setuptools that reads our license string, and the wheel carries the data files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
#: setuptools 77 is the first to accept a PEP 639 license expression (``license = "Apache-2.0"``).
SETUPTOOLS_FLOOR = (77, 0)


def _version_tuple(text: str) -> tuple[int, int]:
    """(major, minor) of "77", "77.0.3" or "84.2.1"."""
    major, minor = (*(int(part) for part in re.findall(r"\d+", text)[:2]), 0)[:2]
    return major, minor


def test_build_requires_a_setuptools_that_reads_license_expressions():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert isinstance(pyproject["project"]["license"], str)  # a PEP 639 expression, not a table
    floors = [
        _version_tuple(req.split(">=", 1)[1])
        for req in pyproject["build-system"]["requires"]
        if re.match(r"setuptools\s*>=", req)
    ]
    assert floors and floors[0] >= SETUPTOOLS_FLOOR


def test_wheel_carries_the_toyworld_weights(tmp_path):
    """Build the wheel offline from a copy of the tree; every file under toyworld/weights must be in it."""
    installed = version("setuptools")
    if _version_tuple(installed) < SETUPTOOLS_FLOOR:
        pytest.skip(f"setuptools {installed} cannot build this project (needs >=77); pip install 'setuptools>=77'")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(tree)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("dreamguide-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))

    package = ROOT / "src" / "dreamguide"
    files = (package / "toyworld" / "weights").rglob("*")
    weights = sorted(f"dreamguide/{p.relative_to(package).as_posix()}" for p in files if p.is_file())
    assert len(weights) > 10 and "dreamguide/toyworld/weights/base/unet/diffusion_pytorch_model.safetensors" in weights
    assert [w for w in weights if w not in names] == []
    modules = sorted(
        f"dreamguide/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py") if "__pycache__" not in p.parts
    )
    assert [m for m in modules if m not in names] == []
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
