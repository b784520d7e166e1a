"""The block-wise KV-cached sampler: equivalence with an uncached loop, batching, strategies, errors."""

import copy
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from modalities.text import TextModality
from prior.models.mmdit import MMDiT
from prior.sampling.block_sampler import BlockSampler
from prior.sampling.config import FIRST_BLOCK_STRATEGIES, RELEASED_LOOP, GenerationConfig
from prior.sampling.tokens import apply_repetition_penalty, sample_tokens
from unimodal.text_vae import TextVAE

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, D, BS, PAD, EOS = 40, 4, 4, 1, 0


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Break the init's symmetries (LayerNorm 1/0, zero biases) so no path is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))


def tiny_models(patch_size: int = 1, vae_block: int = 2, prior_block: int = BS, max_seq_len: int = 64):
    torch.manual_seed(0)
    vae = TextVAE(
        vocab_size=VOCAB, dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1, decoder_num_blocks=2,
        latent_dim=D, patch_size=patch_size, block_size=vae_block, max_seq_len=max_seq_len,
    ).eval()  # fmt: skip
    prior = MMDiT(
        in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=2, block_size=prior_block,
        adaln_zero_init=False,
    ).eval()  # fmt: skip
    perturb(vae, 1)
    perturb(prior, 2, 0.1)
    return vae, prior


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def make_sampler(models, **overrides) -> BlockSampler:
    vae, prior = models
    values = dict(num_inference_steps=3, guidance_scale=3.0, max_new_tokens=8, pad_token_id=PAD)
    text = TextModality(vae, None, prior.config.block_size)  # ids only: no tokenizer
    return BlockSampler(
        text, prior, FlowMatchEulerDiscreteScheduler(), GenerationConfig(**{**values, **overrides})
    )


def noise_table(batch: int, blocks: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, blocks, BS, D, generator=torch.Generator().manual_seed(seed))  # (B, K, bs, d)


def prompts_of(lengths, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in lengths]


# ----------------------------------------------------------------------------- scheduler and sampling helpers


@pytest.mark.parametrize("k", [1, 3, 16])
def test_grid_is_released_uniform_grid_and_step_is_euler(k):
    scheduler = FlowMatchEulerDiscreteScheduler()
    BlockSampler.set_grid(scheduler, GenerationConfig(num_inference_steps=k))
    grid = torch.linspace(1000, 0, k + 1)
    assert torch.equal(scheduler.timesteps, grid[:-1])
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    for s, t in enumerate(scheduler.timesteps):
        dt = float((grid[s] - grid[s + 1]) / 1000)
        expected = x - torch.tensor(dt, dtype=torch.float32) * v  # the released update
        x_next = scheduler.step(v, t, x).prev_sample
        assert torch.equal(x_next, expected)
        x = x_next


def test_shifted_grid_is_sd3_warp():
    scheduler = FlowMatchEulerDiscreteScheduler()
    BlockSampler.set_grid(scheduler, GenerationConfig(num_inference_steps=4, shift=3.0))
    s = torch.linspace(1, 0, 5)[:-1]
    torch.testing.assert_close(scheduler.sigmas[:-1], 3 * s / (1 + 2 * s))
    assert scheduler.sigmas[-1] == 0


def test_repetition_penalty_semantics():
    logits = torch.tensor([[[2.0, -2.0, 1.0], [-1.0, 4.0, 0.5]]])  # (1, 2, 3)
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[[1.0, -4.0, 1.0], [-2.0, 2.0, 0.5]]]))
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_sample_tokens_limits():
    logits = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sample_tokens(logits, 0.0), greedy)
    assert torch.equal(sample_tokens(logits, 1.0, top_k=1, generator=gen), greedy)
    assert torch.equal(sample_tokens(logits, 1.0, top_p=1e-6, generator=gen), greedy)
    top3 = logits.topk(3, dim=-1).indices
    drawn = sample_tokens(logits, 2.0, top_k=3, generator=gen)
    assert (drawn[..., None] == top3).any(-1).all()


# ----------------------------------------------------------------------------- cached == uncached


def uncached_reference(vae, prior, prompt, cfg: GenerationConfig, noise: torch.Tensor, num_blocks: int):
    """Clean repaint recomputing the whole sequence at every step (no cache, CFG in two calls)."""
    k_steps, w_cfg = cfg.num_inference_steps, cfg.guidance_scale
    grid = torch.linspace(1000, 0, k_steps + 1)
    n = len(prompt)
    start, r = (n // BS) * BS, n % BS
    z = vae.encode(torch.tensor([prompt])).latents[0] if n else torch.zeros(0, D)
    seq, known = z[:start], z[start:]
    seen, latents, ids = set(), [], []
    for k in range(num_blocks):
        x = noise[k].clone()
        w = 1.0 if k == 0 and start == 0 else w_cfg
        for s in range(k_steps):
            t = torch.full((BS,), float(grid[s]))
            if k == 0 and r:
                x[:r], t[:r] = known, 0.0
            full_t = torch.cat((torch.zeros(len(seq)), t))
            v_c = prior(torch.cat((seq, x))[None], full_t[None]).velocity[0, -BS:]
            v_u = prior(x[None], t[None]).velocity[0]
            x = x - float((grid[s] - grid[s + 1]) / 1000) * (w * (v_c - v_u) + v_u)
            if k == 0 and r:
                x[:r] = known
        seq = torch.cat((seq, x))
        logits = vae.decode(seq[None]).logits[0, -BS:]  # (bs, V)
        for token in seen:
            col = logits[:, token]
            logits[:, token] = torch.where(
                col < 0, col * cfg.repetition_penalty, col / cfg.repetition_penalty
            )
        block_ids = logits.argmax(-1)
        seen.update(block_ids.tolist())
        latents.append(x)
        ids.append(block_ids)
    return latents, ids


@pytest.mark.parametrize("length", [0, 3, 4, 6])
@torch.no_grad()
def test_cached_sampling_equals_uncached(models, length):
    vae, prior = models
    sampler = make_sampler(models, repetition_penalty=1.3, stop_on_eos=False, max_new_tokens=9)
    prompt = prompts_of([length])[0]
    noise = noise_table(1, 4)
    out = sampler.sample([prompt], noise=lambda k, shape: noise[:, k])
    ref_latents, ref_ids = uncached_reference(vae, prior, prompt, sampler.config, noise[0], out.num_blocks)
    for k in range(out.num_blocks):
        torch.testing.assert_close(out.block_latents[k][0], ref_latents[k], atol=1e-5, rtol=1e-5)
        assert torch.equal(out.block_ids[k][0], ref_ids[k])
    trim = length % BS
    assert out.token_ids[0] == torch.cat(ref_ids).tolist()[trim : trim + 9]


@torch.no_grad()
def test_batch_of_different_lengths_equals_each_prompt_alone(models):
    lengths = [0, 3, 5, 8, 10]
    prompts = prompts_of(lengths)
    noise = noise_table(len(prompts), 4)
    sampler = make_sampler(models, repetition_penalty=1.2, max_new_tokens=7, stop_token_ids=[EOS])
    batched = sampler.sample(prompts, noise=lambda k, shape: noise[:, k])
    for i, prompt in enumerate(prompts):
        alone = sampler.sample([prompt], noise=lambda k, shape, i=i: noise[i : i + 1, k])
        assert batched.token_ids[i] == alone.token_ids[0]
        for k in range(alone.num_blocks):
            torch.testing.assert_close(
                batched.block_latents[k][i], alone.block_latents[k][0], atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("merge", [True, False])
@torch.no_grad()
def test_prior_calls_per_block(models, merge):
    """K passes per block with merged commits; K + 1 and a prefill pass without."""
    vae, prior = models
    calls = []
    handle = prior.register_forward_hook(lambda *args: calls.append(1))
    try:
        sampler = make_sampler(
            models, num_inference_steps=5, max_new_tokens=12, stop_on_eos=False, merge_commit=merge
        )
        out = sampler.sample(prompts_of([6, 9]), generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert out.num_blocks == 4  # trim 2 and 1 -> 12 new tokens need 4 blocks of 4
    expected = out.num_blocks * 5 if merge else 1 + out.num_blocks * (5 + 1)
    assert out.num_prior_calls == len(calls) == expected
    assert [len(t) for t in out.token_ids] == [12, 12]


@pytest.fixture(scope="module")
def models64(models):
    return tuple(copy.deepcopy(m).double() for m in models)


@pytest.mark.parametrize("strategy", FIRST_BLOCK_STRATEGIES)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@torch.no_grad()
def test_merged_commit_equals_the_unmerged_loop(models, models64, strategy, guidance):
    """Same noise -> identical tokens and latents, for a ragged batch (an empty prompt, one inside
    the first block, one past a block boundary) and every first-block strategy: bit for bit with
    fp64 weights (the merge is exact), within float rounding in fp32 (GEMMs of other shapes sum in
    another order: <= 5e-6 without guidance, <= 2e-5 at w = 3, which amplifies differences)."""
    prompts = prompts_of([0, 3, 6, 9])
    table = noise_table(4, 5)
    kw = dict(first_block=strategy, guidance_scale=guidance, max_new_tokens=12, stop_on_eos=False)
    for weights, atol in ((models64, 0.0), (models, 5e-6 if guidance == 1 else 2e-5)):
        merged = make_sampler(weights, merge_commit=True, **kw).sample(
            prompts, noise=lambda k, s: table[:, k]
        )
        plain = make_sampler(weights, merge_commit=False, **kw).sample(
            prompts, noise=lambda k, s: table[:, k]
        )
        assert merged.token_ids == plain.token_ids and merged.num_blocks == plain.num_blocks
        for a, b in zip(merged.block_latents, plain.block_latents):
            torch.testing.assert_close(a, b, atol=atol, rtol=0.0)
        assert (
            merged.num_prior_calls == plain.num_prior_calls - plain.num_blocks - 1
        )  # commits + prefill gone


# ----------------------------------------------------------------------------- strategies and edge cases


@pytest.mark.parametrize("strategy", FIRST_BLOCK_STRATEGIES)
@torch.no_grad()
def test_every_first_block_strategy_runs(models, strategy):
    vae, _ = models
    prompts = prompts_of([5, 2, 8])
    sampler = make_sampler(models, first_block=strategy, repaint_fraction=0.5, stop_on_eos=False)
    out = sampler.sample(prompts, generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in out.token_ids] == [8, 8, 8]
    assert all(0 <= t < VOCAB for row in out.token_ids for t in row)
    if strategy in ("left_pad", "right_pad"):
        assert out.trim == [0, 0, 0]
    else:
        assert out.trim == [1, 2, 0]
    if strategy == "clean_repaint":  # known latents are held at their clean values
        known = vae.encode(torch.tensor([prompts[0]])).latents[0, 4:5]
        assert torch.allclose(out.block_latents[0][0, :1], known, atol=1e-6)


@torch.no_grad()
def test_patch_size_two_with_odd_prompts():
    models2 = tiny_models(patch_size=2, vae_block=2, prior_block=2)
    sampler = make_sampler(models2, stop_on_eos=False, max_new_tokens=6)
    out = sampler.sample(prompts_of([3, 4, 7]), generator=torch.Generator().manual_seed(0))
    assert out.trim == [3, 0, 3]  # block = 2 latents = 4 tokens
    assert [len(t) for t in out.token_ids] == [6, 6, 6]
    # shift: the pads go before the odd prompt, so it ends on a patch boundary (pads trimmed too)
    shifted = make_sampler(models2, stop_on_eos=False, max_new_tokens=6, patch_boundary="shift")
    rows = shifted.layout(prompts_of([3, 4, 7]))
    pad = shifted.config.pad_token_id
    assert [r.encode_ids[0] == pad for r in rows] == [True, False, True]
    assert [(r.prefix, r.pinned, r.trim) for r in rows] == [(2, 0, 0), (2, 0, 0), (4, 0, 0)]
    out = shifted.sample(prompts_of([3, 4, 7]), generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in out.token_ids] == [6, 6, 6]
    assert (
        out.token_ids[1]
        == sampler.sample(prompts_of([3, 4, 7]), generator=torch.Generator().manual_seed(0)).token_ids[1]
    )


@torch.no_grad()
def test_empty_prompt_is_unconditional_generation(models):
    noise = noise_table(1, 3)
    outs = [
        make_sampler(models, guidance_scale=w, stop_on_eos=False).sample([[]], noise=lambda k, s: noise[:, k])
        for w in (1.0, 7.0)
    ]
    for out in outs:
        assert len(out.token_ids[0]) == 8
        assert out.num_prior_calls == out.num_blocks * 3  # no prefill; commits merged into the next block
    # guidance is off in the first block of an empty prefix, on afterwards
    assert torch.equal(outs[0].block_latents[0], outs[1].block_latents[0])
    assert not torch.allclose(outs[0].block_latents[1], outs[1].block_latents[1])


@torch.no_grad()
def test_stop_on_eos_is_sticky_and_cuts_output(models):
    sampler = make_sampler(models, stop_on_eos=True, max_new_tokens=16)
    prompts = prompts_of([3, 6])
    free = make_sampler(models, stop_on_eos=False, max_new_tokens=16)
    noise = noise_table(2, 5)
    ref = free.sample(prompts, noise=lambda k, s: noise[:, k])
    first = ref.token_ids[0][0]  # make sample 0 stop on its first generated token
    sampler.config.stop_token_ids = [first]
    out = sampler.sample(prompts, noise=lambda k, s: noise[:, k])
    assert out.token_ids[0] == [first]
    assert out.finished[0]
    row1 = ref.token_ids[1]
    expected = row1[: row1.index(first) + 1] if first in row1 else row1
    assert out.token_ids[1] == expected


@torch.no_grad()
def test_streaming_yields_the_same_tokens(models):
    sampler = make_sampler(models, temperature=1.0, top_k=10, top_p=0.9, max_new_tokens=9, stop_on_eos=False)
    prompts = prompts_of([2, 7])
    full = sampler.sample(prompts, generator=torch.Generator().manual_seed(5))
    streamed = [[], []]
    chunks = list(sampler.stream(prompts, generator=torch.Generator().manual_seed(5)))
    for chunk in chunks:
        for acc, new in zip(streamed, chunk.token_ids):
            acc.extend(new)
    assert streamed == full.token_ids
    assert len(chunks) == full.num_blocks


@torch.no_grad()
def test_released_loop_generates_whole_blocks_and_keeps_tokens_after_eos(models):
    sampler = make_sampler(models, **RELEASED_LOOP, max_new_tokens=6, repetition_penalty=1.1)
    out = sampler.sample(prompts_of([3, 4]), generator=torch.Generator().manual_seed(0))
    assert out.num_blocks == 2  # stops once k * bs >= max_new_tokens
    assert [len(t) for t in out.token_ids] == [2 * BS - 3, 2 * BS]


@torch.no_grad()
def test_step_callback_can_replace_latents(models):
    seen = []

    def callback(state):
        seen.append((state.block, state.step))
        return torch.zeros_like(state.latents)

    out = make_sampler(models, stop_on_eos=False).sample(
        [[5, 6]], generator=torch.Generator(), step_callback=callback
    )
    assert seen[:3] == [(0, 0), (0, 1), (0, 2)]
    assert all(torch.equal(x, torch.zeros_like(x)) for x in out.block_latents)


def test_bad_inputs_raise(models):
    with pytest.raises(ValueError, match="num_inference_steps"):
        GenerationConfig(num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        GenerationConfig(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="first_block"):
        GenerationConfig(first_block="middle_pad")
    with pytest.raises(ValueError, match="shift"):
        GenerationConfig(shift=0.0)
    with pytest.raises(ValueError, match="whole_blocks"):
        GenerationConfig(stop_rule="released", whole_blocks=False)
    with pytest.raises(ValueError, match="unknown generation setting 'released_compat'"):
        GenerationConfig().replace(released_compat=True)
    sampler = make_sampler(models)
    with pytest.raises(ValueError, match="too long"):
        sampler.sample([[3] * 64])
    with pytest.raises(ValueError, match="vocabulary"):
        sampler.sample([[3, VOCAB]])
    with pytest.raises(ValueError, match="pad_token_id"):
        make_sampler(models, pad_token_id=None, first_block="right_pad").sample([[3, 4, 5]])
    with pytest.raises(ValueError, match="noise"):
        sampler.sample([[3]], noise=[torch.zeros(3, 3)])


@torch.no_grad()
def test_guidance_interval_and_noise_scale(models):
    prompts, noise = prompts_of([5, 2]), noise_table(2, 3)
    base = dict(stop_on_eos=False, max_new_tokens=8, guidance_scale=3.0)

    def run(**overrides):
        return make_sampler(models, **{**base, **overrides}).sample(prompts, noise=lambda k, s: noise[:, k])

    plain, everywhere = run(), run(guidance_interval=[0.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(plain.block_latents, everywhere.block_latents))
    nowhere, unguided = run(guidance_interval=[0.0, 0.0]), run(guidance_scale=1.0)
    assert all(torch.equal(a, b) for a, b in zip(nowhere.block_latents, unguided.block_latents))
    assert nowhere.num_prior_calls == unguided.num_prior_calls  # no unconditional half at all
    scaled = run(noise_scale=2.0)
    doubled = make_sampler(models, **base).sample(prompts, noise=lambda k, s: 2 * noise[:, k])
    assert all(torch.equal(a, b) for a, b in zip(scaled.block_latents, doubled.block_latents))
    with pytest.raises(ValueError, match="guidance_interval"):
        GenerationConfig(guidance_interval=[0.8, 0.2])


def test_per_row_generators_make_each_row_independent_of_the_batch():
    """A list of generators (diffusers' convention): row i's noise and sampled tokens come from
    generator i, so a row's output is the same alone or next to any other prompt."""
    from helpers import tiny_pipeline

    from prior.sampling.block_sampler import BlockSampler
    from prior.sampling.config import GenerationConfig

    pipe = tiny_pipeline(["the cat sat on the mat", "a dog ran in the park"], perturb_scale=0.05)
    config = GenerationConfig(
        num_inference_steps=3, max_new_tokens=8, temperature=0.9, top_p=0.95, stop_on_eos=False
    )
    sampler = BlockSampler(pipe.text_modality, pipe.prior, pipe.scheduler, config.replace(stop_token_ids=[]))
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    batch = sampler.sample(prompts, generator=gens(1, 2))
    alone = [sampler.sample([p], generator=gens(s)) for p, s in zip(prompts, (1, 2))]
    assert batch.token_ids == [a.token_ids[0] for a in alone]
    swapped = sampler.sample(prompts[::-1], generator=gens(2, 1))
    assert swapped.token_ids == batch.token_ids[::-1]
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        sampler.sample(prompts, generator=gens(1))
