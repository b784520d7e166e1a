"""Study: how Stage 2 treats the VAE, and two Stage-1 choices (the BERT loss, a learnable logSNR).

Three Stage-1 Text VAEs are trained for ``--vae-steps`` (``configs/text/vae_tiny.yaml``): the
default (BERT loss, learnable logSNR), ``vae.bert_weight=0`` and ``vae.logsnr_learnable=false``.
From the default one, Stage 2 (``cola_tiny.yaml``) runs in each mode for ``--steps``: ``joint``
x1 (the flow loss trains the encoder at full strength), ``joint`` x0.01 (``vae_grad_scale``),
``fixed_vae``, ``scratch`` (VAE and prior from random weights, the VAE's Stage-1 objective
included) and ``interval`` (alternating phases); from the two other VAEs, Stage 2 in ``joint`` x1.
Each run is scored on held-out samples (two seeds), the relative flow loss and the VAE's held-out
reconstruction accuracy after Stage 2. Paper: joint from a pretrained VAE x1 is best, scratch and
interval are worse; the BERT loss and a learnable logSNR help. Budget: 3 x ~2 min (Stage 1) +
7 x ~2.5 min (Stage 2) + sampling at the defaults.

    python scripts/study_stage2_modes.py --vae-steps 250 --steps 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _study import (
    CONFIGS,
    add_common_args,
    common_settings,
    plt,
    pm,
    relative_flow_loss,
    sample_figures,
    train_variant,
    write_study,
)

from prior.checkpoints.released import load_pipeline
from prior.eval.vae import evaluate_text_vae
from prior.training.run_config import load_run_config
from unimodal.text_data import build_text_datasets

VAES = {
    "default": [],
    "no BERT loss": ["vae.bert_weight=0.0"],
    "fixed logSNR": ["vae.logsnr_learnable=false"],
}
MODES = {
    "joint x1": ["joint.mode=joint", "joint.vae_grad_scale=1.0"],
    "joint x0.01": ["joint.mode=joint", "joint.vae_grad_scale=0.01"],
    "fixed VAE": ["joint.mode=fixed_vae"],
    "all scratch": ["joint.mode=scratch"],
    "interval": ["joint.mode=interval", "joint.interval_every=50"],
}


def scratch_overrides(vae_overrides: list[str]) -> list[str]:
    """joint.mode=scratch builds its VAE from ``vae:``: give it vae_tiny.yaml's (and its tokenizer's)."""
    stage1 = load_run_config(CONFIGS / "vae_tiny.yaml", vae_overrides)
    keys = [f"vae.{k}={v}" for k, v in vars(stage1.vae).items() if k != "vocab_size" and v is not None]
    return ["stage1=null", *keys, f"tokenizer.vocab_size={stage1.tokenizer.vocab_size}"]


def vae_accuracy(run: Path, cfg) -> float:
    pipe = load_pipeline(run)
    _, val = build_text_datasets(cfg.data, pipe.tokenizer)
    return evaluate_text_vae(pipe.text_vae, val, t_values=(), max_batches=2, progress=False).accuracy_mean


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae-steps", type=int, default=250)
    p.add_argument("--steps", type=int, default=200)
    add_common_args(p, "runs/studies/stage2_modes")
    args = common_settings(p.parse_args(argv))
    out = Path(args.output_dir)
    budget = [
        f"train.max_steps={args.steps}",
        "train.max_time_minutes=null",
        f"train.save_every={args.steps}",
    ]
    vae_runs = {}
    for name, overrides in VAES.items():
        vae_runs[name] = out / ("vae_" + name.replace(" ", "_"))
        train_variant(CONFIGS / "vae_tiny.yaml", vae_runs[name], [
            *overrides, f"train.max_steps={args.vae_steps}", "train.max_time_minutes=null",
            f"train.save_every={args.vae_steps}",
        ], smoke=args.smoke)  # fmt: skip
    plan = {mode: ("default", overrides) for mode, overrides in MODES.items()}
    plan |= {f"joint x1, {name}": (name, MODES["joint x1"]) for name in VAES if name != "default"}
    results = {}
    for variant, (vae_name, overrides) in plan.items():
        run = out / ("stage2_" + variant.replace(" ", "_").replace(",", "").replace(".", ""))
        start = (
            scratch_overrides(VAES[vae_name]) if "scratch" in variant else [f"stage1={vae_runs[vae_name]}"]
        )
        cfg, seconds = train_variant(
            CONFIGS / "cola_tiny.yaml", run, [*start, *overrides, *budget], smoke=args.smoke
        )
        results[variant] = {"vae": vae_name, "train_seconds": seconds, "vae_accuracy": vae_accuracy(run, cfg),
                            **relative_flow_loss(run, cfg), **sample_figures(run, cfg, args.num_prompts, args.seeds)}  # fmt: skip

    def beats(a: str, b: str) -> bool | None:
        """a's bigram log-prob above b's by more than the seed spreads (None: within them)."""
        ra, rb = results[a], results[b]
        gap = ra["bigram_logprob"] - rb["bigram_logprob"]
        return None if abs(gap) <= ra["bigram_logprob_spread"] + rb["bigram_logprob_spread"] else gap > 0

    def word(x: bool | None) -> str:
        return {True: "yes", False: "no", None: "within spread"}[x]

    checks = {
        "joint x1 > all scratch": beats("joint x1", "all scratch"),
        "joint x1 > interval": beats("joint x1", "interval"),
        "joint x1 > joint x0.01": beats("joint x1", "joint x0.01"),
        "joint x1 > fixed VAE": beats("joint x1", "fixed VAE"),
        "BERT loss helps": beats("joint x1", "joint x1, no BERT loss"),
        "learnable logSNR helps": beats("joint x1", "joint x1, fixed logSNR"),
    }
    verdict = "; ".join(f"{k}: **{word(v)}**" for k, v in checks.items())
    verdict += " (bigram log-prob of the samples, beyond the two-seed spread)"

    def plot():
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        names = list(results)
        for ax, key, label in (
            (axes[0], "bigram_logprob", "bigram logp/token"),
            (axes[1], "in_vocab", "in-vocab words"),
        ):
            ax.bar(names, [results[n][key] for n in names], yerr=[results[n][key + "_spread"] for n in names])
            ax.set_ylabel(label)
        axes[2].bar(names, [results[n]["with_context"] for n in names])
        axes[2].set_ylabel("flow loss / Gaussian baseline")
        for ax in axes:
            ax.tick_params(axis="x", rotation=35, labelsize=7)
        return fig

    headers = [
        "Stage 2",
        "VAE",
        "in-vocab",
        "bigram logp",
        "context sens.",
        "flow/baseline",
        "VAE recon acc",
        "train s",
    ]
    rows = [[n, r["vae"], pm(r["in_vocab"], r["in_vocab_spread"]), pm(r["bigram_logprob"], r["bigram_logprob_spread"]),
             r.get("context_sensitivity", ""), r["with_context"], r["vae_accuracy"], round(r["train_seconds"])]
            for n, r in results.items()]  # fmt: skip
    write_study(out, "Stage-2 modes, the BERT loss and the VAE logSNR",
                "joint training from a pretrained VAE (x1) is best; scratch and interval lag; the BERT loss and "
                "a learnable logSNR help.", verdict, headers, rows,
                {"vae_steps": args.vae_steps, "steps": args.steps, "checks": checks, "variants": results},
                {"stage2_modes.png": plot},
                notes=f"Stage 1: {args.vae_steps} steps; Stage 2: {args.steps} steps (batch 16 x 128); samples: "
                f"{args.num_prompts} held-out prompts x seeds {args.seeds}. `all scratch` trains its VAE only in "
                "these Stage-2 steps.")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
