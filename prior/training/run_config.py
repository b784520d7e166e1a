"""The top-level run configuration: one dataclass tree that every YAML under ``configs/`` mirrors.

A run YAML has one section per module, each validated against that module's own config::

    task: vae            # vae (Stage 1) | cola (Stage 2: joint VAE + prior) | ar (the AR baseline)
    data: ...            # unimodal.text_data.DataConfig
    tokenizer: ...       # unimodal.tokenization.TokenizerConfig
    vae: ...             # unimodal.text_vae.TextVAE.__init__ (its diffusers config); runs that build a VAE
    train: ...           # prior.training.trainer.TrainerConfig

Stage-2 runs add ``stage1`` (the Stage-1 run or export to start from), ``prior`` (MMDiT),
``flow`` (flow matching), ``joint`` (the joint-training mode) and ``generation`` (samples printed at
the end). ``task: image_vae`` trains an ``AutoencoderKL`` (``image_vae:``) on ``image_data:``;
``task: multimodal`` trains the text+image MMDiT (``prior:``, ``flow:``, ``multimodal:``) on
``image_data:`` pairs, from the Text VAE and image VAE runs named in ``multimodal:``. ``task: sft``
fine-tunes a trained Cola model (``init_from``: its VAE, tokenizer and prior) on ``chat:``
conversations, the loss on assistant turns only; ``init_from`` also starts a ``task: cola`` prior
from trained weights (continued pretraining). The matched autoregressive baseline (``task: ar``) reads ``stage1`` (its tokenizer only,
so both systems see identical tokens), ``ar`` (:class:`~prior.models.ar.ARTransformer`, its
``vocab_size`` derived from the tokenizer) and ``generation``. Loading goes through
:func:`unimodal.config.load_config`: unknown keys, wrong types and missing files are one-line
:class:`~unimodal.config.ConfigError`s.

Values that must agree are derived, never repeated: ``vae.vocab_size`` comes from the tokenizer,
``prior.in_channels`` from the VAE's ``latent_dim``, and the flow layout uses ``prior.block_size``.
The first two stay settable (None = derived); a given value that disagrees is one ConfigError.
``vae:`` belongs to the runs that build a VAE (``task: vae``, and ``task: cola`` with
``joint.mode: scratch``); a Stage-2 run from ``stage1`` takes its VAE from the Stage-1 export, and
a ``vae:`` section there is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prior.models.ar import ARTransformer
from prior.models.mmdit import MMDiT
from prior.sampling.config import GenerationConfig
from prior.sampling.masked_diffusion import MaskedDiffusionSamplingConfig
from prior.training.flow_matching import FlowMatchingConfig
from prior.training.joint import JointConfig
from prior.training.multimodal import MultimodalConfig
from prior.training.trainer_config import TrainerConfig
from unimodal.chat_data import ChatDataConfig
from unimodal.config import ConfigError, load_config, schema_from_signature
from unimodal.image_text_data import ImageTextDataConfig
from unimodal.image_vae import ImageVAEConfig
from unimodal.text_data import DataConfig
from unimodal.text_vae import TextVAE
from unimodal.tokenization import TokenizerConfig

TASKS = ("vae", "cola", "ar", "image_vae", "multimodal", "sft", "mdm")

TextVAEConfig = schema_from_signature(TextVAE, derived=("vocab_size",))  # from the tokenizer
MMDiTConfig = schema_from_signature(MMDiT, derived=("in_channels",))  # from the VAE's latent_dim
ARTransformerConfig = schema_from_signature(ARTransformer, derived=("vocab_size",))  # from the tokenizer


@dataclass
class RunConfig:
    """Everything one ``unimodal train`` run needs; YAML mirrors it 1:1."""

    task: str = "vae"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vae: TextVAEConfig | None = None  # runs that build a VAE (see builds_vae); defaults when absent
    train: TrainerConfig = field(default_factory=TrainerConfig)
    # Stage 2 (task: cola)
    stage1: str | None = None  # Stage-1 run folder or export; required unless joint.mode == scratch
    # initialise from a trained Cola model (a run folder, a pipeline folder or a released folder):
    # task sft (required: its VAE, tokenizer and prior weights) and task cola (prior weights)
    init_from: str | None = None
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)  # task sft: the conversations
    prior: MMDiTConfig = field(default_factory=MMDiTConfig)
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # saved in every export
    # the autoregressive baseline (task: ar); its tokenizer comes from stage1
    ar: ARTransformerConfig = field(default_factory=ARTransformerConfig)
    # the masked-diffusion baseline (task: mdm): the same transformer, bidirectional, + a mask id
    mdm: ARTransformerConfig = field(default_factory=ARTransformerConfig)
    mdm_sampling: MaskedDiffusionSamplingConfig = field(default_factory=MaskedDiffusionSamplingConfig)
    # the unified text-image path: the image VAE (task: image_vae) and the multimodal prior
    image_data: ImageTextDataConfig = field(default_factory=ImageTextDataConfig)
    image_vae: ImageVAEConfig = field(default_factory=ImageVAEConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {', '.join(TASKS)}")
        if self.builds_vae:
            if self.vae is None:
                self.vae = TextVAEConfig()
        elif self.vae is not None and self.task in ("ar", "image_vae", "multimodal", "sft", "mdm"):
            raise ConfigError(
                f"vae: is unused by task: {self.task} (it builds no Text VAE; a Text VAE comes from a Stage-1 run "
                "folder); remove the vae: section"
            )
        elif self.vae is not None:
            raise ConfigError(
                f"vae: is unused by task: cola with joint.mode={self.joint.mode} (its VAE comes from the "
                "Stage-1 export named by stage1:); remove the vae: section (only task: vae and "
                "joint.mode: scratch build a VAE)"
            )

    @property
    def builds_vae(self) -> bool:
        """Whether this run builds a fresh VAE from ``vae:`` (Stage 1, or Stage 2 from scratch)."""
        return self.task == "vae" or (self.task == "cola" and self.joint.mode == "scratch")


def load_run_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Load a run YAML with ``key=value`` overrides (e.g. ``train.max_steps=100``)."""
    return load_config(RunConfig, path, overrides)
