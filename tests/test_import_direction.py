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


# Inside prior/: models <- training; models <- sampling <- pipelines <- checkpoints <- eval.
# The inference path (models, sampling, pipelines, checkpoints, eval) never imports prior.training.
PRIOR_ALLOWED = {
    "models": set(),
    "sampling": {"models"},
    "pipelines": {"models", "sampling"},
    "checkpoints": {"models", "sampling", "pipelines"},
    "eval": {"models", "sampling", "pipelines", "checkpoints"},
    "training": {"models", "sampling", "pipelines", "checkpoints"},
    "serving": {"models", "sampling", "pipelines", "checkpoints"},
}


def _prior_subpackages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        names.update(m.split(".")[1] for m in modules if m.startswith("prior.") and m.count(".") >= 1)
    return names


@pytest.mark.parametrize("sub", sorted(PRIOR_ALLOWED))
def test_prior_subpackage_direction(sub):
    files = sorted((ROOT / "prior" / sub).rglob("*.py"))
    assert files, f"prior/{sub} has no modules"
    offenders = sorted(
        f"{path.relative_to(ROOT)} imports prior.{name}"
        for path in files
        for name in _prior_subpackages(path) - PRIOR_ALLOWED[sub] - {sub}
    )
    assert not offenders, offenders
    if sub != "training":
        accelerate = [str(p.relative_to(ROOT)) for p in files if "accelerate" in _imported_packages(p)]
        assert not accelerate, f"the inference path imports accelerate: {accelerate}"


INFERENCE_SCRIPT = """
import sys

sys.modules["accelerate"] = None  # `import accelerate` now fails; find_spec reports it absent

sys.path.insert(0, sys.argv[2])
import torch
from helpers import tiny_pipeline
from prior.checkpoints.released import load_pipeline

tiny_pipeline(["the cat sat on the mat.", "a dog ran in the park."] * 4).save_pretrained(sys.argv[1])
pipe = load_pipeline(sys.argv[1])
out = pipe("the cat", generator=torch.Generator().manual_seed(0), max_new_tokens=4, num_inference_steps=2)
assert isinstance(out.texts[0], str)
loaded = sorted(m for m, mod in sys.modules.items() if m.startswith(("prior.training", "accelerate")) and mod)
assert not loaded, loaded
print("ok")
"""


def test_inference_path_runs_without_accelerate_or_training(tmp_path):
    """Import the text pipeline with accelerate blocked, load a saved pipeline folder and generate."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", INFERENCE_SCRIPT, str(tmp_path / "pipe"), str(ROOT / "tests")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
