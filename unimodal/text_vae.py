"""Text VAE (Stage 1 of Cola DLM): tokens <-> a sequence of continuous latents.

Design choices
--------------
* **The released layout, parameter for parameter.** Module and parameter names mirror the
  released state_dict (``encoder.wte``, ``encoder.patch_embedder``, ``encoder.blocks.{i}.qkv_proj``,
  ..., ``decoder.final_layer``), so the official weights load with ``load_state_dict(strict=True)``
  (the config mapping lives with the other released-format facts in
  ``prior/checkpoints/released_format.py``; docs/released-format.md describes the format).
* **Released block wiring.** Post-norm blocks with the asymmetric residuals of the released code:
  ``y = LN_attn(x) + Attn(x)`` (attention reads the *un-normalised* x), ``out = y + LN_ffn(FFN(y))``.
  Fused bias-free ``[q | k | v]`` projection, affine LayerNorm over the full q and k vectors
  *before* the head split, NeoX (half-split) RoPE over the whole head (theta 5e5), SwiGLU as
  ``silu(second half) * first half``.
* **Block-causal everywhere.** Encoder and decoder attend block-causally over latent positions
  (``block_size`` 1 = strictly causal). A latent never depends on a later block, so a prefix
  encodes once and never changes as text is appended, and the decoder streams block by block
  with an explicit :class:`~unimodal.kv_cache.KVCache` (post-RoPE keys; read-only unless
  ``update_cache=True``).
* **Patches.** ``patch_embedder`` is a Conv1d with kernel = stride = ``patch_size`` p: latent j
  summarises tokens ``jp .. jp+p-1``; the decoder's ``unpatch_layer`` (Linear dim -> dim*p) gives
  latent j the logits of those p tokens. Inputs must be a multiple of p (callers pad).
* **Two posteriors, one Gaussian.** ``diagonal`` (released): ``final_layer`` gives [mean | logvar],
  the mean goes through a non-affine LayerNorm, logvar is clamped to [-30, 20]. ``logsnr`` (paper):
  ``mu`` = non-affine LayerNorm of ``final_layer``'s output and a scalar logSNR ``lambda``;
  ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``. Both are stored as
  ``N(mean, exp(logvar))`` (for logsnr: ``mean = alpha * mu``, ``logvar = log sigma^2``), so one
  sampler and one KL, ``0.5 * sum(mean^2 + exp(logvar) - 1 - logvar)``, serve both; for logsnr this
  is exactly ``0.5 * sum(alpha^2 mu^2 + sigma^2 - 1 - log sigma^2)``. The mode is ``mean``.
* **Encoder context** (``encoder_context``): ``block`` (released) lets each latent attend block-causally
  to the tokens before it; ``token`` lets it see only its own patch, so with patch size 1 every token
  id has one latent, a fixed table (what the prior's categorical head mixes; an extension).
* **Decoder history** (``decoder_window``, 0 = all, the release): with W > 0 the decoder attends
  only to the latents of its own and the W - 1 previous blocks, so the latents must carry more of
  their tokens themselves (a latent-geometry lever: the code the prior has to model depends on it).
* **Latent normalisation, released quirk.** ``normalize(z) = (z - shifting_factor) * scaling_factor``
  is applied after encoding; the decoder consumes normalised latents and the inverse is never
  applied (training and inference alike).
* **Losses.** Reconstruction CE + ``kl_weight * KL`` + ``bert_weight * BERT``. The BERT term masks a
  fraction ``bert_mask_ratio`` of the *encoder* input tokens with the [MASK] embedding row
  (``mask_token_id == vocab_size``); one encoder pass on the masked input, CE on the unmasked
  tokens is the reconstruction term, CE on the masked tokens is the BERT term. KL is summed over
  latent channels and averaged over valid latent positions; CE is averaged over tokens.
* **Padded batches.** ``(B, L)`` ids with a boolean ``valid`` mask (True = real token); a latent is
  valid if any token of its patch is. Positions restart at 0 per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from unimodal.attention import BACKENDS, Rotary, apply_rope, attention, rope_inv_freq, rotary
from unimodal.kv_cache import KVCache
from unimodal.masks import AttentionMask, block_causal_mask, windowed

POSTERIORS = ("diagonal", "logsnr")
DECODER_LATENTS = ("sample", "mean")  # what the Stage-1 decoder reconstructs from
ENCODER_CONTEXTS = ("block", "token")  # what each latent's encoder attention sees
LOGVAR_RANGE = (-30.0, 20.0)  # released DiagonalGaussianDistribution clamp


# ----------------------------------------------------------------------------- outputs


@dataclass
class TextVAEEncoderOutput:
    mean: torch.Tensor  # (B, N, d) posterior mean = mode (alpha * mu for logsnr), un-normalised
    logvar: torch.Tensor  # (B, N, d) posterior log-variance (a broadcast scalar for logsnr)
    latents: torch.Tensor  # (B, N, d) normalize(mean): what the prior and the decoder consume
    valid: torch.Tensor  # (B, N) bool, True = latent covers at least one real token


@dataclass
class TextVAEDecoderOutput:
    logits: torch.Tensor  # (B, N * p, V)
    valid: torch.Tensor  # (B, N * p) bool, token-level validity (latent validity repeated p times)


@dataclass
class TextVAELossOutput:
    loss: torch.Tensor  # () total = recon + kl_weight * kl + bert_weight * bert
    recon_loss: torch.Tensor  # () CE over valid, unmasked tokens
    kl: torch.Tensor  # () KL(q || N(0, I)) summed over channels, mean over valid latents
    bert_loss: torch.Tensor  # () CE over [MASK]ed encoder tokens (0 when none are masked)
    accuracy: torch.Tensor  # () argmax accuracy over valid, unmasked tokens
    bert_accuracy: torch.Tensor  # () argmax accuracy over masked tokens (0 when none)
    logsnr: torch.Tensor  # () lambda (logsnr) or mean(-logvar) over valid latents (diagonal)


# ----------------------------------------------------------------------------- helpers


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (same shape); 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _draw(kind: str, shape: tuple, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """``torch.rand``/``torch.randn`` on the generator's device, moved to ``like``'s device/dtype."""
    device = generator.device if generator is not None else like.device
    fn = torch.randn if kind == "normal" else torch.rand
    return fn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


# ----------------------------------------------------------------------------- blocks


class TextVAEBlock(nn.Module):
    """Post-norm transformer block with the released residual wiring (see the module docstring)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm_attn = nn.LayerNorm(dim, eps=eps)
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.LayerNorm(dim, eps=eps)  # full width, before the head split
        self.k_norm = nn.LayerNorm(dim, eps=eps)
        self.attn_out_proj = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim, eps=eps)
        self.ffn_proj = nn.Linear(dim, ffn_dim)  # [x | gate]
        self.ffn_out = nn.Linear(ffn_dim // 2, dim)

    def attn(
        self,
        x: torch.Tensor,
        rope: Rotary,
        mask: AttentionMask,
        layer: int,
        kv_cache: KVCache | None,
        backend: str,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv_proj(x)  # (B, N, 3D)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, N, D) each
        q, k = self.q_norm(q).to(qkv.dtype), self.k_norm(k).to(qkv.dtype)
        heads = (b, n, self.num_heads, self.head_dim)  # channel layout (h c), as released
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd) each
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.keys_values(layer, k, v)  # (B, H, S + N, hd): [cache ; new]
        out = attention(q, k, v, mask, backend=backend)  # (B, H, N, hd)
        return self.attn_out_proj(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, D)

    def ffn(self, y: torch.Tensor) -> torch.Tensor:
        h, gate = self.ffn_proj(y).chunk(2, dim=-1)  # (B, N, F/2) each
        return self.ffn_out(F.silu(gate) * h)  # (B, N, D)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, D)
        rope: Rotary,  # NeoX tables of the N positions
        mask: AttentionMask,
        layer: int,
        kv_cache: KVCache | None = None,
        backend: str = "sdpa",
    ) -> torch.Tensor:
        attn = self.attn(x, rope, mask, layer, kv_cache, backend)
        y = self.norm_attn(x) + attn  # released wiring: LN of x plus attention of the un-normalised x
        return y + self.norm_ffn(self.ffn(y))  # (B, N, D)


class TextVAEEncoder(nn.Module):
    """ids (B, L) -> posterior parameters (B, L/p, 2d) (diagonal) or (B, L/p, d) (logsnr)."""

    def __init__(self, cfg, out_dim: int) -> None:
        super().__init__()
        p, dim = cfg.patch_size, cfg.dim
        self.wte = nn.Embedding(cfg.vocab_size + 1, dim)  # row vocab_size = [MASK]
        self.patch_embedder = nn.Conv1d(dim, dim, kernel_size=p, stride=p)
        self.blocks = nn.ModuleList(
            TextVAEBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.layer_norm_eps)
            for _ in range(cfg.encoder_num_blocks)
        )
        self.final_layer = nn.Linear(dim, out_dim)  # no norm before it (released)
        self.final_norm = nn.LayerNorm(cfg.latent_dim, eps=cfg.layer_norm_eps, elementwise_affine=False)

    def forward(self, input_ids: torch.Tensor, rope: Rotary, mask, backend: str) -> torch.Tensor:
        h = self.wte(input_ids)  # (B, L, D)
        h = self.patch_embedder(h.transpose(1, 2)).transpose(1, 2)  # (B, N, D), N = L / p
        for i, block in enumerate(self.blocks):
            h = block(h, rope, mask, layer=i, backend=backend)
        return self.final_layer(h)  # (B, N, 2d | d)


class TextVAEDecoder(nn.Module):
    """latents (B, N, d) -> logits (B, N*p, V), block-causal, optionally through a KV cache."""

    def __init__(self, cfg) -> None:
        super().__init__()
        dim, self.patch_size = cfg.dim, cfg.patch_size
        self.in_layer = nn.Linear(cfg.latent_dim, dim)
        self.blocks = nn.ModuleList(
            TextVAEBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.layer_norm_eps)
            for _ in range(cfg.decoder_num_blocks)
        )
        self.unpatch_layer = nn.Linear(dim, dim * cfg.patch_size)
        self.final_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.final_layer = nn.Linear(dim, cfg.vocab_size)  # untied LM head, no [MASK] output

    def forward(self, latents, rope: Rotary, mask, kv_cache, backend) -> torch.Tensor:
        b, n, _ = latents.shape
        h = self.in_layer(latents)  # (B, N, D)
        for i, block in enumerate(self.blocks):
            h = block(h, rope, mask, i, kv_cache, backend=backend)
        h = self.unpatch_layer(h).reshape(b, n * self.patch_size, -1)  # (B, N*p, D): latent j -> tokens jp..
        return self.final_layer(self.final_norm(h))  # (B, N*p, V)


# ----------------------------------------------------------------------------- model


class TextVAE(ModelMixin, ConfigMixin):
    """Block-causal Text VAE with the released Cola DLM layout (defaults = the released ~500M model)."""

    _no_split_modules = ["TextVAEBlock"]

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 100278,
        dim: int = 1536,
        ffn_dim: int = 6144,
        num_heads: int = 12,
        encoder_num_blocks: int = 4,
        decoder_num_blocks: int = 4,
        latent_dim: int = 16,
        patch_size: int = 1,
        block_size: int = 4,
        max_seq_len: int = 4096,
        rope_theta: float = 500000.0,
        layer_norm_eps: float = 1e-6,
        posterior: str = "diagonal",
        logsnr_init: float = 4.5,
        logsnr_learnable: bool = True,
        scaling_factor: float = 1.0,
        shifting_factor: float = 0.0,
        kl_weight: float = 1e-4,
        bert_weight: float = 1.0,
        bert_mask_ratio: float = 0.15,
        decoder_latents: str = "sample",
        encoder_context: str = "block",
        decoder_window: int = 0,
        init_std: float = 0.02,
        init_cutoff_factor: float = 3.0,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"unknown posterior {posterior!r}; expected one of {POSTERIORS}")
        if encoder_context not in ENCODER_CONTEXTS:
            raise ValueError(
                f"unknown encoder_context {encoder_context!r}; expected one of {ENCODER_CONTEXTS}"
            )
        if decoder_latents not in DECODER_LATENTS:
            raise ValueError(f"unknown decoder_latents {decoder_latents!r}; expected {DECODER_LATENTS}")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even size")
        if ffn_dim % 2:
            raise ValueError(f"ffn_dim must be even for SwiGLU, got {ffn_dim}")
        for name, value in (
            ("patch_size", patch_size),
            ("block_size", block_size),
            ("max_seq_len", max_seq_len),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= bert_mask_ratio < 1.0:
            raise ValueError(f"bert_mask_ratio must be in [0, 1), got {bert_mask_ratio}")
        if decoder_window < 0:
            raise ValueError(f"decoder_window must be >= 0 (0 = all history), got {decoder_window}")
        self.set_attn_backend(attn_backend)
        cfg = self.config
        out_dim = 2 * latent_dim if posterior == "diagonal" else latent_dim
        self.encoder = TextVAEEncoder(cfg, out_dim)
        self.decoder = TextVAEDecoder(cfg)
        if posterior == "logsnr":  # scalar logSNR lambda: a parameter, or a fixed buffer
            if logsnr_learnable:
                self.logsnr = nn.Parameter(torch.tensor(float(logsnr_init)))
            else:
                self.register_buffer("logsnr", torch.tensor(float(logsnr_init)))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Truncated normal (std ``init_std``, cut at ``init_cutoff_factor`` std) for every
        linear/conv/embedding weight, zero biases, LayerNorm 1/0 (released init); lambda = logsnr_init."""
        std = self.config.init_std
        cut = self.config.init_cutoff_factor * std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std, a=-cut, b=cut)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.posterior == "logsnr":
            with torch.no_grad():
                self.logsnr.fill_(self.config.logsnr_init)

    def set_attn_backend(self, backend: str) -> None:
        """Switch the attention kernel at run time (an execution detail: the saved config keeps its own)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
        self.attn_backend = backend

    @property
    def mask_token_id(self) -> int:
        """The BERT [MASK] id: the extra embedding row ``vocab_size``."""
        return self.config.vocab_size

    def new_kv_cache(self) -> KVCache:
        """An empty decoder KV cache (one slot per decoder block)."""
        return KVCache(self.config.decoder_num_blocks)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        return rope_inv_freq(self.config.dim // self.config.num_heads, self.config.rope_theta).to(device)

    def _check_length(self, num_tokens: int) -> None:
        if num_tokens > self.config.max_seq_len:
            raise ValueError(f"sequence of {num_tokens} tokens exceeds max_seq_len {self.config.max_seq_len}")

    # ------------------------------------------------------------------------- encoder side

    def encode(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> TextVAEEncoderOutput:
        """ids (B, L) (+ valid (B, L)) -> posterior; L must be a multiple of ``patch_size``."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        b, length = input_ids.shape
        p = self.config.patch_size
        if length == 0 or length % p:
            raise ValueError(f"input length {length} must be a positive multiple of patch_size {p} (pad it)")
        self._check_length(length)
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        elif valid.shape != input_ids.shape:
            raise ValueError(f"valid shape {tuple(valid.shape)} != input_ids shape {tuple(input_ids.shape)}")
        latent_valid = valid.bool().reshape(b, length // p, p).any(dim=-1)  # (B, N)
        positions = torch.arange(length // p, device=input_ids.device).expand(b, -1)  # (B, N)
        own = (
            positions if self.config.encoder_context == "token" else None
        )  # token: a latent sees its patch only
        mask = block_causal_mask(
            positions, positions, self.config.block_size, latent_valid, latent_valid, q_doc=own, k_doc=own
        )
        rope = rotary(positions, self._inv_freq(input_ids.device), "neox")
        out = self.encoder(input_ids, rope, mask, self.attn_backend)  # (B, N, 2d | d)
        d = self.config.latent_dim
        if self.config.posterior == "diagonal":
            mean = self.encoder.final_norm(out[..., :d])  # (B, N, d), non-affine LN
            logvar = out[..., d:].clamp(*LOGVAR_RANGE)  # (B, N, d)
        else:
            lam = self.logsnr.float()
            mu = self.encoder.final_norm(out)  # (B, N, d), unit second moment per position
            mean = mu * torch.exp(0.5 * F.logsigmoid(lam)).to(mu.dtype)  # alpha * mu
            logvar = F.logsigmoid(-lam).to(mu.dtype).expand_as(mean)  # log sigma^2
        return TextVAEEncoderOutput(
            mean=mean, logvar=logvar, latents=self.normalize(mean), valid=latent_valid
        )

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Prior-boundary normalisation ``(z - shift) * scale`` (never inverted before decoding)."""
        return (z - self.config.shifting_factor) * self.config.scaling_factor

    def project_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, N, d) -> the nearest point of the set the encoder's mode lies on.

        The mode is ``alpha * LN(h)`` (``alpha = sqrt(sigmoid(lambda))`` for the logsnr posterior, 1
        for the diagonal one) with a non-affine LayerNorm: per latent, zero channel mean and an RMS of
        ``alpha`` (up to LN's eps), i.e. a sphere in the zero-mean hyperplane. The projection undoes
        the normalisation, centres, rescales to that RMS and normalises again."""
        cfg = self.config
        z = latents.float() / cfg.scaling_factor + cfg.shifting_factor  # un-normalised
        centred = z - z.mean(-1, keepdim=True)
        rms = centred.square().mean(-1, keepdim=True).clamp_min(1e-12).sqrt()
        alpha = torch.exp(0.5 * F.logsigmoid(self.logsnr.float())) if cfg.posterior == "logsnr" else 1.0
        return self.normalize(alpha * centred / rms).to(latents.dtype)

    def sample(
        self, encoded: TextVAEEncoderOutput, generator: torch.Generator | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """A posterior sample ``mean + exp(logvar / 2) * eps`` (B, N, d), normalised by default."""
        eps = _draw("normal", tuple(encoded.mean.shape), generator, encoded.mean)
        z = encoded.mean + torch.exp(0.5 * encoded.logvar) * eps
        return self.normalize(z) if normalize else z

    @staticmethod
    def kl(encoded: TextVAEEncoderOutput) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per latent position, summed over channels: (B, N)."""
        mean, logvar = encoded.mean.float(), encoded.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)

    # ------------------------------------------------------------------------- decoder side

    def decode(
        self,
        latents: torch.Tensor,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> TextVAEDecoderOutput:
        """Normalised latents (B, N, d) -> logits (B, N*p, V).

        With ``kv_cache`` the latents continue the cached sequence (positions default to
        ``cache.lengths() + arange(N)``); the cache is only written when ``update_cache`` is True.
        """
        if latents.ndim != 3 or latents.shape[-1] != self.config.latent_dim:
            raise ValueError(f"latents must be (B, N, {self.config.latent_dim}), got {tuple(latents.shape)}")
        if update_cache and kv_cache is None:
            raise ValueError("update_cache=True needs a kv_cache")
        b, n, _ = latents.shape
        if n == 0:
            raise ValueError("cannot decode an empty latent sequence")
        device = latents.device
        valid = torch.ones(b, n, dtype=torch.bool, device=device) if valid is None else valid.bool()
        if valid.shape != (b, n):
            raise ValueError(f"valid shape {tuple(valid.shape)} != latent shape {(b, n)}")
        cached = kv_cache is not None and kv_cache.seq_len > 0
        if positions is None:
            start = kv_cache.lengths()[:, None] if cached else 0
            positions = start + torch.arange(n, device=device)[None, :]  # (B, N)
        positions = positions.expand(b, n)
        self._check_length((int(positions.max()) + 1) * self.config.patch_size)
        if kv_cache is not None:
            k_pos, k_valid = kv_cache.key_metadata(positions, valid)  # (B, S + N) each
        else:
            k_pos, k_valid = positions, valid
        mask = block_causal_mask(positions, k_pos, self.config.block_size, valid, k_valid)
        if self.config.decoder_window:  # the decoder sees only the last `decoder_window` blocks
            bs = self.config.block_size
            mask = windowed(mask, positions // bs, k_pos // bs, self.config.decoder_window)
        rope = rotary(positions, self._inv_freq(device), "neox")
        logits = self.decoder(latents, rope, mask, kv_cache, self.attn_backend)  # (B, N*p, V)
        if update_cache:
            kv_cache.advance(positions, valid)
        return TextVAEDecoderOutput(
            logits=logits, valid=valid.repeat_interleave(self.config.patch_size, dim=1)
        )

    # ------------------------------------------------------------------------- training

    def loss(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TextVAELossOutput:
        """Reconstruction CE + kl_weight * KL + bert_weight * BERT CE on ids (B, L)."""
        cfg = self.config
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        bert_mask = torch.zeros_like(valid)  # (B, L) True = [MASK]ed in the encoder input
        if cfg.bert_mask_ratio > 0:
            bert_mask = (
                _draw("uniform", tuple(input_ids.shape), generator, valid.float()) < cfg.bert_mask_ratio
            ) & valid
        encoded = self.encode(input_ids.masked_fill(bert_mask, self.mask_token_id), valid)
        sample = cfg.decoder_latents == "sample"
        z = self.sample(encoded, generator) if sample else encoded.latents  # (B, N, d)
        logits = self.decode(z, encoded.valid).logits.float()  # (B, L, V)
        ce = F.cross_entropy(logits.flatten(0, 1), input_ids.flatten(), reduction="none").view_as(input_ids)
        recon_tokens = valid & ~bert_mask
        recon, bert = _masked_mean(ce, recon_tokens), _masked_mean(ce, bert_mask)
        kl = _masked_mean(self.kl(encoded), encoded.valid)
        with torch.no_grad():
            hit = (logits.argmax(dim=-1) == input_ids).float()
            if cfg.posterior == "logsnr":
                logsnr = self.logsnr.detach().float()
            else:
                logsnr = _masked_mean(-encoded.logvar.float().mean(dim=-1), encoded.valid)
        return TextVAELossOutput(
            loss=recon + cfg.kl_weight * kl + cfg.bert_weight * bert,
            recon_loss=recon,
            kl=kl,
            bert_loss=bert,
            accuracy=_masked_mean(hit, recon_tokens),
            bert_accuracy=_masked_mean(hit, bert_mask),
            logsnr=logsnr,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TextVAELossOutput:
        """The training loss (so DDP/accelerate wrappers can call the model directly)."""
        return self.loss(input_ids, valid, generator)
