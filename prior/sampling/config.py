"""One generation config: every setting of a sampling run, its defaults, and the released preset.

:class:`GenerationConfig` is what the sampler, the pipeline (``pipe(prompt, generation_config,
**overrides)``), the CLI (its flags are derived from the fields), the run config (``generation:``
section) and the evaluations share, as ``transformers.GenerationConfig`` is for its models. A
pipeline folder stores its default in ``generation_config.json``.

Design choices
--------------
* **Defaults are this project's loop**: clean repaint of a partial first block with the prompt
  encoded unpadded (padded only to the VAE patch size), output cut after the first stop id and at
  ``max_new_tokens``, 16 Euler steps, CFG 7, greedy, no repetition penalty, the scheduler's own
  time shift.
* **The released loop is a preset, not a mode** (:meth:`GenerationConfig.released`): the released
  numbers (16 steps, CFG 7, 32 new tokens, greedy, top-k 50 / top-p 0.9 unused when greedy,
  repetition penalty 1.1) and the four behaviours in which the released loop differs, each its own
  field: ``pad_prompt_to_block`` (the prompt right-padded with the pad id to a block multiple and
  encoded *with* the pads), ``finite_logits`` (NaN -> 0, +-inf -> +-1e4 before sampling),
  ``stop_rule="released"`` (see :mod:`prior.sampling.stopping`) and ``skip_special_tokens=False``;
  on the unshifted grid (``shift=1``). Any field can be overridden on top.
* ``stop_token_ids`` / ``pad_token_id`` left at None are filled from the tokenizer by the
  pipeline (EOS, plus ``<|im_end|>`` when the vocabulary has it; PAD).
* Invalid values raise ValueError naming the field; :meth:`replace` refuses unknown names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

FIRST_BLOCK_STRATEGIES = ("clean_repaint", "partial_repaint", "left_pad", "right_pad")
PATCH_BOUNDARIES = ("pin", "shift")  # a prompt that ends inside a patch (VAE patch size > 1)
STOP_RULES = ("first_stop", "released")
AUTOCAST_DTYPES = ("bfloat16",)  # GenerationConfig.autocast
CONFIG_NAME = "generation_config.json"

# The released benchmark's numbers, and the released loop's behaviours.
RELEASED_SETTINGS = dict(
    num_inference_steps=16, guidance_scale=7.0, max_new_tokens=32, temperature=0.0, top_k=50, top_p=0.9,
    repetition_penalty=1.1,
)  # fmt: skip
RELEASED_LOOP = dict(
    shift=1.0, pad_prompt_to_block=True, finite_logits=True, stop_rule="released", whole_blocks=True,
    skip_special_tokens=False,
)  # fmt: skip


@dataclass
class GenerationConfig:
    """Settings of one generation run (YAML ``generation:`` section; ``generation_config.json``)."""

    max_new_tokens: int = 32
    num_inference_steps: int = 16  # K Euler steps per block
    guidance_scale: float = 7.0  # CFG weight w (1 = no guidance, 0 = unconditional)
    guidance_interval: list[float] | None = None  # [lo, hi]: CFG only at noise levels t in it
    noise_scale: float = 1.0  # initial noise = noise_scale * eps (a "temperature" of the transport)
    project_latents: bool = (
        False  # put each finished block on the encoder's output sphere (TextVAE.project_latents)
    )
    shift: float | None = None  # SD3-style time shift of the grid; None = the scheduler's own
    first_block: str = "clean_repaint"  # one of FIRST_BLOCK_STRATEGIES
    repaint_fraction: float = 0.5  # partial_repaint: fraction of the steps that re-noise known latents
    pad_prompt_to_block: bool = False  # repaint: encode the prompt right-padded to a block (released)
    merge_commit: bool = True  # commit each clean block inside the next block's first step (K passes/block)
    autocast: str | None = None  # "bfloat16": the prior's matmuls in bf16 under torch.autocast (weights,
    # norms, softmax and the Euler update stay fp32; the VAE decoder runs in its own dtype); None: off
    patch_boundary: str = "pin"  # one of PATCH_BOUNDARIES: pin the padded partial patch | shift the prompt
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # None/0 = off
    top_p: float | None = None  # None/1 = off
    repetition_penalty: float = 1.0  # 1 = off; released 1.1
    finite_logits: bool = False  # replace NaN/inf logits before sampling (released)
    stop_on_eos: bool = True  # whether stop ids end a sample at all
    stop_token_ids: list[int] | None = None  # None = the tokenizer's EOS (+ <|im_end|>)
    pad_token_id: int | None = None  # None = the tokenizer's PAD
    stop_rule: str = "first_stop"  # one of STOP_RULES
    whole_blocks: bool = False  # keep whole blocks past max_new_tokens
    skip_special_tokens: bool = True  # when decoding ids to text

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        check(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        check(self.num_inference_steps >= 1, "num_inference_steps", ">= 1")
        check(self.guidance_scale >= 0, "guidance_scale", ">= 0")
        check(self.shift is None or self.shift > 0, "shift", "> 0 (or None)")
        check(self.noise_scale > 0, "noise_scale", "> 0")
        if self.guidance_interval is not None:
            lo_hi = [float(v) for v in self.guidance_interval]
            check(
                len(lo_hi) == 2 and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0,
                "guidance_interval",
                "[lo, hi] in [0, 1]",
            )
            self.guidance_interval = lo_hi
        check(self.first_block in FIRST_BLOCK_STRATEGIES, "first_block", f"one of {FIRST_BLOCK_STRATEGIES}")
        check(0.0 <= self.repaint_fraction <= 1.0, "repaint_fraction", "in [0, 1]")
        check(self.patch_boundary in PATCH_BOUNDARIES, "patch_boundary", f"one of {PATCH_BOUNDARIES}")
        check(self.temperature >= 0, "temperature", ">= 0")
        check(self.top_k is None or self.top_k >= 0, "top_k", ">= 0 (or None)")
        check(self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p", "in (0, 1] (or None)")
        check(self.repetition_penalty > 0, "repetition_penalty", "> 0")
        check(self.stop_rule in STOP_RULES, "stop_rule", f"one of {STOP_RULES}")
        check(
            self.autocast is None or self.autocast in AUTOCAST_DTYPES,
            "autocast",
            f"one of {AUTOCAST_DTYPES} or None",
        )
        if self.pad_prompt_to_block and self.first_block not in ("clean_repaint", "partial_repaint"):
            raise ValueError(
                f"pad_prompt_to_block applies to clean/partial repaint, not first_block={self.first_block!r}"
            )
        if self.stop_rule == "released" and not self.whole_blocks:
            raise ValueError("stop_rule='released' keeps whole blocks: whole_blocks must be True")
        if self.stop_token_ids is not None:
            self.stop_token_ids = [int(i) for i in self.stop_token_ids]

    # ------------------------------------------------------------------ construction

    @classmethod
    def released(cls, **overrides) -> GenerationConfig:
        """The released inference loop with the released benchmark's settings (module docstring)."""
        return cls(**{**RELEASED_SETTINGS, **RELEASED_LOOP, **overrides})

    def replace(self, **overrides) -> GenerationConfig:
        """A copy with some fields changed (None values are ignored: "not given")."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown generation setting {unknown[0]!r}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ files

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/generation_config.json`` (returned)."""
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> GenerationConfig:
        """Read ``folder/generation_config.json``; unknown keys are an error naming the file."""
        path = Path(folder) / CONFIG_NAME
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg})") from e
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{path}: unknown generation setting {unknown[0]!r}")
        return cls(**values)


__all__ = [
    "AUTOCAST_DTYPES",
    "CONFIG_NAME",
    "FIRST_BLOCK_STRATEGIES",
    "PATCH_BOUNDARIES",
    "RELEASED_LOOP",
    "RELEASED_SETTINGS",
    "STOP_RULES",
    "GenerationConfig",
]
