"""An explicit key/value cache, passed through ``forward`` and owned by the caller.

Block-wise generation reads the history many times and extends it once per block: the prior
runs K denoising steps that all *read* the cache, then one commit pass of the finished block
that *writes* it; the VAE decoder writes each decoded block. So the cache is a plain object with
two verbs, and a model never keeps cache state on its modules:

* ``keys_values(layer, k, v)`` returns ``[cache ; new]`` for attention without storing anything;
* ``update(layer, k, v)`` stores ``[cache ; new]`` (only in a forward called with
  ``update_cache=True``), and ``advance(positions, valid)`` records the new tokens' metadata
  once per forward, after the last layer.

Per layer it holds post-RoPE keys and values ``(B, H, S, D)``; the metadata ``positions (B, S)``
and ``valid (B, S)`` let masks treat cached keys exactly like fresh ones (a sample's prefix may be
shorter than another's: its missing slots are invalid). Caching post-RoPE keys is exact: RoPE
and the per-token key norms are deterministic per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys/values of committed tokens for ``num_layers`` attention layers."""

    num_layers: int
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    positions: torch.Tensor | None = None  # (B, S) int64
    valid: torch.Tensor | None = None  # (B, S) bool

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def seq_len(self) -> int:
        """Number of cached slots S (including invalid padding slots)."""
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

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[cached ; new] keys and values for attention, (B, H, S + Lq, D). Stores nothing."""
        if self.keys[layer] is None:
            return k, v
        return torch.cat((self.keys[layer], k), dim=2), torch.cat((self.values[layer], v), dim=2)

    def update(self, layer: int, k_all: torch.Tensor, v_all: torch.Tensor) -> None:
        """Store the keys/values returned by :meth:`keys_values` (the commit of a finished block)."""
        self.keys[layer], self.values[layer] = k_all, v_all

    def advance(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> None:
        """Append the metadata of the tokens just written to every layer."""
        self.positions, self.valid = self.key_metadata(q_pos, q_valid)

    def expand_for_cfg(self) -> KVCache:
        """A read-only (2B) view for one batched CFG forward: rows [0, B) see the cache, rows [B, 2B)
        (the unconditional branch) see none of it, as if the block stood alone."""
        if self.positions is None:
            return KVCache(self.num_layers)
        dup = KVCache(
            self.num_layers,
            keys=[None if k is None else torch.cat((k, k), dim=0) for k in self.keys],
            values=[None if v is None else torch.cat((v, v), dim=0) for v in self.values],
            positions=torch.cat((self.positions, self.positions), dim=0),
            valid=torch.cat((self.valid, torch.zeros_like(self.valid)), dim=0),
        )
        return dup

    def _check_batch(self, batch: int) -> None:
        if self.positions is not None and self.positions.shape[0] != batch:
            raise ValueError(f"KV cache holds batch {self.positions.shape[0]} but the input has batch {batch}")
