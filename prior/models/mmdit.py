"""The block-causal MMDiT prior: per-modality weights, one joint attention.

The design is docs/design.md §3-§5; the released DiT it reproduces, docs/released-format.md §3.

Design choices
--------------
* **One model, N modalities.** Every modality owns its *stream* of weights: input projection,
  adaLN, fused QKV, per-head QK LayerNorms, attention output projection, MLP and final layer
  (SD3/flux MMDiT). Only the timestep embedding is shared. In every block each stream computes
  q, k, v for its own tokens; the segments are concatenated (in the model's modality order) and
  ONE attention runs over the joint sequence; its output is split back to the streams. With a
  single modality this is exactly the released Cola DiT, whose weights load after the renames of
  ``prior/checkpoints/released_format.py`` (docs/released-format.md).
* **Inputs.** ``x`` is a tensor ``(B, L, C)`` for a single-modality model, or a dict
  ``{modality: (B, L_m, C_m)}`` (a subset of the model's modalities). ``timestep``, ``positions``
  and ``valid`` are either tensors over the concatenated sequence ``(B, sum L_m)`` or dicts with
  the same keys as ``x``. The output mirrors ``x``: a tensor or a dict of velocities. The order
  of the segments is internal: what a token attends to is decided by ``positions`` and the
  mask only, so multi-modal callers pass explicit positions (and usually an explicit mask).
* **Timesteps per token** on the 0..1000 scale (0 = clean), shape ``(B, L)``; a ``(B,)`` vector
  or a scalar is one timestep per sample, embedded once and broadcast over its tokens.
* **adaLN as in the release, fused.** The released four heads per block (SiLU -> Linear:
  ``msa_in`` [shift|scale], ``msa_out`` gate, ``mlp_in`` [shift|scale], ``mlp_out`` gate) are one
  ``Linear(D, 6D)`` per stream whose rows are those four heads stacked, read as two
  :class:`Modulation` (shift, scale, gate): one GEMM instead of four, the same function. SiLU of
  the timestep embedding is computed once per forward and shared by all heads.
* **Attention.** Fused bias-free QKV ``[q(heads) | k | v]``, per-head affine LayerNorm on q and
  k, interleaved (GPT-J) RoPE on the first ``rope_dim`` channels of each head (theta 1e4),
  scale ``1/sqrt(head_dim)`` (``rope_axes > 1``: axial RoPE, FLUX-style: the rotated channels are
  split into one group per coordinate axis, e.g. an image token's (row, column)), through :func:`unimodal.attention.attention` with the configured
  backend. The default mask is block-causal from the positions (``config.block_size``); a caller
  passes any :class:`AttentionMask` instead (the 2L training mask ``two_l_mask``).
* **KV cache.** An explicit :class:`KVCache` is passed to ``forward``; it is read-only unless
  ``update_cache=True`` (prefill, commit of a finished block; ``commit_tokens=C`` keeps only the
  first C tokens, the clean block of the sampler's merged step). Keys are cached after the K norm
  and after RoPE. Default positions with a cache continue each sample (``lengths + arange``).
  ``context_free_rows=R`` marks the last R rows of the batch as standing alone: they attend over
  their own tokens only, at positions 0..L-1 by default, so one (2B) forward runs both CFG branches
  over a batch-B cache.
* **Two output parameterisations** (``prediction``): ``velocity`` (released) regresses
  ``eps - z0``; ``categorical`` (an extension, CDCD's score interpolation) predicts logits over the
  ``vocab_size`` token ids for the ``text`` stream, takes the clean estimate
  ``x0 = softmax(logits) @ token_latents`` (the latent of every token id, a buffer the recipe fills
  from a token-local Text VAE) and returns the velocity that estimate implies,
  ``(z_t - x0) / t``: the sampler and CFG see a velocity either way, the trainer a cross-entropy.
* **Two extensions of the input** (levers of README "Levers at equal wall clock"; off by default, the release unchanged):
  ``self_condition`` adds ``embed_self_cond(x0_prev)``, the previous step's clean estimate through a
  zero-initialised linear (Chen et al.'s self-conditioning; the trainer feeds a no-grad first
  pass's estimate to half the batches, the sampler the last Euler step's); ``history="tokens"``
  gives the prior a learned ``history_embed`` (vocab_size, C): callers put ``embed_history(ids)``
  where the clean latents of finished blocks would go (the 2L clean copy, the prompt, every
  commit), so the history is read as token embeddings, as continuous-token AR models do.
* **Per-run constants.** An :class:`AdaLNCache` passed by the sampler keeps the timestep
  embedding and adaLN outputs of the K grid values (and of t = 0) after their first use, so later
  blocks skip the timestep MLP and every adaLN linear.
* **Init.** :meth:`MMDiT.initialize_weights` applies the released init (xavier-uniform linears,
  each released adaLN head initialised as its own matrix, zero biases); with
  ``adaln_zero_init=True`` (default, for training from scratch) the adaLN linears and the final
  projections are zeroed so every block starts as the identity and the velocity at 0 (DiT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from prior.models.timestep import AdaLNCache, Conditioning, TimestepEmbedding, timestep_freqs
from unimodal.attention import BACKENDS, Rotary, apply_rope, attention, rope_inv_freq, rotary
from unimodal.kv_cache import KVCache
from unimodal.masks import AttentionMask, block_id_mask

PREDICTIONS = ("velocity", "categorical")
HISTORIES = ("latents", "tokens")  # what the clean copy of earlier blocks carries

Tensors = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class MMDiTOutput:
    """``velocity``: (B, L, C) for a tensor input, or {modality: (B, L_m, C_m)} for a dict input;
    ``logits``: (B, L_text, V) fp32 of the text stream's categorical head (``prediction="categorical"``),
    else None."""

    velocity: Tensors
    logits: torch.Tensor | None = None


@dataclass
class Modulation:
    """One adaLN triple: ``x + gate * f(LN(x) * (1 + scale) + shift)``; each (B, 1 or L, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(width, hidden)
        self.fc_out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Stream(nn.Module):
    """One modality's weights inside one block."""

    def __init__(self, width: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, qk_bias: bool):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.ada = nn.Linear(width, 6 * width)  # rows: msa [shift|scale|gate], mlp [shift|scale|gate]
        self.qkv = nn.Linear(width, 3 * heads * head_dim, bias=qk_bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=eps)
        self.norm_k = nn.LayerNorm(head_dim, eps=eps)
        self.proj = nn.Linear(heads * head_dim, width, bias=qk_bias)
        self.mlp = MLP(width, mlp_hidden)

    def modulation(self, c: Conditioning) -> tuple[Modulation, Modulation]:
        """The (attention, MLP) modulations of every token (T = L or 1)."""
        chunks = c.rows(self.ada).chunk(6, dim=-1)  # 6 x (B, T, D)
        return Modulation(*chunks[:3]), Modulation(*chunks[3:])

    # the two halves around the joint attention: tensors in, tensors out (what compile_streams wraps)

    def attention_inputs(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        """x (B, L, D) -> q, k (QK-normed), v, each (B, H, L, Dh)."""
        h = modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift, scale)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.norm_q(q), self.norm_k(k), v

    def attention_output(self, x, o, gate, mlp_shift, mlp_scale, mlp_gate) -> torch.Tensor:
        """x (B, L, D), attention output o (B, L, H*Dh) -> the block's output for this stream."""
        x = x + gate * self.proj(o)
        h = modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), mlp_shift, mlp_scale)
        return x + mlp_gate * self.mlp(h)


@dataclass
class _AttnContext:
    """What every block's attention needs besides the hidden states (built once per forward)."""

    positions: torch.Tensor  # (B, L) int64 of the queries
    mask: AttentionMask | None  # rows [0, cached_rows): over [cache ; tokens]
    rope: Rotary | None  # interleaved tables of the query positions (None: rope_dim 0)
    backend: str
    kv_cache: KVCache | None = None
    update_cache: bool = False
    cached_rows: int = 0  # rows that read the cache; the rest (CFG's unconditional branch) stand alone
    mask_alone: AttentionMask | None = None  # rows [cached_rows, B): over their own tokens


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: _AttnContext, layer: int):
    """Attention of one block, reading the KV cache when there is one. q/k/v: (B, H, L, Dh).

    With a cache of batch Bc < B (one batched CFG forward), rows [0, Bc) attend over
    [cache ; their tokens] and rows [Bc, B) over their own tokens only, as two kernel calls: the
    unconditional branch never spends work on history it may not see.
    """
    if ctx.kv_cache is None:
        return attention(q, k, v, ctx.mask, backend=ctx.backend)
    n = ctx.cached_rows
    k_all, v_all = ctx.kv_cache.keys_values(layer, k[:n], v[:n])  # (Bc, H, S + L, Dh)
    out = attention(q[:n], k_all, v_all, ctx.mask, backend=ctx.backend)
    if n == q.shape[0]:
        return out
    alone = attention(q[n:], k[n:], v[n:], ctx.mask_alone, backend=ctx.backend)
    return torch.cat((out, alone))


class MMDiTBlock(nn.Module):
    """Per-modality adaLN/QKV/MLP around one joint attention over all segments."""

    def __init__(
        self,
        modalities: list[str],
        width: int,
        heads: int,
        head_dim: int,
        mlp_hidden: int,
        eps: float,
        qk_bias: bool,
        layer: int,
    ):
        super().__init__()
        self.heads, self.head_dim, self.eps, self.layer = heads, head_dim, eps, layer
        self.streams = nn.ModuleDict(
            {m: Stream(width, heads, head_dim, mlp_hidden, eps, qk_bias) for m in modalities}
        )

    def forward(
        self, h: dict[str, torch.Tensor], c: dict[str, Conditioning], ctx: _AttnContext
    ) -> dict[str, torch.Tensor]:
        mods = {m: self.streams[m].modulation(c[m]) for m in h}
        qs, ks, vs = [], [], []
        for m, x in h.items():  # x: (B, L_m, D)
            msa = mods[m][0]
            q, k, v = self.streams[m].attention_inputs(x, msa.shift, msa.scale)  # (B, H, L_m, Dh)
            qs.append(q)
            ks.append(k)
            vs.append(v)
        q, k, v = (t[0] if len(t) == 1 else torch.cat(t, dim=2) for t in (qs, ks, vs))  # (B, H, L, Dh)
        if ctx.rope is not None:  # q and k rotated in one pass: (2, B, H, L, Dh)
            q, k = apply_rope(torch.stack((q, k)), ctx.rope).unbind(0)
        o = joint_attention(q, k, v, ctx, self.layer)  # (B, H, L, Dh)
        o = o.transpose(1, 2).flatten(2)  # (B, L, H*Dh)
        out = {}
        for (m, x), o_m in zip(h.items(), o.split([x.shape[1] for x in h.values()], dim=1)):
            msa, mlp = mods[m]
            out[m] = self.streams[m].attention_output(x, o_m, msa.gate, mlp.shift, mlp.scale, mlp.gate)
        return out


class FinalLayer(nn.Module):
    """Affine LayerNorm, adaLN [shift|scale] (no gate), Linear -> velocity."""

    def __init__(self, width: int, out_channels: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.ada = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, c: Conditioning) -> torch.Tensor:  # (B, L, D) -> (B, L, C)
        shift, scale = c.rows(self.ada).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------- model


class MMDiT(ModelMixin, ConfigMixin):
    """Block-causal MMDiT velocity model. See the module docstring for the design."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        modalities: list[str] = ["text"],  # noqa: B006 - the config schema; never mutated
        in_channels: list[int] = [16],  # noqa: B006 - latent dim per modality (= output channels)
        width: int = 2048,
        heads: int = 16,
        head_dim: int = 128,
        rope_dim: int = 96,
        rope_theta: float = 10000.0,
        mlp_ratio: float = 4.0,
        num_layers: int = 24,
        block_size: int = 16,
        norm_eps: float = 1e-5,
        qk_bias: bool = False,
        attn_backend: str = "sdpa",
        adaln_zero_init: bool = True,
        prediction: str = "velocity",
        vocab_size: int = 0,
        rope_axes: int = 1,
        self_condition: bool = False,
        history: str = "latents",
    ):
        super().__init__()
        modalities, in_channels = list(modalities), list(in_channels)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if prediction == "categorical" and ("text" not in modalities or vocab_size < 1):
            raise ValueError(
                f"prediction='categorical' needs a 'text' modality and vocab_size >= 1, got {modalities}, {vocab_size}"
            )
        if not modalities or len(modalities) != len(in_channels):
            raise ValueError(f"need one in_channels per modality, got {modalities} and {in_channels}")
        for m in modalities:
            if not m.isidentifier() or modalities.count(m) > 1:
                raise ValueError(f"modality names must be unique identifiers, got {m!r}")
        if rope_dim % 2 or not 0 <= rope_dim <= head_dim:
            raise ValueError(f"rope_dim must be even and in [0, head_dim={head_dim}], got {rope_dim}")
        if rope_axes < 1 or rope_dim % (2 * rope_axes):
            raise ValueError(
                f"rope_dim={rope_dim} must split into rope_axes={rope_axes} groups of channel pairs"
            )
        if attn_backend not in BACKENDS:
            raise ValueError(f"unknown attn_backend {attn_backend!r}; expected one of {BACKENDS}")
        if min(width, heads, head_dim, num_layers, block_size, *in_channels) < 1:
            raise ValueError("width, heads, head_dim, num_layers, block_size, in_channels must be >= 1")
        if history not in HISTORIES:
            raise ValueError(f"unknown history {history!r}; expected one of {HISTORIES}")
        if (self_condition or history == "tokens") and modalities != ["text"]:
            raise ValueError(f"self_condition / history='tokens' need modalities ['text'], got {modalities}")
        if history == "tokens" and vocab_size < 1:
            raise ValueError(f"history='tokens' needs vocab_size >= 1, got {vocab_size}")
        mlp_hidden = round(width * mlp_ratio)
        self.embed_in = nn.ModuleDict({m: nn.Linear(c, width) for m, c in zip(modalities, in_channels)})
        if self_condition:  # the previous clean estimate, added to the input embedding (zero-init)
            self.embed_self_cond = nn.Linear(in_channels[0], width, bias=False)
        if history == "tokens":  # a learned clean "latent" per token id, for the history of earlier blocks
            self.history_embed = nn.Embedding(vocab_size, in_channels[0])
        self.time_embed = TimestepEmbedding(width)
        self.blocks = nn.ModuleList(
            MMDiTBlock(modalities, width, heads, head_dim, mlp_hidden, norm_eps, qk_bias, layer=i)
            for i in range(num_layers)
        )
        out_channels = [vocab_size if prediction == "categorical" and m == "text" else c
                        for m, c in zip(modalities, in_channels)]  # fmt: skip
        self.final = nn.ModuleDict(
            {m: FinalLayer(width, c, norm_eps) for m, c in zip(modalities, out_channels)}
        )
        if prediction == "categorical":  # the latent of every token id (set from the VAE)
            self.register_buffer(
                "token_latents", torch.zeros(vocab_size, in_channels[modalities.index("text")])
            )
        self._freqs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Released init (xavier-uniform per released matrix, zero biases), then adaLN-Zero if configured."""
        width = self.config.width
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):  # history_embed: unit scale, like the latents
                nn.init.normal_(module.weight)
        for block in self.blocks:
            for stream in block.streams.values():  # the released four heads are four matrices
                for rows in stream.ada.weight.split([2 * width, width, 2 * width, width]):
                    nn.init.xavier_uniform_(rows)
        if self.config.adaln_zero_init:
            zero = [s.ada for b in self.blocks for s in b.streams.values()]
            zero += [layer for f in self.final.values() for layer in (f.ada, f.proj)]
            for layer in zero:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        if self.config.self_condition:  # a self-conditioned prior starts as the plain one
            nn.init.zeros_(self.embed_self_cond.weight)

    def compile_streams(self, freezing: bool = True, dynamic: bool = True) -> None:
        """``torch.compile`` the tensor-only halves of every stream (:meth:`Stream.attention_inputs`,
        :meth:`Stream.attention_output`); the joint attention and its KV cache stay eager, so the
        growing cache never changes a compiled graph. ``freezing`` (inductor) folds the weights in as
        constants and pre-packs them for oneDNN: inference only, and only until the weights change.
        ``dynamic``: one graph for every sequence length. Measured in README "Sampler speed"."""
        options = {"freezing": freezing}
        for block in self.blocks:
            for stream in block.streams.values():
                stream.attention_inputs = torch.compile(
                    stream.attention_inputs, dynamic=dynamic, options=options
                )
                stream.attention_output = torch.compile(
                    stream.attention_output, dynamic=dynamic, options=options
                )

    def _frequencies(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(RoPE inverse frequencies, timestep frequencies) in fp32 on ``device``. Plain cached tensors,
        not buffers, so that ``model.to(torch.bfloat16)`` can never round them."""
        if device not in self._freqs:
            inv_freq = rope_inv_freq(self.config.rope_dim // self.config.rope_axes, self.config.rope_theta)
            self._freqs[device] = (inv_freq.to(device), timestep_freqs().to(device))
        return self._freqs[device]

    # ------------------------------------------------------------------ input normalisation

    def _segments(self, x: Tensors) -> dict[str, torch.Tensor]:
        """x -> {modality: (B, L_m, C_m)} in the model's modality order, with shape checks."""
        mods, chans = self.config.modalities, dict(zip(self.config.modalities, self.config.in_channels))
        if isinstance(x, torch.Tensor):
            if len(mods) != 1:
                raise ValueError(
                    f"this MMDiT has modalities {list(mods)}: pass x as a dict {{modality: tensor}}"
                )
            x = {mods[0]: x}
        unknown = sorted(set(x) - set(mods))
        if unknown or not x:
            raise ValueError(
                f"x must map some of the modalities {list(mods)} to tensors, got keys {sorted(x)}"
            )
        xs = {m: x[m] for m in mods if m in x}
        batch = next(iter(xs.values())).shape[0]
        for m, t in xs.items():
            if t.ndim != 3 or t.shape[0] != batch or t.shape[2] != chans[m]:
                raise ValueError(f"x[{m!r}] must be (B={batch}, L, {chans[m]}), got {tuple(t.shape)}")
        return xs

    @staticmethod
    def _per_token(
        value, xs: dict[str, torch.Tensor], name: str, per_sample_ok: bool = False
    ) -> torch.Tensor:
        """A per-token quantity over the joint sequence: (B, L), or (B, 1) for a per-sample value."""
        batch, device = next(iter(xs.values())).shape[0], next(iter(xs.values())).device
        if isinstance(value, dict):
            if set(value) != set(xs):
                raise ValueError(f"{name} keys {sorted(value)} must match the x keys {sorted(xs)}")
            parts = [
                MMDiT._per_token(value[m], {m: t}, f"{name}[{m!r}]", per_sample_ok) for m, t in xs.items()
            ]
            lengths = [t.shape[1] for t in xs.values()]
            return torch.cat([p.expand(batch, n) for p, n in zip(parts, lengths)], dim=1)
        length = sum(t.shape[1] for t in xs.values())
        value = torch.as_tensor(value, device=device)
        if per_sample_ok and value.ndim == 0:
            return value.expand(batch, 1)
        if per_sample_ok and value.shape == (batch,):
            return value[:, None]
        if value.shape != (batch, length):
            allowed = "(), (B,) or (B, L)" if per_sample_ok else "(B, L)"
            raise ValueError(f"{name} must be {allowed} with B={batch}, L={length}; got {tuple(value.shape)}")
        return value

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensors,
        timestep: Tensors | float,
        positions: Tensors | None = None,
        valid: Tensors | None = None,
        attn_mask: AttentionMask | None = None,
        kv_cache: KVCache | None = None,
        update_cache: bool = False,
        context_free_rows: int = 0,
        block_ids: Tensors | None = None,
        rope_positions: Tensors | None = None,
        commit_tokens: int | None = None,
        adaln_cache: AdaLNCache | None = None,
        self_cond: torch.Tensor | None = None,
    ) -> MMDiTOutput:
        """Velocity of the latents ``x`` at per-token ``timestep`` (0..1000).

        x: (B, L, C) or {modality: (B, L_m, C_m)}; timestep: scalar, (B,) or (B, L) (or a dict);
        positions: (B, L) int64, default 0..L-1, or ``cache.lengths() + 0..L-1`` with a cache;
        valid: (B, L) bool, default all True; attn_mask: overrides the block-causal mask (it must
        cover the cached keys too); kv_cache: read, and written only if ``update_cache``.
        ``context_free_rows``: the last R rows attend over their own tokens only, never the cache
        (CFG's unconditional branch in the same batched forward: the block alone, at positions
        0..L-1 by default); the cache then holds the first B - R rows.
        block_ids: (B, L) int attention block of every token (or a dict), default
        ``positions // block_size``; the default mask lets a token see keys of blocks <= its own
        (the multimodal layouts: an image is one block). They are committed to the cache with the keys.
        rope_positions: (B, L, rope_axes) (or a dict) the coordinates RoPE rotates by when
        ``rope_axes > 1`` (axial RoPE, e.g. (row, column) of image tokens); default: every axis = the
        position. Unused with one axis.
        commit_tokens: with ``update_cache``, commit only the first C tokens of the rows that read
        the cache (default: all). The sampler's merged step: a finished clean block (t = 0) rides
        in front of the next noisy block; the mask keeps the clean tokens blind to the noisy ones
        (higher block ids), so their keys equal a separate commit pass's, and only they are kept.
        adaln_cache: reuse the timestep embedding and adaLN outputs of timestep sets seen before
        (:class:`AdaLNCache`; sampling only, the weights must not change while it lives).
        self_cond: (B, L, C) the previous clean estimate of every token (``self_condition=True``;
        None = zeros: the first step, clean tokens).
        """
        xs = self._segments(x)
        first = next(iter(xs.values()))
        batch, length, device = first.shape[0], sum(t.shape[1] for t in xs.values()), first.device
        t = self._per_token(timestep, xs, "timestep", per_sample_ok=True).float()  # (B, L) or (B, 1)
        valid = (
            torch.ones(batch, length, dtype=torch.bool, device=device)
            if valid is None
            else self._per_token(valid, xs, "valid").bool()
        )
        if kv_cache is not None and kv_cache.num_layers != self.config.num_layers:
            raise ValueError(f"KV cache has {kv_cache.num_layers} layers, the model {self.config.num_layers}")
        if update_cache and kv_cache is None:
            raise ValueError("update_cache=True needs a kv_cache")
        if not 0 <= context_free_rows <= batch:
            raise ValueError(f"context_free_rows must be in [0, B={batch}], got {context_free_rows}")
        if context_free_rows and attn_mask is not None:
            raise ValueError("context_free_rows needs the default mask")
        if commit_tokens is not None and not (update_cache and 0 <= commit_tokens <= length):
            raise ValueError(
                f"commit_tokens={commit_tokens} needs update_cache=True and 0 <= C <= L={length}"
            )
        n = batch - context_free_rows  # rows that read the cache
        if kv_cache is not None and kv_cache.batch_size not in (None, n):
            raise ValueError(
                f"KV cache holds batch {kv_cache.batch_size} but {n} rows read it "
                f"(batch {batch}, context_free_rows {context_free_rows})"
            )
        if positions is None:
            positions = torch.arange(length, device=device).expand(batch, length).clone()  # (B, L)
            if kv_cache is not None and kv_cache.seq_len:
                positions[:n] += kv_cache.lengths()[:, None]  # queries continue each sample
        else:
            positions = self._per_token(positions, xs, "positions").long()
        if block_ids is None:
            block_ids = torch.div(positions, self.config.block_size, rounding_mode="floor")  # (B, L)
        else:
            block_ids = self._per_token(block_ids, xs, "block_ids").long()
        mask_alone = None
        if attn_mask is None:
            q_blk, q_valid = block_ids[:n], valid[:n]
            k_blk, k_valid = (q_blk, q_valid)
            if kv_cache is not None:
                k_valid, k_blk = kv_cache.key_metadata(positions[:n], q_valid)[1], kv_cache.key_blocks(q_blk)
            attn_mask = block_id_mask(q_blk, k_blk, q_valid, k_valid)
            if n < batch:
                mask_alone = block_id_mask(block_ids[n:], block_ids[n:], valid[n:], valid[n:])

        inv_freq, time_freqs = self._frequencies(device)
        distinct, index = torch.unique(t, return_inverse=True)  # (U,), (B, L or 1)
        memo = None if adaln_cache is None else adaln_cache.entry(distinct)
        table = None if memo is None else memo.get("table")
        if table is None:
            table = F.silu(self.time_embed(distinct, time_freqs))  # (U, D), shared by all adaLN heads
            if memo is not None:
                memo["table"] = table
        if index.shape[1] == 1:
            cs = dict.fromkeys(xs, Conditioning(table, index, memo))
        else:
            parts = index.split([v.shape[1] for v in xs.values()], dim=1)
            cs = {m: Conditioning(table, i, memo) for m, i in zip(xs, parts)}
        h = {m: self.embed_in[m](v) for m, v in xs.items()}  # {m: (B, L_m, D)}
        if self_cond is not None:
            if not self.config.self_condition or self_cond.shape != first.shape:
                raise ValueError(
                    f"self_cond {tuple(self_cond.shape)} needs self_condition=True and the shape of x {tuple(first.shape)}"
                )
            h["text"] = h["text"] + self.embed_self_cond(self_cond.to(first.dtype))
        rope = self._rotary(positions, rope_positions, xs, inv_freq) if inv_freq.numel() else None
        ctx = _AttnContext(
            positions, attn_mask, rope, self.config.attn_backend, kv_cache, update_cache, n, mask_alone
        )
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing and kv_cache is None:
                h = self._gradient_checkpointing_func(block, h, cs, ctx)
            else:
                h = block(h, cs, ctx)
        if update_cache:  # the rows that read the cache (all but CFG's unconditional ones)
            c = length if commit_tokens is None else commit_tokens
            kv_cache.advance(positions[:n, :c], valid[:n, :c], block_ids[:n, :c])
        out = {m: self.final[m](h[m], cs[m]) for m in h}  # {m: (B, L_m, C_m)}
        if self.config.prediction == "categorical" and "text" in xs:
            return self._categorical(xs, t, out, isinstance(x, dict))
        return MMDiTOutput(out if isinstance(x, dict) else out[next(iter(out))])

    def _rotary(self, positions: torch.Tensor, rope_positions, xs: dict, inv_freq: torch.Tensor) -> Rotary:
        """Interleaved RoPE tables: 1-D from ``positions`` (released), or axial over ``rope_axes``
        coordinates, each axis rotating its own group of ``rope_dim / rope_axes`` channels."""
        axes = self.config.rope_axes
        if axes == 1:
            return rotary(positions, inv_freq, "interleaved")
        if rope_positions is None:
            coords = positions[..., None].expand(*positions.shape, axes)
        else:
            parts = [rope_positions[m] for m in xs] if isinstance(rope_positions, dict) else [rope_positions]
            coords = torch.cat([torch.as_tensor(c, device=positions.device) for c in parts], dim=1)
            if tuple(coords.shape) != (*positions.shape, axes):
                raise ValueError(
                    f"rope_positions must be (B, L, {axes}) = {(*positions.shape, axes)}, got {tuple(coords.shape)}"
                )
        angles = coords.float()[:, None, :, :, None] * inv_freq.to(positions.device)  # (B, 1, L, A, R/2A)
        angles = angles.flatten(-2).repeat_interleave(2, dim=-1)  # (B, 1, L, R): pairs share an angle
        return Rotary(angles.cos(), angles.sin(), "interleaved")

    def embed_history(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, C): the clean inputs of a ``history="tokens"`` prior's earlier blocks."""
        if self.config.history != "tokens":
            raise ValueError(f"embed_history needs history='tokens', this prior has {self.config.history!r}")
        return self.history_embed(ids)

    def set_token_latents(self, table: torch.Tensor) -> None:
        """The categorical head's latent of every token id, (V, C) (the VAE's latent of each token)."""
        if self.config.prediction != "categorical":
            raise ValueError("set_token_latents needs prediction='categorical'")
        if tuple(table.shape) != tuple(self.token_latents.shape):
            raise ValueError(
                f"token latents must be {tuple(self.token_latents.shape)}, got {tuple(table.shape)}"
            )
        self.token_latents.copy_(table.detach())

    def _categorical(
        self, xs: dict[str, torch.Tensor], t: torch.Tensor, out: dict, as_dict: bool
    ) -> MMDiTOutput:
        """Text logits -> clean estimate ``x0 = softmax(logits) @ token_latents`` -> velocity ``(z_t - x0) / t``
        (rectified flow: ``z_t = (1 - t) x0 + t eps``). At t = 0 (clean tokens) the velocity is 0. The
        other streams' outputs are velocities already."""
        z_t, logits = xs["text"], out["text"].float()  # (B, L_text, C), (B, L_text, V)
        if t.shape[1] > 1:  # per-token timesteps over the joint sequence: the text segment's
            start = sum(v.shape[1] for m, v in xs.items() if list(xs).index(m) < list(xs).index("text"))
            t = t[:, start : start + z_t.shape[1]]
        with torch.autocast(z_t.device.type, enabled=False):  # x0 in fp32 under a bf16 autocast too
            x0 = logits.softmax(-1) @ self.token_latents.float()  # (B, L_text, C)
        tt = (t.float() / 1000.0)[..., None]  # (B, L_text or 1, 1)
        velocity = torch.where(tt > 0, (z_t.float() - x0) / tt.clamp_min(1e-4), torch.zeros_like(x0))
        out = {**out, "text": velocity.to(z_t.dtype)}
        return MMDiTOutput(out if as_dict else out["text"], logits)
