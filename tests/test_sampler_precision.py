"""bf16 autocast sampling (``GenerationConfig.autocast``): what runs in bf16, what stays fp32."""

import pytest
import torch

from prior.models.mmdit import MMDiT
from prior.sampling.config import GenerationConfig
from tests.test_sampler import BS, D, make_sampler, noise_table, prompts_of, tiny_models


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def _run(models, **overrides):
    noise = noise_table(2, 4)
    sampler = make_sampler(models, max_new_tokens=3 * BS, **overrides)
    return sampler.sample(prompts_of([BS, BS + 2]), noise=lambda k, shape: noise[:, k])


def test_autocast_stays_close_to_fp32_and_leaves_the_weights_alone(models):
    vae, prior = models
    before = [p.detach().clone() for p in prior.parameters()]
    ref, low = _run(models), _run(models, autocast="bfloat16")
    assert all(p.dtype == torch.float32 for p in prior.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, prior.parameters()))
    assert low.num_prior_calls == ref.num_prior_calls
    for a, b in zip(ref.block_latents, low.block_latents):
        assert b.dtype == torch.float32
        rel = ((a - b).norm() / a.norm()).item()
        assert 0 < rel < 0.05, rel  # bf16 matmuls really ran, and only rounded the result (~1-3% here)
    assert not torch.is_autocast_enabled("cpu")  # the region never leaks out of the sampler


def test_autocast_region_casts_the_prior_matmuls_only(models):
    """Inside a block the prior's Linear layers see bf16 autocast; the VAE decoder does not."""
    vae, prior = models
    seen = {"prior": set(), "decoder": set()}
    hooks = [
        prior.blocks[0].streams["text"].qkv.register_forward_hook(lambda m, a, o: seen["prior"].add(o.dtype)),
        vae.decoder.register_forward_hook(
            lambda m, a, o: seen["decoder"].add(torch.is_autocast_enabled("cpu"))
        ),
    ]
    try:
        _run(models, autocast="bfloat16")
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"prior": {torch.bfloat16}, "decoder": {False}}


def test_categorical_clean_estimate_stays_fp32_under_autocast():
    torch.manual_seed(0)
    prior = MMDiT(
        in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, block_size=BS,
        adaln_zero_init=False, prediction="categorical", vocab_size=11,
    ).eval()  # fmt: skip
    prior.set_token_latents(torch.randn(11, D))
    z, t = torch.randn(2, BS, D), torch.tensor([300.0, 700.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = prior(z, t)
    x0 = out.logits.float().softmax(-1) @ prior.token_latents  # fp32 reference from the same logits
    expected = (z - x0) / (t[:, None, None] / 1000.0)
    torch.testing.assert_close(out.velocity.float(), expected, rtol=1e-5, atol=1e-5)


def test_bad_autocast_dtype_raises():
    with pytest.raises(ValueError, match="autocast"):
        GenerationConfig(autocast="float16")
