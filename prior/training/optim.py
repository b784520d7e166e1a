"""The optimizer pieces every stage shares: AdamW parameter groups and the warmup-cosine LR schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from torch import nn


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _no_decay(module: nn.Module, param: nn.Parameter) -> bool:
    return param.ndim < 2 or isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower()


def param_groups(
    model: nn.Module, weight_decay: float, trainable: Iterable[nn.Parameter] | None = None
) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms, embeddings and 1-D params.

    ``trainable`` restricts the optimised set (default: every parameter with ``requires_grad``).
    """
    wanted = None if trainable is None else {id(p) for p in trainable}
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:  # tied weights belong to the first module that holds them
                continue
            seen.add(id(param))
            selected = param.requires_grad if wanted is None else id(param) in wanted
            if not selected:
                continue
            (no_decay if _no_decay(module, param) else decay).append(param)
    if wanted is not None and wanted - seen:
        stray = len(wanted - seen)
        raise ValueError(f"trainable_parameters holds {stray} tensors that are not parameters of the model")
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
