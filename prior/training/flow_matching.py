"""Rectified-flow training of the block-causal prior: path, time sampler, 2L batch, loss, diagnostics.

The pieces are kept apart (as in facebookresearch/flow_matching): a *path* turns (z0, eps, t) into
a :class:`PathSample`; a *time sampler* draws t; :func:`build_2l_batch` lays a batch out for the
one-pass teacher-forcing forward; :func:`flow_matching_loss` runs the prior and reduces. The model
knows nothing of the noise schedule: it sees latents, per-token timesteps on 0..1000, positions,
validity and an :class:`~unimodal.masks.AttentionMask`.

Design choices
--------------
* **Rectified flow**, ``t = 1`` is pure noise: ``z_t = (1 - t) z0 + t eps``, velocity target
  ``eps - z0``, model timestep ``1000 t`` (released scripts). Every block draws its own ``t``
  (all blocks train in parallel).
* **Time sampling**: logit-normal ``t = sigmoid(loc + scale n)`` (default) or uniform.
  ``loc = None`` means *auto*: ``1 + 0.5 ln(d / 16)`` for latent dim ``d`` (1.0 at d=16, ~1.69 at
  d=64, ~2.04 at d=128; the Cola DLM paper reports ~1.0 / ~1.7 / ~2.3 as the best values). In
  YAML write ``loc: null`` for auto or a number. The released pretrain default is loc 1.0 (d = 16).
* **Block size** is the prior's (``prior.config.block_size``): the 2L layout and its mask take it
  as an argument, so the flow settings never repeat it.
* **2L layout** ``x = [z0 ; z_t]`` (clean copy first, as ``create_2l_block_causal_mask``), both
  copies at positions ``0..N-1``, clean copy at timestep 0, mask :func:`unimodal.masks.two_l_mask`.
  ``valid`` must be a prefix of each row (right padding): real tokens sit at positions 0..n-1.
* **Prompt blocks** (``prompt_block_prob``, released 0.05): per block with more than one valid
  latent, with this probability a split ``s`` is drawn uniformly in ``[1, len - 1]`` and the
  block's first ``s`` latents of the noisy copy are set to clean ``z0`` with ``t = 0`` and loss
  weight 0. This trains the sampler's *clean repaint* of a partially known first block.
* **Condition dropout** (``p_uncond``): with this probability a sample's noisy blocks are cut off
  from the clean context (a mask change only: noisy block b keeps its own noisy block, loses the
  clean blocks < b). The sampler's unconditional branch sees the current block alone at positions
  ``0..B-1``; here the block keeps its shared positions ``bB..bB+B-1``. The two are the same
  computation: with nothing but its own block visible, attention logits depend on positions only
  through RoPE's *relative* rotation ``q_i . R(p_j - p_i) k_j``, which a constant shift leaves
  unchanged, and the prior has no absolute position embedding. Keeping shared positions keeps the
  block ids (``position // block_size``) that the mask is built from, and the whole batch in one
  layout. ``tests/test_flow_matching.py`` checks the equivalence on a RoPE attention stand-in.
  Default 0 (released): block 0 of every row already trains the unconditional branch.
* **Mixed block sizes** (``block_sizes`` / ``block_size_probs``, released pretraining option, off by
  default): each call draws the layout's block size from the list, so the prior learns blocks of
  several sizes; the sampler keeps the prior's ``block_size``.
* **Self-conditioning** (``flow_matching_loss(self_condition=True)`` for a prior built with
  ``self_condition``): with probability ``self_cond_prob`` a batch first runs without gradient and
  the noisy half's clean estimate ``z_t - t v`` is fed back through ``self_cond`` (zeros on the clean
  copy), the sampler's situation at every step after a block's first; otherwise none is fed (the
  first step's situation).
* **Loss** (released): per-token MSE averaged over channels, masked mean over the noisy tokens
  of the whole batch (``sum(mse * mask) / sum(mask)``). ``loss_weighting="baseline"`` multiplies
  each token by ``(1-t)^2 + t^2``, i.e. measures it in units of the unit-Gaussian baseline below.
* **Gaussian baseline** (diagnostic): the best predictor that knows only the per-channel mean
  ``m`` and variance ``s^2`` of the data. For ``z0 ~ N(m, s^2)`` and ``eps ~ N(0, 1)`` the pair
  (v, z_t) is jointly Gaussian with ``Var(z_t) = (1-t)^2 s^2 + t^2``,
  ``Cov(v, z_t) = t - (1-t) s^2``, ``Var(v) = 1 + s^2``, so ``E[v | z_t]`` is linear and its MSE is
  ``Var(v) - Cov^2 / Var(z_t) = s^2 / ((1-t)^2 s^2 + t^2)`` (the numerator collapses to ``s^2``).
  For unit-variance latents that is ``1 / ((1-t)^2 + t^2)``: 1 at both ends, 2 at t = 0.5. A
  prior whose loss sits at this baseline has learnt nothing beyond the latent statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from unimodal.masks import AttentionMask, two_l_mask

TIME_SAMPLINGS = ("logit_normal", "uniform")
LOSS_WEIGHTINGS = ("none", "baseline")


# ----------------------------------------------------------------------------- config


@dataclass
class FlowMatchingConfig:
    """Training-time flow matching settings (YAML ``flow:`` section)."""

    loc: float | None = None  # logit-normal location; None = auto, 1 + 0.5 ln(d / 16)
    scale: float = 1.0  # logit-normal scale
    time_sampling: str = "logit_normal"  # "logit_normal" | "uniform"
    prompt_block_prob: float = 0.05  # per block: clean left part (t = 0, loss 0); released 0.05
    p_uncond: float = 0.0  # per sample: noisy blocks cut off from the clean context (CFG dropout)
    loss_weighting: str = "none"  # "none" | "baseline" (x ((1-t)^2 + t^2))
    t_buckets: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # log edges
    # mixed block sizes (released pretraining option): each batch draws its layout's block size from
    # these with block_size_probs; null = always the prior's block_size (what the sampler uses)
    block_sizes: list[int] | None = None
    block_size_probs: list[float] | None = None
    self_cond_prob: float = 0.5  # a self-conditioned prior (prior.self_condition): batches fed an estimate

    def __post_init__(self) -> None:
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling={self.time_sampling!r}; expected one of {TIME_SAMPLINGS}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={self.loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if (self.block_sizes is None) != (self.block_size_probs is None):
            raise ValueError("block_sizes and block_size_probs go together (both null or both lists)")
        if self.block_sizes is not None:
            sizes, probs = list(self.block_sizes), list(self.block_size_probs)
            if not sizes or len(sizes) != len(probs) or min(sizes) < 1 or min(probs) < 0:
                raise ValueError(f"block_sizes {sizes} / block_size_probs {probs}: one p >= 0 per size >= 1")
            if abs(sum(probs) - 1.0) > 1e-6:
                raise ValueError(f"block_size_probs must sum to 1, got {sum(probs)}")
        for name in ("prompt_block_prob", "p_uncond", "self_cond_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        edges = list(self.t_buckets)
        if len(edges) < 2 or edges[0] != 0.0 or edges[-1] != 1.0 or sorted(set(edges)) != edges:
            raise ValueError(f"t_buckets must increase strictly from 0.0 to 1.0, got {edges}")


# ----------------------------------------------------------------------------- time sampler


def resolve_loc(cfg: FlowMatchingConfig, latent_dim: int) -> float:
    """The logit-normal location: ``cfg.loc``, or for ``None`` the auto rule 1 + 0.5 ln(d / 16)."""
    if cfg.loc is not None:
        return float(cfg.loc)
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    return 1.0 + 0.5 * math.log(latent_dim / 16.0)


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def _draw_uniform(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand((), generator=generator, device=_gen_device(generator, device))


def sample_t(
    shape: tuple[int, ...],
    cfg: FlowMatchingConfig,
    latent_dim: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times in (0, 1), fp32, of ``shape`` (logit-normal or uniform per ``cfg``)."""
    device = torch.device(device)
    gdev = _gen_device(generator, device)
    if cfg.time_sampling == "uniform":
        return torch.rand(shape, generator=generator, device=gdev).to(device)
    n = torch.randn(shape, generator=generator, device=gdev).to(device)
    return torch.sigmoid(resolve_loc(cfg, latent_dim) + cfg.scale * n)


def draw_block_size(
    cfg: FlowMatchingConfig, block_size: int, generator: torch.Generator | None = None
) -> int:
    """The block size of one batch's layout: ``block_size`` (the prior's), or one of ``cfg.block_sizes``
    drawn with ``cfg.block_size_probs`` (one draw on the generator's device, so on the CPU by default)."""
    if cfg.block_sizes is None:
        return block_size
    probs = torch.tensor(cfg.block_size_probs, dtype=torch.float32)
    gen_cpu = generator if generator is None or generator.device.type == "cpu" else None
    pick = torch.multinomial(probs, 1, generator=gen_cpu).item()
    return int(cfg.block_sizes[pick])


# ----------------------------------------------------------------------------- path


@dataclass
class PathSample:
    """A point on the rectified-flow path. All (..., d) except ``t`` (...)."""

    z_t: torch.Tensor  # (1 - t) z0 + t eps
    target: torch.Tensor  # velocity d z_t / dt = eps - z0
    z0: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor


class RectifiedFlowPath:
    """The straight path from data (t = 0) to noise (t = 1)."""

    def sample(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> PathSample:
        if z0.shape != eps.shape or t.shape != z0.shape[:-1]:
            raise ValueError(f"path shapes: z0 {tuple(z0.shape)}, eps {tuple(eps.shape)}, t {tuple(t.shape)}")
        tt = t[..., None].to(z0.dtype)
        return PathSample(z_t=(1 - tt) * z0 + tt * eps, target=eps - z0, z0=z0, eps=eps, t=t)


def gaussian_baseline(t: torch.Tensor, variance: torch.Tensor | float = 1.0) -> torch.Tensor:
    """MSE of the best predictor of ``eps - z0`` from ``z_t`` that knows only the data's per-channel
    mean and variance: ``mean_c s_c^2 / ((1-t)^2 s_c^2 + t^2)``. t: (...), variance: scalar or (d,)."""
    var = torch.as_tensor(variance, dtype=torch.float32, device=t.device).reshape(-1)  # (d,) or (1,)
    tt = t.float()[..., None]
    return (var / ((1 - tt) ** 2 * var + tt**2)).mean(-1)


# ----------------------------------------------------------------------------- 2L batch


@dataclass
class TwoLBatch:
    """One teacher-forcing forward's inputs (2N rows: ``[clean ; noisy]``) and loss targets (N rows)."""

    x: torch.Tensor  # (B, 2N, d) [z0 ; z_t]
    timestep: torch.Tensor  # (B, 2N) float, 0..1000 (clean copy and prompt pieces at 0)
    positions: torch.Tensor  # (B, 2N) int64, [0..N-1, 0..N-1]
    valid: torch.Tensor  # (B, 2N) bool
    noisy: torch.Tensor  # (B, 2N) bool, True on the z_t copy
    attn_mask: AttentionMask  # two_l_mask (+ context cut for the p_uncond rows)
    target: torch.Tensor  # (B, N, d) eps - z0
    loss_mask: torch.Tensor  # (B, N) bool: valid and not a prompt piece
    t: torch.Tensor  # (B, N) fp32 in [0, 1] (0 on prompt pieces)
    prompt: torch.Tensor  # (B, N) bool, clean pieces inside the noisy copy
    uncond: torch.Tensor  # (B,) bool, rows whose noisy blocks see no clean context


def cut_clean_context(mask: AttentionMask, noisy: torch.Tensor, rows: torch.Tensor) -> AttentionMask:
    """Forbid noisy queries of the selected rows (B,) to attend clean keys (condition dropout)."""
    inner = mask.mask_mod

    def mask_mod(b, h, q, kv):
        return inner(b, h, q, kv) & ~(rows[b] & noisy[b, q] & ~noisy[b, kv])

    return AttentionMask(mask_mod, mask.batch, mask.q_len, mask.kv_len, mask.device)


def _check_latents(z0: torch.Tensor, valid: torch.Tensor) -> None:
    if z0.ndim != 3 or valid.shape != z0.shape[:2]:
        raise ValueError(
            f"expected z0 (B, N, d) and valid (B, N), got {tuple(z0.shape)} and {tuple(valid.shape)}"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("valid must be a prefix of each row (right padding)")


def build_2l_batch(
    z0: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    cfg: FlowMatchingConfig,
    generator: torch.Generator | None = None,
    *,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> TwoLBatch:
    """Lay out ``[z0 ; z_t]`` with per-block t, prompt pieces and condition dropout.
    ``target_mask`` (B, N) bool: only these latents are loss targets (e.g. assistant turns in SFT);
    the others stay in the layout as clean context for later blocks.

    z0: (B, N, d) clean latents; valid: (B, N) bool (a prefix per row); ``block_size``: latents per
    prior block (the prior's own). Overrides (diagnostics, tests): ``t`` (B, N) per-token times
    (then no prompt pieces are drawn), ``eps`` (B, N, d), ``uncond`` (B,) bool. ``history`` (B, N, d):
    what the clean copy carries instead of ``z0`` (a ``history="tokens"`` prior's token embeddings).
    Random draws, in order: t per block, eps, prompt splits, uncond rows.
    """
    _check_latents(z0, valid)
    if history is not None and history.shape != z0.shape:
        raise ValueError(f"history must be {tuple(z0.shape)} like z0, got {tuple(history.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    bsz, n, d = z0.shape
    dev, gdev = z0.device, _gen_device(generator, z0.device)
    bs = block_size
    pos = torch.arange(n, device=dev).expand(bsz, n)  # (B, N)
    blk = pos // bs  # (B, N) block id
    n_blocks = -(-n // bs)

    if t is None:
        t_tok = sample_t((bsz, n_blocks), cfg, d, dev, generator).gather(1, blk)  # (B, N)
    else:
        if t.shape != (bsz, n):
            raise ValueError(f"t override must be (B, N) = {(bsz, n)}, got {tuple(t.shape)}")
        t_tok = t.to(dev, torch.float32)
    if eps is None:
        eps = torch.randn(z0.shape, generator=generator, device=gdev, dtype=z0.dtype).to(dev)
    elif eps.shape != z0.shape:
        raise ValueError(f"eps override must be {tuple(z0.shape)}, got {tuple(eps.shape)}")

    prompt = torch.zeros(bsz, n, dtype=torch.bool, device=dev)
    if t is None and cfg.prompt_block_prob > 0:
        lens = torch.zeros(bsz, n_blocks, dtype=torch.long, device=dev).scatter_add_(1, blk, valid.long())
        draw = torch.rand((2, bsz, n_blocks), generator=generator, device=gdev).to(dev)
        apply = (draw[0] < cfg.prompt_block_prob) & (lens > 1)  # (B, nb)
        offset = (draw[1] * (lens - 1)).long().clamp_max(lens - 2).clamp_min(0)  # [0, len-2]
        split = 1 + offset  # (B, nb) uniform in [1, len-1]: left pieces of 1..len-1 latents
        prompt = apply.gather(1, blk) & (pos % bs < split.gather(1, blk)) & valid
    t_tok = t_tok.masked_fill(prompt, 0.0)

    cut = uncond is not None or cfg.p_uncond > 0
    if uncond is None:
        uncond = torch.rand(bsz, generator=generator, device=gdev).to(dev) < cfg.p_uncond
    elif uncond.shape != (bsz,) or uncond.dtype != torch.bool:
        raise ValueError(f"uncond override must be a (B,) = ({bsz},) bool tensor, got {tuple(uncond.shape)}")
    uncond = uncond.to(dev)

    path = RectifiedFlowPath().sample(z0, eps, t_tok)
    noisy = torch.cat([torch.zeros_like(valid), torch.ones_like(valid)], dim=1)  # (B, 2N)
    positions = torch.cat([pos, pos], dim=1)  # (B, 2N) shared by both copies
    valid2 = torch.cat([valid, valid], dim=1)
    mask = two_l_mask(positions, noisy, bs, valid2)
    if cut:  # no host sync on uncond
        mask = cut_clean_context(mask, noisy, uncond)
    return TwoLBatch(
        x=torch.cat([z0 if history is None else history.to(z0.dtype), path.z_t], dim=1),  # (B, 2N, d)
        timestep=torch.cat([torch.zeros_like(t_tok), 1000.0 * t_tok], dim=1),  # (B, 2N)
        positions=positions,
        valid=valid2,
        noisy=noisy,
        attn_mask=mask,
        target=path.target,
        loss_mask=valid & ~prompt if target_mask is None else valid & ~prompt & target_mask.to(dev),
        t=t_tok,
        prompt=prompt,
        uncond=uncond,
    )


# ----------------------------------------------------------------------------- loss


@dataclass
class FlowLoss:
    """The flow-matching loss and per-t-bucket diagnostics (all diagnostics detached)."""

    loss: torch.Tensor  # () scalar, differentiable
    mse: torch.Tensor  # (B, N) per-token MSE (mean over channels), unweighted
    t: torch.Tensor  # (B, N)
    loss_mask: torch.Tensor  # (B, N) bool
    bucket_edges: list[float]
    bucket_loss: torch.Tensor  # (K,) mean MSE per t bucket (NaN where empty)
    bucket_baseline: torch.Tensor  # (K,) mean Gaussian baseline per bucket (batch per-channel variance)
    bucket_count: torch.Tensor  # (K,) tokens per bucket
    ce: torch.Tensor | None = None  # () token cross-entropy of a categorical prior (then ``loss``)
    velocity: torch.Tensor | None = None  # (B, N, d) the noisy half's predicted velocity (differentiable)
    batch: TwoLBatch | None = None  # the 2L layout it was predicted on

    def logs(self, prefix: str = "flow") -> dict[str, torch.Tensor]:
        """Detached scalars for the trainer: the loss and, per non-empty t bucket, the mean MSE and the
        Gaussian baseline (keys ``{prefix}/t0.2-0.4``, ``{prefix}/base_t0.2-0.4``)."""
        out = {f"{prefix}/loss": self.loss.detach()}
        if self.ce is not None:
            out[f"{prefix}/ce"] = self.ce.detach()
            out[f"{prefix}/mse"] = (self.mse * self.loss_mask).sum() / self.loss_mask.sum().clamp_min(1)
        edges, counts = self.bucket_edges, self.bucket_count.tolist()
        for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            if counts[k] > 0:
                out[f"{prefix}/t{lo:.1f}-{hi:.1f}"] = self.bucket_loss[k]
                out[f"{prefix}/base_t{lo:.1f}-{hi:.1f}"] = self.bucket_baseline[k]
        return out


def latent_variance(z0: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(d,) per-channel variance of the valid latents (detached, fp32; 1 where undefined)."""
    z, w = z0.detach().float(), valid[..., None].float()  # (B, N, d), (B, N, 1); no host sync
    count = w.sum()
    mean = (z * w).sum((0, 1)) / count.clamp_min(1)  # (d,)
    var = ((z - mean).square() * w).sum((0, 1)) / (count - 1).clamp_min(1)  # (d,) unbiased
    return torch.where(count >= 2, var, torch.ones_like(var))


def _bucket_stats(values: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, edges: list[float]):
    """Masked mean of ``values`` (B, N) per t bucket -> (means (K,), counts (K,))."""
    k, w = len(edges) - 1, mask.flatten().float()
    inner = torch.tensor(edges[1:-1], device=t.device, dtype=t.dtype)
    idx = torch.bucketize(t.detach().flatten(), inner, right=True)  # (B*N,) bucket [e_i, e_{i+1})
    counts = torch.zeros(k, device=t.device).index_add_(0, idx, w)
    sums = torch.zeros(k, device=t.device).index_add_(0, idx, values.detach().float().flatten() * w)
    return sums / counts.where(counts > 0, torch.nan), counts


def velocity_loss(
    velocity: torch.Tensor, batch: TwoLBatch, cfg: FlowMatchingConfig, z0: torch.Tensor | None = None
) -> FlowLoss:
    """Masked MSE of the noisy-half ``velocity`` (B, N, d) against ``batch.target`` (+ diagnostics)."""
    if velocity.shape != batch.target.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} != target {tuple(batch.target.shape)}")
    mse = (velocity.float() - batch.target.float()).pow(2).mean(-1)  # (B, N)
    mask = batch.loss_mask
    weight = (1 - batch.t) ** 2 + batch.t**2 if cfg.loss_weighting == "baseline" else torch.ones_like(mse)
    loss = (mse * weight * mask).sum() / mask.sum().clamp_min(1)
    variance = 1.0 if z0 is None else latent_variance(z0, batch.valid[:, : z0.shape[1]])
    edges = list(cfg.t_buckets)
    bucket_loss, counts = _bucket_stats(mse, batch.t, mask, edges)
    bucket_base, _ = _bucket_stats(gaussian_baseline(batch.t, variance), batch.t, mask, edges)
    return FlowLoss(loss, mse.detach(), batch.t, mask, edges, bucket_loss, bucket_base, counts)


def predict(
    prior: nn.Module, batch: TwoLBatch, self_cond: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the prior on the 2L layout: the noisy-half velocity (B, N, d) and, for a categorical
    prior, its logits (B, N, V) (else None). ``self_cond`` (B, 2N, d): a self-conditioned prior's
    previous clean estimates (zeros on the clean copy)."""
    extra = {} if self_cond is None else {"self_cond": self_cond}
    out = prior(
        batch.x, batch.timestep, positions=batch.positions, valid=batch.valid, attn_mask=batch.attn_mask,
        **extra,
    )  # fmt: skip
    n = batch.target.shape[1]
    logits = getattr(out, "logits", None)  # only a categorical prior has logits
    return out.velocity[:, n:], None if logits is None else logits[:, n:]


def predict_velocity(prior: nn.Module, batch: TwoLBatch) -> torch.Tensor:
    """The noisy-half velocity (B, N, d) of the prior on the 2L layout."""
    return predict(prior, batch)[0]


def flow_matching_loss(
    prior: nn.Module,
    z0: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    cfg: FlowMatchingConfig,
    generator: torch.Generator | None = None,
    targets: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    self_condition: bool = False,
) -> FlowLoss:
    """One teacher-forcing forward of ``prior`` on ``[z0 ; z_t]`` and the released masked MSE.

    ``block_size``: the prior's (``prior.config.block_size``; ``prior`` may be a functional wrapper).
    A categorical prior (``MMDiT(prediction="categorical")``) is trained instead by the token
    cross-entropy of its logits against ``targets`` (B, N), the token id of every latent, on the
    same noisy tokens (CDCD's score interpolation); the velocity MSE stays as a diagnostic.
    ``target_mask`` (B, N): the latents that are loss targets (default: every valid one).
    ``history`` (B, N, d): the clean copy's inputs instead of ``z0`` (``history="tokens"`` priors).
    ``self_condition``: the prior takes ``self_cond``; with probability ``cfg.self_cond_prob`` the batch
    first runs without gradient and feeds the noisy half's clean estimate ``z_t - t v`` back in.
    With ``cfg.block_sizes`` the layout's block size is drawn per call (:func:`draw_block_size`)."""
    block_size = draw_block_size(cfg, block_size, generator)
    batch = build_2l_batch(z0, valid, block_size, cfg, generator, target_mask=target_mask, history=history)
    self_cond = None
    if self_condition and float(_draw_uniform(generator, z0.device)) < cfg.self_cond_prob:
        with torch.no_grad():
            n = z0.shape[1]
            z_t, t = batch.x[:, n:].float(), batch.t[..., None]  # (B, N, d), (B, N, 1)
            x0 = z_t - t * predict(prior, batch)[0].float()  # (B, N, d)
        self_cond = torch.cat([torch.zeros_like(x0), x0], dim=1).to(z0.dtype)  # (B, 2N, d)
    velocity, logits = predict(prior, batch, self_cond)
    result = velocity_loss(velocity, batch, cfg, z0)
    result.velocity, result.batch = velocity, batch
    if logits is not None:
        if targets is None or targets.shape != batch.loss_mask.shape:
            shape = None if targets is None else tuple(targets.shape)
            raise ValueError(
                f"a categorical prior needs targets (B, N) = {tuple(batch.loss_mask.shape)}, got {shape}"
            )
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        mask = batch.loss_mask.flatten()
        result.ce = result.loss = (ce * mask).sum() / mask.sum().clamp_min(1)
    return result


# ----------------------------------------------------------------------------- diagnostics


@dataclass
class FlowLossByT:
    """Flow loss at fixed times (every block at the same t), against the Gaussian baseline."""

    t: torch.Tensor  # (K,)
    loss: torch.Tensor  # (K,) masked-mean MSE
    baseline: torch.Tensor  # (K,) Gaussian baseline with the batch's per-channel variance
    baseline_unit: torch.Tensor  # (K,) Gaussian baseline for unit-variance latents, 1 / ((1-t)^2 + t^2)
    with_context: bool


@torch.no_grad()
def flow_loss_by_t(
    prior: nn.Module,
    z0: torch.Tensor,
    valid: torch.Tensor,
    t_values: list[float] | torch.Tensor,
    with_context: bool = True,
    block_size: int = 16,
    seed: int = 0,
    skip_first_block: bool = True,
    history: torch.Tensor | None = None,
) -> FlowLossByT:
    """Loss of ``prior`` with every block at each fixed ``t``, with or without the clean context.

    One forward per t value. The noise comes from ``seed`` (fresh generator per call), so a call
    with ``with_context=True`` and one with ``False`` see identical (z_t, target) pairs and their
    difference is the value of the history. Block 0 never has context; ``skip_first_block``
    leaves it out of both. No prompt pieces. Run the prior in eval mode for a clean measurement.
    ``history``: the clean copy's inputs for a ``history="tokens"`` prior (its token embeddings).
    """
    _check_latents(z0, valid)
    cfg = FlowMatchingConfig(prompt_block_prob=0.0)
    bsz, n, _ = z0.shape
    gen = torch.Generator(device=z0.device).manual_seed(seed)
    keep = valid.clone()
    if skip_first_block:
        keep[:, :block_size] = False
    variance = latent_variance(z0, valid)
    uncond = torch.full((bsz,), not with_context, dtype=torch.bool, device=z0.device)
    ts = torch.as_tensor(t_values, dtype=torch.float32).reshape(-1)
    losses = []
    for tv in ts.tolist():
        eps = torch.randn(z0.shape, generator=gen, device=z0.device, dtype=z0.dtype)
        t_tok = torch.full((bsz, n), tv, device=z0.device)
        batch = build_2l_batch(z0, valid, block_size, cfg, t=t_tok, eps=eps, uncond=uncond, history=history)
        mse = (predict_velocity(prior, batch).float() - batch.target.float()).pow(2).mean(-1)  # (B, N)
        losses.append((mse * keep).sum() / keep.sum().clamp_min(1))
    return FlowLossByT(
        t=ts,
        loss=torch.stack(losses).cpu() if losses else torch.zeros(0),
        baseline=gaussian_baseline(ts.to(z0.device), variance).cpu(),
        baseline_unit=gaussian_baseline(ts, 1.0),
        with_context=with_context,
    )
