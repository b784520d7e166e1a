"""Parity of prior.models.mmdit.MMDiT with the official Cola DiT on golden set A (tests/data/golden/A/README.md §5.4-§5.6).

The golden tensors use the official packed ("NA") layout: samples concatenated on one axis, per-sample
lengths in ``txt_shape`` (keys) / ``txt_q_shape`` (queries, the suffix of the keys). Here they become
padded batches with a ``valid`` mask, and only valid rows are compared.

Tolerance: atol 1e-5 with rtol 1e-5, the module-level suggestion of that README (§7). The released DiT is very
sensitive to the fp32 timestep sinusoid (at t ~ 1000 one ulp of a frequency moves the velocity by
~1e-5), and fp32 ``exp`` differs by an ulp across CPUs, so a pure 1e-5 atol would sit at the
platform noise floor. Measured on the development machine: max abs diff <= 8.5e-6 everywhere.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prior.checkpoints.released import load_released_prior as load_released_dit
from unimodal.kv_cache import KVCache
from unimodal.masks import two_l_mask

GOLDEN = Path(__file__).resolve().parent / "data/golden/A"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def pad(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (sum L_i, ...) -> padded (B, max L_i, ...) and valid (B, max L_i)."""
    width = max(max(lengths), 1)
    out = flat.new_zeros((len(lengths), width, *flat.shape[1:]))
    valid = torch.zeros(len(lengths), width, dtype=torch.bool)
    start = 0
    for i, n in enumerate(lengths):
        out[i, :n], valid[i, :n] = flat[start : start + n], True
        start += n
    return out, valid


def lengths_of(shape: torch.Tensor) -> list[int]:
    return shape[:, 0].tolist()


@pytest.fixture(scope="module")
def dit():
    return load_released_dit(GOLDEN / "cola_dit", attn_backend="eager")


def test_released_config_mapped(dit):
    cfg = dit.config
    assert (cfg.width, cfg.heads, cfg.head_dim, cfg.rope_dim, cfg.num_layers) == (64, 2, 32, 24, 2)
    assert (list(cfg.in_channels), cfg.block_size, cfg.mlp_ratio) == ([8], 4, 4.0)


@torch.no_grad()
def test_forward_nocache(dit):
    g = load_file(GOLDEN / "dit_forward_nocache.safetensors")
    lengths = lengths_of(g["txt_shape"])
    assert lengths == lengths_of(g["txt_q_shape"])
    x, valid = pad(g["txt"], lengths)
    t, _ = pad(g["timestep"], lengths)
    assert_matches(dit(x, t, valid=valid).velocity[valid], g["velocity"])
    per_sample = dit(x, g["timestep_per_sample"], valid=valid).velocity  # (B,) timesteps
    assert_matches(per_sample[valid], g["velocity_per_sample_timestep"])


@torch.no_grad()
def test_forward_2l_train(dit):
    """Layout [z0 padded to L | z_t padded to L], shared positions, per-sample block sizes [4, 4, 2]."""
    g = load_file(GOLDEN / "dit_forward_2l_train.safetensors")
    seq = g["seq_lens"].tolist()
    batch, length = len(seq), max(seq)
    # packed row -> (sample, padded column): sample i's [clean | noisy] rows go to [0, n) and [L, L + n)
    sample = torch.repeat_interleave(torch.arange(batch), 2 * g["seq_lens"])
    column = torch.cat([torch.cat((torch.arange(n), length + torch.arange(n))) for n in seq])
    x = torch.zeros(batch, 2 * length, g["txt"].shape[1])
    t = torch.zeros(batch, 2 * length)
    valid = torch.zeros(batch, 2 * length, dtype=torch.bool)
    x[sample, column], t[sample, column], valid[sample, column] = g["txt"], g["timestep"], True
    positions = torch.arange(length).repeat(2).expand(batch, -1)  # (B, 2L): both copies share positions
    noisy = torch.arange(2 * length).expand(batch, -1) >= length
    mask = two_l_mask(positions, noisy, g["block_sizes"], valid)

    # the relation we feed is the official one, read back in the packed layout
    dense = mask.dense()[:, 0]  # (B, 2L, 2L)
    ours = (sample[:, None] == sample[None, :]) & dense[sample[:, None], column[:, None], column[None, :]]
    assert torch.equal(ours, g["attn_allowed"].bool())

    v = dit(x, t, positions=positions, valid=valid, attn_mask=mask).velocity  # (B, 2L, C)
    assert_matches(v[sample, column], g["velocity_full"])
    is_noisy = column >= length
    v_noisy = v[sample[is_noisy], column[is_noisy]]  # noisy halves, sample by sample
    assert_matches(v_noisy, g["velocity_noisy"])
    loss = (((v_noisy - g["target"]) ** 2).mean(-1) * g["loss_mask"]).sum() / g["loss_mask"].sum()
    assert_matches(loss.reshape(1), g["loss"])


@torch.no_grad()
def test_forward_cached_protocol(dit):
    """prefill (one empty prefix) -> cond (read-only) -> uncond (no cache) -> commit -> cond."""
    g = load_file(GOLDEN / "dit_forward_cached.safetensors")

    def inputs(step: str):
        lengths = lengths_of(g[f"{step}_txt_q_shape"])
        x, valid = pad(g[f"{step}_txt"], lengths)
        t, _ = pad(g[f"{step}_timestep"], lengths)
        return x, t, valid

    def check(step: str, out: torch.Tensor, valid: torch.Tensor) -> None:
        assert_matches(out[valid], g[f"{step}_velocity"])

    cache = KVCache(dit.config.num_layers)
    x, t, valid = inputs("step0_prefill")  # prefix lengths [8, 0, 4]
    check("step0_prefill", dit(x, t, valid=valid, kv_cache=cache, update_cache=True).velocity, valid)
    assert cache.lengths().tolist() == lengths_of(g["step0_prefill_txt_shape"])

    x1, t1, valid = inputs("step1_cond")
    check("step1_cond", dit(x1, t1, valid=valid, kv_cache=cache).velocity, valid)
    assert cache.lengths().tolist() == [8, 0, 4]  # read-only

    x2, t2, valid = inputs("step2_uncond")
    check("step2_uncond", dit(x2, t2, valid=valid).velocity, valid)

    # both CFG branches in one (2B) forward: the unconditional rows stand alone (context_free_rows)
    both = dit(torch.cat((x1, x2)), torch.cat((t1, t2)), kv_cache=cache, context_free_rows=len(x2)).velocity
    assert_matches(both[:3].flatten(0, 1), g["step1_cond_velocity"])
    assert_matches(both[3:].flatten(0, 1), g["step2_uncond_velocity"])

    x, t, valid = inputs("step3_commit")
    check("step3_commit", dit(x, t, valid=valid, kv_cache=cache, update_cache=True).velocity, valid)
    assert cache.lengths().tolist() == [12, 4, 8]

    x, t, valid = inputs("step4_cond")
    check("step4_cond", dit(x, t, valid=valid, kv_cache=cache).velocity, valid)
