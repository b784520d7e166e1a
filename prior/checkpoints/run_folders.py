"""Run folders and the exports inside them: where a trained model is, for training and inference alike.

A run folder, as the trainer writes it::

    runs/cola_tiny/
      config.yaml                      # the resolved RunConfig
      tokenizer/                       # save_pretrained of the run's tokenizer
      checkpoints/step_0001500/        # accelerate state + trainer_state.json + model/
        model/                         # a loadable export of that step: Stage 1 holds
                                       #   text_vae/ + tokenizer/, Stage 2 a whole
                                       #   ColaTextPipeline folder (model_index.json, prior/, ...),
                                       #   the AR baseline (task: ar) an ARTextPipeline folder
      logs/                            # tensorboard

Design choices
--------------
* **Checkpoints are ordered by step number**, never by name: ``step_10000000`` sorts after
  ``step_9999999`` (names are zero-padded to at least 7 digits, but a long run may exceed them).
  :func:`list_checkpoints` is the one listing; the trainer's resume and pruning use it too.
* This module imports nothing of ``prior.training``: the inference path (loading a pipeline)
  resolves run folders without the trainer or accelerate.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "model"
PIPELINE_INDEX = "model_index.json"  # what marks a pipeline export (diffusers' save_pretrained)
CHECKPOINT_NAME = re.compile(r"step_(\d{7,})")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step`` (``step_0001500``)."""
    return f"step_{step:07d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under ``output_dir/checkpoints``, oldest (lowest step) first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def resolve_export(path: str | os.PathLike, component: str = "text_vae") -> Path:
    """The export folder holding ``component/``: ``path`` itself, its ``model/``, or the newest
    checkpoint export of a run folder (``checkpoints/step_*/model``) that has one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / component).is_dir():
        return path
    if (path / EXPORT_DIR / component).is_dir():
        return path / EXPORT_DIR
    exports = [c / EXPORT_DIR for c in list_checkpoints(path) if (c / EXPORT_DIR / component).is_dir()]
    if not exports:
        raise FileNotFoundError(f"no {component}/ export found in {path} (nor in its {CHECKPOINTS_DIR}/)")
    return exports[-1]


def resolve_pipeline_folder(path: str | os.PathLike) -> Path:
    """A pipeline folder (``model_index.json``: Cola or AR baseline), its ``model/``, or the newest
    pipeline export of a Stage-2 or AR run folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for folder in (path, path / EXPORT_DIR):
        if (folder / PIPELINE_INDEX).is_file():
            return folder
    exports = [c / EXPORT_DIR for c in list_checkpoints(path) if (c / EXPORT_DIR / PIPELINE_INDEX).is_file()]
    if not exports:
        raise FileNotFoundError(
            f"no pipeline export ({PIPELINE_INDEX}) found in {path} (nor in its {CHECKPOINTS_DIR}/)"
        )
    return exports[-1]


__all__ = [
    "CHECKPOINT_NAME",
    "list_checkpoints",
    "checkpoint_name",
    "resolve_export",
    "resolve_pipeline_folder",
]
