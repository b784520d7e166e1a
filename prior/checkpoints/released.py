"""Released Cola DLM checkpoints -> :class:`~prior.pipelines.pipeline_cola_text.ColaTextPipeline`.

The format itself is described in docs/released-format.md; its tables live in
:mod:`prior.checkpoints.released_format`.

The released model (``ByteDance-Seed/Cola-DLM`` on the HF hub) is laid out as::

    cola_dit/config.json + model.safetensors
                           (or model-0000k-of-0000N.safetensors + model.safetensors.index.json)
    cola_vae/config.json + model.safetensors  (or sharded, the same way)
    tokenizer.json       (in the folder, or in its parent: the official README's ``hf_models/`` layout)

:func:`load_released_pipeline` reads such a folder into a pipeline in memory;
:func:`convert_released` (``unimodal convert SRC DST``) saves it as a pipeline folder that
``ColaTextPipeline.from_pretrained`` loads; :func:`load_pipeline` takes either kind of folder (or a
Stage-2 run folder, or an AR baseline run or export: then it returns an ``ARTextPipeline``) and is
what ``unimodal sample`` / ``eval-samples`` use. The entry points that need a Cola DLM
(``unimodal eval``, the lm-eval adapter, ``scripts/study_context.py``) call
:func:`load_cola_pipeline`, which refuses an AR baseline folder with one line before reading a
weight; :func:`load_ar_pipeline` is the reverse.

Design choices
--------------
* **Strict, one-line errors.** Every weight the model needs must be present with the model's
  shape; nothing else may be present (the DiT's RoPE ``freqs`` buffers are the one exception: they
  are checked against the recomputed frequencies and dropped by
  :func:`~prior.checkpoints.released_format.convert_released_dit_state_dict`). Messages name the released key and the
  file. A shard index that names a key its shard does not hold, a shard file that is missing, a
  folder without ``cola_vae/`` and a tokenizer whose vocabulary is not the VAE's ``vocab_size``
  all fail before anything is built.
* **Latent normalisation comes across in the VAE config.** ``scaling_factor`` / ``shifting_factor``
  of ``cola_vae/config.json`` become the :class:`~unimodal.text_vae.TextVAE` config fields of the
  same names; ``TextVAE.encode`` applies ``(z - shift) * scale`` and the decoder consumes the
  normalised latents, never inverted, exactly as released.
* **Special ids live in the tokenizer.** The pipeline reads EOS and PAD from the tokenizer's special
  tokens and adds ``<|im_end|>`` to the stop ids when the vocabulary has it (released: EOS 100257
  ``<|endoftext|>``, im_end 100265, pad 100277 ``<|pad|>``). A bare ``tokenizer.json`` carries no
  special-token map; :func:`~unimodal.tokenization.load_tokenizer` takes the conventional token
  strings, and ``eos_token_id`` / ``pad_token_id`` name other tokens explicitly (e.g. the golden
  tiny models: EOS 199, PAD 299). The exported folder's ``tokenizer/tokenizer_config.json``
  records them, so ``from_pretrained`` restores them. For the released 100,278-token vocabulary the
  ids are checked against those.
* **A record of the conversion**: ``cola_release.json`` at the top of the exported folder (source,
  special ids, normalisation factors, block sizes, the released generation preset). Nothing reads
  it to *configure* the model; ``unimodal eval`` uses its presence to default to the released
  generation loop.
* **The pipeline's generation config is the released preset** (``GenerationConfig.released()``,
  saved as ``generation_config.json``), so a converted checkpoint samples as released by default.
* The scheduler is ``FlowMatchEulerDiscreteScheduler(shift=1.0)``: the released uniform grid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors import safe_open

from prior.checkpoints.released_format import (
    RELEASED_SPECIAL_IDS,
    RELEASED_VOCAB_SIZE,
    ROPE_BUFFER_PATTERN,
    convert_released_dit_state_dict,
    dit_from_released_config,
    ours_to_released,
    released_dit_shapes,
    vae_from_released_config,
)
from prior.checkpoints.run_folders import resolve_pipeline_folder
from prior.models.mmdit import MMDiT
from prior.pipelines.folders import check_pipeline_class, pipeline_class_name
from prior.pipelines.pipeline_ar_text import ARTextPipeline
from prior.pipelines.pipeline_cola_text import ColaTextPipeline
from prior.pipelines.pipeline_mdm_text import MDMTextPipeline
from prior.sampling.config import GenerationConfig
from unimodal.text_vae import TextVAE
from unimodal.tokenization import IM_END_TOKEN, load_tokenizer, model_vocab_size

RELEASE_RECORD = "cola_release.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


# ----------------------------------------------------------------------------------------- layout


@dataclass
class ReleasedLayout:
    """Where the parts of a released checkpoint are."""

    root: Path
    dit: Path  # cola_dit/
    vae: Path  # cola_vae/
    tokenizer: Path  # tokenizer.json


def is_released_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` holds ``cola_dit/config.json`` (the released layout)."""
    return (Path(path) / "cola_dit" / "config.json").is_file()


def find_released_layout(
    folder: str | os.PathLike, tokenizer: str | os.PathLike | None = None
) -> ReleasedLayout:
    """Locate ``cola_dit/``, ``cola_vae/`` and ``tokenizer.json`` (``tokenizer`` overrides the search)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"released checkpoint folder not found: {root}")
    for part in ("cola_dit", "cola_vae"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"released checkpoint {root} has no {part}/ folder")
        if not (root / part / "config.json").is_file():
            raise FileNotFoundError(f"released checkpoint file not found: {root / part / 'config.json'}")
    if tokenizer is not None:
        tok = Path(tokenizer).expanduser()
        if tok.is_dir():
            tok = tok / "tokenizer.json"
        if not tok.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok}")
    else:
        candidates = [
            root / "tokenizer.json",
            root / "tokenizer" / "tokenizer.json",
            root.parent / "tokenizer.json",
        ]
        tok = next((c for c in candidates if c.is_file()), None)
        if tok is None:
            raise FileNotFoundError(
                f"no tokenizer.json in {root}, {root / 'tokenizer'} or {root.parent} (pass tokenizer=...)"
            )
    return ReleasedLayout(root=root, dit=root / "cola_dit", vae=root / "cola_vae", tokenizer=tok)


# ---------------------------------------------------------------------------------------- weights


def read_safetensors_folder(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a ``save_pretrained`` folder, single-file or sharded.

    Returns (state dict, {key: file name}). Sharded folders need ``model.safetensors.index.json``;
    every key its ``weight_map`` names must be in that shard, and every shard key must be named.
    """
    folder = Path(folder)
    index_path, single = folder / INDEX_FILE, folder / WEIGHTS_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a safetensors index with a 'weight_map' ({e})") from e
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
    elif single.is_file():
        shards = {WEIGHTS_FILE: None}
    else:
        stray = sorted(p.name for p in folder.glob("*.safetensors") if _SHARD.fullmatch(p.name))
        if stray:
            raise FileNotFoundError(f"{folder} holds sharded weights ({stray[0]}, ...) but no {INDEX_FILE}")
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {folder}")
    state, origin = {}, {}
    for shard, keys in shards.items():
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"shard file not found: {path} (named in {INDEX_FILE})")
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            if keys is not None:
                missing = [k for k in keys if k not in present]
                if missing:
                    raise ValueError(f"{path} lacks key {missing[0]!r}, which {INDEX_FILE} places in it")
                extra = sorted(present - set(keys))
                if extra:
                    raise ValueError(f"{path} holds key {extra[0]!r}, which {INDEX_FILE} does not list")
            for key in sorted(present):
                if key in state:
                    raise ValueError(f"key {key!r} appears in both {origin[key]} and {shard} of {folder}")
                state[key], origin[key] = f.get_tensor(key), shard
    return state, origin


def _check_weights(
    expected: dict[str, tuple[int, ...]],
    state: dict[str, torch.Tensor],
    origin: dict[str, str],
    where: Path,
    ignore: re.Pattern | None = None,
    ours: dict[str, str] | None = None,
) -> None:
    """Missing, unexpected or mis-shaped weights -> one ValueError naming the key and the file
    (``ours``: released key -> our key, named too when they differ)."""
    ours = ours or {}
    for key in expected:
        if key not in state:
            files = ", ".join(sorted(set(origin.values()))) or "no weights"
            model_key = f"model key {ours[key]!r}; " if ours.get(key, key) != key else ""
            raise ValueError(f"{where}: required weight {key!r} is missing ({model_key}looked in {files})")
    for key, value in state.items():
        if ignore is not None and ignore.fullmatch(key):
            continue
        if key not in expected:
            raise ValueError(f"{where}/{origin[key]}: unexpected weight {key!r} (not part of the model)")
        if tuple(value.shape) != expected[key]:
            raise ValueError(
                f"{where}/{origin[key]}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, "
                f"config expects {expected[key]}"
            )


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"released checkpoint file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg})") from e


def load_released_prior(folder: str | os.PathLike, modality: str = "text", **overrides) -> MMDiT:
    """A released ``cola_dit`` folder (single-file or sharded) as an :class:`MMDiT` (eval mode);
    ``overrides``: MMDiT config values (e.g. ``attn_backend="eager"``)."""
    folder = Path(folder)
    model = dit_from_released_config(_read_config(folder), modality, **overrides)
    state, origin = read_safetensors_folder(folder)
    expected = released_dit_shapes(model)
    ours = {r: o for o in model.state_dict() for r in ours_to_released(o)}
    _check_weights(expected, state, origin, folder, ignore=ROPE_BUFFER_PATTERN, ours=ours)
    model.load_state_dict(convert_released_dit_state_dict(state, modality), strict=True)
    return model.eval()


def load_released_vae(folder: str | os.PathLike, **overrides) -> TextVAE:
    """A released ``cola_vae`` folder (single-file or sharded) as a :class:`TextVAE` (eval mode);
    the weight names are ours already."""
    folder = Path(folder)
    model = vae_from_released_config(_read_config(folder), **overrides)
    state, origin = read_safetensors_folder(folder)
    _check_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, origin, folder)
    model.load_state_dict(state, strict=True)
    return model.eval()


# -------------------------------------------------------------------------------------- tokenizer


@dataclass
class SpecialIds:
    """The ids the released generation loop uses (None: the tokenizer has no such token)."""

    eos: int | None
    pad: int | None
    im_end: int | None


def special_ids(tokenizer) -> SpecialIds:
    """EOS / PAD from the tokenizer's special tokens, im_end by its token string ``<|im_end|>``."""
    return SpecialIds(
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        im_end=tokenizer.get_vocab().get(IM_END_TOKEN),
    )


def configure_special_tokens(tokenizer, eos_token_id: int | None = None, pad_token_id: int | None = None):
    """Make the tokens with these ids the tokenizer's EOS / PAD; check the result (returns ``tokenizer``)."""
    size = model_vocab_size(tokenizer)
    for role, token_id in (("eos", eos_token_id), ("pad", pad_token_id)):
        if token_id is None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(token_id)) if 0 <= token_id < size else None
        if token is None:
            raise ValueError(f"{role}_token_id={token_id} is not a token of the tokenizer ({size} ids)")
        tokenizer.add_special_tokens({f"{role}_token": token})
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            raise ValueError(f"{role}_token_id={token_id}: token {token!r} maps to another id")
    ids = special_ids(tokenizer)
    for role in ("eos", "pad"):
        if getattr(ids, role) is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path} has no {role} token; pass {role}_token_id=... "
                f"(`unimodal convert --{role}-id`)"
            )
    if size == RELEASED_VOCAB_SIZE:  # the released OLMo 2 vocabulary: the ids are fixed
        for role, expected in RELEASED_SPECIAL_IDS.items():
            if getattr(ids, role) != expected:
                raise ValueError(
                    f"tokenizer {tokenizer.name_or_path}: {role} id {getattr(ids, role)} is not the released "
                    f"{expected}"
                )
    return tokenizer


# --------------------------------------------------------------------------------------- pipeline


def load_released_pipeline(
    folder: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **model_overrides,
) -> ColaTextPipeline:
    """A :class:`ColaTextPipeline` from a released-layout folder (nothing is written).

    ``tokenizer``: a ``tokenizer.json`` to use instead of the one found beside the weights;
    ``eos_token_id`` / ``pad_token_id``: the special ids when the tokenizer does not name them
    conventionally; ``model_overrides``: config values for both models (e.g. ``attn_backend``).
    """
    layout = find_released_layout(folder, tokenizer)
    tok = load_tokenizer(layout.tokenizer)
    vae_config = _read_config(layout.vae)
    vae_vocab = vae_config.get("vocab_size", RELEASED_VOCAB_SIZE)
    if model_vocab_size(tok) != vae_vocab:
        raise ValueError(
            f"tokenizer {layout.tokenizer} has {model_vocab_size(tok)} token ids but "
            f"{layout.vae / 'config.json'} has vocab_size {vae_vocab}"
        )
    configure_special_tokens(tok, eos_token_id, pad_token_id)
    vae = load_released_vae(layout.vae, **model_overrides)
    prior = load_released_prior(layout.dit, **model_overrides)
    if prior.config.block_size % vae.config.block_size:
        raise ValueError(
            f"cola_dit block_size {prior.config.block_size} is not a multiple of the cola_vae block_size "
            f"{vae.config.block_size}"
        )
    pipe = ColaTextPipeline(
        text_vae=vae, prior=prior, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), tokenizer=tok
    )
    pipe.generation_config = GenerationConfig.released()  # saved as generation_config.json
    pipe.release_record = release_record(pipe, layout.root)
    return pipe


def release_record(pipe: ColaTextPipeline, source: str | os.PathLike) -> dict:
    """What ``cola_release.json`` holds: provenance and the settings that came across."""
    ids = special_ids(pipe.tokenizer)
    vae = pipe.text_vae.config
    return {
        "source": str(source),
        "special_token_ids": dataclasses.asdict(ids),
        "stop_token_ids": pipe.stop_token_ids(),
        "latent_normalization": {
            "scaling_factor": vae.scaling_factor,
            "shifting_factor": vae.shifting_factor,
        },
        "block_size": {"prior": pipe.prior.config.block_size, "text_vae": vae.block_size},
        "vocab_size": vae.vocab_size,
        "generation": GenerationConfig.released().to_dict(),
    }


def convert_released(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the released checkpoint in ``folder`` as a pipeline folder ``out_dir`` (returned).

    ``dtype`` (e.g. ``torch.bfloat16``) casts the saved weights; default: as loaded (fp32).
    An existing non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out} is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(out)
    pipe = load_released_pipeline(folder, tokenizer, eos_token_id, pad_token_id)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(out)
    (out / RELEASE_RECORD).write_text(json.dumps(pipe.release_record, indent=2) + "\n")
    return out


def read_release_record(path: str | os.PathLike) -> dict | None:
    """The ``cola_release.json`` of a converted pipeline folder, or None."""
    record = Path(path) / RELEASE_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def load_pipeline(
    path: str | os.PathLike, **released_kwargs
) -> ColaTextPipeline | ARTextPipeline | MDMTextPipeline:
    """A pipeline from a released-layout folder, a pipeline folder or a Stage-2 / AR run folder:
    an :class:`ARTextPipeline` or :class:`MDMTextPipeline` when ``model_index.json`` names it, else a
    ColaTextPipeline.

    ``released_kwargs`` go to :func:`load_released_pipeline` (released folders only). The returned
    pipeline has ``release_record`` set (a dict) when it comes from a released checkpoint, directly
    or converted; else None.
    """
    if is_released_folder(path):
        return load_released_pipeline(path, **released_kwargs)
    if released_kwargs:
        raise ValueError(f"{sorted(released_kwargs)} only apply to released-layout folders, not {path}")
    folder = resolve_pipeline_folder(path)
    classes = {c.__name__: c for c in (ARTextPipeline, MDMTextPipeline)}
    cls = classes.get(pipeline_class_name(folder), ColaTextPipeline)
    pipe = cls.from_pretrained(folder)
    pipe.release_record = read_release_record(folder)
    return pipe


def _load_expecting(path: str | os.PathLike, cls: type, purpose: str | None, **released_kwargs):
    """:func:`load_pipeline`, after checking that ``path`` holds a ``cls`` (one ValueError line if not)."""
    if not is_released_folder(path):
        check_pipeline_class(resolve_pipeline_folder(path), cls.__name__, purpose, shown=path)
    return load_pipeline(path, **released_kwargs)


def load_cola_pipeline(
    path: str | os.PathLike, purpose: str | None = None, **released_kwargs
) -> ColaTextPipeline:
    """:func:`load_pipeline` for the callers that need a Cola DLM: an AR baseline run or export is one
    ValueError line naming ``path``, what it holds and ``purpose`` (the caller, e.g. ``"unimodal eval"``)."""
    return _load_expecting(path, ColaTextPipeline, purpose or "load_cola_pipeline", **released_kwargs)


def load_ar_pipeline(path: str | os.PathLike, purpose: str | None = None) -> ARTextPipeline:
    """The reverse of :func:`load_cola_pipeline`: an AR baseline run or export; a Cola DLM folder
    (released ones included) is one ValueError line."""
    if is_released_folder(path):
        raise ValueError(
            f"{path} is a released Cola DLM checkpoint, but {purpose or 'load_ar_pipeline'} needs "
            "an autoregressive baseline pipeline (ARTextPipeline, task: ar)"
        )
    return _load_expecting(path, ARTextPipeline, purpose or "load_ar_pipeline")


__all__ = [
    "RELEASED_SPECIAL_IDS",
    "RELEASED_VOCAB_SIZE",
    "RELEASE_RECORD",
    "ReleasedLayout",
    "SpecialIds",
    "configure_special_tokens",
    "convert_released",
    "find_released_layout",
    "is_released_folder",
    "load_ar_pipeline",
    "load_cola_pipeline",
    "load_pipeline",
    "load_released_pipeline",
    "load_released_prior",
    "load_released_vae",
    "read_release_record",
    "read_safetensors_folder",
    "release_record",
    "resolve_pipeline_folder",
    "special_ids",
]
