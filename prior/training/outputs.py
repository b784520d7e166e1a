"""What a training step and a training run return: the loss-function contract and the run summary.

Kept apart from the trainer so that objectives (:mod:`prior.training.joint`, the recipes' Stage-1
loss) depend on this small module only, not on the trainer and accelerate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

STOP_REASONS = {"max_steps": "reached max_steps", "time_budget": "time budget reached"}


@dataclass
class LossOutput:
    """What a loss function returns for one micro-batch."""

    loss: torch.Tensor  # scalar, differentiable
    # scalars, averaged for logging; the same keys on every process at a given step
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0  # tokens in this micro-batch (for tokens/s)


LossFn = Callable[[nn.Module, Any, int], LossOutput]


@dataclass
class TrainResult:
    """The summary of one ``Trainer.train()`` call."""

    step: int
    train_metrics: dict[str, float]  # means over the last logging window
    val_metrics: dict[str, float]  # the last evaluation ({} without a validation set)
    wall_time_s: float  # of this train() call
    tokens_per_second: float  # all processes, this train() call
    tokens_seen: int  # all processes, since step 0
    stop_reason: str  # "max_steps" | "time_budget"
    checkpoint: str | None  # the last checkpoint written

    def format(self) -> str:
        """A short human summary: steps, why the run stopped, final losses, time, checkpoint."""
        why = STOP_REASONS.get(self.stop_reason, self.stop_reason)
        lines = [
            f"stopped at step {self.step} ({why}) after {self.wall_time_s:.1f} s; "
            f"{self.tokens_seen:,} tokens seen, {self.tokens_per_second:,.0f} tokens/s"
        ]
        losses = [
            f"{name} loss {metrics['loss']:.4f}"
            for name, metrics in (("train", self.train_metrics), ("val", self.val_metrics))
            if "loss" in metrics
        ]
        if losses:
            lines.append(", ".join(losses))
        lines.append(f"checkpoint: {self.checkpoint or 'none written'}")
        return "\n".join(lines)
