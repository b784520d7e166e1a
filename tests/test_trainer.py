"""The model-agnostic trainer on a toy next-token model: learning, exact resume, accumulation, bf16,
checkpoint layout/atomicity/pruning, tensorboard, bad input, a 2-process torchrun run, and the
training hygiene: the LR schedule on a (simulated) time budget, the EMA, AdamW / Muon."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from prior.checkpoints.run_folders import list_checkpoints
from prior.training.checkpointing import check_checkpoint
from prior.training.optim import (
    EMA,
    LRSchedule,
    ScheduleProgress,
    param_groups,
    partition_parameters,
    warmup_cosine,
)
from prior.training.outputs import LossOutput, TrainResult
from prior.training.progress import ProgressBar
from prior.training.trainer import EpochSampler, Trainer, TrainerConfig
from unimodal.config import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, SEQ = 24, 12


class ToyLM(nn.Module):
    """Embedding -> dropout -> MLP -> LayerNorm -> head; predicts the next token from the current one."""

    def __init__(self, dim: int = 16, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)
        self.hidden_dtype: torch.dtype | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.drop(self.embed(ids)))  # (B, L, D)
        self.hidden_dtype = h.dtype
        return self.head(self.norm(F.gelu(h)))  # (B, L, V)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    return LossOutput(loss=loss, logs={"ppl": loss.detach().exp()}, num_tokens=ids[:, 1:].numel())


def make_data(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Counting sequences (next = current + 1 mod V) from random starts, 10% of tokens noise."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(SEQ)) % VOCAB
    noise = torch.rand(n, SEQ, generator=g) < 0.1
    ids = torch.where(noise, torch.randint(0, VOCAB, (n, SEQ), generator=g), ids)
    return [{"input_ids": row} for row in ids]


def config(out: Path, **kw) -> TrainerConfig:
    base = dict(
        output_dir=str(out),
        max_steps=6,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        eval_every=0,
        eval_batches=2,
        save_every=0,
        log_every=2,
        tensorboard=False,
        progress_bar=False,
    )
    return TrainerConfig(**{**base, **kw})


class BlockLM(ToyLM):
    """ToyLM with a stack of residual MLP blocks in an nn.ModuleList (hidden matrices for Muon)."""

    def __init__(self, dim: int = 16, dropout: float = 0.1, depth: int = 2):
        super().__init__(dim, dropout)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(depth)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.drop(self.embed(ids)))
        for block in self.blocks:
            h = h + block(h)
        self.hidden_dtype = h.dtype
        return self.head(self.norm(h))


def make_trainer(
    out: Path,
    data_size: int = 20,
    dropout: float = 0.1,
    val: bool = False,
    loss_fn=lm_loss,
    model_cls: type[nn.Module] = ToyLM,
    clock=time.monotonic,
    save_model_fn=None,
    trainable=None,
    **kw,
):
    torch.manual_seed(0)
    model = model_cls(dropout=dropout)
    val_ds = make_data(8, seed=1) if val else None
    params = None if trainable is None else trainable(model)
    return Trainer(
        model,
        loss_fn,
        make_data(data_size),
        val_ds,
        config(out, **kw),
        save_model_fn=save_model_fn,
        trainable_parameters=params,
        clock=clock,
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }


# ----------------------------------------------------------------------------- helpers


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    decay = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert f(12) == pytest.approx(0.55)  # half-way: min + (1 - min) / 2


def test_param_groups_skip_decay_on_bias_norm_embedding():
    model = ToyLM()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight), id(model.head.weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    expected = [model.embed.weight, model.proj.bias, model.norm.weight, model.norm.bias, model.head.bias]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}
    # trainable_parameters restricts the set; foreign tensors are rejected
    decay, no_decay = param_groups(model, 0.1, trainable=model.head.parameters())
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 1
    with pytest.raises(ValueError, match="not parameters of the model"):
        param_groups(model, 0.1, trainable=[nn.Parameter(torch.zeros(2))])


def test_epoch_sampler_is_a_seeded_permutation_with_offset():
    s = EpochSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and first == list(EpochSampler(10, seed=3))
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(10))
    s.set_epoch(0)
    s.offset = 4
    assert list(s) == first[4:] and len(s) == 6
    assert list(EpochSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_train_result_format():
    result = TrainResult(
        step=120, train_metrics={"loss": 1.23456, "lr": 1e-3}, val_metrics={"loss": 2.5}, wall_time_s=61.25,
        tokens_per_second=1234.4, tokens_seen=98765, stop_reason="time_budget", checkpoint="runs/x/step_0000120",
    )  # fmt: skip
    text = result.format()
    assert text.splitlines() == [
        "stopped at step 120 (time budget reached) after 61.2 s; 98,765 tokens seen, 1,234 tokens/s",
        "train loss 1.2346, val loss 2.5000",
        "checkpoint: runs/x/step_0000120",
    ]
    bare = dataclasses.replace(result, val_metrics={}, stop_reason="max_steps", checkpoint=None).format()
    assert "(reached max_steps)" in bare and "val loss" not in bare and "none written" in bare


def test_progress_bar_shows_the_time_budget_when_one_is_set():
    steps = ProgressBar(
        max_steps=50, max_time_minutes=None, step=10, start_time=time.monotonic(), disable=False
    )
    steps.advance(11, loss=1.5, tokens_per_s=100.0)
    assert (steps.bar.total, steps.bar.n) == (50, 11)  # no budget: steps to max_steps
    steps.close()
    budget = ProgressBar(
        max_steps=10_000, max_time_minutes=2.0, step=10, start_time=time.monotonic() - 30, disable=False
    )
    budget.advance(11, loss=1.5, tokens_per_s=100.0, lr=1e-3)
    assert budget.bar.total == 120 and 30 <= budget.bar.n < 40  # seconds of the 2-minute budget
    shown = str(budget.bar)
    assert "2 min budget" in shown and "step=11/10000" in shown and "loss=1.5000" in shown
    assert "lr=0.001" in shown
    budget.close()
    # resumed: the bar counts the run's time before the resume, on the trainer's clock
    resumed = ProgressBar(
        max_steps=100, max_time_minutes=2.0, step=5, start_time=10.0, disable=False,
        elapsed_before_s=60.0, clock=lambda: 25.0,
    )  # fmt: skip
    assert resumed.bar.n == 60
    resumed.advance(6)
    assert resumed.bar.n == 75 and "| 01:00<" in str(resumed.bar)  # tqdm's elapsed counts the 60 s too
    resumed.close()


# ----------------------------------------------------------------------------- training


def test_loss_decreases_and_evaluate_is_reproducible(tmp_path):
    trainer = make_trainer(tmp_path, data_size=32, val=True, max_steps=30, eval_every=15, log_every=5)
    before = trainer.evaluate()
    assert trainer.evaluate() == before  # evaluation runs under its own seed
    result = trainer.train()
    assert result.step == 30 and result.stop_reason == "max_steps"
    assert result.val_metrics["loss"] < 0.5 * before["loss"]
    assert result.val_metrics["ppl"] == pytest.approx(math.exp(result.val_metrics["loss"]), rel=0.2)
    assert set(result.train_metrics) >= {"loss", "ppl", "lr", "grad_norm", "tokens_per_s"}
    assert result.tokens_seen == 30 * 4 * (SEQ - 1) and result.tokens_per_second > 0
    assert result.checkpoint == str(tmp_path / "checkpoints" / "step_0000030")


class Preempted(Exception):
    pass


def test_stop_and_resume_matches_uninterrupted_run(tmp_path):
    # 20 samples / batch 4 = 5 micro-batches per epoch; with grad_accum 2 steps straddle epochs.
    kw = dict(data_size=20, val=True, max_steps=9, grad_accum_steps=2, eval_every=3, save_every=4)
    full = make_trainer(tmp_path / "full", **kw)
    full.train()

    # 1) a wall-clock budget stops the run after its first step and checkpoints it
    run = tmp_path / "run"
    first = make_trainer(run, max_time_minutes=1e-9, **kw).train()
    assert first.stop_reason == "time_budget" and first.step == 1
    assert [p.name for p in list_checkpoints(run)] == ["step_0000001"]

    # 2) resumed, it is killed mid-step 6 (after the step-4 checkpoint)
    def crash_at_6(model, batch, step):
        if step == 6:
            raise Preempted
        return lm_loss(model, batch, step)

    second = make_trainer(run, resume="latest", loss_fn=crash_at_6, **kw)
    assert second.step == 1
    with pytest.raises(Preempted):
        second.train()

    # 3) resumed from step 4, it finishes with exactly the uninterrupted weights
    third = make_trainer(run, resume="latest", **kw)
    assert third.step == 4 and third.epoch == 1 and third.samples_into_epoch == 12
    result = third.train()
    assert result.step == 9
    ref, got = weights(full), weights(third)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert result.tokens_seen == 9 * 2 * 4 * (SEQ - 1)


class ToyStream(IterableDataset):
    """An iterable dataset: a different deterministic order of the rows in every epoch."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows, self.epoch = rows, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(100 + self.epoch))
        return (self.rows[i] for i in order.tolist())


def test_iterable_dataset_resume_matches_uninterrupted_run(tmp_path):
    def run(out: Path, **kw) -> Trainer:
        torch.manual_seed(0)
        trainer = Trainer(ToyLM(), lm_loss, ToyStream(make_data(20)), config=config(out, save_every=3, **kw))
        trainer.train()
        return trainer

    full = run(tmp_path / "full", max_steps=8)  # 5 batches per epoch: resumes mid-epoch 0 at step 3
    resumed = run(tmp_path / "resumed", max_steps=8, resume=str(tmp_path / "full/checkpoints/step_0000003"))
    ref, got = weights(full), weights(resumed)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_grad_accumulation_matches_full_batch(tmp_path):
    # 24 rows split evenly into batches of 8 and of 4: both runs read the same rows at every step.
    one = make_trainer(tmp_path / "one", data_size=24, dropout=0.0, batch_size=8, max_steps=4)
    r1 = one.train()
    two = make_trainer(
        tmp_path / "two", data_size=24, dropout=0.0, batch_size=4, grad_accum_steps=2, max_steps=4
    )
    r2 = two.train()
    w1, w2 = weights(one), weights(two)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    assert r1.tokens_seen == r2.tokens_seen
    assert r1.train_metrics["loss"] == pytest.approx(r2.train_metrics["loss"], rel=1e-5)


def test_bf16_autocast_on_cpu(tmp_path):
    trainer = make_trainer(tmp_path, mixed_precision="bf16", max_steps=3)
    result = trainer.train()
    assert trainer.accelerator.unwrap_model(trainer.model).hidden_dtype == torch.bfloat16
    assert math.isfinite(result.train_metrics["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """6 steps, a checkpoint every 2, keep 2, tensorboard on, a model export; a stale temp folder first."""
    out = tmp_path_factory.mktemp("saved_run")
    stale = out / "checkpoints" / ".tmp-step_0000004"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left by a crash")
    export_dirs = []

    def save_model(model: nn.Module, path: Path) -> None:
        export_dirs.append(path)
        torch.save(model.state_dict(), path / "weights.pt")

    torch.manual_seed(0)
    trainer = Trainer(
        ToyLM(),
        lm_loss,
        make_data(20),
        config=config(out, save_every=2, keep_checkpoints=2, tensorboard=True),
        save_model_fn=save_model,
    )
    trainer.train()
    return out, export_dirs


def test_checkpoint_layout_atomicity_and_pruning(saved_run):
    out, export_dirs = saved_run
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004", "step_0000006"]  # no temp leftovers
    ckpt = root / "step_0000006"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "trainer_state.json",
        "model",
    }
    assert (ckpt / "model" / "weights.pt").is_file() and not (root / "step_0000004" / "junk").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["epoch"] == 1 and state["samples_into_epoch"] == 4
    assert state["config"]["save_every"] == 2
    # save_model_fn wrote into a temporary folder that was then renamed into place
    assert [p.parent.name for p in export_dirs] == [f".tmp-step_{s:07d}" for s in (2, 4, 6)]
    assert check_checkpoint(ckpt)["step"] == 6


def test_tensorboard_events_written(saved_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = saved_run
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6]


# ----------------------------------------------------------------------------- bad input


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_fresh_run_refuses_existing_checkpoints(saved_run):
    out, _ = saved_run
    before = _snapshot(out)
    with pytest.raises(ValueError, match=f"{out / 'checkpoints'} already holds checkpoints"):
        make_trainer(out)
    assert _snapshot(out) == before


def test_missing_resume_checkpoint(tmp_path):
    missing = tmp_path / "nope" / "step_0000010"
    with pytest.raises(FileNotFoundError, match=f"resume checkpoint not found: {missing}"):
        make_trainer(tmp_path / "out", resume=str(missing))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "corrupt checkpoint .*model.safetensors"),
        ("optimizer.bin", "corrupt checkpoint .*missing optimizer.bin"),
        ("trainer_state.json", "corrupt checkpoint .*trainer_state.json is missing"),
    ],
)
def test_corrupt_resume_checkpoint(saved_run, tmp_path, damage, message):
    ckpt = tmp_path / "step_0000006"
    shutil.copytree(saved_run[0] / "checkpoints" / "step_0000006", ckpt)
    if damage == "truncate":
        weights_file = ckpt / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:-16])
    else:
        (ckpt / damage).unlink()
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path / "out", resume=str(ckpt))
    assert not (tmp_path / "out").exists()


def test_resume_from_a_run_folder_is_rejected(saved_run, tmp_path):
    with pytest.raises(ValueError, match=f"{saved_run[0]} is a run folder, not a checkpoint"):
        make_trainer(tmp_path / "out", resume=str(saved_run[0]))


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    assert make_trainer(tmp_path, resume="latest").step == 0


def test_config_values_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of"):
        config(tmp_path, mixed_precision="fp8")
    with pytest.raises(ConfigError, match="train.grad_accum_steps must be >= 1"):
        config(tmp_path, grad_accum_steps=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_trainer(tmp_path, data_size=3)


# ----------------------------------------------------------------------------- LR schedule


class FakeClock:
    """The trainer's clock, advanced by hand (by the loss function: ``seconds`` per micro-batch)."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def instrument(trainer: Trainer, clock: FakeClock | None = None, seconds: float = 10.0, crash_at=None):
    """Wrap the trainer's loss: record the LR of every step (both optimizers), tick the clock."""
    lrs: list[tuple[float, ...]] = []
    base = trainer.loss_fn

    def loss_fn(model, batch, step):
        if step == crash_at:
            raise Preempted
        if model.training:
            lrs.append(tuple(opt.param_groups[0]["lr"] for opt in trainer.optimizers))
        if clock is not None:
            clock.t += seconds
        return base(model, batch, step)

    trainer.loss_fn = loss_fn
    return lrs


def test_lr_schedule_shapes():
    cosine = LRSchedule("cosine", warmup_steps=4, floor=0.1)
    reference = warmup_cosine(warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    assert [cosine.factor(s, (s - 4) / 16) for s in range(4, 21)] == [reference(s) for s in range(4, 21)]
    warmdown = LRSchedule("warmdown", warmup_steps=4, floor=0.05, warmdown_fraction=0.65)
    assert [warmdown.factor(s, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmdown.factor(10, 0.0) == warmdown.factor(10, 0.35) == 1.0  # constant for the first 35%
    assert warmdown.factor(10, 0.675) == pytest.approx((1 + 0.05) / 2)  # linear: half-way down
    assert warmdown.factor(10, 1.0) == pytest.approx(0.05) and warmdown.factor(10, 2.0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="one of"):
        LRSchedule("linear", 0, 0.1)


def test_schedule_progress_by_steps_or_by_time():
    by_steps = ScheduleProgress(warmup_steps=2, max_steps=10, budget_s=None)
    assert [by_steps.update(s, elapsed_s=1e9) for s in (1, 2, 6, 10)] == [0.0, 0.0, 0.5, 1.0]
    by_time = ScheduleProgress(warmup_steps=2, max_steps=1000, budget_s=100.0)
    assert by_time.update(1, 5.0) == 0.0 and by_time.warmup_end_s is None
    assert by_time.update(2, 20.0) == 0.0 and by_time.warmup_end_s == 20.0  # warmup ended at 20 s
    assert by_time.update(3, 60.0) == pytest.approx(0.5)  # (60 - 20) / (100 - 20)
    assert by_time.update(4, 100.0) == 1.0 and by_time.update(5, 150.0) == 1.0
    assert ScheduleProgress(2, 10, budget_s=1e9).update(6, 30.0) == 0.5  # steps further on: steps


@pytest.mark.parametrize("schedule, floor", [("cosine", 0.1), ("warmdown", 0.05)])
def test_schedule_reaches_its_floor_at_the_time_budget(tmp_path, schedule, floor):
    clock = FakeClock()
    trainer = make_trainer(
        tmp_path, clock=clock, max_steps=1000, max_time_minutes=1.0, lr_schedule=schedule, warmup_steps=2
    )
    lrs = instrument(trainer, clock, seconds=10.0)  # 10 s per step: the 60 s budget ends at step 6
    result = trainer.train()
    assert result.stop_reason == "time_budget" and result.step == 6
    # warmup by steps, then the progress is the share of the budget after warmup (ended at 20 s)
    shape = LRSchedule(schedule, warmup_steps=2, floor=floor)
    expected = [0.5, 1.0] + [shape.factor(s, (10 * s - 20) / 40) for s in range(2, 6)]
    assert [lr for (lr,) in lrs] == pytest.approx([1e-2 * f for f in expected])
    assert trainer.schedulers[0].get_last_lr()[0] == pytest.approx(1e-2 * floor)  # the floor, at the budget
    state = json.loads((tmp_path / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["elapsed_s"] == 60.0 and state["warmup_end_s"] == 20.0


def test_step_based_schedule_is_unchanged(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8, warmup_steps=2)  # no budget: steps only
    lrs = instrument(trainer)
    trainer.train()
    reference = warmup_cosine(warmup_steps=2, max_steps=8, min_lr_ratio=0.1)  # the schedule of before
    assert [lr for (lr,) in lrs] == [1e-2 * reference(s) for s in range(8)]
    assert trainer.schedulers[0].get_last_lr()[0] == pytest.approx(1e-3)


def test_time_budget_resume_continues_the_schedule(tmp_path):
    kw = dict(max_steps=1000, max_time_minutes=1.0, warmup_steps=2, save_every=3, lr_schedule="warmdown")
    clock = FakeClock()
    full = make_trainer(tmp_path / "full", clock=clock, **kw)
    full_lrs = instrument(full, clock)
    full.train()

    run = tmp_path / "run"
    clock = FakeClock()
    first = make_trainer(run, clock=clock, **kw)
    instrument(first, clock, crash_at=4)
    with pytest.raises(Preempted):  # killed in step 4, after the step-3 checkpoint (30 s elapsed)
        first.train()
    clock = FakeClock(t=5000.0)  # another process, another clock origin
    second = make_trainer(run, clock=clock, resume="latest", **kw)
    assert second.step == 3 and second.elapsed_s == 30.0
    second_lrs = instrument(second, clock)
    result = second.train()
    assert result.step == 6 and result.stop_reason == "time_budget"
    assert second_lrs == full_lrs[3:]  # the same curve: the budget counts the time before the resume
    ref, got = weights(full), weights(second)
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    # resumed once more with the budget spent: no step, it reports and returns
    third = make_trainer(run, clock=FakeClock(), resume="latest", **kw)
    third_lrs = instrument(third)
    again = third.train()
    assert (again.step, again.stop_reason, third_lrs) == (6, "time_budget", [])


# ----------------------------------------------------------------------------- EMA


def test_ema_update_formula_and_swap():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    start = {k: v.detach().clone() for k, v in params.items()}
    ema = EMA(params, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow[0], 0.9 * start["weight"] + 0.1 * (start["weight"] + 1))
    assert torch.equal(ema.shadow[1], start["bias"])  # an unchanged parameter keeps its average
    raw = model.weight.detach().clone()
    with ema.applied():
        assert torch.equal(model.weight, ema.shadow[0])
    assert torch.equal(model.weight, raw)  # the raw values come back bit-exactly
    # warmup: decay min(decay, (1 + n) / (10 + n)) after n updates
    warm = EMA(params, decay=0.5, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(warm.current_decay())
        warm.update()
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    warm.updates = 100
    assert warm.current_decay() == 0.5  # capped at ema_decay


def _export(exports: dict[int, dict[str, torch.Tensor]]):
    def save_model(model: nn.Module, path: Path) -> None:
        exports[len(exports)] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(model.state_dict(), path / "weights.pt")

    return save_model


def test_ema_is_used_for_validation_and_export(tmp_path):
    from safetensors.torch import load_file

    kw = dict(val=True, max_steps=6, eval_every=3, ema_decay=0.9, ema_warmup=False)
    exports: dict[int, dict[str, torch.Tensor]] = {}
    trainer = make_trainer(tmp_path / "ema", save_model_fn=_export(exports), **kw)
    result = trainer.train()
    ema = trainer.ema.state_dict()
    raw = weights(trainer)
    exported = torch.load(tmp_path / "ema/checkpoints/step_0000006/model/weights.pt")
    assert set(ema) == set(raw) and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert not torch.allclose(exported["head.weight"], raw["head.weight"])  # the EMA is not the weights
    saved = load_file(tmp_path / "ema/checkpoints/step_0000006/ema.safetensors")
    assert all(torch.equal(saved[k], ema[k]) for k in ema)

    # validation saw the EMA weights: the same loss as a raw-weights trainer holding the EMA values
    plain = make_trainer(tmp_path / "plain", val=True, max_steps=6)
    plain.accelerator.unwrap_model(plain.model).load_state_dict(exported)
    assert plain.evaluate() == result.val_metrics
    # the EMA only observes: the raw weights are those of a run without it (swaps restored exactly)
    off = make_trainer(
        tmp_path / "off", save_model_fn=_export(exports_off := {}), **{**kw, "ema_decay": None}
    )
    off.train()
    assert off.ema is None and all(torch.equal(raw[k], v) for k, v in weights(off).items())
    assert all(
        torch.equal(exports_off[max(exports_off)][k], v) for k, v in weights(off).items()
    )  # off: the raw weights
    assert make_trainer(tmp_path / "zero", ema_decay=0.0).ema is None  # 0 is off too


def test_ema_covers_the_trained_parameters_only(tmp_path):
    trainer = make_trainer(tmp_path, trainable=lambda m: m.head.parameters(), ema_decay=0.9)
    assert trainer.ema.names == ["head.weight", "head.bias"]

    def frozen_embed(model):
        model.embed.requires_grad_(False)  # like the VAE under fixed_vae
        return None

    frozen = make_trainer(tmp_path / "frozen", trainable=frozen_embed, ema_decay=0.9)
    assert "embed.weight" not in frozen.ema.names and "proj.weight" in frozen.ema.names


def test_resume_restores_the_ema(tmp_path):
    kw = dict(max_steps=6, save_every=3, ema_decay=0.99)  # with the warmup ramp
    full = make_trainer(tmp_path / "full", **kw)
    full.train()
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        first = make_trainer(run, **kw)
        instrument(first, crash_at=4)
        first.train()
    second = make_trainer(run, resume="latest", **kw)
    assert second.step == 3 and second.ema.updates == 3
    second.train()
    assert second.ema.updates == full.ema.updates == 6
    assert all(torch.equal(a, b) for a, b in zip(full.ema.shadow, second.ema.shadow))
    # a checkpoint without an EMA: the EMA restarts from the resumed weights
    plain = make_trainer(tmp_path / "plain", max_steps=3)
    plain.train()
    late = make_trainer(tmp_path / "plain", resume="latest", **{**kw, "max_steps": 4})
    assert late.ema.updates == 0
    assert all(torch.equal(s, p.detach()) for s, p in zip(late.ema.shadow, late.ema.params))


# ----------------------------------------------------------------------------- AdamW / Muon


def test_muon_partition_hidden_matrices():
    model = BlockLM()
    parts = partition_parameters(model, muon=True)
    hidden = [b[i].weight for b in model.blocks for i in (1, 3)]
    assert {id(p) for p in parts.muon} == {id(p) for p in hidden}
    assert {id(p) for p in parts.decay} == {id(model.proj.weight), id(model.head.weight)}  # in/out layers
    assert len(parts.no_decay) == 5 + 2 * 4  # ToyLM's; per block a LayerNorm's two and two biases
    assert not partition_parameters(model).muon  # AdamW: nothing goes to Muon
    with pytest.raises(ValueError, match="found no hidden matrices"):
        partition_parameters(ToyLM(), muon=True)

    # the prior: the blocks' matrices, not the input/timestep embedders or the final layer
    from prior.models.mmdit import MMDiT

    prior = MMDiT(
        modalities=["text"],
        width=32,
        heads=2,
        head_dim=16,
        rope_dim=8,
        num_layers=2,
        in_channels=[4],
        block_size=4,
    )
    names = {id(p): n for n, p in prior.named_parameters()}
    muon = sorted(names[id(p)] for p in partition_parameters(prior, muon=True).muon)
    assert muon == sorted(
        f"blocks.{i}.streams.text.{n}.weight"
        for i in (0, 1)
        for n in ("ada", "qkv", "proj", "mlp.fc_in", "mlp.fc_out")
    )


def test_muon_trains_and_resumes_exactly(tmp_path):
    kw = dict(model_cls=BlockLM, optimizer="muon", muon_lr=0.02)
    trainer = make_trainer(tmp_path / "learn", data_size=32, val=True, max_steps=30, log_every=5, **kw)
    before = trainer.evaluate()
    lrs = instrument(trainer)
    result = trainer.train()
    assert result.val_metrics["loss"] < 0.6 * before["loss"]
    assert lrs[2] == (1e-2, 0.02) and "muon_lr" in result.train_metrics  # both follow the schedule
    assert len(trainer.optimizers) == 2 and isinstance(trainer.optimizers[1].optimizer, torch.optim.Muon)

    kw.update(max_steps=6, save_every=3)
    full = make_trainer(tmp_path / "full", **kw)
    full.train()
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        first = make_trainer(run, **kw)
        instrument(first, crash_at=4)
        first.train()
    ckpt = run / "checkpoints" / "step_0000003"
    assert {"optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"} <= {
        p.name for p in ckpt.iterdir()
    }
    second = make_trainer(run, resume="latest", **kw)
    second.train()
    ref, got = weights(full), weights(second)
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # Muon's momentum restored too

    # the optimizer cannot change on resume: one line naming both
    with pytest.raises(ValueError, match=r"written with train.optimizer=muon; .* with train.optimizer=adamw"):
        make_trainer(run, resume="latest", **{**kw, "optimizer": "adamw"})


def test_stage2_ema_reaches_the_sampling_pipeline(tmp_path):
    """fixed_vae + Muon + EMA through the trainer: the exported pipeline holds the prior's EMA."""
    from helpers import tiny_pipeline

    from prior.checkpoints.released import load_pipeline
    from prior.sampling.config import GenerationConfig
    from prior.training.flow_matching import FlowMatchingConfig
    from prior.training.joint import ColaModel, JointConfig, cola_loss_fn
    from prior.training.recipes import save_pipeline_export

    sentences = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today"] * 3
    pipe = tiny_pipeline(sentences)
    model = ColaModel(pipe.text_vae, pipe.prior, JointConfig(mode="fixed_vae"), FlowMatchingConfig())
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    ids = pipe.tokenizer(sentences)["input_ids"]
    data = [{"input_ids": torch.tensor((row * 4)[:16])} for row in ids]
    cfg = config(tmp_path, max_steps=4, batch_size=3, optimizer="muon", ema_decay=0.9, ema_warmup=False)
    export = lambda m, d: save_pipeline_export(m, pipe.tokenizer, GenerationConfig(), d)  # noqa: E731
    trainer = Trainer(model, cola_loss_fn, data, config=cfg, save_model_fn=export)
    trainer.train()
    ema = trainer.ema.state_dict()
    assert ema and all(k.startswith("prior.") for k in ema)  # fixed_vae: the EMA is the prior's
    loaded = load_pipeline(tmp_path)
    sampled = loaded.prior.state_dict()
    assert all(torch.equal(sampled[k.removeprefix("prior.")], v) for k, v in ema.items())
    raw = model.prior.state_dict()
    assert any(not torch.equal(sampled[k], raw[k]) for k in raw)  # not the raw prior
    assert all(torch.equal(loaded.text_vae.state_dict()[k], v) for k, v in vae_before.items())


def test_hygiene_config_values_are_validated(tmp_path):
    for bad, message in [
        (dict(lr_schedule="linear"), "train.lr_schedule must be one of"),
        (dict(optimizer="sgd"), "train.optimizer must be one of"),
        (dict(ema_decay=1.0), r"train.ema_decay must be None or in \[0, 1\)"),
        (dict(warmdown_fraction=0.0), r"train.warmdown_fraction must be in \(0, 1\]"),
        (dict(muon_adjust_lr="x"), "train.muon_adjust_lr must be one of"),
        (dict(optimizer="muon", mixed_precision="fp16"), "does not support train.mixed_precision='fp16'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config(tmp_path, **bad)
    assert config(tmp_path).lr_floor == 0.1 and config(tmp_path, lr_schedule="warmdown").lr_floor == 0.05
    assert config(tmp_path, lr_schedule="warmdown", min_lr_ratio=0.2).lr_floor == 0.2


# ----------------------------------------------------------------------------- multi-process

TORCHRUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_trainer import ToyLM, lm_loss, make_data, config
from prior.training.trainer import Trainer
torch.manual_seed(0)
# a budget that never ends (the processes agree on the clock every step) and an EMA (observes only)
trainer = Trainer(ToyLM(dropout=0.0), lm_loss, make_data(32), make_data(8, seed=1),
                  config({out!r}, batch_size=4, max_steps=4, save_every=2, eval_every=2,
                         max_time_minutes=1e6, ema_decay=0.9))
result = trainer.train()
if trainer.accelerator.is_main_process:
    torch.save(trainer.accelerator.unwrap_model(trainer.model).state_dict(), {out!r} + "/final.pt")
    print("RESULT", result.step, result.tokens_seen, trainer.accelerator.num_processes)
"""


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_double_batch(tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_run.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, textwrap.shorten(proc.stderr[-3000:], 3000)
    assert "RESULT 4 352 2" in proc.stdout  # 4 steps x 2 processes x 4 rows x 11 tokens
    ckpt = out / "checkpoints" / "step_0000004"
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json", "ema.safetensors"} <= {
        p.name for p in ckpt.iterdir()
    }

    # the two shards of each global batch are what one process sees with batch_size 8
    single = make_trainer(tmp_path / "single", data_size=32, dropout=0.0, batch_size=8, max_steps=4)
    single.train()
    ddp = torch.load(out / "final.pt")
    ref = weights(single)
    assert all(torch.allclose(ddp[k], ref[k], atol=1e-5) for k in ref)
