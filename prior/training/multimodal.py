"""The unified text-image objective: one block-causal MMDiT trained by flow matching on mixed layouts.

``MultimodalModel`` holds the frozen Text VAE, the frozen image VAE (diffusers ``AutoencoderKL``)
and the MMDiT prior with a ``text`` and an ``image`` stream; ``multimodal_loss_fn`` is the
trainer's loss function, so the image-text prior trains in the same trainer as every other stage.

Design choices
--------------
* **Mixed layouts in one batch.** Every row draws its layout from ``layout_weights``
  (:mod:`modalities.layout`): ``text_to_image`` ``[caption][image]``, ``image_to_text``
  ``[image][caption]`` (so each pair is seen in both orders) and ``text`` (the caption alone).
  Segments are placed per row by :func:`modalities.layout.place_segments`; the model's dict input
  carries both streams for every row, with the segment a row omits marked invalid.
* **The 2L pass on any layout** (:func:`build_multimodal_2l`): each stream holds ``[clean ; noisy]``
  copies sharing positions and block ids; :func:`unimodal.masks.two_l_block_mask` over the block
  ids gives every noisy block its own noisy block plus the clean blocks before it. Every block draws
  its own ``t`` (logit-normal with the ``loc`` of its modality's latent dim, :mod:`flow_matching`,
  or the stream's ``multimodal.loc`` override: images want more low-noise training than text).
  Condition dropout (``flow.p_uncond``) cuts a row's noisy blocks off the clean context, whatever
  the layout: the unconditional branch of CFG (the block alone) for text and images alike. Prompt
  pieces (``prompt_block_prob``) are a text-continuation device and are not drawn here.
* **Loss**: per stream, the mean over its noisy valid tokens *of each row*, summed over the rows
  that hold the stream and divided by the batch size: the velocity MSE (``eps - z0``) for images,
  and for text the token cross-entropy of a categorical prior (CDCD) or the velocity MSE;
  ``loss = sum_m loss_weights[m] * loss_m``. Every row weighs the same whatever its length, so the
  mean of per-process losses over equal shards is the loss of the whole batch.
* **Randomness per sample.** With ``keys`` (the dataset index of each row, which the collator
  passes), each row draws its layout, block times, noise and condition dropout from its own
  generator seeded by ``(seed, step, key)``: the draws do not depend on how a global batch is split
  over processes, so two processes train exactly as one process at the same global batch (and a
  resumed run draws what an uninterrupted one would). Without keys the global RNG is used.
* **Frozen autoencoders.** Latents come from both VAEs under ``no_grad`` (posterior modes: the
  latents the sampler's context encoding and decoders see); only the prior trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from modalities.image import ImageModality
from modalities.layout import get_layout, place_segments, segment_order
from modalities.registry import LatentSequence
from modalities.text import TextModality
from prior.training.flow_matching import FlowMatchingConfig, RectifiedFlowPath, cut_clean_context, sample_t
from prior.training.outputs import LossOutput
from unimodal.masks import AttentionMask, two_l_block_mask


@dataclass
class MultimodalConfig:
    """The unified prior's data mix and loss (YAML ``multimodal:`` section)."""

    text_vae: str | None = None  # Stage-1 Text VAE run folder or export (trained on the captions)
    image_vae: str | None = None  # image VAE run folder / export, or any AutoencoderKL folder
    patch_size: int = 2  # image latents are cut into patch_size x patch_size tokens
    layout_weights: dict[str, float] = field(
        default_factory=lambda: {"text_to_image": 0.5, "image_to_text": 0.4, "text": 0.1}
    )
    loss_weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "image": 1.0})
    loc: dict[str, float] = field(default_factory=dict)  # per-modality logit-normal loc over flow.loc

    def __post_init__(self) -> None:
        for name in self.layout_weights:
            get_layout(name)
        if (
            not self.layout_weights
            or min(self.layout_weights.values()) < 0
            or sum(self.layout_weights.values()) <= 0
        ):
            raise ValueError(
                f"multimodal.layout_weights={dict(self.layout_weights)} needs non-negative weights, sum > 0"
            )
        if set(self.loss_weights) != {"text", "image"}:
            raise ValueError(
                f"multimodal.loss_weights must name text and image, got {sorted(self.loss_weights)}"
            )
        if self.patch_size < 1:
            raise ValueError(f"multimodal.patch_size={self.patch_size} must be >= 1")
        unknown = sorted(set(self.loc) - {"text", "image"})
        if unknown:
            raise ValueError(f"multimodal.loc names unknown modalities {unknown}; expected text and/or image")

    def flow_for(self, flow: FlowMatchingConfig, modality: str) -> FlowMatchingConfig:
        """The flow settings of one stream: ``flow`` with this modality's ``loc`` override, if any."""
        return stream_flow(flow, self.loc, modality)


def stream_flow(flow: FlowMatchingConfig, loc: dict[str, float] | None, modality: str) -> FlowMatchingConfig:
    """``flow`` with ``loc[modality]`` as its logit-normal location when given (per-stream time sampling)."""
    return replace(flow, loc=float(loc[modality])) if loc and modality in loc else flow


# ----------------------------------------------------------------------------- the 2L layout


@dataclass
class MultimodalTwoL:
    """One teacher-forcing forward over ``{modality: [clean ; noisy]}`` and its loss targets."""

    x: dict[str, torch.Tensor]  # {m: (B, 2N_m, d_m)}
    timestep: dict[str, torch.Tensor]  # {m: (B, 2N_m)} 0..1000, clean copies at 0
    positions: dict[str, torch.Tensor]  # {m: (B, 2N_m)}
    valid: dict[str, torch.Tensor]  # {m: (B, 2N_m)}
    attn_mask: AttentionMask  # over the model's concatenation order of the streams
    rope_positions: dict[str, torch.Tensor] | None  # {m: (B, 2N_m, A)} for an axial-RoPE prior, else None
    target: dict[str, torch.Tensor]  # {m: (B, N_m, d_m)} eps - z0
    loss_mask: dict[str, torch.Tensor]  # {m: (B, N_m)} valid noisy tokens
    t: dict[str, torch.Tensor]  # {m: (B, N_m)} in (0, 1)
    uncond: torch.Tensor  # (B,) rows cut off from the clean context


def build_multimodal_2l(
    segments: dict[str, LatentSequence],
    modality_order: list[str],
    cfg: FlowMatchingConfig,
    generator: torch.Generator | None = None,
    *,
    eps: dict[str, torch.Tensor] | None = None,
    t: dict[str, torch.Tensor] | None = None,
    uncond: torch.Tensor | None = None,
    rope_axes: int = 1,
    loc: dict[str, float] | None = None,
) -> MultimodalTwoL:
    """The 2L layout of placed segments (positions and block ids already joint, e.g. by
    :func:`~modalities.layout.place_segments`). ``modality_order`` is the prior's stream order (the
    order its forward concatenates the dict); ``rope_axes``: the prior's (its RoPE coordinates come
    from each segment's ``rope_coordinates``); overrides ``eps``/``t`` per modality and ``uncond``
    (B,) are for tests. Random draws, in order: t per block per modality, eps per modality, uncond."""
    names = [m for m in modality_order if m in segments]
    first = segments[names[0]]
    batch, dev = first.batch_size, first.latents.device
    num_blocks = 1 + max(int(s.block_ids.masked_fill(~s.valid, 0).max()) for s in segments.values())
    x, ts, pos, val, target, loss_mask, t_out, blk, noisy, rope = {}, {}, {}, {}, {}, {}, {}, [], [], {}
    for m in names:
        s = segments[m]
        blocks = s.block_ids.clamp(0, num_blocks - 1)
        if t is None:
            t_m = sample_t(
                (batch, num_blocks), stream_flow(cfg, loc, m), s.latent_dim, dev, generator
            ).gather(1, blocks)  # (B, N)
        else:
            t_m = t[m].to(dev, torch.float32)
        e = eps[m] if eps is not None else torch.randn(s.latents.shape, generator=generator, device=dev)
        path = RectifiedFlowPath().sample(s.latents, e.to(s.latents), t_m)
        x[m] = torch.cat((s.latents, path.z_t), dim=1)
        ts[m] = torch.cat((torch.zeros_like(t_m), 1000.0 * t_m), dim=1)
        pos[m] = torch.cat((s.positions, s.positions), dim=1)
        val[m] = torch.cat((s.valid, s.valid), dim=1)
        target[m], loss_mask[m], t_out[m] = path.target, s.valid, t_m
        coords = s.rope_coordinates(rope_axes)
        if coords is not None:
            rope[m] = torch.cat((coords, coords), dim=1)
        blk.append(torch.cat((s.block_ids, s.block_ids), dim=1))
        noisy.append(torch.cat((torch.zeros_like(s.valid), torch.ones_like(s.valid)), dim=1))
    if uncond is None:
        uncond = torch.rand(batch, generator=generator, device=dev) < cfg.p_uncond
    blk_all, noisy_all = torch.cat(blk, 1), torch.cat(noisy, 1)
    mask = two_l_block_mask(blk_all, noisy_all, torch.cat([val[m] for m in names], 1))
    if cfg.p_uncond > 0 or bool(uncond.any()):
        mask = cut_clean_context(mask, noisy_all, uncond.to(dev))
    return MultimodalTwoL(x, ts, pos, val, mask, rope or None, target, loss_mask, t_out, uncond)


@dataclass
class MultimodalLoss:
    loss: torch.Tensor  # () differentiable
    per_modality: dict[str, torch.Tensor]  # {m: ()} detached: text CE (categorical) or MSE, image MSE
    counts: dict[str, torch.Tensor]  # {m: ()} noisy valid tokens


def multimodal_flow_loss(
    prior: nn.Module,
    segments: dict[str, LatentSequence],
    cfg: FlowMatchingConfig,
    loss_weights: dict[str, float],
    text_targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    draws: dict | None = None,
    loc: dict[str, float] | None = None,
) -> MultimodalLoss:
    """One 2L forward of ``prior`` on placed ``segments`` and the weighted per-stream losses.
    ``text_targets`` (B, N_text): token ids of the text latents (a categorical prior's CE targets);
    ``draws``: ``eps`` / ``t`` / ``uncond`` overrides of :func:`build_multimodal_2l` (per-row draws)."""
    modalities, axes = list(prior.config.modalities), prior.config.rope_axes
    batch = build_multimodal_2l(
        segments, modalities, cfg, generator, rope_axes=axes, loc=loc, **(draws or {})
    )
    out = prior(
        batch.x, batch.timestep, positions=batch.positions, valid=batch.valid, attn_mask=batch.attn_mask,
        rope_positions=batch.rope_positions,
    )  # fmt: skip
    total, parts, counts = 0.0, {}, {}
    for m, target in batch.target.items():
        n, mask = target.shape[1], batch.loss_mask[m]
        count = mask.sum()
        if m == "text" and out.logits is not None:
            if text_targets is None or text_targets.shape != mask.shape:
                raise ValueError(f"a categorical prior needs text_targets of shape {tuple(mask.shape)}")
            per_token = F.cross_entropy(
                out.logits[:, n:].flatten(0, 1).float(), text_targets.flatten(), reduction="none"
            ).view_as(mask)
        else:
            per_token = (out.velocity[m][:, n:].float() - target.float()).pow(2).mean(-1)  # (B, N)
        per_row = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B,) 0 for rows without m
        loss_m = per_row.sum() / mask.shape[0]
        total = total + loss_weights[m] * loss_m
        parts[m], counts[m] = loss_m.detach(), count
    return MultimodalLoss(total, parts, counts)


# ----------------------------------------------------------------------------- the model


class MultimodalModel(nn.Module):
    """Frozen Text VAE + frozen image VAE + the trained MMDiT; ``forward`` is the training loss."""

    def __init__(self, text: TextModality, image: ImageModality, prior: nn.Module, cfg: MultimodalConfig,
                 flow: FlowMatchingConfig, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.seed = int(seed)
        if sorted(prior.config.modalities) != ["image", "text"]:
            raise ValueError(
                f"the multimodal prior needs modalities text and image, got {prior.config.modalities}"
            )
        self.text_vae, self.image_vae, self.prior = text.vae, image.image_vae, prior
        self.text, self.image, self.cfg, self.flow = text, image, cfg, flow
        for module in (self.text_vae, self.image_vae):
            module.requires_grad_(False)
            module.eval()
        names = list(cfg.layout_weights)
        self._layouts = [segment_order(get_layout(n)) for n in names]
        self._weights = torch.tensor([cfg.layout_weights[n] for n in names], dtype=torch.float)

    def train(self, mode: bool = True) -> MultimodalModel:
        super().train(mode)
        self.text_vae.eval()  # frozen autoencoders stay in eval mode (no dropout)
        self.image_vae.eval()
        return self

    def trainable_parameters(self, step: int = 0) -> list[nn.Parameter]:
        return [p for p in self.prior.parameters() if p.requires_grad]

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, LatentSequence]:
        """In-segment latent sequences of a batch: {text: (B, N_t, d_t), image: (B, N_i, d_i)}."""
        encoded = self.text_vae.encode(input_ids, valid)
        text = self.text.layout(encoded.latents.float(), encoded.valid)
        return {"text": text, "image": self.image.encode(images.to(self.text_vae.device))}

    def draw_orders(self, batch: int, gens: list[torch.Generator] | None = None) -> list[tuple[str, ...]]:
        """Each row's segment order, drawn from ``layout_weights`` (per-row generators, else the global RNG)."""
        if gens is None:
            picks = torch.multinomial(self._weights, batch, replacement=True).tolist()
        else:
            picks = [int(torch.multinomial(self._weights, 1, generator=g)) for g in gens]
        return [self._layouts[i] for i in picks]

    def row_generators(self, keys: torch.Tensor, step: int) -> list[torch.Generator]:
        """One CPU generator per row, seeded by (seed, step, key)."""
        mix = lambda k: (self.seed * 1_000_003 + step) * 2_147_483_647 + int(k)  # noqa: E731
        return [torch.Generator().manual_seed(mix(k) % (2**63)) for k in keys.tolist()]

    def row_draws(self, placed: dict[str, LatentSequence], gens: list[torch.Generator]) -> dict:
        """Per-row block times, noise and condition dropout (the overrides of build_multimodal_2l). Each
        row draws only what its own valid tokens need, so its draws do not depend on the batch."""
        eps, t = {}, {}
        for m in [m for m in self.prior.config.modalities if m in placed]:
            s = placed[m]
            lengths = s.valid.sum(1).tolist()
            blocks = s.block_ids.masked_fill(~s.valid, 0)
            t[m], eps[m] = torch.zeros(s.valid.shape), torch.zeros(s.latents.shape)
            for b, (g, n) in enumerate(zip(gens, lengths)):
                if n == 0:
                    continue
                first, last = int(blocks[b, :n].min()), int(blocks[b, :n].max())
                flow = self.cfg.flow_for(self.flow, m)
                t_row = sample_t((last - first + 1,), flow, s.latent_dim, generator=g)  # one per block
                t[m][b, :n] = t_row[blocks[b, :n] - first]
                eps[m][b, :n] = torch.randn((n, s.latent_dim), generator=g)
            t[m], eps[m] = t[m].to(s.latents.device), eps[m].to(s.latents)
        uncond = torch.cat([torch.rand(1, generator=g) for g in gens]) < self.flow.p_uncond
        return {"eps": eps, "t": t, "uncond": uncond.to(s.latents.device)}

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor, step: int = 0,
        keys: torch.Tensor | None = None,
    ) -> LossOutput:  # fmt: skip
        segments = self.encode(images, input_ids, valid)
        gens = None if keys is None else self.row_generators(keys, step)
        placed = place_segments(segments, self.draw_orders(images.shape[0], gens))
        draws = None if gens is None else self.row_draws(placed, gens)
        targets = input_ids if self.prior.config.prediction == "categorical" else None
        out = multimodal_flow_loss(
            self.prior, placed, self.flow, self.cfg.loss_weights, targets, draws=draws, loc=self.cfg.loc
        )
        logs = {f"{m}_loss": v for m, v in out.per_modality.items()}
        tokens = int(sum(c for c in out.counts.values()))
        return LossOutput(loss=out.loss, logs=logs, num_tokens=tokens)


def multimodal_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
    """The trainer's loss function: ``batch`` holds ``images``, ``input_ids``, ``valid`` (and ``keys``)."""
    return model(batch["images"], batch["input_ids"], batch["valid"], step=step, keys=batch.get("keys"))


__all__ = [
    "MultimodalConfig",
    "MultimodalLoss",
    "MultimodalModel",
    "MultimodalTwoL",
    "build_multimodal_2l",
    "multimodal_flow_loss",
    "multimodal_loss_fn",
]
