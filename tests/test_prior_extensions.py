"""Prior extensions: self-conditioning, token-embedding history, mixed training block sizes, latent projection."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from modalities.text import TextModality
from prior.models.mmdit import MMDiT
from prior.sampling.block_sampler import BlockSampler
from prior.sampling.config import GenerationConfig
from prior.training.flow_matching import (
    FlowMatchingConfig,
    build_2l_batch,
    draw_block_size,
    flow_matching_loss,
)
from prior.training.joint import ColaModel, JointConfig
from unimodal.text_vae import TextVAE

VOCAB, D, BS = 40, 4, 4


def perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))


def tiny(self_condition=False, history="latents", dtype=torch.float32):
    torch.manual_seed(0)
    vae = TextVAE(vocab_size=VOCAB, dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1,
                  decoder_num_blocks=1, latent_dim=D, block_size=2, max_seq_len=64).eval()  # fmt: skip
    prior = MMDiT(in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=2, block_size=BS,
                  adaln_zero_init=False, self_condition=self_condition, history=history,
                  vocab_size=VOCAB if history == "tokens" else 0).eval()  # fmt: skip
    perturb(vae, 1, 0.05)
    perturb(prior, 2, 0.1)
    return vae.to(dtype), prior.to(dtype)


def sampler(vae, prior, **overrides) -> BlockSampler:
    values = dict(
        num_inference_steps=3, guidance_scale=1.0, max_new_tokens=12, stop_on_eos=False, pad_token_id=1
    )
    text = TextModality(vae, None, BS)
    return BlockSampler(
        text, prior, FlowMatchEulerDiscreteScheduler(), GenerationConfig(**{**values, **overrides})
    )


PROMPTS = [[5, 6, 7], [], [8, 9, 10, 11, 12, 13]]


def noise_of(batch: int, seed: int = 7, rows: slice = slice(None)):
    table = torch.randn(batch, 6, BS, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda k, shape: table[rows, k]


# ----------------------------------------------------------------------------- self-conditioning


def test_self_conditioned_prior_starts_as_the_plain_one_and_rejects_bad_input():
    prior = MMDiT(in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, block_size=BS,
                  self_condition=True, adaln_zero_init=False)  # fmt: skip
    x, t = torch.randn(2, 8, D), torch.rand(2, 8) * 1000
    torch.testing.assert_close(prior(x, t, self_cond=torch.randn(2, 8, D)).velocity, prior(x, t).velocity)
    with pytest.raises(ValueError, match="self_cond"):
        prior(x, t, self_cond=torch.randn(2, 7, D))
    plain = MMDiT(in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, block_size=BS)
    with pytest.raises(ValueError, match="self_condition=True"):
        plain(x, t, self_cond=torch.randn(2, 8, D))


@torch.no_grad()
def test_sampler_feeds_the_previous_clean_estimate():
    """Step 0 of a block gets no estimate; step s > 0 gets x - t v of step s - 1 (t per token)."""
    vae, prior = tiny(self_condition=True, dtype=torch.float64)
    seen = []
    handle = prior.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((args[0].clone(), kwargs, out.velocity.clone())),
        with_kwargs=True,
    )
    try:
        sampler(vae, prior, merge_commit=False).sample([[]], noise=noise_of(1))
    finally:
        handle.remove()
    steps = [(x, kw, v) for x, kw, v in seen if not kw.get("update_cache")]  # transport passes only
    grid = [1000.0, 1000.0 * 2 / 3, 1000.0 / 3]
    for s in range(len(steps)):
        x, kw, v = steps[s]
        if s % 3 == 0:
            assert kw.get("self_cond") is None
        else:
            prev_x, _, prev_v = steps[s - 1]
            expected = prev_x - grid[s % 3 - 1] / 1000 * prev_v  # the sampler keeps latents in fp32
            torch.testing.assert_close(kw["self_cond"], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("history", ["latents", "tokens"])
@pytest.mark.parametrize("self_condition", [False, True])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@torch.no_grad()
def test_extensions_keep_merged_equal_unmerged_and_batch_equal_alone(history, self_condition, guidance):
    vae, prior = tiny(self_condition, history, torch.float64)
    kw = dict(guidance_scale=guidance)
    merged = sampler(vae, prior, merge_commit=True, **kw).sample(PROMPTS, noise=noise_of(3))
    plain = sampler(vae, prior, merge_commit=False, **kw).sample(PROMPTS, noise=noise_of(3))
    assert merged.token_ids == plain.token_ids
    for a, b in zip(merged.block_latents, plain.block_latents):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0.0)
    alone = sampler(vae, prior, **kw).sample([PROMPTS[2]], noise=noise_of(3, rows=slice(2, 3)))
    assert alone.token_ids[0] == merged.token_ids[2]


# ----------------------------------------------------------------------------- token-embedding history


@torch.no_grad()
def test_token_history_commits_embeddings_of_prompt_and_sampled_ids():
    """Uncached reference (guidance 1, clean repaint): every step recomputes the whole sequence with
    the history = embed_history(prompt ids, then each block's sampled ids, the prompt's where pinned)."""
    vae, prior = tiny(history="tokens", dtype=torch.float64)
    prompt = [5, 6, 7, 8, 9, 10]  # one whole block + 2 pinned
    table = torch.randn(1, 6, BS, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = sampler(vae, prior).sample([prompt], noise=lambda k, s: table[:, k])
    z = vae.encode(torch.tensor([prompt])).latents[0]
    known = z[4:]
    ids = torch.tensor(prompt[:4])
    dec_in = z[:4]
    grid = torch.linspace(1000, 0, 4, dtype=torch.float64)
    for k in range(out.num_blocks):
        x = table[0, k].clone()
        for s in range(3):
            t = torch.full((BS,), float(grid[s]), dtype=torch.float64)
            if k == 0:
                x[:2], t[:2] = known, 0.0
            hist = prior.embed_history(ids)
            v = prior(torch.cat((hist, x))[None], torch.cat((torch.zeros(len(ids)), t))[None]).velocity[
                0, -BS:
            ]
            x = x - float((grid[s] - grid[s + 1]) / 1000) * v
            if k == 0:
                x[:2] = known
        # the sampler keeps latents and its grid in fp32: ~1e-5 here; a wrong history moves them by O(1)
        torch.testing.assert_close(out.block_latents[k][0], x.float(), atol=1e-4, rtol=0.0)
        dec_in = torch.cat((dec_in, x))
        block_ids = vae.decode(dec_in[None]).logits[0, -BS:].argmax(-1)
        assert torch.equal(out.block_ids[k][0], block_ids)
        if k == 0:
            block_ids = torch.cat((torch.tensor(prompt[4:]), block_ids[2:]))
        ids = torch.cat((ids, block_ids))


def test_token_history_in_training_replaces_the_clean_copy_and_trains_the_embedding():
    vae, prior = tiny(history="tokens")
    prior.train()
    model = ColaModel(vae, prior, JointConfig(mode="fixed_vae"), FlowMatchingConfig())
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids).loss.backward()
    assert prior.history_embed.weight.grad is not None and prior.history_embed.weight.grad.abs().sum() > 0
    z0 = torch.randn(2, 16, D)
    hist = prior.embed_history(ids).detach()
    batch = build_2l_batch(z0, torch.ones(2, 16, dtype=torch.bool), BS, FlowMatchingConfig(), history=hist)
    assert torch.equal(batch.x[:, :16], hist) and not torch.equal(batch.x[:, :16], z0)
    with pytest.raises(ValueError, match="history"):
        MMDiT(in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, history="tokens")
    with pytest.raises(ValueError, match="embed_history"):
        tiny()[1].embed_history(ids)


# ----------------------------------------------------------------------------- training: self-cond, mixed blocks


def test_self_conditioning_training_feeds_a_no_grad_estimate():
    vae, prior = tiny(self_condition=True)
    prior.train()
    calls = []
    handle = prior.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((args, kwargs, out.velocity, torch.is_grad_enabled())),
        with_kwargs=True,
    )
    z0, valid = torch.randn(2, 8, D), torch.ones(2, 8, dtype=torch.bool)
    try:
        for prob, n_calls in ((1.0, 2), (0.0, 1)):
            calls.clear()
            cfg = FlowMatchingConfig(self_cond_prob=prob, prompt_block_prob=0.0)
            flow_matching_loss(
                prior, z0, valid, BS, cfg, torch.Generator().manual_seed(0), self_condition=True
            )
            assert len(calls) == n_calls
    finally:
        handle.remove()
    calls.clear()
    handle = prior.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((args, kwargs, out.velocity, torch.is_grad_enabled())),
        with_kwargs=True,
    )
    cfg = FlowMatchingConfig(self_cond_prob=1.0, prompt_block_prob=0.0)
    flow = flow_matching_loss(
        prior, z0, valid, BS, cfg, torch.Generator().manual_seed(0), self_condition=True
    )
    handle.remove()
    (x, t), _, v, grad = calls[0][0][:2], calls[0][1], calls[0][2], calls[0][3]
    assert not grad and calls[1][3]
    sc = calls[1][1]["self_cond"]
    assert torch.equal(sc[:, :8], torch.zeros_like(sc[:, :8]))
    torch.testing.assert_close(sc[:, 8:], x[:, 8:] - t[:, 8:, None] / 1000 * v[:, 8:])
    flow.loss.backward()
    assert prior.embed_self_cond.weight.grad.abs().sum() > 0


def test_mixed_block_sizes_draw_per_batch_and_shape_the_layout():
    cfg = FlowMatchingConfig(block_sizes=[2, 8], block_size_probs=[0.25, 0.75])
    gen = torch.Generator().manual_seed(0)
    draws = [draw_block_size(cfg, 4, gen) for _ in range(400)]
    assert set(draws) == {2, 8} and 0.15 < draws.count(2) / 400 < 0.35
    assert draw_block_size(FlowMatchingConfig(), 4, gen) == 4  # off: the prior's block size
    prior = MMDiT(in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, block_size=4)
    z0, valid = torch.randn(1, 16, D), torch.ones(1, 16, dtype=torch.bool)
    only2 = FlowMatchingConfig(block_sizes=[2], block_size_probs=[1.0], prompt_block_prob=0.0)
    flow = flow_matching_loss(prior, z0, valid, 4, only2)
    expected = build_2l_batch(z0, valid, 2, only2).attn_mask.dense()
    assert torch.equal(flow.batch.attn_mask.dense(), expected)
    assert not torch.equal(expected, build_2l_batch(z0, valid, 4, only2).attn_mask.dense())
    for bad in (dict(block_sizes=[2]), dict(block_sizes=[2, 4], block_size_probs=[0.5, 0.6]),
                dict(block_sizes=[0], block_size_probs=[1.0])):  # fmt: skip
        with pytest.raises(ValueError, match="block_size"):
            FlowMatchingConfig(**bad)


@torch.no_grad()
def test_project_latents_puts_every_generated_block_on_the_encoder_sphere():
    vae, prior = tiny()
    out = sampler(vae, prior, project_latents=True).sample(PROMPTS, noise=noise_of(3))
    plain = sampler(vae, prior).sample(PROMPTS, noise=noise_of(3))
    for x, y in zip(out.block_latents, plain.block_latents):
        torch.testing.assert_close(vae.project_latents(x), x, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(x, y, atol=1e-3)  # random weights: the raw blocks are off the sphere
