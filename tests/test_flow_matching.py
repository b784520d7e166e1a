"""Flow matching for the block-causal prior: 2L layout, masks, time sampling, path, loss, diagnostics."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from prior.models.mmdit import MMDiT
from prior.training.flow_matching import (
    FlowMatchingConfig,
    RectifiedFlowPath,
    build_2l_batch,
    flow_loss_by_t,
    flow_matching_loss,
    gaussian_baseline,
    resolve_loc,
    sample_t,
)
from unimodal.masks import two_l_mask

B, N, D, BS = 3, 10, 4, 4  # batch, latents, channels, block size (last block is partial)


def _latents(seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(B, N, D, generator=g)
    lengths = torch.tensor([10, 7, 1])
    valid = torch.arange(N)[None] < lengths[:, None]  # (B, N) right padding
    return z0, valid


def _tiny_mmdit(block_size: int = BS) -> MMDiT:
    torch.manual_seed(0)
    return MMDiT(
        in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=2,
        block_size=block_size, attn_backend="eager", adaln_zero_init=False,
    ).eval()  # fmt: skip


@dataclass
class _Out:
    velocity: torch.Tensor


class _LinearPrior(nn.Module):
    """A stand-in velocity model: per-token linear map of [x, timestep / 1000]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(D + 1, D)

    def forward(self, x, timestep, positions=None, valid=None, attn_mask=None):
        return _Out(self.proj(torch.cat([x, timestep[..., None] / 1000], dim=-1)))


# ----------------------------------------------------------------------------- layout and mask


def test_2l_batch_layout():
    z0, valid = _latents()
    cfg = FlowMatchingConfig(prompt_block_prob=0.0)
    b = build_2l_batch(z0, valid, BS, cfg, torch.Generator().manual_seed(1))
    assert b.x.shape == (B, 2 * N, D) and b.timestep.shape == b.positions.shape == b.valid.shape == (B, 2 * N)
    assert b.target.shape == (B, N, D) and b.loss_mask.shape == b.t.shape == (B, N)
    assert torch.equal(b.x[:, :N], z0)  # clean copy first
    assert torch.equal(b.positions[:, :N], b.positions[:, N:])  # shared positions
    assert torch.equal(b.positions[0, :N], torch.arange(N))
    assert torch.all(b.timestep[:, :N] == 0)
    assert torch.allclose(b.timestep[:, N:], 1000 * b.t)
    assert torch.equal(b.valid, torch.cat([valid, valid], 1)) and torch.equal(b.loss_mask, valid)
    # one t per block, different across blocks
    for blk in range(math.ceil(N / BS)):
        seg = b.t[:, blk * BS : (blk + 1) * BS]
        assert torch.all(seg == seg[:, :1])
    assert len(torch.unique(b.t[0])) == 3
    # z_t and target follow the path
    eps = b.target + z0
    assert torch.allclose(b.x[:, N:], (1 - b.t[..., None]) * z0 + b.t[..., None] * eps, atol=1e-6)


def test_2l_mask_rules():
    z0, valid = _latents()
    cfg = FlowMatchingConfig(prompt_block_prob=0.0)
    b = build_2l_batch(z0, valid, BS, cfg, torch.Generator().manual_seed(1))
    m = b.attn_mask.dense()[:, 0]  # (B, 2N, 2N)
    blk = torch.arange(N) // BS
    real = valid[0]  # row 0 is fully valid
    clean_q, noisy_q = m[0, :N], m[0, N:]
    # noisy block b: clean keys of blocks < b only (never its own clean block), own noisy block only
    assert torch.equal(noisy_q[:, :N], blk[:, None] > blk[None, :])
    assert torch.equal(noisy_q[:, N:], blk[:, None] == blk[None, :])
    assert not (noisy_q[:, :N] & (blk[:, None] == blk[None, :])).any()
    # clean block b: clean blocks <= b, never noisy
    assert torch.equal(clean_q[:, :N], blk[:, None] >= blk[None, :]) and not clean_q[:, N:].any()
    assert real.all()
    # padding keys never seen by real queries; every row attends to something
    assert not m[1][torch.cat([valid[1], valid[1]])][:, ~torch.cat([valid[1], valid[1]])].any()
    assert m.any(-1).all()


def test_prompt_pieces_are_clean_with_zero_loss():
    z0, valid = _latents()
    cfg = FlowMatchingConfig(prompt_block_prob=1.0)
    splits = set()
    for seed in range(20):
        b = build_2l_batch(z0, valid, BS, cfg, torch.Generator().manual_seed(seed))
        p = b.prompt
        assert torch.all(b.t[p] == 0) and torch.all(b.timestep[:, N:][p] == 0)
        assert torch.equal(b.x[:, N:][p], z0[p])  # clean latents inside the noisy copy
        assert not b.loss_mask[p].any() and not (p & ~valid).any()
        for i in range(B):
            for s in range(0, N, BS):
                n_valid = int(valid[i, s : s + BS].sum())
                piece = p[i, s : s + BS]
                k = int(piece.sum())
                if n_valid <= 1:
                    assert k == 0  # blocks of length 1 (and padding) never split
                else:  # a left piece of 1..len-1 latents
                    assert 1 <= k <= n_valid - 1 and piece[:k].all()
                    splits.add((n_valid, k))
    assert {(4, 1), (4, 2), (4, 3)} <= splits  # the split point covers [1, len-1]
    none = build_2l_batch(z0, valid, BS, FlowMatchingConfig(prompt_block_prob=0.0))
    assert not none.prompt.any()


def test_p_uncond_rows_see_no_clean_context():
    z0, valid = _latents()
    cond = build_2l_batch(z0, valid, BS, FlowMatchingConfig(prompt_block_prob=0, p_uncond=0.0))
    unc = build_2l_batch(z0, valid, BS, FlowMatchingConfig(prompt_block_prob=0, p_uncond=1.0))
    assert unc.uncond.all() and not cond.uncond.any()
    mc, mu = cond.attn_mask.dense()[:, 0], unc.attn_mask.dense()[:, 0]
    assert not mu[:, N:, :N].any()  # noisy queries: no clean keys
    assert torch.equal(mu[:, N:, N:], mc[:, N:, N:])  # own noisy block kept
    assert torch.equal(mu[:, :N], mc[:, :N])  # clean rows unchanged
    assert torch.equal(mc, two_l_mask(cond.positions, cond.noisy, BS, cond.valid).dense()[:, 0])
    mixed = build_2l_batch(z0, valid, BS, FlowMatchingConfig(), uncond=torch.tensor([True, False, True]))
    m = mixed.attn_mask.dense()[:, 0]
    assert not m[0, N:, :N].any() and m[1, N:, :N].any()


def test_2l_forward_matches_sampler_views():
    """Noisy block b in one 2L pass == the sampler's views: conditional (clean history, positions
    continuing) and, for p_uncond rows, unconditional (the block alone at positions 0..B-1)."""
    prior = _tiny_mmdit()
    z0, _ = _latents()
    z0, valid = z0[:1, :8], torch.ones(1, 8, dtype=torch.bool)  # two full blocks
    t = torch.tensor([[0.3] * 4 + [0.8] * 4])
    eps = torch.randn(1, 8, D, generator=torch.Generator().manual_seed(3))
    cfg = FlowMatchingConfig(prompt_block_prob=0.0)
    with torch.no_grad():
        for uncond in (False, True):
            b = build_2l_batch(z0, valid, BS, cfg, t=t, eps=eps, uncond=torch.tensor([uncond]))
            v = prior(b.x, b.timestep, positions=b.positions, valid=b.valid, attn_mask=b.attn_mask).velocity
            zt = b.x[:, 8:]
            blk1 = zt[:, 4:]  # block 1
            if uncond:  # alone, positions 0..3
                ref = prior(blk1, torch.full((1, 4), 800.0)).velocity
            else:  # [clean block 0 at t=0 ; noisy block 1], positions 0..7, block-causal
                x = torch.cat([z0[:, :4], blk1], 1)
                ref = prior(x, torch.tensor([[0.0] * 4 + [800.0] * 4])).velocity[:, 4:]
            assert torch.allclose(v[:, 12:], ref, atol=1e-5)
            block0 = prior(zt[:, :4], torch.full((1, 4), 300.0)).velocity  # block 0 never has context
            assert torch.allclose(v[:, 8:12], block0, atol=1e-5)


# ----------------------------------------------------------------------------- time sampler and path


def test_loc_auto():
    cfg = FlowMatchingConfig()
    assert resolve_loc(cfg, 16) == pytest.approx(1.0)
    assert resolve_loc(cfg, 64) == pytest.approx(1 + 0.5 * math.log(4))
    assert resolve_loc(cfg, 128) == pytest.approx(1 + 0.5 * math.log(8))
    assert resolve_loc(FlowMatchingConfig(loc=0.0), 64) == 0.0


def test_logit_normal_statistics():
    cfg = FlowMatchingConfig(loc=1.0, scale=1.0)
    t = sample_t((200_000,), cfg, 16, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    normal = torch.distributions.Normal(0.0, 1.0)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # quantiles of sigmoid(1 + n)
        expected = torch.sigmoid(1.0 + normal.icdf(torch.tensor(q)))
        assert torch.quantile(t[:50_000], q) == pytest.approx(float(expected), abs=0.01)
    n = torch.linspace(-8, 8, 20001)  # E[sigmoid(1 + n)] by quadrature
    mean = float((torch.sigmoid(1 + n) * normal.log_prob(n).exp()).sum() * (n[1] - n[0]))
    assert float(t.mean()) == pytest.approx(mean, abs=3e-3)
    assert float((t < 0.2).float().mean()) < 0.01  # <1% of t below 0.2 at loc 1 (docs/design.md §8)
    u = sample_t((100_000,), FlowMatchingConfig(time_sampling="uniform"), 16, generator=torch.Generator())
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)


def test_path_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    z0, eps = (
        torch.randn(2, 5, D, generator=g, dtype=torch.float64),
        torch.randn(2, 5, D, generator=g, dtype=torch.float64),
    )
    path = RectifiedFlowPath()
    assert torch.equal(path.sample(z0, eps, torch.zeros(2, 5)).z_t, z0)
    assert torch.equal(path.sample(z0, eps, torch.ones(2, 5)).z_t, eps)
    s = path.sample(z0, eps, torch.full((2, 5), 0.4, dtype=torch.float64))
    h = 1e-6
    ahead = path.sample(z0, eps, torch.full((2, 5), 0.4 + h, dtype=torch.float64))
    assert torch.allclose((ahead.z_t - s.z_t) / h, s.target, atol=1e-6)
    assert torch.equal(s.target, eps - z0)


# ----------------------------------------------------------------------------- loss and diagnostics


def test_loss_equals_hand_computed_masked_mse():
    prior = _LinearPrior()
    z0, valid = _latents()
    cfg = FlowMatchingConfig(prompt_block_prob=0.5)
    out = flow_matching_loss(prior, z0, valid, BS, cfg, torch.Generator().manual_seed(7))
    b = build_2l_batch(z0, valid, BS, cfg, torch.Generator().manual_seed(7))
    v = prior(b.x, b.timestep).velocity[:, N:]
    total, count = 0.0, 0
    for i in range(B):
        for j in range(N):
            if b.loss_mask[i, j]:
                total += float(((v[i, j] - b.target[i, j]) ** 2).mean().detach())
                count += 1
    assert b.prompt.any() and count == int(b.loss_mask.sum())
    assert float(out.loss.detach()) == pytest.approx(total / count, rel=1e-5)
    out.loss.backward()
    assert prior.proj.weight.grad.abs().sum() > 0
    assert int(out.bucket_count.sum()) == count
    logs = out.logs()
    assert logs["flow/loss"] == pytest.approx(total / count, rel=1e-5)
    assert any(k.startswith("flow/base_t") for k in logs)


def test_gaussian_baseline_is_the_best_linear_predictor():
    assert float(gaussian_baseline(torch.tensor(0.5))) == pytest.approx(2.0)
    assert float(gaussian_baseline(torch.tensor(0.0))) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    s2 = torch.tensor([0.25, 1.0, 4.0])
    z0 = torch.randn(400_000, 3, generator=g) * s2.sqrt() + 0.7
    eps = torch.randn(400_000, 3, generator=g)
    for t in (0.1, 0.5, 0.9):
        zt, v = (1 - t) * z0 + t * eps, eps - z0
        zc, vc = zt - zt.mean(0), v - v.mean(0)
        coef = (vc * zc).mean(0) / zc.pow(2).mean(0)  # least squares per channel
        mse = (vc - coef * zc).pow(2).mean()
        assert float(mse) == pytest.approx(float(gaussian_baseline(torch.tensor(t), s2)), rel=0.02)


def test_flow_loss_by_t():
    z0, valid = _latents()
    zero = _LinearPrior()
    nn.init.zeros_(zero.proj.weight), nn.init.zeros_(zero.proj.bias)
    res = flow_loss_by_t(zero, z0, valid, [0.1, 0.5, 0.9], block_size=BS, skip_first_block=False)
    assert res.loss.shape == res.baseline.shape == (3,)
    assert torch.allclose(res.baseline_unit, 1 / ((1 - res.t) ** 2 + res.t**2))
    # zero prediction: loss = E|eps - z0|^2 per channel ~ 2 for unit data, above the baseline
    assert torch.all(res.loss > res.baseline) and torch.all((res.loss - 2).abs() < 0.6)
    prior = _tiny_mmdit()
    with_ctx = flow_loss_by_t(prior, z0, valid, [0.5], block_size=BS)
    no_ctx = flow_loss_by_t(prior, z0, valid, [0.5], block_size=BS, with_context=False)
    again = flow_loss_by_t(prior, z0, valid, [0.5], block_size=BS, with_context=False)
    assert torch.equal(no_ctx.loss, again.loss) and not torch.equal(with_ctx.loss, no_ctx.loss)


def test_bad_inputs_fail_loudly():
    z0, valid = _latents()
    with pytest.raises(ValueError, match="time_sampling"):
        FlowMatchingConfig(time_sampling="cosine")
    with pytest.raises(ValueError, match="p_uncond"):
        FlowMatchingConfig(p_uncond=1.5)
    holes = valid.clone()
    holes[0, 2] = False
    with pytest.raises(ValueError, match="prefix"):
        build_2l_batch(z0, holes, BS, FlowMatchingConfig())
    with pytest.raises(ValueError, match="valid"):
        build_2l_batch(z0, valid[:, :3], BS, FlowMatchingConfig())
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        build_2l_batch(z0, valid, 0, FlowMatchingConfig())
