"""The import direction is law: unimodal <- modalities <- prior <- scripts."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "unimodal": {"modalities", "prior", "scripts"},
    "modalities": {"prior", "scripts"},
    "prior": {"scripts"},
}


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    offenders = {
        f"{path.relative_to(ROOT)} imports {bad}"
        for path in files
        for bad in _imported_packages(path) & FORBIDDEN[package]
    }
    assert not offenders, sorted(offenders)
