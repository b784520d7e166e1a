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
- **The time budget** (``max_time_minutes``) covers the whole run, resumes included: the elapsed
  training time (wall clock of ``train()``: steps, validation, checkpoints) is saved in
  ``trainer_state.json`` and restored, so a run resumed after its budget is spent takes no step
  (it reports and returns). All processes agree on the elapsed time (the maximum) once per step.
  The trainer reads one clock (``clock``, default ``time.monotonic``; tests inject a fake one).
- **The learning-rate schedule** (:mod:`prior.training.optim`): a linear warmup over
  ``warmup_steps`` optimizer steps, then ``lr_schedule``: ``cosine`` (down to ``min_lr_ratio``) or
  ``warmdown`` (the released pretraining script: constant, then a linear fall over the last
  ``warmdown_fraction`` = 65% of the run to ``min_lr_ratio`` = 5% of the peak). Its progress is the
  post-warmup share of ``max_steps``, and with a time budget the post-warmup share of the budget
  if that is further on, so the LR reaches its floor when the run stops, whichever limit stops it
  (a 3000-step cosine cut by a budget at step 860 used to end at 0.86 of the peak). Under a budget
  the LR depends on the clock, so such runs are not bit-reproducible (a resumed run continues the
  curve from the saved elapsed time and warmup end); without one the schedule is exactly the
  step-based warmup-cosine. The LR is a ``LambdaLR`` per optimizer (in the accelerate state).
- **Optimizer** (``optimizer``): ``adamw`` over every trained parameter, or ``muon``:
  ``torch.optim.Muon`` for the hidden matrices (2-D ``nn.Linear`` weights inside the model's
  ``nn.ModuleList`` of blocks) and AdamW for the rest (embeddings, input/output projections,
  norms, biases, scalars), both prepared by accelerate and saved in every checkpoint, each with
  its LambdaLR of the same schedule. Muon's peak LR is ``muon_lr`` (None: ``lr``) and its update
  is scaled to AdamW's RMS by default (``muon_adjust_lr=match_rms_adamw``, so AdamW's LR and weight
  decay carry over); ``original`` is Keller Jordan's scaling, which wants ``muon_lr`` ~0.02. fp16
  (a GradScaler over two optimizers) is refused with Muon; use bf16.
- **EMA** (``ema_decay``; None or 0: off, the raw weights everywhere): an fp32 shadow of the
  parameters the optimizers update (the ``trainable_parameters`` argument, else every parameter
  with ``requires_grad``: the prior alone under ``fixed_vae``, prior + VAE under ``joint``; the
  union over steps of the model's ``trainable_parameters(step)``), updated after every optimizer
  step, with ``ema_warmup`` at decay ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates.
  Validation and the export written with every checkpoint (what ``unimodal sample`` loads) use
  it: the EMA values are **swapped into** the parameters in place for the duration and the raw
  ones restored bit-exactly (no second model; the training trajectory is the same with the EMA
  on or off). The accelerate state keeps the raw weights (for resume); the EMA is saved as
  ``ema.safetensors`` and restored on resume (a checkpoint without one restarts it from the
  resumed weights). Buffers are not averaged.
- **Progress bar** (:class:`~prior.training.progress.ProgressBar`): without a time budget it
  counts optimizer steps to ``max_steps`` (its ETA is the time to ``max_steps``). With
  ``max_time_minutes`` it measures the wall-clock budget on the trainer's clock, the one the
  schedule anneals on, counting the time before a resume: its length is the budget, its ETA the
  time left in it, and the postfix shows ``step k/max_steps`` and the LR (the run stops at
  whichever limit comes first).
- **Bad input fails before anything is written**: a fresh run into a folder that holds checkpoints,
  a missing or corrupt resume checkpoint, one written with another ``optimizer``, an invalid
  config value: one line naming it.
- **DDP caveat**: under several processes the model is wrapped in DDP, which synchronises gradients
  only for computations that go through ``model(...)`` (its ``forward``). A loss function that calls
  other methods (``model.loss(...)``) is fine in one process; for multi-process runs route the
  computation through ``forward``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from prior.checkpoints.run_folders import checkpoint_name
from prior.training.checkpointing import load_checkpoint, load_ema, resume_target, save_checkpoint
from prior.training.data_order import EpochSampler, isolated_rng, mix_seed
from prior.training.optim import (
    EMA,
    LRSchedule,
    ScheduleProgress,
    build_optimizers,
    partition_parameters,
)
from prior.training.outputs import LossFn, TrainResult
from prior.training.progress import MeanLogs, ProgressBar
from prior.training.trainer_config import TrainerConfig

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
        clock: Callable[[], float] = time.monotonic,
    ):
        """``trainable_parameters``: what the optimizers update (default: every parameter with
        ``requires_grad``); ``clock``: seconds, for the time budget, the schedule and the bar."""
        self.config = cfg = config if config is not None else TrainerConfig()
        self._clock = clock
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
        parts = partition_parameters(model, trainable_parameters, muon=cfg.optimizer == "muon")
        optimizers = build_optimizers(
            parts,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            muon_lr=cfg.muon_lr,
            muon_momentum=cfg.muon_momentum,
            muon_adjust_lr=cfg.muon_adjust_lr,
        )
        # validates the output folder; nothing is written before this
        resume = resume_target(self.output_dir, cfg.resume, acc, cfg.optimizer, len(optimizers))
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

        self.params = parts.all
        # The schedule's progress is set before every scheduler step (steps, and the clock under a
        # budget); the LambdaLR closure reads it, so its state dict holds no function state.
        self.progress = ScheduleProgress(cfg.warmup_steps, cfg.max_steps, cfg.budget_s)
        schedule = LRSchedule(cfg.lr_schedule, cfg.warmup_steps, cfg.lr_floor, cfg.warmdown_fraction)
        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule.factor(step, self.progress.value))
            for opt in optimizers
        ]
        n = len(optimizers)
        prepared = acc.prepare(model, *optimizers, *schedulers, train_loader)
        self.model, self.train_loader = prepared[0], prepared[-1]
        self.optimizers, self.schedulers = list(prepared[1 : 1 + n]), list(prepared[1 + n : 1 + 2 * n])
        if self.val_loader is not None:
            self.val_loader = acc.prepare(self.val_loader)
        self.ema = self._new_ema() if cfg.ema_decay else None

        self.step = self.epoch = self.samples_into_epoch = self.tokens_seen = 0
        self.elapsed_s = 0.0  # training time before this train() call (restored on resume)
        self._start: float | None = None  # clock() when train() started
        self._last_elapsed = 0.0  # the elapsed time the last step agreed on
        self._pending_tokens = 0  # this process's tokens not yet summed into tokens_seen
        self._trained = False
        if resume is not None:
            self._load_checkpoint(*resume)

    # ------------------------------------------------------------------ setup helpers

    def _new_ema(self) -> EMA:
        """An EMA over the optimised parameters, by name, starting at their current values."""
        names = {id(p): n for n, p in self.accelerator.unwrap_model(self.model).named_parameters()}
        return EMA({names[id(p)]: p for p in self.params}, self.config.ema_decay, self.config.ema_warmup)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the model for the duration of the block (the raw ones when it is off)."""
        if self.ema is None:
            yield
        else:
            with self.ema.applied():
                yield

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
            self._loader_rng.manual_seed(mix_seed(self.config.seed, self.epoch, 1))
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
        start_time = self._start = self._clock()
        self._last_elapsed = self.elapsed_s
        start_tokens = self.tokens_seen
        self._window, self._window_start, self._window_tokens = MeanLogs(), start_time, self.tokens_seen
        train_metrics: dict[str, float] = {}
        val_metrics: dict[str, float] = {}
        last_eval, checkpoint, stop_reason = None, None, "max_steps"
        saved = self.output_dir / "checkpoints" / checkpoint_name(self.step)
        last_save = self.step if saved.is_dir() else None  # resumed from this very step
        if self.step < cfg.max_steps and self._out_of_time():  # resumed with the budget spent
            stop_reason = "time_budget"
        stream = self._micro_batches()
        disable = not (cfg.progress_bar and acc.is_local_main_process)
        bar = ProgressBar(
            cfg.max_steps, cfg.max_time_minutes, self.step, start_time, disable, self.elapsed_s, self._clock
        )
        self.model.train()
        while stop_reason == "max_steps" and self.step < cfg.max_steps:
            self._optimizer_step(stream)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                train_metrics = self._log_window()
                lr = self.schedulers[0].get_last_lr()[0]
                bar.advance(self.step, train_metrics["loss"], train_metrics["tokens_per_s"], lr)
            else:
                bar.advance(self.step)
            if self.val_loader is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                val_metrics, last_eval = self._evaluate_and_log(), self.step
            if cfg.save_every and self.step % cfg.save_every == 0:
                checkpoint, last_save = self.save_checkpoint(), self.step
            if self.step < cfg.max_steps and self._out_of_time():
                stop_reason = "time_budget"
        bar.close()

        if self.val_loader is not None and last_eval != self.step:
            val_metrics = self._evaluate_and_log()
        if last_save != self.step:
            checkpoint = self.save_checkpoint()
        wall = self._clock() - start_time
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
        """``grad_accum_steps`` micro-batches, then one clipped step of every optimizer, the EMA update,
        and one step of every scheduler at the progress reached (steps, and the agreed clock)."""
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
        self._window.add({"lr": self.schedulers[0].get_last_lr()[0]})
        if len(self.schedulers) > 1:
            self._window.add({"muon_lr": self.schedulers[1].get_last_lr()[0]})
        for optimizer in self.optimizers:
            optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        self._last_elapsed = self._agreed_elapsed()
        self.progress.update(self.step, self._last_elapsed)
        for scheduler in self.schedulers:
            scheduler.step()

    def _log_window(self) -> dict[str, float]:
        """Means of the logs since the last call (all processes) + tokens/s; to tensorboard."""
        metrics = self._window.reduce(self.accelerator)
        self._flush_tokens()
        now = self._clock()
        elapsed = max(now - self._window_start, 1e-9)
        metrics["tokens_per_s"] = (self.tokens_seen - self._window_tokens) / elapsed
        self._window, self._window_start, self._window_tokens = MeanLogs(), now, self.tokens_seen
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite training loss {metrics['loss']} at step {self.step}")
        self.accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=self.step)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of the loss function's logs (and ``loss``) over the validation batches, all processes,
        with the EMA weights when the EMA is on."""
        if self.val_loader is None:
            raise ValueError("evaluate() needs a val_dataset")
        cfg, acc = self.config, self.accelerator
        was_training = self.model.training
        self.model.eval()
        logs = MeanLogs()
        with isolated_rng(mix_seed(cfg.seed, acc.process_index, 2)), self.ema_weights():
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

    def _elapsed(self) -> float:
        """Training time of the run so far (this process's clock), resumes included."""
        return self.elapsed_s if self._start is None else self.elapsed_s + self._clock() - self._start

    def _agreed_elapsed(self) -> float:
        """The elapsed time, the same on every process under a budget (the maximum): the LR and
        the stop depend on it, and DDP replicas must apply the same LR and stop at the same step."""
        elapsed = self._elapsed()
        if self.config.budget_s is None or self.accelerator.num_processes == 1:
            return elapsed
        local = torch.tensor([elapsed], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.gather(local).max().item())

    def _out_of_time(self) -> bool:
        """Is the budget spent, at the elapsed time the last step agreed on?"""
        budget = self.config.budget_s
        return budget is not None and self._last_elapsed >= budget

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
            "elapsed_s": self._last_elapsed if self._start is not None else self.elapsed_s,
            "warmup_end_s": self.progress.warmup_end_s,
            "ema_updates": None if self.ema is None else self.ema.updates,
            "config": dataclasses.asdict(self.config),
        }
        export = None
        if self.save_model_fn is not None:

            def export(model: nn.Module, folder: Path) -> None:
                with self.ema_weights():
                    self.save_model_fn(model, folder)

        return save_checkpoint(
            self.accelerator,
            self.model,
            self.output_dir,
            state,
            export,
            self.config.keep_checkpoints,
            None if self.ema is None else self.ema.state_dict(),
        )

    def _load_checkpoint(self, path: Path, state: dict) -> None:
        """Restore the accelerate state, the counters, the elapsed time and schedule, the EMA."""
        load_checkpoint(self.accelerator, path)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.samples_into_epoch = int(state["samples_into_epoch"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.elapsed_s = float(state.get("elapsed_s") or 0.0)
        warmup_end = state.get("warmup_end_s")
        if warmup_end is None and self.step >= self.config.warmup_steps:  # written before it was saved
            warmup_end = 0.0
        self.progress.warmup_end_s = None if warmup_end is None else float(warmup_end)
        self.progress.update(self.step, self.elapsed_s)
        if self.ema is not None:
            saved = load_ema(path)
            if saved is None:
                self.accelerator.print(f"{path} holds no EMA: the EMA starts from the resumed weights")
                self.ema = self._new_ema()
            else:
                try:
                    self.ema.load_state_dict(saved, int(state.get("ema_updates") or 0))
                except ValueError as err:
                    raise ValueError(f"cannot load the EMA of checkpoint {path}: {err}") from None
        self.accelerator.print(f"resumed from {path} at step {self.step}")


def _hparams(cfg: TrainerConfig) -> dict[str, int | float | str | bool]:
    """The config as tensorboard hparams (scalars and strings only)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(cfg).items()
    }
