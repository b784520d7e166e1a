"""The matched autoregressive baseline: a decoder-only transformer LM over the same tokens.

Cola DLM generates tokens with two networks, the block-causal prior and the Text VAE decoder; the
baseline is the plain next-token model the framework is measured against (as the paper measures
Cola against its AR baseline), trained in the same trainer on the same tokenizer, data and time
budget (``task: ar``, ``configs/text/ar_tiny.yaml``; the pipeline is
:class:`~prior.pipelines.pipeline_ar_text.ARTextPipeline`).

Size rule
---------
Width, heads, head dim, RoPE channels and MLP ratio are the Cola prior's (``prior:`` of
``configs/text/cola_tiny.yaml``); the depth is chosen so that the parameter count matches what
generates tokens in Cola at inference: **the prior's parameters plus the Text VAE decoder's**
(:func:`matched_num_layers`; the encoder only reads the prompt and is not counted). The tiny
configs obey it within 10% (a test checks).

Design choices
--------------
* **Our own small model, not ``transformers.LlamaForCausalLM``.** It uses the framework's own
  parts, so the comparison with the prior measures the objective, not two code bases: attention
  and RoPE from :mod:`unimodal.attention` (the same backends and kernels as the prior), masks from
  :mod:`unimodal.masks`, and the explicit :class:`~unimodal.kv_cache.KVCache` (read in every
  forward, written only by a forward with ``update_cache=True``), so a cached generation is
  checked exactly against an uncached recomputation and the pipeline owns the loop, as for Cola.
  A diffusers ``ModelMixin``/``ConfigMixin`` like the MMDiT: ``save_pretrained`` /
  ``from_pretrained`` and a config that the run YAML's ``ar:`` section mirrors.
* **The prior's block without adaLN.** Pre-norm blocks: affine LayerNorm -> fused bias-free QKV
  ``[q(heads) | k | v]`` -> per-head affine LayerNorm on q and k -> interleaved (GPT-J) RoPE on the
  first ``rope_dim`` channels of each head (theta 1e4) -> attention -> output projection; then
  affine LayerNorm -> MLP (GELU-tanh, ``mlp_ratio``). The prior's timestep modulation has no
  counterpart (there is no noise level); its place is taken by the LayerNorms' affine parameters.
* **Tokens in, logits out.** A token embedding ``(V, D)``, a final affine LayerNorm and an untied
  LM head ``(D -> V)``, as the VAE decoder's own untied head.
* **Causal attention from positions**: the mask is :func:`~unimodal.masks.causal_mask` of explicit
  per-token positions and validity, so cached keys, left padding (invalid slots) and rows of
  different lengths need no special case. Default positions are ``0..L-1``, or continue each
  row's cache (``cache.lengths() + 0..L-1``).
* **``causal=False``** makes it the bidirectional transformer of the masked-diffusion baseline
  (:mod:`prior.training.masked_diffusion`, :mod:`prior.sampling.masked_diffusion`): full attention
  over the valid tokens, no KV cache.
* **Init**: GPT-2's: normal(0, ``init_std``) for linear and embedding weights, the residual
  output projections scaled by ``1 / sqrt(2 num_layers)``, zero biases, LayerNorms 1 / 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from unimodal.attention import BACKENDS, Rotary, apply_rope, attention, rope_inv_freq, rotary
from unimodal.kv_cache import KVCache
from unimodal.masks import AttentionMask, block_id_mask, causal_mask


@dataclass
class ARTransformerOutput:
    """``logits``: (B, L, V), next-token logits at every input position."""

    logits: torch.Tensor


# ----------------------------------------------------------------------------- blocks


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(width, hidden)
        self.fc_out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class ARBlock(nn.Module):
    """Pre-norm causal self-attention + MLP (the prior's block without adaLN)."""

    def __init__(self, width: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, qk_bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm_attn = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * heads * head_dim, bias=qk_bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=eps)
        self.norm_k = nn.LayerNorm(head_dim, eps=eps)
        self.proj = nn.Linear(heads * head_dim, width, bias=qk_bias)
        self.norm_mlp = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        rope: Rotary | None,
        mask: AttentionMask,  # over [cache ; tokens]
        layer: int,
        kv_cache: KVCache | None,
        backend: str,
    ) -> torch.Tensor:
        qkv = self.qkv(self.norm_attn(x))  # (B, L, 3*H*Dh)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh)
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.keys_values(layer, k, v)  # (B, H, S + L, Dh): [cache ; new]
        o = attention(q, k, v, mask, backend=backend)  # (B, H, L, Dh)
        x = x + self.proj(o.transpose(1, 2).flatten(2))  # (B, L, D)
        return x + self.mlp(self.norm_mlp(x))


# ----------------------------------------------------------------------------- model


class ARTransformer(ModelMixin, ConfigMixin):
    """Decoder-only causal LM with an explicit KV cache. See the module docstring for the design."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        width: int = 256,
        heads: int = 4,
        head_dim: int = 64,
        rope_dim: int = 48,
        rope_theta: float = 10000.0,
        mlp_ratio: float = 4.0,
        num_layers: int = 7,
        max_seq_len: int = 2048,
        norm_eps: float = 1e-5,
        qk_bias: bool = False,
        attn_backend: str = "sdpa",
        init_std: float = 0.02,
        causal: bool = True,
    ):
        super().__init__()
        if rope_dim % 2 or not 0 <= rope_dim <= head_dim:
            raise ValueError(f"rope_dim must be even and in [0, head_dim={head_dim}], got {rope_dim}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"unknown attn_backend {attn_backend!r}; expected one of {BACKENDS}")
        for name, value in (
            ("vocab_size", vocab_size), ("width", width), ("heads", heads), ("head_dim", head_dim),
            ("num_layers", num_layers), ("max_seq_len", max_seq_len),
        ):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        mlp_hidden = round(width * mlp_ratio)
        self.embed = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(
            ARBlock(width, heads, head_dim, mlp_hidden, norm_eps, qk_bias) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(width, eps=norm_eps)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """GPT-2 init (module docstring)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # residual branches: std / sqrt(2 L)
            for out in (block.proj, block.mlp.fc_out):
                nn.init.normal_(out.weight, std=std / math.sqrt(2 * self.config.num_layers))

    def new_kv_cache(self) -> KVCache:
        """An empty KV cache (one slot per block)."""
        return KVCache(self.config.num_layers)

    def _rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE inverse frequencies in fp32 on ``device`` (a cached tensor, not a buffer: never cast)."""
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config.rope_dim, self.config.rope_theta).to(device)
        return self._inv_freq[device]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> ARTransformerOutput:
        """Next-token logits of ``input_ids`` (B, L).

        positions: (B, L) int64, default 0..L-1 or ``cache.lengths() + 0..L-1`` with a cache;
        valid: (B, L) bool, default all True (invalid slots, e.g. left padding, are never attended);
        kv_cache: read, and written only if ``update_cache`` (prefill, and each sampled token).
        """
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (B, L) with L >= 1, got {tuple(input_ids.shape)}")
        if update_cache and kv_cache is None:
            raise ValueError("update_cache=True needs a kv_cache")
        if kv_cache is not None and kv_cache.num_layers != self.config.num_layers:
            raise ValueError(f"KV cache has {kv_cache.num_layers} layers, the model {self.config.num_layers}")
        batch, length = input_ids.shape
        device = input_ids.device
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if valid is None else valid.bool()
        if positions is None:
            positions = torch.arange(length, device=device).expand(batch, length)  # (B, L)
            if kv_cache is not None and kv_cache.seq_len:
                positions = positions + kv_cache.lengths()[:, None]  # continue each row
        for name, t in (("positions", positions), ("valid", valid)):
            if t.shape != (batch, length):
                raise ValueError(f"{name} must be (B={batch}, L={length}), got {tuple(t.shape)}")
        positions = positions.long()
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        if not self.config.causal and kv_cache is not None:
            raise ValueError("a bidirectional (causal=False) transformer has no KV cache")
        k_pos, k_valid = (positions, valid) if kv_cache is None else kv_cache.key_metadata(positions, valid)
        if self.config.causal:
            mask = causal_mask(positions, k_pos, valid, k_valid)  # (B, L, S + L)
        else:  # every valid token sees every valid token (the masked-diffusion baseline)
            zeros = torch.zeros_like(positions)
            mask = block_id_mask(zeros, zeros, valid, valid)
        inv_freq = self._rope_inv_freq(device)
        rope = rotary(positions, inv_freq, "interleaved") if inv_freq.numel() else None
        backend = self.config.attn_backend
        h = self.embed(input_ids)  # (B, L, D)
        for i, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing and kv_cache is None:
                h = self._gradient_checkpointing_func(block, h, rope, mask, i, None, backend)
            else:
                h = block(h, rope, mask, i, kv_cache, backend)
        if update_cache:
            kv_cache.advance(positions, valid)
        return ARTransformerOutput(self.lm_head(self.norm_out(h)))  # (B, L, V)


# ----------------------------------------------------------------------------- the size rule


def count_parameters(model_cls: type[nn.Module], **config) -> int:
    """Parameters of ``model_cls(**config)``, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(**config).parameters())


def matched_num_layers(target: int, **config) -> int:
    """The depth (>= 1) whose :class:`ARTransformer` parameter count is nearest ``target``
    (the size rule: ``target`` = prior + Text VAE decoder parameters); ``config``: the other
    ``ARTransformer`` arguments (the prior's width, heads, head_dim, rope_dim, mlp_ratio)."""
    one = count_parameters(ARTransformer, **config, num_layers=1)
    per_layer = count_parameters(ARTransformer, **config, num_layers=2) - one
    return max(1, round((target - (one - per_layer)) / per_layer))


__all__ = ["ARTransformer", "ARTransformerOutput", "count_parameters", "matched_num_layers"]
