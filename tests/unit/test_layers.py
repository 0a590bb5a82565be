"""The floors' import directions (docs/architecture.md), read from the source of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipelines", "curation", "training", "distillation", "flows")
# What each package may import of the others: the spine none, training nothing of curation.
ALLOWED = {
    "pipelines": set(),
    "training": {"pipelines"},
    "curation": {"pipelines", "training"},
    "distillation": {"pipelines", "training"},
    "flows": {"pipelines", "curation", "training", "distillation"},
}
MAX_MODULE_LINES = 400


def imported_packages(path: Path) -> set[str]:
    """The top-level names of every module `path` imports, at any depth of its code."""
    names = set()
    for item in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(item, ast.Import):
            names.update(alias.name.split(".")[0] for alias in item.names)
        elif isinstance(item, ast.ImportFrom) and item.module and not item.level:
            names.add(item.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_floors_below_it(package):
    wrong = {
        str(path.relative_to(REPO)): sorted(forbidden)
        for path in sorted((REPO / package).rglob("*.py"))
        if (forbidden := (imported_packages(path) & set(PACKAGES)) - ALLOWED[package] - {package})
    }
    assert wrong == {}


def test_no_module_is_over_the_size_a_reader_takes_in():
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
    }
    assert {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}
