"""Modalities: registered adapters between data and the prior's latent token sequences.

Importing this package registers the built-in modalities ("text", "image").
"""

from modalities.image import ImageModality, patchify, unpatchify
from modalities.registry import (
    LatentSequence,
    Modality,
    available_modalities,
    get_modality,
    register_modality,
)
from modalities.text import TextModality

__all__ = [
    "ImageModality",
    "LatentSequence",
    "Modality",
    "TextModality",
    "available_modalities",
    "get_modality",
    "patchify",
    "register_modality",
    "unpatchify",
]
