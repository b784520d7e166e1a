"""One accelerate-based trainer for every stage: Text VAE, joint VAE + prior, multimodal.

The trainer knows a model (an ``nn.Module``) and a loss function ``loss_fn(model, batch, step) ->
LossOutput``; it knows nothing about VAEs or diffusion. Design choices:

- **accelerate does the device work**: device placement, DDP, mixed precision (bf16 autocast also
  on CPU), gradient accumulation (``accelerator.accumulate``), checkpoint state
  (``save_state``/``load_state``: model, optimizer, scheduler, per-process RNG) and tensorboard.
- **Batch sizes**: ``batch_size`` is the per-process micro-batch; one optimizer step consumes
  ``batch_size * grad_accum_steps * num_processes`` samples. The loss of a micro-batch is its mean;
  ``accelerator.backward`` divides it by ``grad_accum_steps``.
- **The data stream is a pure function of (seed, epoch, position)**: a map-style dataset is read in
  the order of a seeded per-epoch permutation (:class:`EpochSampler`), which accelerate shards over
  processes. The checkpoint stores (epoch, samples consumed in the epoch); resuming starts the
  permutation at that offset without reading the skipped samples, so a run stopped at step k and
  resumed to step n ends with the same weights as an uninterrupted run (on CPU, fp32). Iterable
  datasets must yield the same full stream on every process (accelerate keeps each process's share;
  do not split by rank yourself) and be deterministic given ``set_epoch``; resuming skips the
  consumed batches (``skip_first_batches``).
- **Randomness inside the loss** (dropout, timesteps, noise) uses the global RNGs, seeded
  per process at start and restored from the checkpoint on resume. Evaluation runs under its own
  fixed seed and restores the training RNG afterwards: validation is reproducible and does not
  perturb training.
- **Checkpoints** ``output_dir/checkpoints/step_{N:07d}/`` hold the accelerate state,
  ``trainer_state.json`` and ``model/`` (written by ``save_model_fn``); they are written atomically
  and pruned to the newest ``keep_checkpoints`` (:mod:`prior.training.checkpointing`).
- **Progress bar** (:class:`~prior.training.progress.ProgressBar`): without a time budget it
  counts optimizer steps to ``max_steps`` (its ETA is the time to ``max_steps``). With
  ``max_time_minutes`` it measures the wall-clock budget: its length is the budget, its ETA the
  time left in it, and the postfix shows ``step k/max_steps`` (the run stops at whichever limit
  comes first).
- **Bad input fails before anything is written**: a fresh run into a folder that holds checkpoints,
  a missing or corrupt resume checkpoint, an invalid config value: one line naming it.
- **DDP caveat**: under several processes the model is wrapped in DDP, which synchronises gradients
  only for computations that go through ``model(...)`` (its ``forward``). A loss function that calls
  other methods (``model.loss(...)``) is fine in one process; for multi-process runs route the
  computation through ``forward``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset
from tqdm import tqdm

from prior.checkpoints.run_folders import checkpoint_name
from prior.training.checkpointing import load_checkpoint, resume_target, save_checkpoint
from prior.training.optim import param_groups, warmup_cosine
from prior.training.outputs import LossFn, TrainResult
from prior.training.progress import MeanLogs, ProgressBar
from unimodal.config import ConfigError

MIXED_PRECISION = ("no", "bf16", "fp16")


# ----------------------------------------------------------------------------- config


@dataclass
class TrainerConfig:
    """The ``train:`` section of a run YAML."""

    output_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process, per micro-batch
    eval_batch_size: int | None = None  # None: batch_size
    grad_accum_steps: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100  # linear warmup
    weight_decay: float = 0.01  # not applied to biases, norms, embeddings, 1-D params
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
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
    max_time_minutes: float | None = None  # wall-clock budget: stop cleanly, save, report
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
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        check(self.weight_decay >= 0, "weight_decay", ">= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "None or > 0")
        check(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"one of {MIXED_PRECISION}")
        check(self.max_time_minutes is None or self.max_time_minutes > 0, "max_time_minutes", "None or > 0")


# ----------------------------------------------------------------------------- helpers


def _mix(*values: int) -> int:
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
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
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


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Train ``model`` on ``loss_fn`` over ``train_dataset``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        config: TrainerConfig | None = None,
        collate_fn: Callable | None = None,
        save_model_fn: Callable[[nn.Module, Path], None] | None = None,
        trainable_parameters: Iterable[nn.Parameter] | None = None,
    ):
        self.config = cfg = config if config is not None else TrainerConfig()
        self.loss_fn, self.save_model_fn, self.collate_fn = loss_fn, save_model_fn, collate_fn
        self.output_dir = Path(cfg.output_dir)

        # accelerate keeps process-wide singletons; each trainer configures them afresh.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        # accelerate only forms a CPU process group (gloo) when asked to run on CPU (torchrun on CPU).
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = acc = Accelerator(
            cpu=multi_cpu,
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.grad_accum_steps, sync_with_dataloader=False, adjust_scheduler=False
            ),
            step_scheduler_with_optimizer=False,
            # every process reads its own shard (also of iterable datasets: no rank-0 dispatch)
            dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
            log_with="tensorboard" if cfg.tensorboard else None,
            project_dir=str(self.output_dir),
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
            ],
        )
        # validates the output folder; nothing is written before this
        resume = resume_target(self.output_dir, cfg.resume, acc)
        set_seed(cfg.seed, device_specific=True)

        # Data: map-style datasets go through the seeded EpochSampler; accelerate shards batches.
        self.iterable = isinstance(train_dataset, IterableDataset)
        self.samples_per_batch = cfg.batch_size * acc.num_processes  # one micro-batch, all processes
        if not self.iterable and len(train_dataset) < self.samples_per_batch:
            raise ValueError(
                f"train dataset has {len(train_dataset)} samples, fewer than one batch "
                f"(batch_size {cfg.batch_size} x {acc.num_processes} processes)"
            )
        self.sampler = None if self.iterable else EpochSampler(len(train_dataset), cfg.seed, cfg.shuffle)
        self._loader_rng = torch.Generator()  # worker seeds; keeps DataLoader off the global RNG
        train_loader = DataLoader(
            train_dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            drop_last=True,
            collate_fn=collate_fn,
            num_workers=cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=self._loader_rng,
        )
        self.val_loader = self._val_loader(val_dataset)

        groups = param_groups(model, cfg.weight_decay, trainable_parameters)
        self.params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        )
        self.model, self.optimizer, self.scheduler, self.train_loader = acc.prepare(
            model, optimizer, scheduler, train_loader
        )
        if self.val_loader is not None:
            self.val_loader = acc.prepare(self.val_loader)

        self.step = self.epoch = self.samples_into_epoch = self.tokens_seen = 0
        self._pending_tokens = 0  # this process's tokens not yet summed into tokens_seen
        self._trained = False
        if resume is not None:
            self._load_checkpoint(*resume)

    # ------------------------------------------------------------------ setup helpers

    def _val_loader(self, dataset: Dataset | None) -> DataLoader | None:
        if dataset is None:
            return None
        cfg, n_proc = self.config, self.accelerator.num_processes
        bs = cfg.eval_batch_size or cfg.batch_size
        if not isinstance(dataset, IterableDataset):
            if len(dataset) == 0:
                raise ValueError("val_dataset is empty; pass None to train without validation")
            if cfg.eval_batches is not None:  # the first eval_batches batches of every process
                dataset = Subset(dataset, range(min(len(dataset), cfg.eval_batches * bs * n_proc)))
        return DataLoader(
            dataset,
            batch_size=bs,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    # ------------------------------------------------------------------ data stream

    def _micro_batches(self) -> Iterator[Any]:
        """This process's micro-batches, forever; advances (epoch, samples_into_epoch)."""
        while True:
            self._loader_rng.manual_seed(_mix(self.config.seed, self.epoch, 1))
            loader = self.train_loader
            if self.iterable:
                skip = self.samples_into_epoch // self.samples_per_batch
                if skip:
                    loader = self.accelerator.skip_first_batches(loader, skip)
            else:
                self.sampler.offset = self.samples_into_epoch
                self.sampler.set_epoch(self.epoch)
            loader.set_epoch(self.epoch)  # accelerate re-applies this epoch when the pass starts
            fresh_epoch, produced = self.samples_into_epoch == 0, 0
            for batch in loader:
                produced += 1
                self.samples_into_epoch += self.samples_per_batch
                yield batch
            if fresh_epoch and produced == 0:
                raise RuntimeError(f"the training data produced no batch in epoch {self.epoch}")
            self.epoch, self.samples_into_epoch = self.epoch + 1, 0

    # ------------------------------------------------------------------ train / evaluate

    def train(self) -> TrainResult:
        """Run optimizer steps until ``max_steps`` (or the time budget); checkpoint; return a summary."""
        if self._trained:
            raise RuntimeError("train() already ran on this Trainer; build a new one with resume='latest'")
        self._trained = True
        cfg, acc = self.config, self.accelerator
        if acc.gradient_state.num_steps != cfg.grad_accum_steps:  # accelerate's state is process-wide
            raise RuntimeError("another Trainer was built after this one; train one Trainer at a time")
        if cfg.tensorboard:
            acc.init_trackers("logs", config=_hparams(cfg))
        start_time = time.monotonic()
        start_tokens = self.tokens_seen
        self._window, self._window_start, self._window_tokens = MeanLogs(), start_time, self.tokens_seen
        train_metrics: dict[str, float] = {}
        val_metrics: dict[str, float] = {}
        last_eval, checkpoint, stop_reason = None, None, "max_steps"
        saved = self.output_dir / "checkpoints" / checkpoint_name(self.step)
        last_save = self.step if saved.is_dir() else None  # resumed from this very step
        stream = self._micro_batches()
        disable = not (cfg.progress_bar and acc.is_local_main_process)
        bar = ProgressBar(cfg.max_steps, cfg.max_time_minutes, self.step, start_time, disable)
        self.model.train()
        while self.step < cfg.max_steps:
            self._optimizer_step(stream)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                train_metrics = self._log_window()
                bar.advance(self.step, train_metrics["loss"], train_metrics["tokens_per_s"])
            else:
                bar.advance(self.step)
            if self.val_loader is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                val_metrics, last_eval = self._evaluate_and_log(), self.step
            if cfg.save_every and self.step % cfg.save_every == 0:
                checkpoint, last_save = self.save_checkpoint(), self.step
            if self.step < cfg.max_steps and self._out_of_time(start_time):
                stop_reason = "time_budget"
                break
        bar.close()

        if self.val_loader is not None and last_eval != self.step:
            val_metrics = self._evaluate_and_log()
        if last_save != self.step:
            checkpoint = self.save_checkpoint()
        wall = time.monotonic() - start_time
        if stop_reason == "time_budget":
            acc.print(f"time budget ({cfg.max_time_minutes} min) reached at step {self.step}/{cfg.max_steps}")
        for tracker in acc.trackers:
            tracker.finish()
        return TrainResult(
            step=self.step,
            train_metrics=train_metrics,
            val_metrics=val_metrics,
            wall_time_s=wall,
            tokens_per_second=(self.tokens_seen - start_tokens) / max(wall, 1e-9),
            tokens_seen=self.tokens_seen,
            stop_reason=stop_reason,
            checkpoint=None if checkpoint is None else str(checkpoint),
        )

    def _optimizer_step(self, stream: Iterator[Any]) -> None:
        """``grad_accum_steps`` micro-batches, then one clipped AdamW step and one scheduler step."""
        cfg, acc = self.config, self.accelerator
        for _ in range(cfg.grad_accum_steps):
            batch = next(stream)
            with acc.accumulate(self.model):  # DDP syncs gradients on the last micro-batch only
                with acc.autocast():
                    out = self.loss_fn(self.model, batch, self.step)
                acc.backward(out.loss)  # divides by grad_accum_steps
            self._window.add({"loss": out.loss, **out.logs})
            self._pending_tokens += int(out.num_tokens)
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation fell out of step with the trainer")
        if cfg.grad_clip is not None:
            self._window.add({"grad_norm": acc.clip_grad_norm_(self.params, cfg.grad_clip)})
        self._window.add({"lr": self.scheduler.get_last_lr()[0]})
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _log_window(self) -> dict[str, float]:
        """Means of the logs since the last call (all processes) + tokens/s; to tensorboard."""
        metrics = self._window.reduce(self.accelerator)
        self._flush_tokens()
        now = time.monotonic()
        elapsed = max(now - self._window_start, 1e-9)
        metrics["tokens_per_s"] = (self.tokens_seen - self._window_tokens) / elapsed
        self._window, self._window_start, self._window_tokens = MeanLogs(), now, self.tokens_seen
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite training loss {metrics['loss']} at step {self.step}")
        self.accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=self.step)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of the loss function's logs (and ``loss``) over the validation batches, all processes."""
        if self.val_loader is None:
            raise ValueError("evaluate() needs a val_dataset")
        cfg, acc = self.config, self.accelerator
        was_training = self.model.training
        self.model.eval()
        logs = MeanLogs()
        with isolated_rng(_mix(cfg.seed, acc.process_index, 2)):
            for i, batch in enumerate(self.val_loader):
                if cfg.eval_batches is not None and i >= cfg.eval_batches:  # iterable datasets
                    break
                with acc.autocast():
                    out = self.loss_fn(self.model, batch, self.step)
                logs.add({"loss": out.loss, **out.logs})
        self.model.train(was_training)
        return logs.reduce(acc)

    def _evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=self.step)
        if self.accelerator.is_local_main_process and self.config.progress_bar:
            tqdm.write(f"step {self.step}: " + ", ".join(f"val/{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def _flush_tokens(self) -> None:
        pending = torch.tensor(self._pending_tokens, dtype=torch.int64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            pending = self.accelerator.reduce(pending, "sum")
        self.tokens_seen += int(pending.item())
        self._pending_tokens = 0

    def _out_of_time(self, start_time: float) -> bool:
        """Over the wall-clock budget? All processes agree, so that they stop at the same step."""
        if self.config.max_time_minutes is None:
            return False
        late = time.monotonic() - start_time >= self.config.max_time_minutes * 60
        if self.accelerator.num_processes == 1:
            return late
        flag = torch.tensor(float(late), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_{N:07d}`` atomically (temp folder + rename); prune old ones."""
        self._flush_tokens()
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "samples_into_epoch": self.samples_into_epoch,
            "tokens_seen": self.tokens_seen,
            "num_processes": self.accelerator.num_processes,
            "config": dataclasses.asdict(self.config),
        }
        return save_checkpoint(
            self.accelerator,
            self.model,
            self.output_dir,
            state,
            self.save_model_fn,
            self.config.keep_checkpoints,
        )

    def _load_checkpoint(self, path: Path, state: dict) -> None:
        load_checkpoint(self.accelerator, path)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.samples_into_epoch = int(state["samples_into_epoch"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.accelerator.print(f"resumed from {path} at step {self.step}")


def _hparams(cfg: TrainerConfig) -> dict[str, int | float | str | bool]:
    """The config as tensorboard hparams (scalars and strings only)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(cfg).items()
    }
