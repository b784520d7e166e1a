"""Smoke test of scripts/bench_sampler.py at tiny sizes: the loops agree and the pass counts are right."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
K, BS = 3, 4
TINY = [
    "--width", "32", "--heads", "2", "--head-dim", "16", "--rope-dim", "8", "--layers", "2",
    "--block-size", str(BS), "--vae-dim", "32", "--vae-ffn-dim", "64", "--vae-heads", "2",
    "--vae-layers", "1", "--vocab", "64", "--latent-dim", "4", "--max-seq-len", "64", "--steps", str(K),
    "--prompt-len", "4", "--repeats", "1", "--threads", "1", "--no-progress",
]  # fmt: skip


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script("bench_sampler")


@pytest.fixture(scope="module")
def reference(bench):
    return sys.modules["_reference_loops"]  # imported by bench_sampler


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out.json"
    rep = bench.main([*TINY, "--tokens", "8", "16", "--ar-tokens", "12", "--json", str(path)])
    return rep, path


def test_loops_give_the_same_tokens_and_latents(report):
    rep, _ = report
    for n in (8, 16):
        ours = rep.run("cached", n)
        assert len(ours.token_ids) == n
        assert len(set(ours.token_ids)) > 1  # a non-degenerate comparison
        for other in ("unmerged", "recompute", "released"):
            ref = rep.run(other, n)
            assert ref.token_ids == ours.token_ids
            torch.testing.assert_close(ref.latents, ours.latents, atol=1e-5, rtol=1e-5)
            assert rep.summary[f"same_tokens_{other}@{n}"] is True
            assert rep.summary[f"token_agreement_{other}@{n}"] == 1.0
    assert rep.run("cached", 8).token_ids == rep.run("cached", 16).token_ids[:8]  # same noise prefix
    bf16 = rep.run("cached_bf16", 16)  # rounded weights: agreement is measured, not required
    assert len(bf16.token_ids) == 16 and 0.0 <= rep.summary["token_agreement_cached_bf16@16"] <= 1.0


def test_pass_counts_per_block(report):
    rep, _ = report
    for n in (8, 16):
        blocks = n // BS
        ours, released, recompute = (rep.run(loop, n) for loop in ("cached", "released", "recompute"))
        unmerged = rep.run("unmerged", n)
        assert ours.block_prior_calls == [K] * blocks  # K batched CFG calls, the commit merged into them
        assert unmerged.block_prior_calls == [K + 1] * blocks  # K batched CFG calls + 1 commit
        assert released.block_prior_calls == [2 * K + 1] * blocks  # cond + uncond per step + commit
        assert recompute.block_prior_calls == [2 * K] * blocks  # no commit, no cache
        for run in (ours, unmerged, released, recompute):
            assert run.block_decoder_calls == [1] * blocks
            assert len(run.block_seconds) == blocks and min(run.block_seconds) > 0
        assert (ours.prefill_prior_calls, ours.prefill_decoder_calls) == (0, 1)  # prompt rides in block 0
        assert (unmerged.prefill_prior_calls, unmerged.prefill_decoder_calls) == (1, 1)
        assert (released.prefill_prior_calls, released.prefill_decoder_calls) == (1, 1)
        assert (recompute.prefill_prior_calls, recompute.prefill_decoder_calls) == (0, 0)
        assert ours.prior_calls == blocks * K and unmerged.prior_calls == 1 + blocks * (K + 1)
        assert rep.summary[f"passes_per_token@{n}"] == pytest.approx((blocks * K + blocks + 1) / n)
        assert released.prior_calls == 1 + blocks * (2 * K + 1)


def test_ar_and_summary_figures(report):
    rep, path = report
    assert rep.ar.new_tokens == 12 and rep.ar.forward_calls == 12
    assert rep.run("cached", 12).new_tokens == 12  # Cola timed at the AR token count too
    s = rep.summary
    assert s["theoretical_pass_ratio_ar_over_cola"] == pytest.approx(BS / (K + 1))
    assert rep.ar_bf16.dtype == "bfloat16" and "cola_bf16_over_ar_bf16_tokens_per_s" in s
    fastest = max(rep.ar.tokens_per_s, rep.ar_bf16.tokens_per_s)
    assert s["cola_autocast_over_fastest_ar_tokens_per_s"] == pytest.approx(
        rep.run("cached_autocast", 12).tokens_per_s / fastest
    )
    assert s["speedup_vs_released@16"] == pytest.approx(
        rep.run("cached", 16).tokens_per_s / rep.run("released", 16).tokens_per_s
    )
    assert s["last_over_first_block"] == pytest.approx(s["last_block_s"] / s["first_block_s"])
    saved = json.loads(path.read_text())
    assert saved["summary"]["same_tokens_released@16"] is True
    assert {(r["loop"], r["new_tokens"]) for r in saved["runs"]} >= {("released", 8), ("cached", 16)}
    assert saved["ar"]["new_tokens"] == 12


def test_released_mask_matches_block_causal_rule(reference):
    mask = reference.na_block_causal_mask([6, 5], [2, 5], 2, torch.float32, "cpu")  # (1, 1, 7, 11)
    allowed = mask[0, 0] == 0
    expected = torch.zeros(7, 11, dtype=torch.bool)
    expected[0:2, 0:6] = True  # sample 0: queries = local 4, 5 (block 2) see every key of blocks <= 2
    for r, q in enumerate(range(5)):  # sample 1: keys 6..10, queries 2..6 with local index q
        expected[2 + r, 6 : 6 + (q // 2 + 1) * 2] = True
    assert torch.equal(allowed, expected)
    assert mask.min() == torch.finfo(torch.float32).min


def test_defaults_are_the_tiny_configs(bench):
    args = bench.build_parser().parse_args([])
    bench.load_configs(args)
    prior = OmegaConf.load(ROOT / "configs/text/cola_tiny.yaml").prior
    vae_run = OmegaConf.load(ROOT / "configs/text/vae_tiny.yaml")
    vae = vae_run.vae
    assert (args.width, args.heads, args.head_dim, args.rope_dim) == (
        prior.width, prior.heads, prior.head_dim, prior.rope_dim
    )  # fmt: skip
    assert (args.layers, args.block_size, args.mlp_ratio) == (
        prior.num_layers,
        prior.block_size,
        prior.mlp_ratio,
    )
    assert (args.vocab, args.vae_dim, args.vae_ffn_dim, args.vae_heads, args.latent_dim) == (
        vae_run.tokenizer.vocab_size, vae.dim, vae.ffn_dim, vae.num_heads, vae.latent_dim
    )  # fmt: skip
    assert args.vae_layers == vae.encoder_num_blocks == vae.decoder_num_blocks
    assert (args.vae_block_size, args.max_seq_len) == (vae.block_size, vae.max_seq_len)
    assert (args.steps, args.tokens) == (10, [256, 1024])


@pytest.mark.parametrize(
    "bad",
    [["--tokens", "6"], ["--tokens", "4"], ["--prompt-len", "3"], ["--guidance", "1"], ["--steps", "0"],
     ["--ar-tokens", "5"], ["--tokens", "64"], ["--repeats", "0"]],
)  # fmt: skip
def test_bad_arguments_raise(bench, bad):
    with pytest.raises(ValueError):
        bench.main([*TINY, *bad])


def test_models_come_from_the_configs_and_flags_override_them(bench):
    args = bench.build_parser().parse_args(["--width", "32", "--heads", "2", "--head-dim", "16",
                                            "--rope-dim", "8", "--vae-dim", "32", "--vocab", "300"])  # fmt: skip
    configs = bench.load_configs(args)
    vae, prior = bench.build_models(args, *configs)
    assert (prior.config.width, prior.config.heads, prior.config.head_dim) == (32, 2, 16)
    assert (prior.config.num_layers, prior.config.block_size) == (4, 16)  # from cola_tiny.yaml
    assert list(prior.config.in_channels) == [vae.config.latent_dim] == [16]  # derived
    assert (vae.config.dim, vae.config.vocab_size, vae.config.ffn_dim) == (32, 300, 1024)
    assert vae.config.posterior == "logsnr" and vae.config.block_size == 1  # from vae_tiny.yaml
    with pytest.raises(ValueError, match="config file not found"):
        bench.main([*TINY, "--prior-config", str(ROOT / "missing.yaml")])


def test_precision_agreement_counts_positions_and_lengths():
    """bench_precision's agreement: equal positions over the longer continuation, identical rows."""
    bench_precision = _load_script("bench_precision")
    tokens, rows = bench_precision.agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 0, 4], [5, 6]])
    assert (tokens, rows) == (5 / 6, 0.5)
    tokens, rows = bench_precision.agreement([[1, 2, 3]], [[1, 2]])  # a shorter row disagrees at its end
    assert (tokens, rows) == (2 / 3, 0.0)
