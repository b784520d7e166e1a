"""Training recipes: build the pieces a :class:`RunConfig` names and hand them to the one trainer.

Stage 1 (``task: vae``) trains the Text VAE on reconstruction + KL + BERT losses; Stage 2
(``task: cola``) trains the block-causal prior by flow matching jointly with the VAE
(:mod:`prior.training.joint`), starting from a Stage-1 export (``stage1:``). The matched
autoregressive baseline (``task: ar``, :mod:`prior.models.ar`) trains by next-token cross-entropy
with the Stage-1 run's tokenizer, on the same data, in the same trainer. The run folder it writes
is described in :mod:`prior.checkpoints.run_folders`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import PreTrainedTokenizerFast

from prior.checkpoints.released import load_cola_pipeline
from prior.checkpoints.run_folders import resolve_export
from prior.models.ar import ARTransformer
from prior.models.mmdit import MMDiT
from prior.pipelines.pipeline_ar_text import ARTextPipeline
from prior.pipelines.pipeline_cola_text import ColaTextPipeline
from prior.pipelines.pipeline_mdm_text import MDMTextPipeline
from prior.sampling.config import GenerationConfig
from prior.training.joint import ColaModel, cola_loss_fn
from prior.training.masked_diffusion import masked_diffusion_loss
from prior.training.outputs import LossOutput, TrainResult
from prior.training.run_config import RunConfig
from prior.training.trainer import Trainer
from unimodal.config import ConfigError, to_yaml
from unimodal.text_data import build_text_datasets, load_documents
from unimodal.text_vae import TextVAE
from unimodal.tokenization import build_tokenizer, load_tokenizer, model_vocab_size


def prepare_tokenizer(cfg: RunConfig, run_dir: Path) -> PreTrainedTokenizerFast:
    """The run's tokenizer: reuse ``run_dir/tokenizer`` when resuming, else load or train one."""
    saved = run_dir / "tokenizer"
    if cfg.train.resume and saved.is_dir():
        return load_tokenizer(saved)
    train_texts = None
    if cfg.tokenizer.name_or_path is None:
        train_texts, _ = load_documents(cfg.data)
    return build_tokenizer(cfg.tokenizer, train_texts)


def _derive(kwargs: dict, section: str, name: str, value, source: str) -> dict:
    """Fill the derived ``kwargs[name]`` with ``value``; a given value that disagrees is a ConfigError."""
    given = kwargs[name]
    if given is not None and given != value:
        raise ConfigError(
            f"{section}.{name}={given!r} disagrees with {source} ({value!r}); "
            f"leave {section}.{name} out: it is derived"
        )
    kwargs[name] = value
    return kwargs


def vae_kwargs(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> dict:
    """``TextVAE`` arguments from ``cfg.vae``, ``vocab_size`` derived from the tokenizer (checked)."""
    kwargs = dataclasses.asdict(cfg.vae)
    _derive(kwargs, "vae", "vocab_size", model_vocab_size(tokenizer), "the tokenizer's number of token ids")
    if cfg.data.seq_len > kwargs["max_seq_len"]:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds vae.max_seq_len={kwargs['max_seq_len']}")
    return kwargs


def vae_loss_fn(model: TextVAE, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
    """Stage-1 objective: reconstruction CE + kl_weight * KL + bert_weight * BERT loss.

    Called through ``model(...)`` (``TextVAE.forward`` is its loss) so DDP synchronises gradients."""
    out = model(batch["input_ids"], batch.get("valid"))
    logs = {"recon": out.recon_loss, "kl": out.kl, "bert": out.bert_loss, "acc": out.accuracy}
    return LossOutput(loss=out.loss, logs=logs, num_tokens=batch["input_ids"].numel())


def save_vae_export(model: TextVAE, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir / "text_vae")
    tokenizer.save_pretrained(out_dir / "tokenizer")


def _run(cfg: RunConfig, model, loss_fn, tokenizer, save_model_fn, describe, datasets=None) -> TrainResult:
    """The tail every recipe shares: the datasets (``cfg.data``'s text unless ``datasets`` are given),
    the one trainer, the run folder's record (tokenizer + resolved config, written once the trainer
    has validated the folder), a one-line summary (``describe(train_ds, val_ds)``), then training."""
    run_dir = Path(cfg.train.output_dir)
    train_ds, val_ds = datasets if datasets is not None else build_text_datasets(cfg.data, tokenizer)
    trainer = Trainer(
        model, loss_fn, train_ds, val_ds if len(val_ds) else None, cfg.train, save_model_fn=save_model_fn
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(describe(train_ds, val_ds))
    return trainer.train()


def _millions(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"


def train_text_vae(cfg: RunConfig) -> TrainResult:
    """Stage 1: train the Text VAE described by ``cfg`` and return the trainer's result."""
    tokenizer = prepare_tokenizer(cfg, Path(cfg.train.output_dir))
    kwargs = vae_kwargs(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = TextVAE(**kwargs)
    return _run(
        cfg, model, vae_loss_fn, tokenizer, lambda m, d: save_vae_export(m, tokenizer, d),
        lambda tr, va: f"Text VAE: {_millions(model)} parameters; data: {len(tr)} train rows x "
        f"{cfg.data.seq_len} tokens, {len(va)} validation rows",
    )  # fmt: skip


def save_pipeline_export(
    model: ColaModel, tokenizer: PreTrainedTokenizerFast, generation: GenerationConfig, out_dir: str | Path
) -> None:
    """A whole pipeline folder; its scheduler takes the run's time shift (1 if unset) and its
    ``generation_config.json`` the run's ``generation:`` section."""
    shift = 1.0 if generation.shift is None else generation.shift
    pipe = ColaTextPipeline(
        text_vae=model.vae,
        prior=model.prior,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        tokenizer=tokenizer,
    )
    pipe.generation_config = generation
    pipe.save_pretrained(out_dir)


def _stage2_vae(cfg: RunConfig, run_dir: Path) -> tuple[TextVAE, PreTrainedTokenizerFast]:
    """The VAE Stage 2 starts from: the Stage-1 export, or a fresh one for ``joint.mode=scratch``."""
    if cfg.joint.mode == "scratch":
        tokenizer = prepare_tokenizer(cfg, run_dir)
        torch.manual_seed(cfg.train.seed)
        return TextVAE(**vae_kwargs(cfg, tokenizer)), tokenizer
    if not cfg.stage1:
        raise ConfigError(
            f"stage1 (a Stage-1 run folder or export) is required for joint.mode={cfg.joint.mode}"
        )
    export = resolve_export(cfg.stage1, "text_vae")
    tokenizer = load_tokenizer(export / "tokenizer")
    vae = TextVAE.from_pretrained(export / "text_vae")
    if cfg.data.seq_len > vae.config.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the VAE's max_seq_len={vae.config.max_seq_len}"
        )
    return vae, tokenizer


def prior_kwargs(cfg: RunConfig, latent_dim: int) -> dict:
    """``MMDiT`` arguments from ``cfg.prior``, ``in_channels`` derived from the VAE's latent dim."""
    kwargs = dataclasses.asdict(cfg.prior)
    return _derive(kwargs, "prior", "in_channels", [latent_dim], "the VAE's latent_dim")


def build_cola_model(cfg: RunConfig, run_dir: Path) -> tuple[ColaModel, PreTrainedTokenizerFast]:
    """The Stage-2 model (VAE + prior + frozen reference encoder) and its tokenizer; with
    ``init_from`` the prior starts from that model's weights (and for SFT the VAE and tokenizer too)."""
    source = load_cola_pipeline(cfg.init_from, purpose="init_from") if cfg.init_from else None
    if cfg.task == "sft":
        if source is None:
            raise ConfigError("task: sft needs init_from (a trained Cola run, pipeline or released folder)")
        vae, tokenizer = source.text_vae, source.tokenizer
    else:
        vae, tokenizer = _stage2_vae(cfg, run_dir)
    kwargs = prior_kwargs(cfg, vae.config.latent_dim)
    if kwargs["prediction"] == "categorical":
        _check_categorical(cfg, vae)
    if kwargs["history"] == "tokens" and vae.config.patch_size != 1:
        raise ConfigError(
            f"prior.history=tokens needs vae patch_size=1 (a latent per token), got {vae.config.patch_size}"
        )
    prior = build_prior(kwargs, vae, cfg.train.seed)
    if source is not None:
        load_init_weights(prior, source.prior, cfg.init_from)
    return ColaModel(vae, prior, cfg.joint, cfg.flow), tokenizer


def load_init_weights(prior: torch.nn.Module, source: torch.nn.Module, where: str) -> None:
    """Copy ``source``'s weights into ``prior``; a missing, extra or differently shaped tensor is one
    ConfigError naming the first one (the ``prior:`` section must describe the same architecture)."""
    src, dst = source.state_dict(), prior.state_dict()
    for key in sorted(set(src) | set(dst)):
        a, b = src.get(key), dst.get(key)
        if a is None or b is None or a.shape != b.shape:
            shape = lambda t: "absent" if t is None else tuple(t.shape)  # noqa: E731
            raise ConfigError(
                f"init_from {where}: prior tensor {key!r} is {shape(a)} there but {shape(b)} in this run's "
                "prior: config; make prior: match the checkpoint"
            )
    prior.load_state_dict(src)


def build_prior(kwargs: dict, vae: TextVAE, seed: int) -> MMDiT:
    """``MMDiT(**kwargs)`` seeded by ``seed``; a categorical prior (and one reading its history as
    tokens) gets ``vocab_size`` derived from the Text VAE (checked); a categorical prior also gets the
    VAE's latent of every token id as its table."""
    categorical = kwargs["prediction"] == "categorical"
    if categorical or kwargs["history"] == "tokens":
        kwargs = _derive({**kwargs, "vocab_size": kwargs["vocab_size"] or None}, "prior", "vocab_size",
                         vae.config.vocab_size, "the VAE's vocab_size")  # fmt: skip
    torch.manual_seed(seed)
    prior = MMDiT(**kwargs)
    if categorical:
        prior.set_token_latents(token_latent_table(vae))
    return prior


def _check_categorical(cfg: RunConfig, vae: TextVAE) -> None:
    """A categorical prior mixes a fixed latent per token id: the VAE must give one (token-local
    encoder, patch size 1), stay fixed, and the prior must generate posterior means."""
    problems = {
        "vae encoder_context": (vae.config.encoder_context, "token"),
        "vae patch_size": (vae.config.patch_size, 1),
        "joint.mode": (cfg.joint.mode, "fixed_vae"),
        "joint.prior_latents": (cfg.joint.prior_latents, "mean"),
    }
    for name, (value, needed) in problems.items():
        if value != needed:
            raise ConfigError(f"prior.prediction=categorical needs {name}={needed!r}, got {value!r}")


@torch.no_grad()
def token_latent_table(vae: TextVAE) -> torch.Tensor:
    """(V, d): the normalised posterior mean of every token id alone (a token-local encoder's table)."""
    was_training = vae.training
    vae.eval()
    ids = torch.arange(vae.config.vocab_size, device=vae.device)[:, None]  # (V, 1)
    table = torch.cat([vae.encode(chunk).latents[:, 0].float() for chunk in ids.split(4096)])
    vae.train(was_training)
    return table


def train_cola(cfg: RunConfig) -> TrainResult:
    """Stage 2: flow-matching prior trained jointly with the VAE (mode ``cfg.joint.mode``)."""
    model, tokenizer = build_cola_model(cfg, Path(cfg.train.output_dir))
    return _run(
        cfg, model, cola_loss_fn, tokenizer, lambda m, d: save_pipeline_export(m, tokenizer, cfg.generation, d),
        lambda tr, va: f"Cola Stage 2 ({cfg.joint.mode}): prior {_millions(model.prior)} + VAE "
        f"{_millions(model.vae)} parameters; data: {len(tr)} train rows x {cfg.data.seq_len} tokens",
    )  # fmt: skip


# ----------------------------------------------------------------------------- the AR baseline


def ar_loss_fn(model: ARTransformer, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
    """Next-token cross-entropy over the valid transitions of ``batch["input_ids"]`` (B, L).

    Called through ``model(...)`` so DDP synchronises gradients."""
    ids = batch["input_ids"]
    valid = batch.get("valid")
    logits = model(ids, valid=valid).logits[:, :-1].float()  # (B, L-1, V): predicts ids[:, 1:]
    target = ids[:, 1:]
    keep = torch.ones_like(target, dtype=torch.bool) if valid is None else valid[:, 1:] & valid[:, :-1]
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    n = keep.sum().clamp(min=1)
    loss = (ce * keep).sum() / n
    with torch.no_grad():
        acc = ((logits.argmax(dim=-1) == target) & keep).sum() / n
    tokens = ids.numel() if valid is None else int(valid.sum())  # tokens read, as the other stages count
    return LossOutput(loss=loss, logs={"ce": loss.detach(), "acc": acc}, num_tokens=tokens)


def save_ar_export(
    model: ARTransformer,
    tokenizer: PreTrainedTokenizerFast,
    generation: GenerationConfig,
    out_dir: str | Path,
) -> None:
    """An ARTextPipeline folder whose ``generation_config.json`` is the run's ``generation:`` section."""
    pipe = ARTextPipeline(transformer=model, tokenizer=tokenizer)
    pipe.generation_config = generation
    pipe.save_pretrained(out_dir)


def stage1_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerFast:
    """The tokenizer of the Stage-1 run ``cfg.stage1``: a baseline uses it, so it sees the same tokens
    as the Cola runs."""
    if not cfg.stage1:
        raise ConfigError(
            f"stage1 (a Stage-1 run folder or export) is required for task: {cfg.task}: the baseline uses "
            "its tokenizer, so it sees the same tokens as the Cola runs"
        )
    return load_tokenizer(resolve_export(cfg.stage1, "text_vae") / "tokenizer")


def build_ar_model(cfg: RunConfig) -> tuple[ARTransformer, PreTrainedTokenizerFast]:
    """The AR baseline and the tokenizer of the Stage-1 run ``cfg.stage1`` (as a Stage-2 run takes it)."""
    tokenizer = stage1_tokenizer(cfg)
    kwargs = dataclasses.asdict(cfg.ar)
    _derive(kwargs, "ar", "vocab_size", model_vocab_size(tokenizer), "the tokenizer's number of token ids")
    if cfg.data.seq_len > kwargs["max_seq_len"]:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds ar.max_seq_len={kwargs['max_seq_len']}")
    torch.manual_seed(cfg.train.seed)
    return ARTransformer(**kwargs), tokenizer


def train_ar(cfg: RunConfig) -> TrainResult:
    """The matched autoregressive baseline: next-token cross-entropy, same tokens, data and trainer."""
    model, tokenizer = build_ar_model(cfg)
    return _run(
        cfg, model, ar_loss_fn, tokenizer, lambda m, d: save_ar_export(m, tokenizer, cfg.generation, d),
        lambda tr, va: f"AR baseline: {_millions(model)} parameters ({cfg.ar.num_layers} layers); "
        f"data: {len(tr)} train rows x {cfg.data.seq_len} tokens",
    )  # fmt: skip


def mdm_loss_fn(model: ARTransformer, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
    """The masked-diffusion baseline's loss (:mod:`prior.training.masked_diffusion`); mask id = last id."""
    out = masked_diffusion_loss(model, batch["input_ids"], model.config.vocab_size - 1, batch.get("valid"))
    logs = {"masked_fraction": out.masked.float().mean()}
    return LossOutput(loss=out.loss, logs=logs, num_tokens=batch["input_ids"].numel())


def train_mdm(cfg: RunConfig) -> TrainResult:
    """The LLaDA-style masked-diffusion baseline: ``mdm:`` (an :class:`ARTransformer` made
    bidirectional, its vocabulary the tokenizer's ids + one mask id), the Stage-1 run's tokenizer,
    the same data and trainer. Exports an :class:`MDMTextPipeline` folder (``mdm_sampling:`` is its
    sampler config, ``generation:`` its generation config)."""
    tokenizer = stage1_tokenizer(cfg)
    kwargs = dataclasses.asdict(cfg.mdm)
    _derive(kwargs, "mdm", "vocab_size", model_vocab_size(tokenizer) + 1, "the tokenizer's ids + one mask id")
    if kwargs.pop("causal"):
        raise ConfigError("mdm.causal must be false: the masked-diffusion baseline is bidirectional")
    torch.manual_seed(cfg.train.seed)
    model = ARTransformer(**kwargs, causal=False)

    def save(m: ARTransformer, out_dir) -> None:  # an MDMTextPipeline folder
        pipe = MDMTextPipeline(m, tokenizer, **dataclasses.asdict(cfg.mdm_sampling))
        pipe.generation_config = cfg.generation
        pipe.save_pretrained(out_dir)

    return _run(
        cfg, model, mdm_loss_fn, tokenizer, save,
        lambda tr, va: f"masked-diffusion baseline: {_millions(model)} parameters ({cfg.mdm.num_layers} layers); "
        f"data: {len(tr)} train rows x {cfg.data.seq_len} tokens",
    )  # fmt: skip


def train_sft(cfg: RunConfig) -> TrainResult:
    """Supervised fine-tuning on chats: the prior (and the VAE with ``joint.mode: joint``) of the
    ``init_from`` model trained on assistant turns only (``chat:``, :mod:`unimodal.chat_data`)."""
    from unimodal.chat_data import build_chat_datasets, ensure_chat_template

    model, tokenizer = build_cola_model(cfg, Path(cfg.train.output_dir))
    ensure_chat_template(tokenizer)
    datasets = build_chat_datasets(cfg.chat, tokenizer)
    return _run(
        cfg, model, cola_loss_fn, tokenizer, lambda m, d: save_pipeline_export(m, tokenizer, cfg.generation, d),
        lambda tr, va: f"SFT ({cfg.joint.mode}) from {cfg.init_from}: prior {_millions(model.prior)}; "
        f"{len(tr)} train / {len(va)} validation conversations x {cfg.chat.seq_len} tokens",
        datasets=datasets,
    )  # fmt: skip


TRAINERS = {"vae": train_text_vae, "cola": train_cola, "ar": train_ar, "sft": train_sft, "mdm": train_mdm}
