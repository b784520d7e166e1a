"""The categorical parameterisation of the prior (an extension, CDCD-style) and the token-local encoder."""

import pytest
import torch
from helpers import perturb

from prior.models.mmdit import MMDiT
from prior.training.flow_matching import FlowMatchingConfig
from prior.training.joint import ColaModel, JointConfig
from prior.training.recipes import token_latent_table
from unimodal.text_vae import TextVAE

VOCAB, D = 30, 4


def tiny_vae(**overrides) -> TextVAE:
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1, decoder_num_blocks=1,
                  latent_dim=D, block_size=2, max_seq_len=64, encoder_context="token")  # fmt: skip
    vae = TextVAE(**{**values, **overrides}).eval()
    perturb(vae, 3, 0.1)  # break the init's near-identity so context would show
    return vae


def tiny_prior() -> MMDiT:
    torch.manual_seed(1)
    return MMDiT(in_channels=[D], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, block_size=4,
                 adaln_zero_init=False, prediction="categorical", vocab_size=VOCAB)  # fmt: skip


def test_token_local_encoder_gives_one_latent_per_token():
    vae = tiny_vae()
    ids = torch.tensor([[5, 7, 9, 7], [1, 2, 3, 7]])
    z = vae.encode(ids).latents  # (2, 4, d)
    torch.testing.assert_close(z[0, 1], z[0, 3])  # token 7 in two contexts
    torch.testing.assert_close(z[0, 1], z[1, 3])
    table = token_latent_table(vae)
    torch.testing.assert_close(table[ids], z)
    contextual = tiny_vae(encoder_context="block").encode(ids).latents
    assert (contextual[0, 1] - contextual[1, 3]).abs().max() > 1e-4  # the released encoder sees context
    with pytest.raises(ValueError, match="encoder_context"):
        tiny_vae(encoder_context="doc")


@torch.no_grad()
def test_velocity_follows_from_the_clean_estimate():
    prior = tiny_prior()
    table = torch.randn(VOCAB, D)
    prior.set_token_latents(table)
    x, t = torch.randn(2, 8, D), torch.full((2, 8), 250.0)
    out = prior(x, t)
    x0 = out.logits.softmax(-1) @ table  # (B, L, d)
    torch.testing.assert_close(out.velocity, (x - x0) / 0.25)
    assert out.logits.shape == (2, 8, VOCAB)
    assert torch.equal(prior(x, 0.0).velocity, torch.zeros_like(x))  # clean tokens: no velocity
    with pytest.raises(ValueError, match="token latents"):
        prior.set_token_latents(torch.zeros(VOCAB, D + 1))
    with pytest.raises(ValueError, match="categorical"):
        MMDiT(
            in_channels=[D],
            width=32,
            heads=2,
            head_dim=16,
            rope_dim=8,
            num_layers=1,
            prediction="categorical",
        )


def test_trains_by_token_cross_entropy():
    vae, prior = tiny_vae(), tiny_prior()
    prior.set_token_latents(token_latent_table(vae))
    model = ColaModel(vae, prior, JointConfig(mode="fixed_vae"), FlowMatchingConfig(prompt_block_prob=0.0))
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        out = model(ids, step=step, generator=torch.Generator().manual_seed(step))
        assert (
            torch.equal(out.loss, out.logs["flow/ce"])
            or abs(out.loss.item() - out.logs["flow/ce"].item()) < 1e-6
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), rel=0.2)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert all(p.grad is None for p in vae.parameters())  # the VAE is fixed
