"""The layering of docs/ARCHITECTURE.md, read from the source with ``ast``: who may import whom,
and no public name defined in two modules. (One scheduler ``step`` call site: tests/test_denoise.py.)"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dreamguide"

#: Layers, lowest first: a module imports only from its own layer or the ones below.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0: pure functions and small helpers, no model code
    ("dreamguide", "dreamguide.atomic", "dreamguide.filenames", "dreamguide.prompts", "dreamguide.guidance",
     "dreamguide.personalized_steps",
     "dreamguide.denoise", "dreamguide.config", "dreamguide.metrics", "dreamguide.tokenizers",
     "dreamguide.cuda_graph", "dreamguide.cpu_threads", "dreamguide.provenance",
     "dreamguide.locks"),
    # 1: models, their files, their UNet rows; written images
    ("dreamguide.models", "dreamguide.single_file", "dreamguide.lora_files", "dreamguide.token_files",
     "dreamguide.unet_rows", "dreamguide.images", "dreamguide.testing", "dreamguide.hub"),
    # 2: sampling
    ("dreamguide.sample_settings", "dreamguide.consistency_trace", "dreamguide.sampling",
     "dreamguide.integrations"),
    # 3: fine-tuning
    ("dreamguide.training",),
    # 4: evaluation
    ("dreamguide.evaluation",),
    # 5: users of the library: the miniature world, and per-subject tuning (on a real model or the world)
    ("dreamguide.toyworld", "dreamguide.tune"),
    # 6: the two front ends
    ("dreamguide.ui", "dreamguide.cli", "dreamguide.__main__"),
)

#: Public names that several modules define on purpose, with the reason.
SHARED_NAMES: dict[str, tuple[set[str] | str, str]] = {
    "add_parser": ("dreamguide.cli.", "each sub-command module's entry, found by dreamguide.cli.build_parser"),
    "run": ("dreamguide.cli.", "each sub-command module's function, set as the parser's func"),
    "EXAMPLE": ("dreamguide.cli.", "each sub-command module's example, shown in its --help"),
    "logger": ({"dreamguide.hub", "dreamguide.models"}, "logging.getLogger(__name__): one per module"),
    "main": ({"dreamguide.cli", "dreamguide.toyworld.train_evaluators"},
             "the entry of `dreamguide` and of `python -m dreamguide.toyworld.train_evaluators`"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, ast.Module] = {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py"))}


def imported(name: str, tree: ast.Module) -> set[str]:
    """The dreamguide modules ``name`` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    package = name if (SRC.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dreamguide")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] != "dreamguide":
                continue
            for alias in node.names:  # ``from dreamguide import guidance`` imports the module
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return out


IMPORTS = {name: imported(name, tree) for name, tree in MODULES.items()}


def layer(name: str) -> int:
    found = [i for i, members in enumerate(LAYERS) for m in members
             if name == m or (m != "dreamguide" and name.startswith(m + "."))]
    if not found:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS and to docs/ARCHITECTURE.md")
    return max(found)


def test_every_module_has_a_layer_and_a_line_in_the_architecture_doc():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [name for name in MODULES if name != "dreamguide" and f"`{name.removeprefix('dreamguide.')}`" not in doc]
    assert not missing, f"docs/ARCHITECTURE.md has no line for {missing}"
    for name in MODULES:
        layer(name)


def test_modules_import_only_their_layer_and_below():
    upward = [f"{name} (layer {layer(name)}) imports {other} (layer {layer(other)})"
              for name, others in IMPORTS.items() for other in sorted(others) if layer(other) > layer(name)]
    assert not upward, "\n".join(upward)


def test_guidance_and_the_denoising_loop_have_no_model_code():
    assert IMPORTS["dreamguide.guidance"] == set()
    assert IMPORTS["dreamguide.denoise"] == set()
    assert IMPORTS["dreamguide.unet_rows"] <= {"dreamguide.models", "dreamguide.cuda_graph"}


def test_only_the_command_line_imports_the_command_line():
    importers = {n for n, others in IMPORTS.items() if any(o.startswith("dreamguide.cli") for o in others)}
    assert {n for n in importers if not n.startswith("dreamguide.cli")} == {"dreamguide.__main__"}


def test_the_library_never_imports_the_miniature_world_or_the_app():
    for package, users in (("dreamguide.toyworld", ("dreamguide.toyworld", "dreamguide.tune", "dreamguide.ui",
                                                     "dreamguide.cli")),
                           ("dreamguide.ui", ("dreamguide.ui", "dreamguide.cli"))):
        importers = {n for n, others in IMPORTS.items() if any(o.startswith(package) for o in others)}
        assert {n for n in importers if not n.startswith(users)} == set(), package


def top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_no_public_name_is_defined_in_two_modules():
    where = defaultdict(set)
    for name, tree in MODULES.items():
        for defined in top_level_names(tree):
            where[defined].add(name)
    twice = {}
    for defined, modules in where.items():
        if len(modules) < 2:
            continue
        allowed = SHARED_NAMES.get(defined, (set(), ""))[0]
        ok = all(m.startswith(allowed) for m in modules) if isinstance(allowed, str) else modules <= allowed
        if not ok:
            twice[defined] = sorted(modules)
    assert not twice, f"defined in several modules (import the one definition, or rename): {twice}"


@pytest.mark.parametrize("defined", sorted(SHARED_NAMES))
def test_each_allowed_shared_name_is_still_shared(defined):
    """An exception that no longer applies is deleted, not kept."""
    modules = {name for name, tree in MODULES.items() if defined in top_level_names(tree)}
    assert len(modules) >= 2, f"{defined} is defined only in {modules}: drop it from SHARED_NAMES"
