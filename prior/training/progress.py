"""What a training run reports while it runs: running means of the logs, and the progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from accelerate import Accelerator
from tqdm import tqdm


class MeanLogs:
    """Running means of scalar logs (per key), averaged over processes on ``reduce``."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: Mapping[str, float | torch.Tensor]) -> None:
        for key, value in logs.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"log {key!r} must be a scalar, got shape {tuple(value.shape)}")
                value = value.detach().float().reshape(())
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        device = accelerator.device
        sums = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=device) for k in keys])
        counts = torch.tensor([float(self.counts[k]) for k in keys], device=device)
        if accelerator.num_processes > 1:
            sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
        return dict(zip(keys, (sums / counts).tolist()))


class ProgressBar:
    """The training bar: optimizer steps to ``max_steps``, or the wall-clock budget when one is set.

    Without ``max_time_minutes`` the bar counts steps and its ETA is the time to ``max_steps``.
    With a budget its length is the budget and its position the run's elapsed training time, the
    same clock the trainer stops on and (with a budget) anneals the LR schedule on: it counts the
    time before a resume (``elapsed_before_s``), so a resumed run's bar starts where the last one
    stopped. Its ETA is the time left in the budget, and the postfix shows ``step k/max_steps``:
    the run stops at whichever limit comes first, so the ETA never promises more steps than the
    budget allows. The postfix also shows the current learning rate, whichever schedule runs.
    """

    def __init__(
        self,
        max_steps: int,
        max_time_minutes: float | None,
        step: int,
        start_time: float,
        disable: bool,
        elapsed_before_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``step``: the step the run starts at; ``start_time``: ``clock()`` at its start;
        ``elapsed_before_s``: training time spent before this run (resumed runs)."""
        self.max_steps, self.clock = max_steps, clock
        self.start_time = start_time - elapsed_before_s  # the clock reading of the run's time 0
        self.budget_s = None if max_time_minutes is None else max_time_minutes * 60
        if self.budget_s is None:
            self.bar = tqdm(total=max_steps, initial=step, desc="train", dynamic_ncols=True, disable=disable)
            self.postfix: dict[str, str] = {}
        else:
            budget = f"{max_time_minutes:g} min budget"
            fmt = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} of the " + budget + "{postfix}"
            self.bar = tqdm(
                total=self.budget_s,
                initial=min(elapsed_before_s, self.budget_s),
                desc="train",
                dynamic_ncols=True,
                disable=disable,
                bar_format=fmt,
            )
            if not disable:  # tqdm's own {elapsed}: the run's, counting the time before a resume
                self.bar.start_t -= elapsed_before_s
            self.postfix = {"step": f"{step}/{max_steps}"}

    def advance(
        self,
        step: int,
        loss: float | None = None,
        tokens_per_s: float | None = None,
        lr: float | None = None,
    ) -> None:
        """One optimizer step done (reaching ``step``); ``loss``, ``tokens_per_s``, ``lr`` when logged."""
        if loss is not None:
            self.postfix.update(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        if lr is not None:
            self.postfix["lr"] = f"{lr:.3g}"
        if self.budget_s is None:
            self.bar.update(1)
            if loss is not None or lr is not None:
                self.bar.set_postfix(self.postfix)
            return
        self.postfix["step"] = f"{step}/{self.max_steps}"
        self.bar.set_postfix(self.postfix, refresh=False)
        elapsed = min(self.clock() - self.start_time, self.budget_s)
        self.bar.update(max(0.0, elapsed - self.bar.n))

    def close(self) -> None:
        self.bar.close()
