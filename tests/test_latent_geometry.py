"""Latent-geometry tools: the windowed decoder (how much history it reads) and the linear token probe."""

from types import SimpleNamespace

import pytest
import torch

from prior.eval.vae import token_probe
from unimodal.kv_cache import KVCache
from unimodal.masks import block_causal_mask, windowed
from unimodal.text_vae import TextVAE


def test_windowed_mask_matches_its_drawing():
    pos = torch.arange(5)[None]
    dense = windowed(block_causal_mask(pos, pos, 1), pos, pos, 2).dense()[0, 0].int()
    drawn = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    )
    assert torch.equal(dense, drawn)
    with pytest.raises(ValueError, match="window"):
        windowed(block_causal_mask(pos, pos, 1), pos, pos, 0)


@torch.no_grad()
def test_decoder_window_limits_what_a_token_reads_and_streams_the_same():
    """Window 1, one decoder layer, block 2: a token reads only its own block's latents; the cached
    block-by-block decode equals one pass."""
    torch.manual_seed(0)
    vae = TextVAE(vocab_size=30, dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1, decoder_num_blocks=1,
                  latent_dim=4, block_size=2, decoder_window=1).eval()  # fmt: skip
    z = torch.randn(1, 6, 4)
    moved = z.clone()
    moved[0, 0] += 3.0
    change = (vae.decode(z).logits - vae.decode(moved).logits).abs().amax(-1)[0]  # (6,)
    assert change[:2].min() > 0 and change[2:].max() == 0
    cache = KVCache(1)
    parts = [vae.decode(z[:, i : i + 2], kv_cache=cache, update_cache=True).logits for i in (0, 2, 4)]
    torch.testing.assert_close(torch.cat(parts, 1), vae.decode(z).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="decoder_window"):
        TextVAE(vocab_size=30, dim=32, ffn_dim=64, num_heads=2, latent_dim=4, decoder_window=-1)


class _TableVAE:
    """A stand-in encoder whose latent j is a fixed vector of token j + shift (the probe's contract)."""

    def __init__(self, vocab: int, shift: int) -> None:
        self.config = SimpleNamespace(patch_size=1, vocab_size=vocab)
        self.table, self.shift = torch.eye(vocab), shift

    def eval(self):
        return self

    def encode(self, ids):
        src = ids.roll(-self.shift, dims=1) if self.shift else ids
        return SimpleNamespace(latents=self.table[src])


def test_token_probe_reads_what_a_latent_carries():
    gen = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, 12, (64, 16), generator=gen), torch.randint(0, 12, (16, 16), generator=gen)
    own = token_probe(_TableVAE(12, 0), train, val)
    assert own.accuracy[0] == 1.0 and own.accuracy[-1] < 0.3 and own.majority < 0.2
    previous = token_probe(_TableVAE(12, -1), train, val)  # latent j names token j - 1
    assert previous.accuracy[-1] == 1.0 and previous.accuracy[0] < 0.3
    with pytest.raises(ValueError, match="patch_size"):
        token_probe(SimpleNamespace(config=SimpleNamespace(patch_size=2)), train, val)


@pytest.mark.parametrize("posterior", ["logsnr", "diagonal"])
@torch.no_grad()
def test_project_latents_is_identity_on_encoder_outputs_and_idempotent(posterior):
    torch.manual_seed(0)
    vae = TextVAE(vocab_size=30, dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1, decoder_num_blocks=1,
                  latent_dim=8, posterior=posterior, scaling_factor=1.7, shifting_factor=0.2).eval()  # fmt: skip
    with torch.no_grad():  # pre-LN outputs well above LN's eps, as in a trained encoder
        for param in vae.encoder.parameters():
            param.add_(0.3 * torch.randn(param.shape))
    z = vae.encode(torch.randint(0, 30, (2, 12))).latents
    torch.testing.assert_close(vae.project_latents(z), z, atol=1e-4, rtol=1e-4)
    x = torch.randn(2, 12, 8) * 3
    once = vae.project_latents(x)
    torch.testing.assert_close(vae.project_latents(once), once, atol=1e-5, rtol=1e-5)
    raw = once / 1.7 + 0.2  # un-normalised: zero channel mean, RMS alpha
    alpha = torch.sigmoid(vae.logsnr).sqrt() if posterior == "logsnr" else torch.tensor(1.0)
    torch.testing.assert_close(raw.mean(-1), torch.zeros(2, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw.square().mean(-1).sqrt(), alpha.expand(2, 12), atol=1e-5, rtol=1e-5)
