"""The trainer's config (the ``train:`` section of a run YAML); the semantics of every field are in
:mod:`prior.training.trainer`'s docstring. Invalid values are one-line ConfigErrors."""

from __future__ import annotations

from dataclasses import dataclass, field

from prior.training.optim import DEFAULT_FLOOR, LR_SCHEDULES, MUON_ADJUST_LR, OPTIMIZERS
from unimodal.config import ConfigError

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainerConfig:
    """The ``train:`` section of a run YAML."""

    output_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process, per micro-batch
    eval_batch_size: int | None = None  # None: batch_size
    grad_accum_steps: int = 1
    lr: float = 3e-4
    lr_schedule: str = "cosine"  # cosine | warmdown (constant, then linear to the floor)
    min_lr_ratio: float | None = None  # the LR floor / lr at the end; None: 0.1 cosine, 0.05 warmdown
    warmdown_fraction: float = 0.65  # warmdown: the last share of the run spent falling to the floor
    warmup_steps: int = 100  # linear warmup (optimizer steps)
    weight_decay: float = 0.01  # not applied to biases, norms, embeddings, 1-D params
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    muon_lr: float | None = None  # Muon's peak LR; None: lr
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"  # match_rms_adamw (AdamW's LR carries over) | original
    ema_decay: float | None = None  # EMA of the trained weights for validation/exports; None or 0: off
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 is for GPUs)
    eval_every: int = 500  # steps; 0: only at the end
    eval_batches: int | None = 20  # per process; None: the whole validation set
    save_every: int = 1000  # steps; 0: only at the end
    log_every: int = 10  # steps
    seed: int = 0
    num_workers: int = 0
    shuffle: bool = True
    resume: str | None = None  # None | "latest" (newest checkpoint, fresh if none) | a checkpoint path
    keep_checkpoints: int | None = 3  # None: keep all
    max_time_minutes: float | None = None  # the run's wall-clock budget (resumes included)
    find_unused_parameters: bool = False  # DDP: needed when a step leaves parameters unused
    tensorboard: bool = True  # events under output_dir/logs
    progress_bar: bool = True

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"train.{name} must be {what} (got {getattr(self, name)!r})")

        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every"):
            check(getattr(self, name) >= 1, name, ">= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "num_workers"):
            check(getattr(self, name) >= 0, name, ">= 0")
        for name in ("eval_batch_size", "eval_batches", "keep_checkpoints"):
            check(getattr(self, name) is None or getattr(self, name) >= 1, name, "None or >= 1")
        check(self.lr > 0, "lr", "> 0")
        check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}")
        check(self.min_lr_ratio is None or 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "None or in [0, 1]")
        check(0 < self.warmdown_fraction <= 1, "warmdown_fraction", "in (0, 1]")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        check(self.muon_lr is None or self.muon_lr > 0, "muon_lr", "None or > 0")
        check(0 <= self.muon_momentum < 1, "muon_momentum", "in [0, 1)")
        check(self.muon_adjust_lr in MUON_ADJUST_LR, "muon_adjust_lr", f"one of {MUON_ADJUST_LR}")
        check(self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay", "None or in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", ">= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "None or > 0")
        check(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"one of {MIXED_PRECISION}")
        check(self.max_time_minutes is None or self.max_time_minutes > 0, "max_time_minutes", "None or > 0")
        if self.optimizer == "muon" and self.mixed_precision == "fp16":
            raise ConfigError(
                "train.optimizer='muon' does not support train.mixed_precision='fp16' (one GradScaler "
                "over two optimizers); use bf16"
            )

    @property
    def lr_floor(self) -> float:
        """The LR multiplier the schedule ends at: ``min_lr_ratio``, or the schedule's default."""
        return DEFAULT_FLOOR[self.lr_schedule] if self.min_lr_ratio is None else self.min_lr_ratio

    @property
    def budget_s(self) -> float | None:
        """The time budget in seconds (None: none)."""
        return None if self.max_time_minutes is None else self.max_time_minutes * 60
