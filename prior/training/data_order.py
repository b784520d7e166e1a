"""The order of the training data and the RNG isolation of evaluation (see :mod:`prior.training.trainer`).

The data stream is a pure function of (seed, epoch, position): :class:`EpochSampler` yields a
seeded per-epoch permutation from an offset, so a resumed run reads exactly the samples an
uninterrupted one would; :func:`isolated_rng` runs a block (validation) under its own seed and
restores every RNG afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import Sampler


def mix_seed(*values: int) -> int:
    """A deterministic 32-bit seed (numpy accepts no more) from integers (seed, epoch, stream)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0xFFFFFFFF


class EpochSampler(Sampler[int]):
    """Indices of epoch ``epoch`` (a seeded permutation, or 0..n-1), starting at ``offset``.

    The trainer sets ``epoch`` and ``offset`` before each pass; accelerate shards the batches.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch, self.offset = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.offset :].tolist())

    def __len__(self) -> int:
        return max(0, self.num_samples - self.offset)


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block under ``seed`` and restore the torch (CPU + CUDA), numpy and python RNGs after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []  # this process's GPU
    with torch.random.fork_rng(devices=devices):
        set_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
