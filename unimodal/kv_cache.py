"""An explicit key/value cache, passed through ``forward`` and owned by the caller.

Block-wise generation reads the history many times and extends it once per block: the prior
runs K denoising steps that all *read* the cache, then one commit pass of the finished block
that *writes* it; the VAE decoder writes each decoded block. So the cache is a plain object with
two verbs, and a model never keeps cache state on its modules:

* ``keys_values(layer, k, v)`` returns ``[committed ; new]`` keys and values for attention, in
  every layer of every forward;
* ``advance(positions, valid)`` commits the new tokens, once, after the last layer of a forward
  called with ``update_cache=True`` (a block's commit pass, a prefill). Nothing else changes what
  the cache holds.

Storage is preallocated per layer, ``(B, H, capacity, D)``, and grows by doubling, so a forward
never copies the history: ``keys_values`` places the new tokens in the free slots after the
committed ones and returns a view; until ``advance`` those slots are scratch that the next
forward overwrites. Per layer it
holds post-RoPE keys and values; the metadata ``positions (B, S)`` and ``valid (B, S)`` let masks
treat cached keys exactly like fresh ones (a sample's prefix may be shorter than another's: its
missing slots are invalid). Caching post-RoPE keys is exact: RoPE and the per-token key norms are
deterministic per position. A model whose attention blocks are not ``position // block_size`` (the
multimodal prior: an image is one block) also commits per-token block ids (``blocks (B, S)``),
so a later query's mask reads the cached keys' blocks instead of guessing them from positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MIN_CAPACITY = 64


@dataclass
class KVCache:
    """Keys/values of committed tokens for ``num_layers`` attention layers."""

    num_layers: int
    keys: list[torch.Tensor | None] = field(default_factory=list)  # (B, H, capacity, D) per layer
    values: list[torch.Tensor | None] = field(default_factory=list)
    positions: torch.Tensor | None = None  # (B, S) int64 of the committed tokens
    valid: torch.Tensor | None = None  # (B, S) bool
    blocks: torch.Tensor | None = None  # (B, S) int64 attention-block ids, when the model commits them

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def seq_len(self) -> int:
        """Number of committed slots S (including invalid padding slots)."""
        return 0 if self.positions is None else self.positions.shape[1]

    @property
    def batch_size(self) -> int | None:
        return None if self.positions is None else self.positions.shape[0]

    def lengths(self) -> torch.Tensor:
        """(B,) number of valid cached tokens per sample: the next position to generate."""
        if self.valid is None:
            raise ValueError("the KV cache is empty: it has no lengths yet")
        return self.valid.sum(dim=1)

    def key_metadata(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity of the keys a forward sees: [cache ; new tokens], each (B, S + Lq)."""
        if self.positions is None:
            return q_pos, q_valid
        self._check_batch(q_pos.shape[0])
        return torch.cat((self.positions, q_pos), dim=1), torch.cat((self.valid, q_valid), dim=1)

    def key_blocks(self, q_blocks: torch.Tensor) -> torch.Tensor:
        """Block ids of the keys a forward sees: [cache ; new tokens], (B, S + Lq)."""
        if self.positions is None:
            return q_blocks
        if self.blocks is None:
            raise ValueError("the KV cache was filled without block ids; commit them with every advance")
        self._check_batch(q_blocks.shape[0])
        return torch.cat((self.blocks, q_blocks), dim=1)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[committed ; new] keys and values for attention, (B, H, S + Lq, D), as views.

        The new tokens (B, H, Lq, D) go to the free slots after the committed ones; they become part
        of the cache only if :meth:`advance` follows."""
        self._check_batch(k.shape[0])
        return self._place(layer, k, v)

    def advance(
        self, q_pos: torch.Tensor, q_valid: torch.Tensor, q_blocks: torch.Tensor | None = None
    ) -> None:
        """Commit the tokens the last forward placed in every layer by recording their metadata
        (and their block ids ``q_blocks`` (B, Lq), for a cache that keeps them from the start)."""
        if q_blocks is not None:
            self.blocks = self.key_blocks(q_blocks)
        elif self.blocks is not None:
            raise ValueError("this KV cache keeps block ids: pass q_blocks to advance")
        self.positions, self.valid = self.key_metadata(q_pos, q_valid)

    def _place(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v into the slots after the committed ones; return views of [committed ; new]."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end or buf_k.shape[0] != k.shape[0] or buf_k.dtype != k.dtype:
            capacity = max(_MIN_CAPACITY, 2 * end)
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if buf_k is not None and start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def _check_batch(self, batch: int) -> None:
        if self.positions is not None and self.positions.shape[0] != batch:
            raise ValueError(
                f"KV cache holds batch {self.positions.shape[0]} but the input has batch {batch}"
            )
