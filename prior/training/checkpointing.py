"""Training checkpoints: validate, write atomically, prune, choose the one to resume from, load.

Layout: ``output_dir/checkpoints/step_{N:07d}/`` holds the accelerate state (``save_state``: model
weights, ``optimizer.bin``, ``scheduler.bin``, one ``random_states_{rank}.pkl`` per process),
``trainer_state.json`` (step, epoch, samples consumed in the epoch, tokens seen, process count,
elapsed training time and the schedule's warmup end, EMA update count, the trainer config), with
``train.ema_decay`` set ``ema.safetensors`` (the EMA of the trained parameters, by name), and
``model/`` (written by the recipe's ``save_model_fn``: a loadable export, of the EMA weights when
the EMA is on). With ``train.optimizer=muon`` the accelerate state holds two optimizers and two
schedulers (``optimizer.bin`` = AdamW, ``optimizer_1.bin`` = Muon; ``scheduler.bin``,
``scheduler_1.bin``).

- **Atomic**: a checkpoint is written into ``.tmp-step_N`` and renamed into place, so a
  checkpoint folder is complete or absent; a temporary folder left by a crash is removed by the
  next save of that step.
- **Pruning**: after a save the newest ``keep`` checkpoints are kept (counting the new one).
- **Validation before anything is written**: a missing or corrupt resume checkpoint (unreadable
  state, missing optimizer/scheduler/weights, truncated safetensors) and a run folder passed where
  a checkpoint is expected are one-line errors naming the path; so is a checkpoint written with
  another ``train.optimizer`` (its optimizer states cannot be loaded). RNG states are only
  required when the process count matches the one that wrote them (another count cannot restore
  them).

Checkpoint folders are listed and named by :mod:`prior.checkpoints.run_folders` (numeric order),
which the inference side shares.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prior.checkpoints.run_folders import checkpoint_name, list_checkpoints

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"


def _numbered(name: str, count: int) -> list[str]:
    """accelerate's file names for ``count`` optimizers or schedulers: name.bin, name_1.bin, ..."""
    return [f"{name}.bin" if i == 0 else f"{name}_{i}.bin" for i in range(count)]


def check_checkpoint(
    path: str | Path,
    process_index: int = 0,
    num_processes: int = 1,
    optimizer: str = "adamw",
    num_optimizers: int = 1,
) -> dict:
    """Validate a checkpoint folder and return its trainer state; one-line error naming the path.

    ``optimizer`` / ``num_optimizers``: the resuming run's ``train.optimizer`` and how many
    optimizers (and schedulers) it prepared; the checkpoint must have been written with the same.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    if not path.is_dir():
        raise ValueError(f"resume checkpoint is not a folder: {path}")
    if not (path / STATE_FILE).exists() and list_checkpoints(path):
        raise ValueError(f"{path} is a run folder, not a checkpoint: pass one of {path}/checkpoints/step_*")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["step"]), int(state["epoch"]), int(state["samples_into_epoch"])
    except FileNotFoundError:
        raise ValueError(f"corrupt checkpoint {path}: {STATE_FILE} is missing") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"corrupt checkpoint {path}: unreadable {STATE_FILE} ({err})") from None
    saved_optimizer = (state.get("config") or {}).get("optimizer", "adamw")
    if saved_optimizer != optimizer:
        raise ValueError(
            f"checkpoint {path} was written with train.optimizer={saved_optimizer}; "
            f"it cannot be resumed with train.optimizer={optimizer}"
        )
    names = {p.name for p in path.iterdir()}
    required = {
        "model weights": any(n.startswith(("model", "pytorch_model")) for n in names if n != "model"),
        **{
            f: f in names
            for f in _numbered("optimizer", num_optimizers) + _numbered("scheduler", num_optimizers)
        },
    }
    if state.get("num_processes") == num_processes:  # another process count cannot restore RNG streams
        required[f"random_states_{process_index}.pkl"] = f"random_states_{process_index}.pkl" in names
    missing = [what for what, ok in required.items() if not ok]
    if missing:
        raise ValueError(f"corrupt checkpoint {path}: missing {', '.join(missing)}")
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt") as f:
                f.keys()
        except Exception as err:
            raise ValueError(f"corrupt checkpoint {weights}: {str(err).splitlines()[0]}") from None
    return state


def resume_target(
    output_dir: Path,
    resume: str | None,
    accelerator: Accelerator,
    optimizer: str = "adamw",
    num_optimizers: int = 1,
) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its validated trainer state, or None for a fresh run.

    ``resume``: None (fresh; refused when ``output_dir`` already holds checkpoints), ``"latest"``
    (the newest checkpoint, fresh if none) or a checkpoint path; ``optimizer`` / ``num_optimizers``
    as in :func:`check_checkpoint`.
    """
    existing = list_checkpoints(output_dir)
    if resume is None:
        if existing:
            raise ValueError(
                f"{output_dir / 'checkpoints'} already holds checkpoints (newest "
                f"{existing[-1].name}); set resume='latest' to continue or choose another output_dir"
            )
        return None
    if resume == "latest" and not existing:
        accelerator.print(f"resume='latest': no checkpoint in {output_dir}, starting fresh")
        return None
    target = existing[-1] if resume == "latest" else Path(resume)
    state = check_checkpoint(
        target, accelerator.process_index, accelerator.num_processes, optimizer, num_optimizers
    )
    return target, state


def save_checkpoint(
    accelerator: Accelerator,
    model: nn.Module,
    output_dir: Path,
    state: dict,
    save_model_fn: Callable[[nn.Module, Path], None] | None = None,
    keep: int | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/step_{state['step']:07d}`` atomically (temp folder + rename); prune old ones.

    Every process saves its RNG state; the main one writes the model, optimizers and schedulers
    (accelerate's ``save_state``), ``state`` as ``trainer_state.json``, ``ema_state`` (if any) as
    ``ema.safetensors`` and ``save_model_fn``'s export.
    """
    acc, step = accelerator, int(state["step"])
    root = output_dir / "checkpoints"
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    if acc.is_main_process:
        if tmp.exists():  # left by a crashed save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))  # every process: its RNG state; the main one: model/optimizer/scheduler
    acc.wait_for_everyone()
    if acc.is_main_process:
        if save_model_fn is not None:
            (tmp / "model").mkdir()
            save_model_fn(acc.unwrap_model(model), tmp / "model")
        if ema_state is not None:
            save_file(ema_state, str(tmp / EMA_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():  # a re-run of this step (resumed from an older checkpoint)
            old = root / f".old-{checkpoint_name(step)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        if keep is not None:  # keep the newest, counting this one
            others = [p for p in list_checkpoints(output_dir) if p != final]
            for stale in others[: max(0, len(others) - keep + 1)]:
                shutil.rmtree(stale)
    acc.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """Restore the accelerate state (model, optimizer, scheduler, RNG) from ``path``; one-line error."""
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {path}: {str(err).splitlines()[0]}") from None


def load_ema(path: Path) -> dict[str, torch.Tensor] | None:
    """The EMA saved in checkpoint ``path`` (CPU tensors by parameter name), None if it has none."""
    file = path / EMA_FILE
    return load_file(str(file)) if file.exists() else None
