"""The top-level run configuration: one dataclass tree that every YAML under ``configs/`` mirrors.

A run YAML has one section per module, each validated against that module's own config::

    task: vae            # vae (Stage 1) | cola (Stage 2: joint VAE + prior)
    data: ...            # unimodal.text_data.DataConfig
    tokenizer: ...       # unimodal.tokenization.TokenizerConfig
    vae: ...             # unimodal.text_vae.TextVAE.__init__ (its diffusers config)
    train: ...           # prior.training.trainer.TrainerConfig

Stage-2 runs add ``stage1`` (the Stage-1 run or export to start from), ``prior`` (MMDiT),
``flow`` (flow matching), ``joint`` (the joint-training mode) and ``sampler`` (samples printed at
the end). Loading goes through :func:`unimodal.config.load_config`: unknown keys, wrong types and
missing files are one-line :class:`~unimodal.config.ConfigError`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prior.models.mmdit import MMDiT
from prior.sampling.block_sampler import SamplerConfig
from prior.training.flow_matching import FlowMatchingConfig
from prior.training.joint import JointConfig
from prior.training.trainer import TrainerConfig
from unimodal.config import ConfigError, load_config, schema_from_signature
from unimodal.text_data import DataConfig
from unimodal.text_vae import TextVAE
from unimodal.tokenization import TokenizerConfig

TASKS = ("vae", "cola")

TextVAEConfig = schema_from_signature(TextVAE)
MMDiTConfig = schema_from_signature(MMDiT)


@dataclass
class RunConfig:
    """Everything one ``unimodal train`` run needs; YAML mirrors it 1:1."""

    task: str = "vae"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vae: TextVAEConfig = field(default_factory=TextVAEConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    # Stage 2 (task: cola)
    stage1: str | None = None  # Stage-1 run folder or export; required unless joint.mode == scratch
    prior: MMDiTConfig = field(default_factory=MMDiTConfig)
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {', '.join(TASKS)}")


def load_run_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Load a run YAML with ``key=value`` overrides (e.g. ``train.max_steps=100``)."""
    return load_config(RunConfig, path, overrides)
