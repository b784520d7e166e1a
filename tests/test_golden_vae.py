"""Parity of the Text VAE with the official Cola DLM code (golden set A, fp32, CPU).

The golden tensors use the official packed layout (samples concatenated, per-sample lengths);
they are converted to padded batches + valid masks here and compared on the valid rows.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prior.checkpoints.released import load_released_vae as load_released_text_vae

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOLDEN = Path(__file__).resolve().parent / "data/golden/A"
ATOL = 1e-5


def _golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / f"{name}.safetensors")


def _pad(packed: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum L_i, ...) packed rows -> (B, max L_i, ...) zero-padded, and valid (B, max L_i)."""
    lengths = lengths.flatten().tolist()
    width = max(max(lengths), 1)
    out = packed.new_zeros((len(lengths), width, *packed.shape[1:]))
    valid = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, row in enumerate(packed.split(lengths)):
        out[i, : len(row)], valid[i, : len(row)] = row, True
    return out, valid


def _assert_rows(padded: torch.Tensor, valid: torch.Tensor, packed_expected: torch.Tensor) -> float:
    """Compare the valid rows of a padded output with the packed golden rows; return the max diff."""
    got = padded[valid]  # (sum L_i, ...) in sample order, like the packed layout
    assert got.shape == packed_expected.shape
    diff = (got - packed_expected).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL}"
    return diff


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def vae(request):
    torch.manual_seed(0)
    return load_released_text_vae(GOLDEN / "cola_vae", attn_backend=request.param)


def test_config_maps_released_fields(vae):
    cfg = vae.config
    assert (cfg.vocab_size, cfg.dim, cfg.latent_dim, cfg.block_size, cfg.patch_size) == (300, 64, 8, 4, 1)
    assert vae.encoder.wte.num_embeddings == 301 and vae.mask_token_id == 300
    released = load_file(GOLDEN / "cola_vae/model.safetensors")
    assert {k: v.shape for k, v in vae.state_dict().items()} == {k: v.shape for k, v in released.items()}


@torch.no_grad()
def test_encode_matches_official(vae):
    g = _golden("vae_encode")
    ids, valid = _pad(g["input_ids"], g["lengths"])
    out = vae.encode(ids, valid)
    assert torch.equal(out.valid, valid)
    _assert_rows(out.mean, valid, g["posterior_mean"])
    _assert_rows(out.logvar, valid, g["posterior_logvar"])
    _assert_rows(out.latents, valid, g["latents_normalized"])


@pytest.mark.parametrize("name", ["vae_decode_nocache", "vae_decode_nocache_ragged"])
@torch.no_grad()
def test_decode_nocache_matches_official(vae, name):
    g = _golden(name)
    latents, valid = _pad(g["latents"], g["txt_shape"])
    logits = vae.decode(latents, valid).logits  # (B, L, V)
    _assert_rows(logits, valid, g["logits"])


@torch.no_grad()
def test_decode_cached_matches_official(vae):
    """Prefill (one empty prefix), then two blocks through the KV cache, as the official pipeline."""
    g = _golden("vae_decode_cached")
    cache = vae.new_kv_cache()
    for step in ("prefill", "block1", "block2"):
        q_lengths = g[f"{step}_txt_q_shape"]
        latents, valid = _pad(g[f"{step}_latents"], q_lengths)
        logits = vae.decode(latents, valid, kv_cache=cache, update_cache=True).logits
        _assert_rows(logits, valid, g[f"{step}_logits"])
        assert torch.equal(cache.lengths(), g[f"{step}_txt_shape"].flatten())  # cumulative K lengths


def test_released_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_released_text_vae(tmp_path)
