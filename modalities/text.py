"""The text modality: strings <-> Text VAE latent sequences, in blocks of ``block_size`` latents.

Design choices
--------------
* **Tokenize without special tokens.** ``encode`` tokenizes with ``add_special_tokens=False`` (no
  BOS/EOS is added; append EOS to the strings yourself when a document must end), right-pads the
  batch with the tokenizer's PAD id and a token-level ``valid`` mask, and pads the length up to a
  multiple of the VAE ``patch_size`` (the VAE refuses other lengths). A latent is valid when its
  patch holds at least one real token (the VAE's rule).
* **Latents = the VAE's normalised posterior mode** (``TextVAE.encode(...).latents``), exactly what
  the prior trains on and what the decoder consumes; ``sample=True`` draws a normalised posterior
  sample instead. No ``no_grad`` here: joint training back-propagates through ``encode``.
* **Positions and blocks.** Positions are 0..N-1 per sample (latent index); block ids are
  ``position // block_size``, the prior's block size ``B`` (docs/design.md §3; default 16, not the
  VAE's own attention block size).
* **Decoding** runs the VAE decoder on the segment alone (VAE positions 0..N-1, whatever offset the
  segment had in a joint layout), takes greedy token ids on valid latents, drops PAD ids and, by
  default, cuts each text at its first EOS, then ``tokenizer.decode``.
* **The sampler's seam.** Block-wise generation works on token ids, so the id-level half of the
  adapter needs no tokenizer: :meth:`encode_ids` (ragged id rows -> latents with their validity),
  :meth:`new_decoder_cache` and :meth:`decode_logits` (the VAE decoder over a block, reading and
  extending its KV cache). The text-level half (:meth:`prompt_ids`, :meth:`detokenize`,
  :meth:`stop_token_ids`, :meth:`encode`, :meth:`decode`) needs the tokenizer; built with
  ``tokenizer=None`` it raises a ValueError saying so. The pipeline builds one adapter from its
  components; an image modality plugs into the same seam.
* **Prompts keep the tokenizer's defaults** (``add_special_tokens=True``, as the released
  ``Tokenizer.encode(text).ids``); stop ids are EOS plus ``<|im_end|>`` when the vocabulary has it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from modalities.registry import LatentSequence, Modality, register_modality
from unimodal.kv_cache import KVCache
from unimodal.text_vae import TextVAE
from unimodal.tokenization import check_special_tokens, default_stop_token_ids, model_vocab_size


@register_modality("text")
class TextModality(Modality):
    """Texts <-> Text VAE latents ``(B, N, latent_dim)``; blocks of ``block_size`` latents."""

    def __init__(self, vae: TextVAE, tokenizer: PreTrainedTokenizerBase | None, block_size: int) -> None:
        """``tokenizer=None``: the id-level half only (see the module docstring)."""
        if tokenizer is not None:
            check_special_tokens(tokenizer)
            num_ids, vocab = model_vocab_size(tokenizer), vae.config.vocab_size
            if num_ids > vocab:
                raise ValueError(f"tokenizer has {num_ids} ids but the Text VAE embeds {vocab}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.vae, self._tokenizer, self.block_size = vae, tokenizer, int(block_size)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise ValueError("this TextModality has no tokenizer (built with tokenizer=None): ids only")
        return self._tokenizer

    @property
    def latent_dim(self) -> int:
        return int(self.vae.config.latent_dim)

    @property
    def patch_size(self) -> int:
        """Tokens per latent."""
        return int(self.vae.config.patch_size)

    @property
    def vocab_size(self) -> int:
        return int(self.vae.config.vocab_size)

    @property
    def max_tokens(self) -> int:
        """The longest token sequence the VAE accepts."""
        return int(self.vae.config.max_seq_len)

    def block_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.div(positions, self.block_size, rounding_mode="floor")  # (B, N)

    # ------------------------------------------------------------------------- encode

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> right-padded ids (B, L) and valid (B, L), L a multiple of the VAE patch size."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        if len(texts) == 0:
            raise ValueError("texts is empty")
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"text {i} tokenizes to no tokens: {texts[i]!r}")
        p = self.vae.config.patch_size
        length = -(-max(len(row) for row in ids) // p) * p  # round up to a multiple of p
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(ids), length, dtype=torch.bool)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            valid[i, : len(row)] = True
        return input_ids.to(self.vae.device), valid.to(self.vae.device)

    def prompt_ids(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Prompts -> unpadded id lists (an empty prompt is an empty list)."""
        return [
            list(ids)
            for ids in self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        ]

    def stop_token_ids(self) -> list[int]:
        """EOS, and ``<|im_end|>`` when the vocabulary has it."""
        return default_stop_token_ids(self.tokenizer)

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def encode_ids(self, rows: Sequence[Sequence[int]]) -> LatentSequence:
        """Ragged id rows (each a multiple of the patch size long) -> latents (B, N, d), N the longest
        row's latents; a latent is valid when its patch holds a token of its row."""
        device = self.vae.device
        longest = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        valid = torch.zeros(len(rows), longest, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long, device=device)
            valid[i, : len(row)] = True
        encoded = self.vae.encode(ids, valid)
        return self.layout(encoded.latents.float(), encoded.valid)

    def encode(
        self, texts: Sequence[str], sample: bool = False, generator: torch.Generator | None = None
    ) -> LatentSequence:
        """texts -> normalised latents (B, N, d), N = ceil(max tokens / patch_size)."""
        input_ids, valid = self.tokenize(texts)  # (B, L) each
        encoded = self.vae.encode(input_ids, valid)
        latents = self.vae.sample(encoded, generator) if sample else encoded.latents  # (B, N, d)
        return self.layout(latents, encoded.valid)

    # ------------------------------------------------------------------------- decode

    @torch.no_grad()
    def token_ids(self, sequence: LatentSequence | torch.Tensor, stop_at_eos: bool = True) -> list[list[int]]:
        """Greedy token ids per sample: valid latents only, PAD dropped, cut at the first EOS."""
        seq = self._as_sequence(sequence)
        out = self.vae.decode(seq.latents, seq.valid)  # logits (B, N*p, V), valid (B, N*p)
        ids, valid = out.logits.argmax(dim=-1).cpu(), out.valid.cpu()
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        rows = []
        for row_ids, row_valid in zip(ids, valid):
            row = [t for t in row_ids[row_valid].tolist() if t != pad]
            if stop_at_eos and eos in row:
                row = row[: row.index(eos)]
            rows.append(row)
        return rows

    def decode(self, sequence: LatentSequence | torch.Tensor, stop_at_eos: bool = True) -> list[str]:
        """Latents (B, N, d) or a LatentSequence -> one string per sample (greedy decoding)."""
        return [self.tokenizer.decode(row) for row in self.token_ids(sequence, stop_at_eos)]

    def detokenize(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode([list(r) for r in rows], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------- block-wise decoding

    def new_decoder_cache(self) -> KVCache:
        return self.vae.new_kv_cache()

    def decode_logits(
        self,
        latents: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        """VAE decoder logits (B, N*p, V) fp32 of latents (B, N, d) at latent ``positions`` (B, N),
        attending over ``cache`` (extended when ``update_cache``)."""
        out = self.vae.decode(latents.to(self.vae.dtype), valid, positions, cache, update_cache=update_cache)
        return out.logits.float()


__all__ = ["TextModality"]
