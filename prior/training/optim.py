"""The optimizer pieces every stage shares: parameter groups, AdamW / Muon, the LR schedule, the EMA.

- **Parameter groups** (:func:`partition_parameters`): weight decay on matrices, none on biases,
  norms, embeddings and 1-D params. With Muon, the **hidden matrices** go to Muon: the 2-D weights
  of ``nn.Linear`` layers inside the model's repeated blocks, i.e. inside an ``nn.ModuleList``
  (``MMDiT.blocks``, the Text VAE's encoder and decoder blocks). Everything else stays with AdamW:
  embeddings, the input/output projections and heads outside the block stack (the timestep
  embedder, ``embed_in``, ``final``, the VAE's ``final_layer``), norms, biases and scalars. This is
  the split Muon was designed for (Jordan et al. 2024: the first and last layers and non-matrix
  parameters take AdamW) and the pairing the released pretraining script offers. The rule is
  structural, so a new model gets it right by keeping its blocks in an ``nn.ModuleList``.
- **The LR schedule** (:class:`LRSchedule`): a linear warmup over ``warmup_steps`` optimizer steps,
  then a shape over the *progress* ``p`` in [0, 1] of the rest of the run: ``cosine`` (half a
  cosine from 1 down to the floor) or ``warmdown`` (the released pretraining script: constant 1,
  then a linear fall to the floor over the last ``warmdown_fraction`` of the progress).
  :class:`ScheduleProgress` says what ``p`` is: the post-warmup share of ``max_steps``, and with a
  time budget the post-warmup share of the budget's wall clock, whichever is further on; so the
  schedule reaches its floor when the run stops, whichever limit stops it.
- **The EMA** (:class:`EMA`): an fp32 shadow copy of the trained parameters, updated after every
  optimizer step, swapped into the model for validation and exports (:meth:`EMA.applied`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

LR_SCHEDULES = ("cosine", "warmdown")
OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("match_rms_adamw", "original")
DEFAULT_FLOOR = {"cosine": 0.1, "warmdown": 0.05}  # the LR floor (a fraction of the peak) per schedule


# ----------------------------------------------------------------------------- the LR schedule


@dataclass(frozen=True)
class LRSchedule:
    """The LR multiplier at (optimizer step, post-warmup progress); see the module docstring."""

    kind: str  # cosine | warmdown
    warmup_steps: int
    floor: float  # the multiplier at progress 1
    warmdown_fraction: float = 0.65  # warmdown: the share of the progress spent falling to the floor

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"lr schedule must be one of {LR_SCHEDULES} (got {self.kind!r})")

    def factor(self, step: int, progress: float) -> float:
        """The multiplier of the peak LR for optimizer step ``step`` at ``progress`` in [0, 1]."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        p = min(1.0, max(0.0, progress))
        if self.kind == "cosine":
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p))
        start = 1 - self.warmdown_fraction  # warmdown: constant until here, then linear to the floor
        if p <= start:
            return 1.0
        return 1 - (1 - self.floor) * (p - start) / self.warmdown_fraction


def step_progress(step: int, warmup_steps: int, max_steps: int) -> float:
    """The post-warmup share of ``max_steps`` reached at ``step`` (0 during warmup, 1 at the end)."""
    return min(1.0, max(0.0, (step - warmup_steps) / max(1, max_steps - warmup_steps)))


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""
    schedule = LRSchedule("cosine", warmup_steps, min_lr_ratio)
    return lambda step: schedule.factor(step, step_progress(step, warmup_steps, max_steps))


class ScheduleProgress:
    """The schedule's progress: post-warmup share of the steps, or of the time budget if further on.

    With ``budget_s`` the time progress is ``(elapsed - warmup_end_s) / (budget_s - warmup_end_s)``,
    ``warmup_end_s`` the elapsed training time when warmup ended (recorded here, saved in the
    trainer state with the elapsed time, so a resumed run continues the same curve). Without a
    budget only the steps count, so a step-based run is exactly the warmup-cosine of before.
    """

    def __init__(self, warmup_steps: int, max_steps: int, budget_s: float | None) -> None:
        self.warmup_steps, self.max_steps, self.budget_s = warmup_steps, max_steps, budget_s
        self.warmup_end_s: float | None = 0.0 if warmup_steps == 0 else None
        self.value = 0.0

    def update(self, step: int, elapsed_s: float) -> float:
        """The progress once ``step`` optimizer steps are done after ``elapsed_s`` seconds."""
        if self.warmup_end_s is None and step >= self.warmup_steps:
            self.warmup_end_s = elapsed_s
        progress = step_progress(step, self.warmup_steps, self.max_steps)
        if self.budget_s is not None and self.warmup_end_s is not None:
            left = self.budget_s - self.warmup_end_s
            by_time = 1.0 if left <= 0 else (elapsed_s - self.warmup_end_s) / left
            progress = max(progress, min(1.0, max(0.0, by_time)))
        self.value = progress
        return progress


# ----------------------------------------------------------------------------- parameter groups


@dataclass
class ParamPartition:
    """The optimised parameters, split by optimizer and weight decay (no tensor twice)."""

    muon: list[nn.Parameter]  # hidden matrices (empty unless Muon is used)
    decay: list[nn.Parameter]  # other matrices: AdamW with weight decay
    no_decay: list[nn.Parameter]  # biases, norms, embeddings, 1-D params: AdamW without

    @property
    def all(self) -> list[nn.Parameter]:
        return [*self.muon, *self.decay, *self.no_decay]


def _no_decay(module: nn.Module, param: nn.Parameter) -> bool:
    return param.ndim < 2 or isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower()


def partition_parameters(
    model: nn.Module, trainable: Iterable[nn.Parameter] | None = None, muon: bool = False
) -> ParamPartition:
    """Split the optimised parameters (``trainable``, default: those with ``requires_grad``).

    ``muon``: move the hidden matrices (2-D ``nn.Linear`` weights inside an ``nn.ModuleList``) to
    their own list. Tied weights belong to the first module that holds them.
    """
    wanted = None if trainable is None else {id(p) for p in trainable}
    in_blocks = {id(sub) for m in model.modules() if isinstance(m, nn.ModuleList) for sub in m.modules()}
    parts = ParamPartition([], [], [])
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not (param.requires_grad if wanted is None else id(param) in wanted):
                continue
            if _no_decay(module, param):
                parts.no_decay.append(param)
            elif muon and isinstance(module, nn.Linear) and param.ndim == 2 and id(module) in in_blocks:
                parts.muon.append(param)
            else:
                parts.decay.append(param)
    if wanted is not None and wanted - seen:
        stray = len(wanted - seen)
        raise ValueError(f"trainable_parameters holds {stray} tensors that are not parameters of the model")
    if not parts.all:
        raise ValueError("the model has no trainable parameters")
    if muon and not parts.muon:
        raise ValueError(
            "train.optimizer='muon' found no hidden matrices (2-D nn.Linear weights inside an "
            "nn.ModuleList of blocks) among the trained parameters; use train.optimizer='adamw'"
        )
    return parts


def param_groups(
    model: nn.Module, weight_decay: float, trainable: Iterable[nn.Parameter] | None = None
) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms, embeddings and 1-D params."""
    parts = partition_parameters(model, trainable)
    return [
        {"params": parts.decay, "weight_decay": weight_decay},
        {"params": parts.no_decay, "weight_decay": 0.0},
    ]


def build_optimizers(
    parts: ParamPartition,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    muon_lr: float | None = None,
    muon_momentum: float = 0.95,
    muon_adjust_lr: str = "match_rms_adamw",
) -> list[torch.optim.Optimizer]:
    """AdamW over ``decay`` + ``no_decay``, then (when ``parts.muon`` is not empty) Muon over ``muon``.

    AdamW comes first, so a checkpoint's ``optimizer.bin`` is AdamW's under either choice. Muon
    (``torch.optim.Muon``, Nesterov momentum, 5 Newton-Schulz steps) takes the same decoupled weight
    decay; ``muon_adjust_lr="match_rms_adamw"`` scales its orthogonalised update to AdamW's RMS
    (``0.2 sqrt(max(A, B))``, Liu et al. 2025, "Muon is Scalable"), so AdamW's LR and weight decay
    carry over (``muon_lr=None`` means ``lr``); ``"original"`` is Keller Jordan's
    ``sqrt(max(1, A/B))``, which wants its own, larger LR (~0.02).
    """
    adamw = torch.optim.AdamW(
        [
            {"params": parts.decay, "weight_decay": weight_decay},
            {"params": parts.no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=betas,
        eps=eps,
    )
    if not parts.muon:
        return [adamw]
    muon = torch.optim.Muon(
        parts.muon,
        lr=lr if muon_lr is None else muon_lr,
        weight_decay=weight_decay,
        momentum=muon_momentum,
        nesterov=True,
        adjust_lr_fn=muon_adjust_lr,
    )
    return [adamw, muon]


# ----------------------------------------------------------------------------- EMA


class EMA:
    """An exponential moving average of ``params`` (named), kept as fp32 shadow copies.

    ``update()`` after every optimizer step: ``ema <- d ema + (1 - d) param`` with
    ``d = decay``, or with ``warmup`` ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` earlier
    updates, so that a short run is not dominated by the initial weights (0.999 ** 860 = 0.42).
    The shadow starts as a copy of the weights. ``applied()`` swaps the averages into the
    parameters in place and back afterwards (a backup of the raw values, restored bit-exactly):
    the model object stays the one the accelerator prepared, and buffers stay raw.
    """

    def __init__(self, named_params: dict[str, nn.Parameter], decay: float, warmup: bool = True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1) (got {decay!r})")
        self.names, self.params = list(named_params), list(named_params.values())
        self.decay, self.warmup, self.updates = decay, warmup, 0
        with torch.no_grad():
            self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        weight = 1 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA values in the parameters for the duration of the block; the raw ones after."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, raw in zip(self.params, backup):
                    p.copy_(raw)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (contiguous CPU tensors, for safetensors)."""
        return {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore averages saved by :meth:`state_dict`; the names and shapes must match."""
        if set(state) != set(self.names):
            missing, extra = set(self.names) - set(state), set(state) - set(self.names)
            raise ValueError(
                f"EMA parameters differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow):
                if state[name].shape != s.shape:
                    raise ValueError(
                        f"EMA of {name} has shape {tuple(state[name].shape)}, expected {tuple(s.shape)}"
                    )
                s.copy_(state[name])
        self.updates = updates
