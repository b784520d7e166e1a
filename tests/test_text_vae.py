"""Property and equivalence tests of the Text VAE (tiny random configs, CPU, fp32)."""

import os

import pytest
import torch

from prior.checkpoints.released_format import vae_from_released_config
from unimodal.config import load_config, schema_from_signature
from unimodal.text_vae import TextVAE, TextVAEEncoderOutput

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(
    vocab_size=40,
    dim=32,
    ffn_dim=64,
    num_heads=2,
    encoder_num_blocks=2,
    decoder_num_blocks=2,
    latent_dim=4,
    max_seq_len=64,
)
GRID = [(p, bs) for p in (1, 2) for bs in (1, 4)]


def tiny_vae(**overrides) -> TextVAE:
    torch.manual_seed(0)
    vae = TextVAE(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # break the LayerNorm 1/0 and zero-bias symmetry of the init
        for param in vae.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return vae


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def random_latents(batch: int, n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, n, TINY["latent_dim"], generator=torch.Generator().manual_seed(seed))


def assert_same(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().amax().item() if a.numel() else 0.0
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("p, bs", GRID)
@torch.no_grad()
def test_encoder_appending_tokens_keeps_complete_blocks(p, bs):
    vae = tiny_vae(patch_size=p, block_size=bs)
    ids = random_ids(2, 8 * p)
    full = vae.encode(ids).mean  # (B, 8, d)
    changed_partial = False
    for cut in range(p, 8 * p, p):
        n = cut // p
        complete = n // bs * bs  # latents in complete blocks (all of them when bs = 1)
        prefix = vae.encode(ids[:, :cut]).mean
        assert_same(prefix[:, :complete], full[:, :complete])
        if complete < n:  # a partial block sees the tokens appended to it (bidirectional in-block)
            changed_partial |= (prefix[:, complete:] - full[:, complete:n]).abs().max().item() > 1e-4
    assert changed_partial == (bs > 1)


@pytest.mark.parametrize("p, bs", GRID)
@torch.no_grad()
def test_decoder_appending_latents_keeps_earlier_logits(p, bs):
    vae = tiny_vae(patch_size=p, block_size=bs)
    z = random_latents(2, 8)
    full = vae.decode(z).logits  # (B, 8p, V)
    assert full.shape == (2, 8 * p, TINY["vocab_size"])
    for n in range(1, 8):
        complete = n // bs * bs
        assert_same(vae.decode(z[:, :n]).logits[:, : complete * p], full[:, : complete * p])


@pytest.mark.parametrize("p, bs", GRID)
@torch.no_grad()
def test_padding_is_invisible(p, bs):
    """A ragged padded batch gives each sample exactly what it gets alone."""
    vae = tiny_vae(patch_size=p, block_size=bs)
    ids, lengths = random_ids(3, 8 * p), [8 * p, 3 * p, 5 * p]
    valid = torch.arange(8 * p)[None, :] < torch.tensor(lengths)[:, None]
    enc = vae.encode(ids, valid)
    logits = vae.decode(enc.latents, enc.valid).logits
    for i, length in enumerate(lengths):
        alone = vae.encode(ids[i : i + 1, :length])
        assert_same(enc.mean[i, : length // p], alone.mean[0])
        assert_same(logits[i, :length], vae.decode(alone.latents).logits[0])


@pytest.mark.parametrize("p, bs", GRID)
@torch.no_grad()
def test_cached_blockwise_decoder_equals_uncached(p, bs):
    """Prefill ragged prefixes (one empty), then decode block by block through the KV cache."""
    vae = tiny_vae(patch_size=p, block_size=bs)
    prefix_lens, num_blocks = [bs, 0, 2 * bs], 3
    totals = [n + num_blocks * bs for n in prefix_lens]
    z = random_latents(3, max(totals))
    full_valid = torch.arange(max(totals))[None, :] < torch.tensor(totals)[:, None]
    full = vae.decode(z, full_valid).logits  # (B, T*p, V)

    cache = vae.new_kv_cache()
    prefix_valid = torch.arange(max(prefix_lens))[None, :] < torch.tensor(prefix_lens)[:, None]
    prefill = vae.decode(z[:, : max(prefix_lens)], prefix_valid, kv_cache=cache, update_cache=True).logits
    for i, n in enumerate(prefix_lens):
        assert_same(prefill[i, : n * p], full[i, : n * p], atol=1e-5)
    for k in range(num_blocks):
        block = torch.stack(
            [z[i, n + k * bs : n + (k + 1) * bs] for i, n in enumerate(prefix_lens)]
        )  # (B, bs, d)
        seq_len = cache.seq_len
        peek = vae.decode(block, kv_cache=cache).logits  # read-only: the cache must not move
        assert cache.seq_len == seq_len
        logits = vae.decode(block, kv_cache=cache, update_cache=True).logits  # (B, bs*p, V)
        assert_same(peek, logits, atol=0.0)
        for i, n in enumerate(prefix_lens):
            start = (n + k * bs) * p
            assert_same(logits[i], full[i, start : start + bs * p], atol=1e-5)
    assert cache.lengths().tolist() == totals


@torch.no_grad()
def test_eager_and_sdpa_agree():
    vae = tiny_vae(patch_size=2, block_size=2)
    ids = random_ids(3, 12)
    valid = torch.arange(12)[None, :] < torch.tensor([12, 7, 4])[:, None]
    outs = {}
    for backend in ("eager", "sdpa"):
        vae.set_attn_backend(backend)
        enc = vae.encode(ids, valid)
        outs[backend] = (enc.mean, enc.logvar, vae.decode(enc.latents, enc.valid).logits)
    for a, b in zip(outs["eager"], outs["sdpa"]):
        assert_same(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- posterior


@torch.no_grad()
def test_logsnr_posterior_closed_form_and_monte_carlo_kl():
    vae = tiny_vae(posterior="logsnr", logsnr_init=1.3)
    assert vae.encoder.final_layer.out_features == TINY["latent_dim"]
    enc = vae.encode(random_ids(1, 6))
    lam = vae.logsnr.detach()  # logsnr_init, moved by tiny_vae's perturbation
    alpha2, sigma2 = torch.sigmoid(lam), torch.sigmoid(-lam)
    mu = enc.mean / alpha2.sqrt()
    assert_same(mu.mean(dim=-1), torch.zeros(1, 6))  # non-affine LN: zero mean, unit second moment
    assert_same(mu.square().mean(dim=-1), torch.ones(1, 6), atol=0.05)  # (var / (var + eps) <= 1)
    assert_same(enc.logvar.exp(), sigma2.expand_as(enc.mean))
    closed = 0.5 * (alpha2 * mu.square() + sigma2 - 1 - sigma2.log()).sum(dim=-1)  # (1, 6)
    assert_same(vae.kl(enc), closed, atol=1e-6)

    # Monte Carlo: E_q[log q(z) - log N(z; 0, I)] with z = alpha * mu + sigma * eps
    draws = 40000
    many = TextVAEEncoderOutput(
        mean=enc.mean.expand(draws, -1, -1),
        logvar=enc.logvar.expand(draws, -1, -1),
        latents=enc.latents,
        valid=enc.valid,
    )
    z = vae.sample(many, torch.Generator().manual_seed(0), normalize=False)  # (draws, 6, d)
    log_q = -0.5 * ((z - enc.mean).square() / sigma2 + sigma2.log()).sum(dim=-1)
    log_p = -0.5 * z.square().sum(dim=-1)
    mc = (log_q - log_p).mean(dim=0)  # (6,)
    assert torch.allclose(mc, closed[0], rtol=0.03, atol=0.02), (mc, closed[0])


@torch.no_grad()
def test_diagonal_posterior_sample_statistics_and_normalization():
    vae = tiny_vae(scaling_factor=2.0, shifting_factor=0.5)
    enc = vae.encode(random_ids(1, 4))
    assert_same(enc.latents, (enc.mean - 0.5) * 2.0)
    assert enc.logvar.min() >= -30 and enc.logvar.max() <= 20
    draws = 20000
    many = TextVAEEncoderOutput(
        enc.mean.expand(draws, -1, -1), enc.logvar.expand(draws, -1, -1), enc.latents, enc.valid
    )
    z = vae.sample(many, torch.Generator().manual_seed(0), normalize=False)
    assert_same(z.mean(dim=0), enc.mean[0], atol=0.05)
    assert torch.allclose(z.var(dim=0), enc.logvar[0].exp(), rtol=0.05)
    assert_same(
        vae.sample(enc, torch.Generator().manual_seed(3)),
        vae.normalize(vae.sample(enc, torch.Generator().manual_seed(3), normalize=False)),
    )


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("posterior", ["diagonal", "logsnr"])
def test_loss_decreases_on_a_tiny_batch(posterior):
    vae = tiny_vae(posterior=posterior, bert_mask_ratio=0.25, kl_weight=1e-3).train()
    ids = random_ids(4, 16)
    valid = torch.arange(16)[None, :] < torch.tensor([16, 16, 11, 7])[:, None]
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)

    def evaluate() -> float:
        with torch.no_grad():
            return vae.loss(ids, valid, torch.Generator().manual_seed(123)).loss.item()

    before = evaluate()
    for step in range(8):
        out = vae(ids, valid, torch.Generator().manual_seed(step))
        assert out.bert_loss > 0 and torch.isfinite(out.loss) and 0 <= out.accuracy <= 1
        opt.zero_grad()
        out.loss.backward()
        if posterior == "logsnr":
            assert vae.logsnr.grad is not None and vae.logsnr.grad.abs() > 0
        opt.step()
    assert evaluate() < 0.95 * before


@torch.no_grad()
def test_loss_terms_switch_off():
    vae = tiny_vae(bert_mask_ratio=0.0, decoder_latents="mean")
    ids = random_ids(2, 8)
    a, b = (vae.loss(ids, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    assert a.bert_loss == 0 and a.bert_accuracy == 0
    assert a.loss == b.loss  # no masking, posterior mean: deterministic
    assert torch.allclose(a.loss, a.recon_loss + 1e-4 * a.kl)


# ----------------------------------------------------------------------------- config / io


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"posterior": "logsnr", "logsnr_init": 2.0},
        {"posterior": "logsnr", "logsnr_learnable": False, "patch_size": 2},
    ],
)
def test_save_and_from_pretrained_round_trip(tmp_path, overrides):
    vae = tiny_vae(**overrides)
    vae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = TextVAE.from_pretrained(tmp_path).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(vae.config)
    ref, got = vae.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    if "logsnr_learnable" in overrides:
        assert "logsnr" in dict(loaded.named_buffers())
    elif overrides:
        assert loaded.logsnr.requires_grad
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(vae.encode(ids).latents, loaded.encode(ids).latents)


def test_config_schema_and_released_layout():
    schema = schema_from_signature(TextVAE)
    cfg = load_config(schema, overrides=["posterior=logsnr", "block_size=16"])
    assert (cfg.posterior, cfg.block_size, cfg.dim) == ("logsnr", 16, 1536)
    with torch.device("meta"):  # the released ~500M layout, without allocating it
        released = TextVAE()
    # the released VAE (docs/released-format.md §1)
    assert sum(p.numel() for p in released.parameters()) == 501_871_574
    shapes = {k: tuple(v.shape) for k, v in released.state_dict().items()}
    assert len(shapes) == 133
    assert shapes["encoder.wte.weight"] == (100279, 1536)
    assert shapes["encoder.patch_embedder.weight"] == (1536, 1536, 1)
    assert shapes["encoder.final_layer.weight"] == (32, 1536)
    assert shapes["decoder.blocks.3.qkv_proj.weight"] == (4608, 1536)
    assert shapes["decoder.blocks.0.ffn_out.weight"] == (1536, 3072)
    assert shapes["decoder.final_layer.weight"] == (100278, 1536)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("layer_norm_type", "rms_norm", "layer_norm_type"),
        ("act", "gelu", "act"),
        ("post_norm", False, "post_norm"),
        ("shared_heads_kv", 2, "shared_heads_kv"),
        ("block_causal", False, "block_causal"),
        ("mystery_field", 1, "mystery_field"),
    ],
)
def test_from_released_config_rejects_unsupported(field, value, match):
    base = {**TINY, "encoder_num_blocks": 1, "decoder_num_blocks": 1}
    base.pop("max_seq_len")
    assert vae_from_released_config(base).config.posterior == "diagonal"
    with pytest.raises(ValueError, match=match):
        vae_from_released_config({**base, field: value})


def test_errors_are_loud():
    vae = tiny_vae(patch_size=2)
    with pytest.raises(ValueError, match="66.*64"):
        vae.encode(random_ids(1, 66))
    with pytest.raises(ValueError, match="68.*64"):
        vae.decode(random_latents(1, 34))
    with pytest.raises(ValueError, match="multiple of patch_size 2"):
        vae.encode(random_ids(1, 7))
    with pytest.raises(ValueError, match="needs a kv_cache"):
        vae.decode(random_latents(1, 2), update_cache=True)
    with pytest.raises(ValueError, match="'gaussian'"):
        TextVAE(**TINY, posterior="gaussian")
    with pytest.raises(ValueError, match="'noise'"):
        TextVAE(**TINY, decoder_latents="noise")
    with pytest.raises(ValueError, match="'cuda_magic'"):
        TextVAE(**TINY, attn_backend="cuda_magic")
