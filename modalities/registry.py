"""The modality registry: named adapters between data and latent token sequences (docs/design.md §5).

Design choices
--------------
* **A modality is an adapter around one autoencoder.** It turns a batch of its data (texts,
  images, ...) into a :class:`LatentSequence` and back, and declares three things the prior needs
  to lay it out in a joint sequence: its ``latent_dim`` (the MMDiT stream's channels), its
  position scheme (``positions``) and how its tokens form attention blocks (``block_ids``).
* **One layout record.** :class:`LatentSequence` carries latents ``(B, N, d)`` with their
  ``valid`` mask, positions and block ids ``(B, N)``. Positions and block ids start at 0 inside a
  segment; whoever lays segments out one after another (the prior's task layouts, e.g.
  ``[text ctx][image gen]``) shifts them with :meth:`LatentSequence.offset`. Tokens in the same
  block attend to each other bidirectionally; a block attends to all earlier blocks.
* **Registry by decorator.** ``@register_modality("text")`` records the class under a unique
  identifier (the MMDiT's stream name) and sets ``cls.name``; :func:`get_modality` returns the
  class (its constructor takes the autoencoder), :func:`available_modalities` the sorted names.
  Unknown or duplicate names raise ValueError naming the value.
* ``modalities`` imports only ``unimodal`` and third-party packages (the import direction).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, TypeVar

import torch


@dataclass
class LatentSequence:
    """One modality segment of a batch, as the prior sees it (all tensors on one device)."""

    latents: torch.Tensor  # (B, N, d) float, normalised latents
    valid: torch.Tensor  # (B, N) bool, True = real token (False = padding)
    positions: torch.Tensor  # (B, N) int64, RoPE positions
    block_ids: torch.Tensor  # (B, N) int64, attention block of every token (non-decreasing in N)
    coords: torch.Tensor | None = None  # (B, N, 2) int64 (row, column) of grid tokens (images); None: 1-D

    def __post_init__(self) -> None:
        if self.latents.ndim != 3:
            raise ValueError(f"latents must be (B, N, d), got shape {tuple(self.latents.shape)}")
        bn = tuple(self.latents.shape[:2])
        for name in ("valid", "positions", "block_ids"):
            value = getattr(self, name)
            if tuple(value.shape) != bn:
                raise ValueError(f"{name} shape {tuple(value.shape)} != latents (B, N) {bn}")
        if self.coords is not None and tuple(self.coords.shape) != (*bn, 2):
            raise ValueError(f"coords shape {tuple(self.coords.shape)} != (B, N, 2) {(*bn, 2)}")
        if self.valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor, got {self.valid.dtype}")
        for name in ("positions", "block_ids"):
            dtype = getattr(self, name).dtype
            if dtype.is_floating_point or dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {dtype}")

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.latents.shape[1]

    @property
    def latent_dim(self) -> int:
        return self.latents.shape[2]

    def offset(self, positions: int | torch.Tensor = 0, blocks: int | torch.Tensor = 0) -> LatentSequence:
        """The same segment placed later in a joint sequence: positions and block ids shifted by a
        scalar or a per-sample ``(B,)`` offset."""

        def shift(x: torch.Tensor, by: int | torch.Tensor) -> torch.Tensor:
            by = torch.as_tensor(by, device=x.device, dtype=x.dtype)
            if by.ndim not in (0, 1) or (by.ndim == 1 and by.shape[0] != x.shape[0]):
                raise ValueError(f"offset must be a scalar or (B={x.shape[0]},), got shape {tuple(by.shape)}")
            return x + (by[:, None] if by.ndim == 1 else by)

        coords = (
            None if self.coords is None else shift(self.coords.flatten(1), positions).view_as(self.coords)
        )
        return LatentSequence(
            self.latents, self.valid, shift(self.positions, positions), shift(self.block_ids, blocks), coords
        )

    def rope_coordinates(self, axes: int) -> torch.Tensor | None:
        """(B, N, axes) coordinates for an axial-RoPE prior: the grid coordinates (shifted with the
        positions), or the position on every axis for 1-D segments; None for a 1-axis prior."""
        if axes == 1:
            return None
        if self.coords is not None:
            if axes != 2:
                raise ValueError(f"grid tokens have 2 coordinates, the prior rotates {axes} axes")
            return self.coords
        return self.positions[..., None].expand(*self.positions.shape, axes)


class Modality(ABC):
    """Adapter between one kind of data and latent token sequences (subclass and register)."""

    name: str = ""  # set by @register_modality

    @property
    @abstractmethod
    def latent_dim(self) -> int:
        """Channels per latent token (the MMDiT ``in_channels`` of this modality)."""

    @abstractmethod
    def encode(self, data: Any) -> LatentSequence:
        """A batch of data -> its latent sequence (positions and block ids start at 0)."""

    @abstractmethod
    def decode(self, sequence: LatentSequence | torch.Tensor) -> Any:
        """Latent sequence (or bare latents (B, N, d)) -> a batch of data."""

    @abstractmethod
    def block_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Block id of every token (B, N) given its in-segment positions (B, N)."""

    def positions(
        self, batch_size: int, num_tokens: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """In-segment positions (B, N): 0..N-1 for every sample (the default scheme)."""
        return torch.arange(num_tokens, device=device).expand(batch_size, num_tokens)

    def layout(self, latents: torch.Tensor, valid: torch.Tensor | None = None) -> LatentSequence:
        """Wrap latents (B, N, d) with this modality's positions and block ids (all valid by default)."""
        if latents.ndim != 3 or latents.shape[-1] != self.latent_dim:
            raise ValueError(f"latents must be (B, N, {self.latent_dim}), got shape {tuple(latents.shape)}")
        b, n, _ = latents.shape
        if valid is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=latents.device)
        positions = self.positions(b, n, latents.device)
        return LatentSequence(latents, valid, positions, self.block_ids(positions))

    def _as_sequence(self, sequence: LatentSequence | torch.Tensor) -> LatentSequence:
        if isinstance(sequence, LatentSequence):
            if sequence.latent_dim != self.latent_dim:
                raise ValueError(f"{self.name} latents have dim {self.latent_dim}, got {sequence.latent_dim}")
            return sequence
        return self.layout(sequence)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Modality]] = {}
M = TypeVar("M", bound=type[Modality])


def register_modality(name: str):
    """Class decorator: register a :class:`Modality` subclass under ``name`` and set ``cls.name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"modality name must be an identifier, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"modality {name!r} is already registered (by {_REGISTRY[name].__qualname__})")

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Modality)):
            raise TypeError(f"@register_modality({name!r}) needs a Modality subclass, got {cls!r}")
        if name in _REGISTRY:  # registered between decorator creation and application
            raise ValueError(f"modality {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_modality(name: str) -> type[Modality]:
    """The registered modality class called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown modality {name!r}; available: {available_modalities()}")
    return _REGISTRY[name]


def available_modalities() -> list[str]:
    """Sorted names of all registered modalities."""
    return sorted(_REGISTRY)


__all__ = [
    "LatentSequence",
    "Modality",
    "available_modalities",
    "get_modality",
    "register_modality",
]
