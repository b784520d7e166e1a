"""Stage-2 objectives: gradient scaling, reference KL, what each mode trains, and the trainer hookup."""

import math

import pytest
import torch

from prior.models.mmdit import MMDiT
from prior.training.flow_matching import FlowMatchingConfig, flow_matching_loss
from prior.training.joint import ColaModel, JointConfig, cola_loss_fn, gaussian_kl, scale_grad
from prior.training.optim import param_groups
from prior.training.trainer import Trainer, TrainerConfig
from unimodal.text_vae import TextVAE

LATENT = 4
FLOW = FlowMatchingConfig(prompt_block_prob=0.2)
BLOCK = 4  # the prior's block_size, which the flow layout follows


def tiny_vae(**overrides) -> TextVAE:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=40, dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1, decoder_num_blocks=1,
        latent_dim=LATENT, block_size=2, max_seq_len=64, posterior="logsnr",
    )  # fmt: skip
    return TextVAE(**{**cfg, **overrides})


def tiny_prior() -> MMDiT:
    torch.manual_seed(1)  # adaLN-zero off: a zero-initialised prior passes no gradient to its input
    return MMDiT(
        in_channels=[LATENT], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, block_size=4,
        attn_backend="eager", adaln_zero_init=False,
    )  # fmt: skip


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(12)[None] < torch.tensor([[12], [9]])
    return {"input_ids": torch.randint(0, 40, (2, 12), generator=g), "valid": valid}


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def run(model: ColaModel, step: int = 0, seed: int = 0):
    model.zero_grad(set_to_none=True)
    b = batch()
    out = model(b["input_ids"], b["valid"], step=step, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    return out


# ----------------------------------------------------------------------------- gradient scaling


def test_scale_grad_function():
    x = torch.randn(5, requires_grad=True)
    for s in (0.5, 1.0, 2.0):
        x.grad = None
        y = scale_grad(x, s)
        assert torch.equal(y, x)
        (y * torch.arange(5.0)).sum().backward()
        assert torch.allclose(x.grad, s * torch.arange(5.0))
    stopped = scale_grad(x, 0.0)  # 0 = stop-gradient
    assert torch.equal(stopped, x) and not stopped.requires_grad


def test_vae_grad_scale_on_the_encoder():
    """Only the flow loss (recon and reference KL weighted 0): encoder grad is scale * unscaled grad."""
    vae, prior = tiny_vae(bert_mask_ratio=0.0, decoder_latents="mean"), tiny_prior()
    b = batch()
    vae.zero_grad(set_to_none=True)  # the unscaled reference, by hand
    enc = vae.encode(b["input_ids"], b["valid"])
    flow_matching_loss(
        prior, enc.latents, enc.valid, BLOCK, FLOW, torch.Generator().manual_seed(0)
    ).loss.backward()
    unscaled = {n: p.grad.clone() for n, p in vae.encoder.named_parameters()}
    assert any(g.abs().sum() > 0 for g in unscaled.values())
    for scale in (1.0, 0.5, 0.0):
        cfg = JointConfig(vae_grad_scale=scale, recon_weight=0.0, ref_kl_weight=0.0)
        run(ColaModel(vae, prior, cfg, FLOW))
        for name, p in vae.encoder.named_parameters():
            assert torch.allclose(p.grad, scale * unscaled[name], atol=1e-7, rtol=1e-5), (scale, name)
        assert grads(prior)  # the prior trains at every scale


# ----------------------------------------------------------------------------- reference KL


def test_gaussian_kl_closed_forms():
    g = torch.Generator().manual_seed(0)
    m, mr, lv, lvr = (torch.randn(3, 5, LATENT, generator=g) for _ in range(4))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, (0.5 * lv).exp()), torch.distributions.Normal(mr, (0.5 * lvr).exp())
    ).sum(-1)
    assert torch.allclose(gaussian_kl(m, lv, mr, lvr), ref, atol=1e-5)
    lam = 4.5  # two logSNR posteriors with the same lambda: 0.5 * e^lambda * |mu - mu_ref|^2
    alpha, logvar = (
        math.sqrt(torch.sigmoid(torch.tensor(lam))),
        torch.nn.functional.logsigmoid(torch.tensor(-lam)),
    )
    kl = gaussian_kl(alpha * m, logvar.expand_as(m), alpha * mr, logvar.expand_as(m))
    assert torch.allclose(kl, 0.5 * math.exp(lam) * (m - mr).square().sum(-1), rtol=1e-4)


def test_reference_kl_zero_at_init_then_positive():
    vae = tiny_vae()
    model = ColaModel(vae, tiny_prior(), JointConfig(ref_kl_weight=1.0), FLOW)
    out = run(model)
    assert float(out.logs["ref_kl"]) == 0.0
    assert not any(p.requires_grad for p in model.ref_encoder.parameters())
    with torch.no_grad():
        vae.encoder.final_layer.weight.add_(0.1 * torch.randn_like(vae.encoder.final_layer.weight))
    out = run(model)
    assert float(out.logs["ref_kl"]) > 0
    assert grads(vae.encoder) and not any(p.grad is not None for p in model.ref_encoder.parameters())


def test_reference_encoder_stays_out_of_parameters_and_state_dict():
    model = ColaModel(tiny_vae(), tiny_prior(), JointConfig(), FLOW)
    ref = model.ref_encoder
    assert ref is not None and ref.decoder is None and not ref.training
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in ref.parameters())
    assert all(k.startswith(("vae.", "prior.")) for k in model.state_dict())
    model.double()  # follows the model's dtype / device
    assert all(p.dtype == torch.float64 for p in ref.parameters())
    model.train()
    assert not ref.training
    reference = tiny_vae(dim=32)
    with torch.no_grad():
        reference.encoder.final_layer.weight.zero_()
    other = ColaModel(tiny_vae(), tiny_prior(), JointConfig(), FLOW, reference=reference)
    assert torch.equal(other.ref_encoder.encoder.final_layer.weight, reference.encoder.final_layer.weight)


# ----------------------------------------------------------------------------- modes


def test_joint_trains_everything_and_logs_each_term():
    model = ColaModel(tiny_vae(), tiny_prior(), JointConfig(), FLOW)
    b = batch()
    out = cola_loss_fn(model, b, 0)
    out.loss.backward()
    for key in ("flow/loss", "recon", "bert", "kl", "acc", "ref_kl", "logsnr"):
        assert key in out.logs and out.logs[key].ndim == 0
    assert out.num_tokens == int(b["valid"].sum())
    g = grads(model)
    assert any(k.startswith("vae.encoder") for k in g) and any(k.startswith("vae.decoder") for k in g)
    assert any(k.startswith("prior.") for k in g) and "vae.logsnr" in g


def test_fixed_vae_trains_only_the_prior():
    model = ColaModel(tiny_vae(), tiny_prior(), JointConfig(mode="fixed_vae"), FLOW)
    out = run(model)
    assert model.ref_encoder is None and "recon" not in out.logs and "flow/loss" in out.logs
    assert all(k.startswith("prior.") for k in grads(model)) and grads(model.prior)
    assert not any(p.requires_grad for p in model.vae.parameters())
    optimised = {id(p) for g in param_groups(model, 0.01) for p in g["params"]}
    assert optimised == {id(p) for p in model.prior.parameters()}
    assert {id(p) for p in model.trainable_parameters()} == optimised
    model.train()
    assert not model.vae.training


def test_scratch_has_no_reference():
    model = ColaModel(tiny_vae(), tiny_prior(), JointConfig(mode="scratch"), FLOW)
    out = run(model)
    assert model.ref_encoder is None and "ref_kl" not in out.logs and "recon" in out.logs
    g = grads(model)
    assert any(k.startswith("vae.encoder") for k in g) and any(k.startswith("prior.") for k in g)


def test_interval_alternates():
    cfg = JointConfig(mode="interval", interval_every=2, recon_weight=0.0, ref_kl_weight=0.0)
    model = ColaModel(tiny_vae(), tiny_prior(), cfg, FLOW)
    phases = [model.phase(s) for s in range(6)]
    assert phases == ["prior", "prior", "vae", "vae", "prior", "prior"]
    for step, phase in enumerate(phases[:4]):
        out = run(model, step=step)
        g = grads(model)
        if phase == "prior":
            assert g and all(k.startswith("prior.") for k in g) and "recon" not in out.logs
            assert all(p.grad is None for p in model.vae.parameters())
        else:  # the flow gradient still reaches the encoder through the prior (recon weight is 0)
            assert any(k.startswith("vae.encoder") for k in g) and "recon" in out.logs
            assert all(p.grad is None for p in model.prior.parameters())
        assert {id(p) for p in model.trainable_parameters(step)} == {
            id(p) for p in (model.prior if phase == "prior" else model.vae).parameters()
        }
        assert all(p.requires_grad for p in model.parameters())  # nothing toggled


@pytest.mark.parametrize("prior_latents", ["mean", "sample"])
def test_prior_latents(prior_latents):
    vae, prior = tiny_vae(), tiny_prior()
    model = ColaModel(vae, prior, JointConfig(mode="fixed_vae", prior_latents=prior_latents), FLOW)
    assert model.block_size == prior.config.block_size == BLOCK
    out = run(model, seed=5)
    b, g = batch(), torch.Generator().manual_seed(5)
    with torch.no_grad():
        enc = vae.encode(b["input_ids"], b["valid"])
        z0 = enc.latents if prior_latents == "mean" else vae.sample(enc, g)
        expected = flow_matching_loss(prior, z0, enc.valid, BLOCK, FLOW, g).loss
    assert torch.allclose(out.logs["flow/loss"], expected)


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        JointConfig(mode="frozen")
    with pytest.raises(ValueError, match="prior_latents"):
        JointConfig(prior_latents="mode")
    with pytest.raises(ValueError, match="vae_grad_scale"):
        JointConfig(vae_grad_scale=-1.0)


def test_trains_through_the_shared_trainer(tmp_path):
    torch.manual_seed(0)
    data = [{"input_ids": torch.randint(0, 40, (8,))} for _ in range(4)]
    model = ColaModel(tiny_vae(), tiny_prior(), JointConfig(), FLOW)
    cfg = TrainerConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, warmup_steps=0, eval_every=0,
        save_every=0, log_every=1, tensorboard=False, progress_bar=False,
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = Trainer(model, cola_loss_fn, data, config=cfg).train()
    assert result.step == 2 and math.isfinite(result.train_metrics["flow/loss"])
    assert "ref_kl" in result.train_metrics
    after = model.state_dict()
    assert all(k.startswith(("vae.", "prior.")) for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("vae.encoder"))


def test_aux_decoder_loss_is_off_by_default_and_reaches_what_its_config_says():
    """Zero-weighted by default (no extra term, identical loss); on, its gradient reaches the prior,
    and the VAE decoder only with aux_decoder_grad."""
    assert JointConfig().aux_decoder_weight == 0.0
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(4))

    def grads(**cfg):
        torch.manual_seed(0)
        vae, prior = tiny_vae(bert_mask_ratio=0.0), tiny_prior()
        model = ColaModel(vae, prior, JointConfig(mode="joint", ref_kl_weight=0.0, **cfg), FLOW)
        out = model(ids, generator=torch.Generator().manual_seed(5))
        out.loss.backward()
        dec = torch.cat([p.grad.flatten() for p in vae.decoder.parameters()])
        pri = torch.cat([p.grad.flatten() for p in prior.parameters() if p.grad is not None])
        return out, dec, pri

    base, dec0, pri0 = grads()
    assert "aux_decoder_ce" not in base.logs
    off, _, _ = grads(aux_decoder_weight=0.0)
    assert torch.equal(off.loss, base.loss)
    on, dec1, pri1 = grads(aux_decoder_weight=0.5)
    assert on.logs["aux_decoder_ce"] > 0 and not torch.allclose(pri1, pri0)
    torch.testing.assert_close(dec1, dec0)  # detached decoder: the aux loss adds nothing to its gradient
    _, dec2, _ = grads(aux_decoder_weight=0.5, aux_decoder_grad=True)
    assert not torch.allclose(dec2, dec0)
    with pytest.raises(ValueError, match="aux_decoder_weight"):
        JointConfig(aux_decoder_weight=-1.0)
