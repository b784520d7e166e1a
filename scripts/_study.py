"""What every ``scripts/study_*.py`` shares: training a variant, scoring it, and writing the study's outputs.

A study trains (or loads) a few variants of one run config, measures each the same way and writes
into its ``--output-dir``:

* ``results.json``: every number of the study (and the settings it ran with);
* ``results.md``: the paper's finding, this run's verdict, the table and the command;
* one or more PNG plots.

Budgets are **steps**, not minutes, for variants of the same model size (equal steps = equal
compute, and the comparison survives other work on the two shared cores); the wall clock of each
run is recorded beside it. ``--smoke`` shrinks every model and budget so a study finishes in
seconds (the slow test suite runs each study this way); its numbers mean nothing.

Quality figures (:func:`sample_figures`) are those of ``unimodal eval-samples``: held-out prompts
continued, in-vocabulary words (with the standard error over prompts), distinct-2, bigram
log-prob/token and context sensitivity, pooled over ``seeds`` sampling seeds; the flow figure
(:func:`relative_flow_loss`) is the prior's held-out flow loss with clean history divided by the
Gaussian baseline, averaged over a uniform t grid (1 = learned nothing; comparable across latent
sizes and time-sampling settings, unlike the training loss).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported for the studies)
import torch  # noqa: E402

from prior.checkpoints.released import load_pipeline  # noqa: E402
from prior.eval.samples import generation_report  # noqa: E402
from prior.training.flow_matching import (  # noqa: E402
    FlowMatchingConfig,
    build_2l_batch,
    flow_loss_by_t,
    predict_velocity,
)
from prior.training.multimodal_recipes import MULTIMODAL_TRAINERS  # noqa: E402
from prior.training.recipes import TRAINERS  # noqa: E402
from prior.training.run_config import RunConfig, load_run_config  # noqa: E402
from unimodal.text_data import build_text_datasets, load_documents  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "text"
FLOW_T = [0.1, 0.3, 0.5, 0.7, 0.9]

# --smoke: every model tiny, every budget a couple of steps (numbers meaningless; plumbing only)
_TINY_TRAIN = ["train.max_steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=1000",
               "train.save_every=2", "train.max_time_minutes=null", "train.log_every=1", "data.seq_len=32",
               "data.max_documents=200"]  # fmt: skip
_TINY_TRANSFORMER = ["width=32", "heads=2", "head_dim=16", "rope_dim=8", "num_layers=1"]
SMOKE = {
    "vae": [
        *_TINY_TRAIN,
        "tokenizer.vocab_size=300",
        "vae.dim=32",
        "vae.ffn_dim=64",
        "vae.num_heads=2",
        "vae.encoder_num_blocks=1",
        "vae.decoder_num_blocks=1",
    ],  # fmt: skip
    "cola": [*_TINY_TRAIN, *(f"prior.{kv}" for kv in _TINY_TRANSFORMER), "generation.max_new_tokens=8"],
    "ar": [*_TINY_TRAIN, *(f"ar.{kv}" for kv in _TINY_TRANSFORMER), "generation.max_new_tokens=8"],
    "mdm": [
        *_TINY_TRAIN,
        *(f"mdm.{kv}" for kv in _TINY_TRANSFORMER),
        "generation.max_new_tokens=8",
        "mdm_sampling.block_length=8",
        "generation.num_inference_steps=4",
    ],  # fmt: skip
}


def add_common_args(p: argparse.ArgumentParser, output_dir: str) -> None:
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--num-prompts", type=int, default=32, help="held-out prompts per sample report")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds (spread)")
    p.add_argument("--smoke", action="store_true", help="tiny models and budgets: a plumbing check only")


def common_settings(args: argparse.Namespace) -> argparse.Namespace:
    if args.smoke:
        args.num_prompts, args.seeds = 2, [0]
        for name in ("steps", "vae_steps"):  # what the smoke overrides train
            if hasattr(args, name):
                setattr(args, name, 2)
    return args


def train_variant(
    config: str | Path, run_dir: Path, overrides: Sequence[str] = (), smoke: bool = False
) -> tuple[RunConfig, float]:
    """Train (or resume to completion) one variant: ``config`` + ``overrides`` into ``run_dir``.

    Returns its config and the wall-clock seconds this call trained (0 when it was complete)."""
    cfg = load_run_config(config, list(overrides))
    extra = SMOKE.get(cfg.task, []) if smoke else []
    if smoke and cfg.builds_vae and cfg.task != "vae":  # joint.mode=scratch builds a VAE too: a tiny one
        extra = [*extra, *(o for o in SMOKE["vae"] if o.startswith(("vae.", "tokenizer.")))]
    cfg = load_run_config(config, [f"train.output_dir={run_dir}", "train.resume=latest", *overrides, *extra])
    trainers = {**TRAINERS, **MULTIMODAL_TRAINERS}
    start = time.perf_counter()
    trainers[cfg.task](cfg)
    return cfg, time.perf_counter() - start


def sample_figures(
    run: str | Path, cfg: RunConfig, num_prompts: int, seeds: Sequence[int], **generation
) -> dict:
    """Held-out sample figures of a run (its newest export), pooled over ``seeds`` (mean and spread)."""
    pipe = load_pipeline(run)
    pipe.set_progress_bar_config(disable=True)
    train_texts, val_texts = load_documents(cfg.data)
    per_seed = []
    for seed in seeds:
        report = generation_report(
            pipe, train_texts, val_texts, num_prompts=num_prompts, seed=seed, **generation
        )
        per_seed.append(report.as_dict())
    return pool_seeds(per_seed)


def pool_seeds(per_seed: list[dict]) -> dict:
    """Mean of each figure over seeds, its half-range (``*_spread``) and the per-seed values."""

    def get(d: dict, key: str):
        return d["generated"][key] if key in d["generated"] else d.get(key)

    out = {"per_seed": per_seed}
    for key in ("in_vocab", "in_vocab_se", "distinct2", "bigram_logprob", "context_sensitivity"):
        values = [get(d, key) for d in per_seed if get(d, key) is not None]
        if values:
            out[key] = sum(values) / len(values)
            out[key + "_spread"] = (max(values) - min(values)) / 2
    for anchor in ("real", "unigram"):  # held-out text and unigram salad, scored the same way
        for key in ("in_vocab", "distinct2", "bigram_logprob"):
            out[f"{anchor}_{key}"] = per_seed[0][anchor][key]
    return out


@torch.no_grad()
def relative_flow_loss(
    run: str | Path, cfg: RunConfig, rows: int = 64, t_values: Sequence[float] = FLOW_T
) -> dict:
    """Held-out flow loss / Gaussian baseline of a Cola run's prior, with and without context."""
    pipe = load_pipeline(run)
    _, val_ds = build_text_datasets(cfg.data, pipe.tokenizer)
    ids = torch.stack([val_ds[i]["input_ids"] for i in range(min(rows, len(val_ds)))])
    enc = pipe.text_vae.eval().encode(ids)
    z0, valid = enc.latents, torch.ones(ids.shape[0], enc.latents.shape[1], dtype=torch.bool)
    bs = pipe.prior.config.block_size
    history = pipe.prior.embed_history(ids) if pipe.prior.config.history == "tokens" else None
    out = {}
    for name, ctx in (("with_context", True), ("no_context", False)):
        r = flow_loss_by_t(
            pipe.prior.eval(), z0, valid, list(t_values), with_context=ctx, block_size=bs, history=history
        )
        ratios = (r.loss / r.baseline).tolist()
        out[name] = sum(ratios) / len(ratios)
        out[name + "_by_t"] = dict(zip(map(str, t_values), ratios))
    return out


@torch.no_grad()
def clean_estimate_accuracy(
    run: str | Path,
    cfg: RunConfig,
    rows: int = 32,
    t_values: Sequence[float] = (0.5, 0.7, 0.9),
    seed: int = 0,
) -> dict:
    """The token-level probe of a Cola run's prior: every block of held-out rows is noised to ``t``,
    the prior's clean estimate ``x0 = z_t - t v`` of each block (with its clean history, or alone:
    the CFG branch) is decoded by the VAE decoder after the block's real history, and the argmax
    is scored against the real tokens (block 0 left out: it never has history). The same noise for
    both; a self-conditioned prior is probed at its first step (no estimate fed back).
    -> {"with_context": {t: acc}, "no_context": {t: acc}}."""
    pipe = load_pipeline(run)
    vae, prior = pipe.text_vae.eval(), pipe.prior.eval()
    _, val_ds = build_text_datasets(cfg.data, pipe.tokenizer)
    ids = torch.stack([val_ds[i]["input_ids"] for i in range(min(rows, len(val_ds)))])  # (B, L)
    z0 = vae.encode(ids).latents  # (B, N, d)
    (b, n, _), bs, p = z0.shape, prior.config.block_size, vae.config.patch_size
    valid = torch.ones(b, n, dtype=torch.bool)
    history = prior.embed_history(ids) if prior.config.history == "tokens" else None
    flow = FlowMatchingConfig(prompt_block_prob=0.0)
    gen = torch.Generator().manual_seed(seed)
    out: dict = {"with_context": {}, "no_context": {}}
    for t in t_values:
        eps = torch.randn(z0.shape, generator=gen)
        for name, ctx in (("with_context", True), ("no_context", False)):
            uncond = torch.full((b,), not ctx)
            batch = build_2l_batch(z0, valid, bs, flow, t=torch.full((b, n), t), eps=eps, uncond=uncond,
                                   history=history)  # fmt: skip
            x0 = batch.x[:, n:] - t * predict_velocity(prior, batch)  # (B, N, d)
            hits = total = 0
            for start in range(bs, n, bs):
                stop = min(start + bs, n)
                logits = vae.decode(torch.cat((z0[:, :start], x0[:, start:stop]), dim=1)).logits
                hits += int((logits[:, start * p :].argmax(-1) == ids[:, start * p : stop * p]).sum())
                total += (stop - start) * p * b
            out[name][str(t)] = hits / total
    return out


def write_study(
    out: Path,
    title: str,
    paper: str,
    verdict: str,
    headers: Sequence[str],
    rows: Sequence[Sequence],
    results: dict,
    plots: dict[str, Callable[[], plt.Figure]],
    notes: str = "",
) -> str:
    """Write results.json, results.md and the PNG plots (name -> figure factory); return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (out / "results.json").write_text(json.dumps({"title": title, "verdict": verdict, "command": command,
                                                  **results}, indent=2, default=str) + "\n")  # fmt: skip
    for name, make in plots.items():
        fig = make()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    table += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    md = "\n".join([
        f"### {title}", "", f"**Paper:** {paper}", "", f"**Here:** {verdict}", "", *table, "",
        *([notes, ""] if notes else []), *(f"![{name}]({name})" for name in plots), "",
        f"Command: `{command}`", "",
    ])  # fmt: skip
    (out / "results.md").write_text(md)
    print(md)
    return md


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def beats(a: dict, b: dict, key: str) -> int:
    """+1 / -1 when figure ``key`` of ``a`` is above / below ``b``'s by more than their seed spreads
    together, 0 when within them (``*_spread`` is half the range over seeds)."""
    gap = a[key] - b[key]
    return (
        0 if abs(gap) <= a.get(key + "_spread", 0.0) + b.get(key + "_spread", 0.0) else (1 if gap > 0 else -1)
    )


def pm(mean: float, spread: float) -> str:
    """``mean +- spread`` for a table cell."""
    return f"{mean:.3f} +- {spread:.3f}"


__all__ = [
    "CONFIGS",
    "SMOKE",
    "add_common_args",
    "beats",
    "clean_estimate_accuracy",
    "common_settings",
    "plt",
    "pm",
    "pool_seeds",
    "relative_flow_loss",
    "sample_figures",
    "train_variant",
    "write_study",
]
