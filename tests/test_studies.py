"""Every study script runs end to end on a smoke budget (slow suite): tiny models, 2 steps, 2
prompts. Checks the outputs each promises (results.json with a verdict, results.md, the PNGs)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(SCRIPTS))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, study):
    """A smoke Stage-1 run and a smoke Stage-2 run from it."""
    root = tmp_path_factory.mktemp("study_runs")
    common = study("_study")
    common.train_variant(common.CONFIGS / "vae_tiny.yaml", root / "vae", smoke=True)
    common.train_variant(
        common.CONFIGS / "cola_tiny.yaml", root / "cola", [f"stage1={root / 'vae'}"], smoke=True
    )
    return root


def check_outputs(out: Path, plots: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["verdict"] and results["command"].startswith("python")
    md = (out / "results.md").read_text()
    assert "**Paper:**" in md and "**Here:**" in md and "|---|" in md
    for name in plots:
        assert (out / name).stat().st_size > 1000, name
    return results


def test_eval_only_studies(study, runs, tmp_path):
    study("study_vae_robustness").main([str(runs / "vae"), "--smoke", "--output-dir", str(tmp_path / "r")])
    check_outputs(tmp_path / "r", ["robustness.png"])
    fb = study("study_first_block").main([str(runs / "cola"), "--smoke", "--output-dir", str(tmp_path / "f")])
    assert set(fb) == {"clean_repaint", "partial_repaint", "left_pad", "right_pad"}
    check_outputs(tmp_path / "f", ["first_block.png"])
    sc = study("study_steps_cfg").main([str(runs / "cola"), "--smoke", "--output-dir", str(tmp_path / "s")])
    assert list(sc["by_steps"]) == [1, 2] and list(sc["by_cfg"]) == [1.0, 2.0]
    check_outputs(tmp_path / "s", ["steps_cfg.png"])
    # make_findings gathers them (folders named as the studies) into one page with a summary
    for short, name in (("r", "vae_robustness"), ("f", "first_block"), ("s", "steps_cfg")):
        (tmp_path / short).rename(tmp_path / name)
    page = tmp_path / "docs" / "findings.md"
    page.parent.mkdir()
    study("make_findings").main(["--studies", str(tmp_path), "--out", str(page)])
    text = page.read_text()
    assert text.count("](#") == 3 and "images/studies/steps_cfg/steps_cfg.png" in text
    assert (page.parent / "images" / "studies" / "first_block" / "first_block.png").is_file()


def test_training_studies(study, runs, tmp_path):
    vae = str(runs / "vae")
    bs = study("study_block_size").main(
        ["--vae", vae, "--sizes", "4", "16", "--smoke", "--output-dir", str(tmp_path / "b")]
    )
    assert set(bs) == {4, 16} and all(r["with_context"] > 0 for r in bs.values())
    check_outputs(tmp_path / "b", ["block_size.png"])
    ld = study("study_loc_dim").main(
        ["--dims", "8", "--locs", "0", "auto", "--smoke", "--output-dir", str(tmp_path / "l")]
    )
    assert set(ld[8]) == {"0", "auto"}
    check_outputs(tmp_path / "l", ["loc_dim.png"])
    pp = study("study_patch_parity").main(["--smoke", "--output-dir", str(tmp_path / "p")])
    assert set(pp) == {"pin", "shift", "right_pad"} and set(pp["pin"]) == {"Mod0", "Mod1"}
    check_outputs(tmp_path / "p", ["patch_parity.png"])


def test_stage2_modes_study(study, tmp_path):
    s2 = study("study_stage2_modes").main(["--smoke", "--output-dir", str(tmp_path / "m")])
    assert {"joint x1", "joint x0.01", "fixed VAE", "all scratch", "interval"} <= set(s2)
    assert s2["joint x1, no BERT loss"]["vae"] == "no BERT loss"
    check_outputs(tmp_path / "m", ["stage2_modes.png"])


def test_cola_ar_mdm_study(study, runs, tmp_path):
    out = study("study_cola_ar_mdm").main(
        [
            "--vae",
            str(runs / "vae"),
            "--systems",
            "cola",
            "ar",
            "mdm",
            "--smoke",
            "--output-dir",
            str(tmp_path / "c"),
        ]
    )
    assert set(out) == {"cola", "ar", "mdm"}
    assert all(r["tokens_per_s"] > 0 and r["curve"] for r in out.values())
    check_outputs(tmp_path / "c", ["cola_ar_mdm.png"])


def test_levers_study(study, tmp_path):
    out = tmp_path / "l"
    args = ["--smoke", "--output-dir", str(out), "--only", "default", "token_history", "paper_fixed"]
    study("study_levers").main([*args, "--sampler"])
    results = check_outputs(out, ["levers.png"])
    assert set(results["variants"]) == {
        "default",
        "token_history",
        "paper_fixed",
        "noise_1",
        "project",
        "cfg_high_t",
        "cfg_low_t",
    }
    for r in results["variants"].values():
        assert set(r["probe"]["with_context"]) == {"0.5", "0.7", "0.9"}
        assert 0 <= r["stage1_probe"]["own"] <= 1 and r["steps"] == 2
