"""The repository's parts import each other only in the directions of DESIGN.md §5.

A static walk over every module's ``import`` statements (``ast``, so imports inside functions
count too): the kernel package is the floor and imports no ``gazejax`` module, and no module
imports a command-line module.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("gazejax", "kernels")
CLI_MODULES = ("gazejax.train", "gazejax.evaluate", "gazejax.generate", "gazejax.convert.__main__")

# part -> first-party prefixes it must not import (DESIGN.md §5: gaze -> kernels; models ->
# gaze, kernels; data -> gaze; inference -> models, data; eval -> inference, models, data).
FORBIDDEN = {
    "kernels": ("gazejax",),
    "gazejax.gaze": (
        "gazejax.models",
        "gazejax.data",
        "gazejax.inference",
        "gazejax.eval",
        "gazejax.lmms",
        "gazejax.convert",
    ),
    "gazejax.models": (
        "gazejax.data",
        "gazejax.inference",
        "gazejax.eval",
        "gazejax.lmms",
        "gazejax.convert",
    ),
    "gazejax.data": ("gazejax.models", "gazejax.inference", "gazejax.eval", "gazejax.lmms"),
    "gazejax.inference": ("gazejax.eval", "gazejax.lmms"),
    "gazejax.eval": ("gazejax.lmms",),
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def first_party_modules() -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = {m for m in imports(path) if m.split(".")[0] in PACKAGES}
    return modules


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_walk_sees_the_parts_and_their_imports():
    """Guards the checks below against passing vacuously."""
    modules = first_party_modules()
    for part in FORBIDDEN:
        assert any(within(m, part) for m in modules), part
    assert "kernels.gaze_attention.metadata" in modules["kernels.gaze_attention.dispatch"]
    assert "kernels.gaze_attention" in modules["gazejax.models.decoder"]
    assert "gazejax.models.mllm" in modules["gazejax.train"]
    assert "gazejax.gaze.geometry" in modules["gazejax.data.packing"]


@pytest.mark.parametrize("part", FORBIDDEN)
def test_parts_import_only_downwards(part):
    offending = {
        module: sorted(m for m in imported if any(within(m, bad) for bad in FORBIDDEN[part]))
        for module, imported in first_party_modules().items()
        if within(module, part)
    }
    assert {m: bad for m, bad in offending.items() if bad} == {}


def test_no_module_imports_a_command_line_module():
    offending = {
        module: sorted(m for m in imported if any(within(m, cli) for cli in CLI_MODULES))
        for module, imported in first_party_modules().items()
        if module not in CLI_MODULES
    }
    assert {m: bad for m, bad in offending.items() if bad} == {}
