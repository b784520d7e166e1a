"""Stage 2 of Cola DLM: the Text VAE and the block-causal prior trained through the shared trainer.

``ColaModel`` holds the VAE, the prior and (for the modes that anchor to Stage 1) a frozen
reference encoder; ``cola_loss_fn(model, batch, step)`` is the trainer's loss function.

Modes (``JointConfig.mode``; the Stage-2 ablations of the Cola DLM paper, named as there)
-----------------------------------------------------------------------------------------
* ``joint`` ("Joint DiT x{vae_grad_scale}", the paper's best at 1.0): the VAE keeps its Stage-1
  objective (reconstruction + BERT, and its own small ``kl_weight`` KL to N(0, I)); the flow loss
  reaches the encoder scaled by ``vae_grad_scale``; a reference KL ``KL(q_phi(z|x) || q_ref(z|x))``
  to the frozen Stage-1 encoder limits latent drift.
* ``fixed_vae`` ("Fix VAE"): the VAE is frozen (no parameter requires grad); latents come from it
  under ``no_grad``; only the prior trains.
* ``scratch`` ("All Scratch"): as ``joint`` without Stage 1: the VAE the caller passes is freshly
  initialised, and there is no reference KL (nothing to anchor to).
* ``interval`` ("Interval"): as ``joint``, but every ``interval_every`` steps the trained part
  alternates, prior first: in a prior phase the VAE runs under ``no_grad``; in a VAE phase the
  prior runs with *detached parameters* (``torch.func.functional_call``), so the flow gradient
  still reaches the encoder through it but the prior's parameters get no gradient. Nothing toggles
  ``requires_grad``; the inactive part's ``.grad`` stays None, so AdamW skips it (the trainer must
  zero grads with ``set_to_none=True``, the PyTorch default). Under DDP this mode needs
  ``find_unused_parameters=True``.

Design choices
--------------
* **Gradient scaling** ``scale_grad(x, s)``: an autograd function, identity forward, ``grad * s``
  backward; ``s = 0`` is a plain stop-gradient (``detach``), ``s = 1`` the identity.
* **Reference KL**, closed form between diagonal Gaussians, summed over channels, masked mean over
  valid latents: ``0.5 * sum(lv_r - lv + (exp(lv) + (m - m_r)^2) / exp(lv_r) - 1)``. Both posterior
  kinds of :class:`~unimodal.text_vae.TextVAE` are stored as ``N(mean, exp(logvar))``; for two
  logSNR posteriors ``N(alpha mu, sigma^2)`` and ``N(alpha_r mu_r, sigma_r^2)`` this reads
  ``0.5 * sum(log(sigma_r^2/sigma^2) + (sigma^2 + (alpha mu - alpha_r mu_r)^2)/sigma_r^2 - 1)``,
  which for an unchanged lambda is ``0.5 * exp(lambda) * |mu - mu_r|^2``. It is computed before the
  prior-boundary normalisation: a KL is invariant to the same affine map applied to both sides.
* **Which latent the prior learns to generate** (``prior_latents``): ``"mean"`` (default) is
  the normalised posterior mode, i.e. ``normalize(alpha * mu)`` for the logSNR posterior
  (``encode(...).latents``) -- the latent the sampler's prompt encoding and the decoder see at
  inference. At toy scale (a ~5M VAE whose posterior settled at logSNR ~1.7) training the prior
  on means instead of samples lowered the flow loss at t = 0.5 from ~2.0 (the Gaussian baseline)
  to ~1.56 and made the context matter. ``"sample"`` is the released scripts' default
  (``--vae-mode sample``): a reparameterised posterior sample, normalised. Either way the flow
  gradient flows into the encoder (scaled) in the modes that train it.
* **Block size**: the flow layout uses the prior's own ``config.block_size``.
* **Auxiliary decoder loss** (``aux_decoder_weight``, default 0 = off, the paper; an extension,
  the literature's rounding / anchor loss): the VAE decoder's token cross-entropy on the prior's
  clean estimate ``x0 = z_t - t v`` of every noisy latent. Its gradient reaches the prior through
  ``v``; the decoder's weights only with ``aux_decoder_grad`` (else they are detached: the loss
  teaches the prior to land where the decoder reads the right token, not the decoder to read
  estimates).
* **Passes per step**: the VAE loss encodes the BERT-masked input, so the flow latents and the
  reference KL take one more encoder pass on the clean input (and one reference-encoder pass).
* **The reference encoder** is a frozen copy of the Stage-1 VAE without its decoder. It is kept
  *unregistered* (not a submodule): it never appears in ``parameters()`` (so never in an
  optimizer), ``state_dict()`` or exports; ``_apply`` forwards ``.to()/.cuda()/.half()`` to it so it
  follows the model's device. On resume it is rebuilt from the Stage-1 checkpoint by the recipe.
* ``ColaModel.forward(input_ids, valid, step)`` computes the loss, so DDP/accelerate wrappers can
  call the model directly; :func:`cola_loss_fn` just calls it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from prior.training.flow_matching import FlowMatchingConfig, flow_matching_loss
from prior.training.outputs import LossOutput
from unimodal.text_vae import TextVAE, TextVAEEncoderOutput

MODES = ("joint", "fixed_vae", "scratch", "interval")
PRIOR_LATENTS = ("mean", "sample")


# ----------------------------------------------------------------------------- config


@dataclass
class JointConfig:
    """Stage-2 objective (YAML ``joint:`` section)."""

    mode: str = "joint"  # "joint" | "fixed_vae" | "scratch" | "interval"
    vae_grad_scale: float = 1.0  # flow-loss gradient into the encoder (0 = stop-gradient)
    ref_kl_weight: float = 0.01  # weight of KL(q_phi || q_ref) (joint, interval); untuned
    recon_weight: float = 1.0  # weight of the VAE's Stage-1 objective (recon + BERT + its KL)
    prior_weight: float = 1.0  # weight of the flow-matching loss
    interval_every: int = 100  # interval mode: steps per phase (prior phase first)
    # auxiliary token cross-entropy through the VAE decoder on the prior's clean estimate x0 = z_t - t v
    # (an extension; 0 = off, the paper); its gradient reaches the prior, and the decoder only if
    # aux_decoder_grad (else the decoder runs with detached weights)
    aux_decoder_weight: float = 0.0
    aux_decoder_grad: bool = False
    # which latent the prior learns to generate: "mean" (normalised posterior mode) | "sample" (released)
    prior_latents: str = "mean"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"joint mode={self.mode!r}; expected one of {MODES}")
        if self.prior_latents not in PRIOR_LATENTS:
            raise ValueError(f"prior_latents={self.prior_latents!r}; expected one of {PRIOR_LATENTS}")
        if self.vae_grad_scale < 0:
            raise ValueError(f"vae_grad_scale must be >= 0, got {self.vae_grad_scale}")
        for name in ("ref_kl_weight", "recon_weight", "prior_weight", "aux_decoder_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.interval_every < 1:
            raise ValueError(f"interval_every must be >= 1, got {self.interval_every}")

    @property
    def uses_reference(self) -> bool:
        """Whether the reference KL (and so the frozen reference encoder) is part of the objective."""
        return self.mode in ("joint", "interval") and self.ref_kl_weight > 0


# ----------------------------------------------------------------------------- helpers


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward, ``scale * grad`` backward (0 = stop-gradient, 1 = identity)."""
    if scale == 0:
        return x.detach()
    if scale == 1:
        return x
    return _ScaleGrad.apply(x, float(scale))


def gaussian_kl(
    mean: torch.Tensor, logvar: torch.Tensor, ref_mean: torch.Tensor, ref_logvar: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(ref_mean, e^ref_logvar)) per position, summed over channels: (...)."""
    mean, logvar, ref_mean, ref_logvar = (x.float() for x in (mean, logvar, ref_mean, ref_logvar))
    ratio = (logvar.exp() + (mean - ref_mean).square()) / ref_logvar.exp()
    return 0.5 * (ref_logvar - logvar + ratio - 1.0).sum(dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def frozen_reference_encoder(vae: TextVAE) -> TextVAE:
    """A frozen, eval-mode copy of ``vae`` without its decoder (``encode`` only)."""
    # Pre-seeding deepcopy's memo with the decoder copies everything else and leaves decoder = None.
    ref = copy.deepcopy(vae, memo={id(vae.decoder): None})
    ref.requires_grad_(False)
    return ref.eval()


def detached_call(module: nn.Module) -> Callable:
    """Call ``module`` with detached parameters: gradients reach its inputs, never its weights."""
    params = {name: p.detach() for name, p in module.named_parameters()}

    def call(*args, **kwargs):
        return functional_call(module, params, args, kwargs)

    return call


# ----------------------------------------------------------------------------- model


class ColaModel(nn.Module):
    """The Stage-2 model: ``vae`` + ``prior`` (+ an unregistered frozen ``ref_encoder``)."""

    def __init__(
        self,
        vae: TextVAE,
        prior: nn.Module,
        cfg: JointConfig,
        flow: FlowMatchingConfig,
        reference: TextVAE | None = None,
    ) -> None:
        """``reference``: the Stage-1 VAE to anchor to (default: a copy of ``vae`` as passed in)."""
        super().__init__()
        self.vae = vae
        self.prior = prior
        self.cfg = cfg
        self.flow_cfg = flow
        self.block_size = int(prior.config.block_size)  # the flow layout follows the prior's blocks
        ref = (
            frozen_reference_encoder(reference if reference is not None else vae)
            if cfg.uses_reference
            else None
        )
        object.__setattr__(self, "ref_encoder", ref)  # unregistered: no parameters, no state_dict
        if cfg.mode == "fixed_vae":
            self.vae.requires_grad_(False)
            self.vae.eval()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.ref_encoder is not None:
            self.ref_encoder._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> ColaModel:
        super().train(mode)
        if self.cfg.mode == "fixed_vae":
            self.vae.eval()
        return self

    def phase(self, step: int) -> str:
        """What trains at ``step``: "both", "prior" (fixed_vae; interval prior phases) or "vae"."""
        if self.cfg.mode == "fixed_vae":
            return "prior"
        if self.cfg.mode == "interval":
            return "prior" if (step // self.cfg.interval_every) % 2 == 0 else "vae"
        return "both"

    def trainable_parameters(self, step: int = 0) -> list[nn.Parameter]:
        """Parameters that receive a gradient at ``step`` (what the mode trains)."""
        phase = self.phase(step)
        parts = {"both": [self.vae, self.prior], "prior": [self.prior], "vae": [self.vae]}[phase]
        return [p for part in parts for p in part.parameters() if p.requires_grad]

    def _latents(self, encoded: TextVAEEncoderOutput, generator: torch.Generator | None) -> torch.Tensor:
        if self.cfg.prior_latents == "mean":
            return encoded.latents  # normalize(alpha * mu) / normalize(mean)
        return self.vae.sample(encoded, generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        step: int = 0,
        generator: torch.Generator | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """The Stage-2 loss on token ids (B, L) (+ valid (B, L)) at training ``step``; ``loss_mask``
        (B, L) bool: the tokens whose latents the prior is trained on (SFT: assistant turns; a latent
        is a target when any token of its patch is), the rest is context."""
        cfg = self.cfg
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        phase = self.phase(step)
        train_vae, train_prior = phase in ("both", "vae"), phase in ("both", "prior")
        logs: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=input_ids.device)

        if train_vae:
            vae_out = self.vae.loss(input_ids, valid, generator)
            total = total + cfg.recon_weight * vae_out.loss
            logs.update(recon=vae_out.recon_loss, bert=vae_out.bert_loss, kl=vae_out.kl, acc=vae_out.accuracy)
            logs["logsnr"] = vae_out.logsnr
            encoded = self.vae.encode(input_ids, valid)  # clean input: flow latents + reference KL
            z0 = scale_grad(self._latents(encoded, generator), cfg.vae_grad_scale)
            if self.ref_encoder is not None:
                with torch.no_grad():
                    ref = self.ref_encoder.encode(input_ids, valid)
                kl = gaussian_kl(encoded.mean, encoded.logvar, ref.mean, ref.logvar)  # (B, N)
                ref_kl = masked_mean(kl, encoded.valid)
                total = total + cfg.ref_kl_weight * ref_kl
                logs["ref_kl"] = ref_kl
        else:
            with torch.no_grad():
                encoded = self.vae.encode(input_ids, valid)
                z0 = self._latents(encoded, generator)

        # a categorical prior learns the token id of every latent (patch size 1: latent j = token j)
        targets = input_ids if getattr(self.prior.config, "prediction", "velocity") == "categorical" else None
        target_mask = None
        if loss_mask is not None:
            p = self.vae.config.patch_size
            target_mask = loss_mask.bool().unflatten(1, (-1, p)).any(-1)  # (B, N) per latent
        if train_prior:
            prior = self.prior
        elif z0.requires_grad:  # VAE phase of interval: gradient through the prior, not into it
            prior = detached_call(self.prior)
        else:
            prior = None
        config = self.prior.config
        extra = {"self_condition": bool(getattr(config, "self_condition", False))}
        if getattr(config, "history", "latents") == "tokens":  # the clean copy: token embeddings
            history = self.prior.embed_history(input_ids)  # (B, N, d); patch size 1
            extra["history"] = history if train_prior else history.detach()
        if prior is None:
            with torch.no_grad():
                flow = flow_matching_loss(
                    self.prior, z0, encoded.valid, self.block_size, self.flow_cfg, generator, targets,
                    target_mask, **extra,
                )  # fmt: skip
        else:
            flow = flow_matching_loss(
                prior, z0, encoded.valid, self.block_size, self.flow_cfg, generator, targets, target_mask,
                **extra,
            )  # fmt: skip
            total = total + cfg.prior_weight * flow.loss
            if cfg.aux_decoder_weight > 0:
                aux = self._aux_decoder_loss(flow, input_ids, valid)
                total = total + cfg.aux_decoder_weight * aux
                logs["aux_decoder_ce"] = aux
        logs.update(flow.logs("flow"))
        return LossOutput(
            loss=total, logs={k: v.detach() for k, v in logs.items()}, num_tokens=int(valid.sum())
        )

    def _aux_decoder_loss(self, flow, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy of the VAE decoder on the clean estimate ``x0 = z_t - t v`` of every noisy
        latent, decoded all at once (its history is estimates too), on the flow loss's tokens."""
        batch, n = flow.batch, flow.velocity.shape[1]
        z_t, t = batch.x[:, n:].float(), batch.t[..., None]  # (B, N, d), (B, N, 1)
        x0 = (z_t - t * flow.velocity.float()).to(self.vae.dtype)
        decode = self.vae.decode if self.cfg.aux_decoder_grad else detached_call(_Decode(self.vae))
        logits = decode(x0, batch.valid[:, :n]).logits.float()  # (B, N*p, V)
        p = self.vae.config.patch_size
        mask = batch.loss_mask.repeat_interleave(p, dim=1) & valid  # (B, L): tokens of trained latents
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), input_ids.flatten(), reduction="none")
        return (ce * mask.flatten()).sum() / mask.sum().clamp_min(1)


class _Decode(nn.Module):
    """``vae.decode`` as a module's forward (so ``functional_call`` can swap the VAE's weights)."""

    def __init__(self, vae: TextVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor, valid: torch.Tensor):
        return self.vae.decode(latents, valid)


def cola_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
    """The trainer's loss function for Stage 2: ``batch`` holds ``input_ids`` (B, L) and maybe ``valid``."""
    return model(batch["input_ids"], batch.get("valid"), step=step, loss_mask=batch.get("loss_mask"))
