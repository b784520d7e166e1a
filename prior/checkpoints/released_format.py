"""The released Cola DLM checkpoint format in one place: config fields and weight names, released -> ours.

Everything that knows how the released ``cola_dit`` / ``cola_vae`` folders are written lives here
(docs/released-format.md describes the format itself); the model files hold architecture only.
Conversion (:mod:`prior.checkpoints.released`), loading and the golden parity tests all go through
these tables.

Design choices
--------------
* **One weight table, its inverse derived.** :data:`DIT_WEIGHTS` lists ``(released template, our
  template)`` pairs with named fields (``{i}`` layer, ``{p}`` weight|bias, ...; ``{m}`` is the
  modality stream on our side). Both directions are compiled from the same pair, so
  :func:`released_to_ours` and :func:`ours_to_released` cannot drift apart.
* **adaLN heads.** The released DiT keeps four adaLN heads per block (``msa_in`` [shift|scale],
  ``msa_out`` gate, ``mlp_in`` [shift|scale], ``mlp_out`` gate; rows 2D / D / 2D / D); ours is one
  ``Linear(D, 6D)`` whose rows are those heads stacked in that order (:data:`ADA_HEADS`).
* **RoPE buffers.** The released DiT stores ``blocks.{i}.msa.rope.rope.freqs``; they are recomputed
  (``1 / 1e4^(2i / rope_dim)``), checked against the file and dropped.
* **The Text VAE needs no rename table**: :class:`~unimodal.text_vae.TextVAE` mirrors the released
  module tree parameter for parameter (strict ``load_state_dict``); only its config maps.
* **Config mapping is strict**: unknown fields, a foreign ``model_type`` and released variants the
  models do not implement raise ValueError naming the field; missing fields take the released
  class defaults (:data:`DIT_CONFIG_DEFAULTS`, :data:`VAE_CONFIG_DEFAULTS`).
"""

from __future__ import annotations

import re

import torch

from prior.models.mmdit import MMDiT
from unimodal.attention import rope_inv_freq
from unimodal.text_vae import TextVAE

RELEASED_VOCAB_SIZE = 100278  # the OLMo 2 vocabulary of the release
RELEASED_SPECIAL_IDS = {"eos": 100257, "im_end": 100265, "pad": 100277}  # <|endoftext|>, <|im_end|>, <|pad|>
DIT_ROPE_THETA = 1e4  # fixed in the released DiT (not a config field)
META_KEYS = frozenset(
    {"architectures", "dtype", "torch_dtype", "transformers_version", "model_type", "_name_or_path"}
)

# ----------------------------------------------------------------------------- DiT config

DIT_CONFIG_DEFAULTS = {  # ColaDiTConfig class defaults
    "txt_in_channels": 16, "txt_out_channels": 16, "txt_dim": 2048, "emb_dim": 2048, "heads": 16,
    "head_dim": 128, "expand_ratio": 4, "num_layers": 24, "norm_eps": 1e-5, "qk_bias": False,
    "patch_size": 1, "rope_dim": 96, "block_size": 4,
}  # fmt: skip


def dit_from_released_config(cfg: dict, modality: str = "text", **overrides) -> MMDiT:
    """A (randomly initialised) :class:`MMDiT` as a released ``cola_dit/config.json`` describes it."""
    unknown = sorted(set(cfg) - set(DIT_CONFIG_DEFAULTS) - META_KEYS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} in the released DiT config")
    if cfg.get("model_type", "cola_dit") != "cola_dit":
        raise ValueError(f"released config has model_type {cfg['model_type']!r}, expected 'cola_dit'")
    r = {**DIT_CONFIG_DEFAULTS, **{k: v for k, v in cfg.items() if k in DIT_CONFIG_DEFAULTS}}
    if r["patch_size"] != 1:
        raise ValueError(f"released patch_size {r['patch_size']} is not supported (only 1)")
    if r["emb_dim"] != r["txt_dim"]:
        raise ValueError(f"released emb_dim {r['emb_dim']} must equal txt_dim {r['txt_dim']} (adaLN input)")
    if r["txt_out_channels"] != r["txt_in_channels"]:
        raise ValueError(
            f"released txt_out_channels {r['txt_out_channels']} must equal txt_in_channels {r['txt_in_channels']}"
        )
    kwargs = dict(
        modalities=[modality], in_channels=[r["txt_in_channels"]], width=r["txt_dim"], heads=r["heads"],
        head_dim=r["head_dim"], rope_dim=r["rope_dim"], rope_theta=DIT_ROPE_THETA,
        mlp_ratio=float(r["expand_ratio"]), num_layers=r["num_layers"], block_size=r["block_size"],
        norm_eps=r["norm_eps"], qk_bias=r["qk_bias"],
    )  # fmt: skip
    return MMDiT(**{**kwargs, **overrides})


# ----------------------------------------------------------------------------- DiT weights

_FIELDS = {
    "i": r"\d+", "p": r"weight|bias", "fc": r"proj_in|proj_hid|proj_out", "qk": r"q|k", "io": r"in|out",
    "head": r"msa_in|msa_out|mlp_in|mlp_out", "m": r"[A-Za-z_]\w*",
}  # fmt: skip
DIT_WEIGHTS = [  # (released key, our key)
    ("txt_in.proj.{p}", "embed_in.{m}.{p}"),
    ("emb_in.{fc}.{p}", "time_embed.{fc}.{p}"),
    ("blocks.{i}.msa.proj_qkv.{p}", "blocks.{i}.streams.{m}.qkv.{p}"),
    ("blocks.{i}.msa.proj_out.{p}", "blocks.{i}.streams.{m}.proj.{p}"),
    ("blocks.{i}.msa.norm_{qk}.{p}", "blocks.{i}.streams.{m}.norm_{qk}.{p}"),
    ("blocks.{i}.mlp.proj_{io}.{p}", "blocks.{i}.streams.{m}.mlp.fc_{io}.{p}"),
    ("txt_out_norm.{p}", "final.{m}.norm.{p}"),
    ("txt_out_ada.out_in.1.{p}", "final.{m}.ada.{p}"),
    ("txt_out.proj.{p}", "final.{m}.proj.{p}"),
]
ADA_WEIGHT = ("blocks.{i}.ada.{head}.1.{p}", "blocks.{i}.streams.{m}.ada.{p}")  # four heads -> one stack
ADA_HEADS = (("msa_in", 2), ("msa_out", 1), ("mlp_in", 2), ("mlp_out", 1))  # stacking order, rows / width
ROPE_BUFFER = "blocks.{i}.msa.rope.rope.freqs"  # recomputed, checked, dropped


def _compile(template: str) -> re.Pattern:
    """``"blocks.{i}.mlp.proj_{io}.{p}"`` -> a regex with a named group per field."""
    parts = re.split(r"\{(\w+)\}", template)
    body = "".join(
        re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for n, part in enumerate(parts)
    )
    return re.compile(body)


_TO_OURS = [(_compile(released), ours) for released, ours in DIT_WEIGHTS]
_TO_RELEASED = [(_compile(ours), released) for released, ours in DIT_WEIGHTS]
_ADA_RELEASED, _ADA_OURS = _compile(ADA_WEIGHT[0]), _compile(ADA_WEIGHT[1])
ROPE_BUFFER_PATTERN = _compile(ROPE_BUFFER)


def released_to_ours(key: str, modality: str = "text") -> str | None:
    """Our key for a released (non-adaLN, non-RoPE) DiT key; None if the table has no row for it."""
    for pattern, template in _TO_OURS:
        if m := pattern.fullmatch(key):
            return template.format(**m.groupdict(), m=modality)
    return None


def ours_to_released(key: str) -> list[str]:
    """The released key(s) of one of our DiT keys (four for a stacked adaLN weight)."""
    if m := _ADA_OURS.fullmatch(key):
        fields = {k: v for k, v in m.groupdict().items() if k != "m"}
        return [ADA_WEIGHT[0].format(**fields, head=head) for head, _ in ADA_HEADS]
    for pattern, template in _TO_RELEASED:
        if m := pattern.fullmatch(key):
            return [template.format(**m.groupdict())]
    raise ValueError(f"no released name for MMDiT weight {key!r}")


def released_dit_shapes(model: MMDiT) -> dict[str, tuple[int, ...]]:
    """{released key: shape} of every weight a released checkpoint must hold for ``model``."""
    width, out = model.config.width, {}
    for key, value in model.state_dict().items():
        names, shape = ours_to_released(key), tuple(value.shape)
        if len(names) == 1:
            out[names[0]] = shape
        else:  # the stacked adaLN weight: one released head per slice of rows
            out.update({n: (rows * width, *shape[1:]) for n, (_, rows) in zip(names, ADA_HEADS)})
    return out


def convert_released_dit_state_dict(
    sd: dict[str, torch.Tensor], modality: str = "text"
) -> dict[str, torch.Tensor]:
    """A released Cola DiT state_dict under our keys for one modality stream: renames per
    :data:`DIT_WEIGHTS`, the four adaLN heads of each block stacked, RoPE buffers checked and dropped."""
    out, heads = {}, {}
    for key, value in sd.items():
        if ROPE_BUFFER_PATTERN.fullmatch(key):
            expected = rope_inv_freq(2 * value.numel(), DIT_ROPE_THETA)
            if not torch.allclose(value.float().cpu(), expected, rtol=1e-6, atol=0):
                raise ValueError(
                    f"released RoPE frequencies {key!r} differ from 1/1e4^(2i/{2 * value.numel()})"
                )
        elif m := _ADA_RELEASED.fullmatch(key):
            heads.setdefault((m["i"], m["p"]), {})[m["head"]] = value
        elif (ours := released_to_ours(key, modality)) is not None:
            out[ours] = value
        else:
            raise ValueError(f"unknown released DiT key {key!r}")
    for (layer, param), found in heads.items():
        for head, _ in ADA_HEADS:
            if head not in found:
                raise ValueError(
                    f"released DiT checkpoint misses key {ADA_WEIGHT[0].format(i=layer, head=head, p=param)!r}"
                )
        out[ADA_WEIGHT[1].format(i=layer, m=modality, p=param)] = torch.cat([found[h] for h, _ in ADA_HEADS])
    return out


# ----------------------------------------------------------------------------- Text VAE config

VAE_CONFIG_DEFAULTS = {  # ColaTextVAEConfig class defaults
    "vocab_size": 100278, "encoder_num_blocks": 4, "decoder_num_blocks": 4, "dim": 1536, "ffn_dim": 6144,
    "latent_dim": 16, "patch_size": 1, "num_heads": 12, "shared_heads_kv": 1, "encoder_last_ln": True,
    "layer_norm_type": "layer_norm", "layer_norm_eps": 1e-6, "layer_norm_affine": True, "post_norm": True,
    "scaling_factor": 1.0, "shifting_factor": 0.0, "qk_bias": False, "qk_norm": True, "qk_norm_affine": True,
    "clip_qkv": None, "rope_theta": 500000, "rope_full_precision": True, "bias": True, "dropout": 0.0,
    "attn_dropout": 0.0, "act": "swiglu", "causal": False, "block_causal": True, "block_size": 4,
    "init_fn": "normal", "init_std": 0.02, "init_cutoff_factor": 3, "use_variation": True, "use_emb": True,
}  # fmt: skip
VAE_REQUIRED = {  # released variants TextVAE implements: only these values
    "shared_heads_kv": 1, "encoder_last_ln": True, "layer_norm_type": "layer_norm", "layer_norm_affine": True,
    "post_norm": True, "qk_bias": False, "qk_norm": True, "qk_norm_affine": True, "clip_qkv": None,
    "rope_full_precision": True, "bias": True, "dropout": 0.0, "attn_dropout": 0.0, "act": "swiglu",
    "block_causal": True, "init_fn": "normal", "use_variation": True,
}  # fmt: skip
VAE_SHARED_FIELDS = (  # same name and meaning in both configs ("causal", "use_emb": never read by the forward)
    "vocab_size", "dim", "ffn_dim", "num_heads", "encoder_num_blocks", "decoder_num_blocks", "latent_dim",
    "patch_size", "block_size", "rope_theta", "layer_norm_eps", "scaling_factor", "shifting_factor",
    "init_std", "init_cutoff_factor",
)  # fmt: skip
_VAE_FLOATS = (
    "rope_theta",
    "layer_norm_eps",
    "scaling_factor",
    "shifting_factor",
    "init_std",
    "init_cutoff_factor",
)


def vae_from_released_config(cfg: dict, **overrides) -> TextVAE:
    """A (randomly initialised) :class:`TextVAE` as a released ``cola_vae/config.json`` describes it
    (the ``diagonal`` posterior; ``overrides``: any TextVAE field, e.g. ``attn_backend``)."""
    merged = {**VAE_CONFIG_DEFAULTS, **cfg}
    unknown = sorted(set(merged) - set(VAE_CONFIG_DEFAULTS) - META_KEYS)
    if unknown:
        raise ValueError(f"unknown released Text VAE config field {unknown[0]!r}")
    if merged.get("model_type", "cola_text_vae") != "cola_text_vae":
        raise ValueError(f"released config model_type {merged['model_type']!r} is not 'cola_text_vae'")
    for key, expected in VAE_REQUIRED.items():
        value = merged[key]
        ok = value == expected if not isinstance(expected, float) else float(value) == expected
        if not ok:
            raise ValueError(f"unsupported released Text VAE setting {key}={value!r} (only {expected!r})")
    kwargs = {name: merged[name] for name in VAE_SHARED_FIELDS}
    kwargs.update({name: float(kwargs[name]) for name in _VAE_FLOATS})  # json may hold ints
    return TextVAE(**{**kwargs, "posterior": "diagonal", **overrides})


__all__ = [
    "ADA_HEADS",
    "DIT_CONFIG_DEFAULTS",
    "DIT_WEIGHTS",
    "RELEASED_SPECIAL_IDS",
    "RELEASED_VOCAB_SIZE",
    "VAE_CONFIG_DEFAULTS",
    "convert_released_dit_state_dict",
    "dit_from_released_config",
    "ours_to_released",
    "released_dit_shapes",
    "released_to_ours",
    "vae_from_released_config",
]
