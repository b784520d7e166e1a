"""Tokenizers for the Text VAE: load any fast tokenizer, or train a small byte-level BPE.

Design choices
--------------
- Every tokenizer is a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``; in transformers 5
  that name is the ``TokenizersBackend`` class). Slow (pure Python) tokenizers are refused: data
  preparation tokenizes whole corpora through the Rust backend in batches.
- ``load_tokenizer`` accepts a local directory written by ``save_pretrained`` (``AutoTokenizer``), a
  hub id when online, or a *bare* ``tokenizer.json`` file. The released Cola DLM ships only a bare
  ``tokenizer.json`` (OLMo 2 BPE; ``<|endoftext|>`` = 100257 is EOS, ``<|pad|>`` = 100277 is PAD,
  ``<|im_end|>`` = 100265). A bare file carries no special-token map, so when it contains the
  conventional tokens ``<|endoftext|>`` / ``<|pad|>`` they become ``eos_token`` / ``pad_token``;
  nothing else is inferred.
- ``train_bpe_tokenizer`` trains a byte-level BPE (GPT-2 style pre-tokenizer, all 256 bytes in the
  initial alphabet, so any string is encodable without an unknown token) with the ``tokenizers``
  library. Special tokens: id 0 = EOS ``<|endoftext|>``, id 1 = PAD ``<|pad|>``. No post-processor,
  so encoding never adds a BOS or EOS: the data layer appends EOS after each document itself.
  Training is deterministic for the same input (checked by a test).
- Special tokens the model needs: EOS (document separator, stop token) and PAD (right padding of
  prompts). ``check_special_tokens`` fails loudly when either is missing; it never adds one.
- The BERT ``[MASK]`` is *not* a tokenizer token. It is the Text VAE's extra embedding row: the
  embedding has ``vocab_size + 1`` rows and ``mask_token_id == vocab_size`` (the released layout:
  100278 tokens, 100279 rows). ``model_vocab_size(tokenizer)`` gives that ``vocab_size``.
- ``TokenizerConfig`` is mirrored 1:1 by the ``tokenizer:`` section of the YAML configs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_END_TOKEN = "<|im_end|>"  # chat turn end in the released tokenizer (id 100265); optional here

_BYTE_ALPHABET_SIZE = 256


@dataclass
class TokenizerConfig:
    """Which tokenizer to use.

    name_or_path: a ``save_pretrained`` directory, a bare ``tokenizer.json`` or a hub id; ``None``
        trains the embedded byte-level BPE on the training split of the data.
    vocab_size: size of the trained BPE (ignored when ``name_or_path`` is given).
    """

    name_or_path: str | None = None
    vocab_size: int = 4096

    def __post_init__(self) -> None:
        min_size = _BYTE_ALPHABET_SIZE + 2
        if self.name_or_path is None and self.vocab_size < min_size:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} is too small for a byte-level BPE (min {min_size})"
            )


# ----------------------------------------------------------------------------------------------- loading


def _wrap_backend(backend: Tokenizer, name: str) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer``; conventional EOS / PAD token strings become the special tokens."""
    special = {}
    if backend.token_to_id(EOS_TOKEN) is not None:
        special["eos_token"] = EOS_TOKEN
    if backend.token_to_id(PAD_TOKEN) is not None:
        special["pad_token"] = PAD_TOKEN
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=name, clean_up_tokenization_spaces=False, **special
    )


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a directory, a bare ``tokenizer.json`` file or a hub id.

    Raises FileNotFoundError when ``name_or_path`` is neither a local path nor reachable on the hub,
    and ValueError when it resolves to a slow tokenizer.
    """
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    is_bare_dir = path.is_dir() and (path / "tokenizer.json").is_file()
    is_bare_dir = is_bare_dir and not (path / "tokenizer_config.json").is_file()
    if path.is_file() or is_bare_dir:
        file = path if path.is_file() else path / "tokenizer.json"
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"cannot read tokenizer file {file}: {str(e).splitlines()[0]}") from e
        return _wrap_backend(backend, name)
    looks_local = name.startswith((".", "/", "~")) or path.suffix == ".json"
    if looks_local and not path.exists():
        raise FileNotFoundError(f"tokenizer path not found: {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"tokenizer {name!r} is not a local path and could not be loaded from the hub ({first})"
        ) from e
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} is not a fast tokenizer ({type(tokenizer).__name__})")
    return tokenizer


# ---------------------------------------------------------------------------------------------- training


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with EOS ``<|endoftext|>`` (id 0) and PAD ``<|pad|>`` (id 1).

    Deterministic for the same ``texts``. When ``out_dir`` is given the tokenizer is saved there with
    ``save_pretrained`` (reload it with ``load_tokenizer(out_dir)``).
    """
    min_size = _BYTE_ALPHABET_SIZE + 2
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (min {min_size})")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    name = str(out_dir) if out_dir is not None else f"byte-level-bpe-{vocab_size}"
    tokenizer = _wrap_backend(backend, name)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# ------------------------------------------------------------------------------------------------ checks


def default_stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a generated text by default: EOS, and ``<|im_end|>`` when the vocabulary has it."""
    ids = [tokenizer.eos_token_id, tokenizer.get_vocab().get(IM_END_TOKEN)]
    return [i for i in ids if i is not None]


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of whole documents: each text without special tokens, then EOS (how captions are
    tokenized for training, and so how a text->image prompt must be)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def check_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise ValueError naming the missing token if the tokenizer has no EOS or no PAD token."""
    where = tokenizer.name_or_path or type(tokenizer).__name__
    for role, conventional in (("eos", EOS_TOKEN), ("pad", PAD_TOKEN)):
        if getattr(tokenizer, f"{role}_token_id") is None:
            raise ValueError(
                f"tokenizer at {where} has no {role} token; add one, e.g. "
                f"tokenizer.add_special_tokens({{'{role}_token': '{conventional}'}})"
            )


def model_vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """Number of token ids the Text VAE must embed (``mask_token_id`` is this value).

    ``len(tokenizer)`` counts added tokens; the max id guards against vocabularies with holes.
    """
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def build_tokenizer(
    cfg: TokenizerConfig,
    train_texts: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Load ``cfg.name_or_path``, or train a BPE on ``train_texts`` (the caller's training split,
    e.g. ``unimodal.text_data.load_documents(data_cfg)[0]``).

    The result always has EOS and PAD (checked). This module knows no corpus: the data layer
    (``unimodal.text_data``) depends on it, never the other way round.
    """
    if cfg.name_or_path is not None:
        tokenizer = load_tokenizer(cfg.name_or_path)
    else:
        if train_texts is None:
            raise ValueError("tokenizer.name_or_path is null: training a BPE needs train_texts")
        tokenizer = train_bpe_tokenizer(train_texts, cfg.vocab_size, out_dir=out_dir)
    check_special_tokens(tokenizer)
    return tokenizer


__all__ = [
    "document_ids",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "PAD_TOKEN",
    "TokenizerConfig",
    "build_tokenizer",
    "check_special_tokens",
    "load_tokenizer",
    "model_vocab_size",
    "train_bpe_tokenizer",
]
