"""Study: the DiT block size (latents denoised together) 1 / 4 / 16 / 64 at equal training steps.

Trains the Stage-2 prior of ``configs/text/cola_tiny.yaml`` (fixed VAE, from the Stage-1 run
``--vae``) once per block size for ``--steps`` optimizer steps (same data order, same seed), then
measures held-out samples (two seeds) and the relative flow loss (held-out flow loss with clean
history / Gaussian baseline, uniform t grid). Paper: block 16 is best (1 is AR-like and slow to
sample, 64 loses the history). Budget: 4 x ~2.5 min training at 300 steps + ~3 min sampling.

    python scripts/study_block_size.py --vae runs/q_def/vae --steps 300
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

SIZES = (1, 4, 16, 64)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="the Stage-1 run every variant starts from")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for every variant")
    add_common_args(p, "runs/studies/block_size")
    args = common_settings(p.parse_args(argv))
    out = Path(args.output_dir)
    results = {}
    for size in args.sizes:
        run = out / f"block_{size}"
        cfg, seconds = train_variant(CONFIGS / "cola_tiny.yaml", run, [
            f"stage1={args.vae}", f"prior.block_size={size}", f"train.max_steps={args.steps}",
            "train.max_time_minutes=null", f"train.save_every={args.steps}", *args.overrides,
        ], smoke=args.smoke)  # fmt: skip
        results[size] = {"train_seconds": seconds, **relative_flow_loss(run, cfg),
                         **sample_figures(run, cfg, args.num_prompts, args.seeds)}  # fmt: skip
    best = max(results, key=lambda s: results[s]["bigram_logprob"])
    top = results[best]
    near = [s for s, r in results.items()
            if r["bigram_logprob"] >= top["bigram_logprob"] - top["bigram_logprob_spread"] - r["bigram_logprob_spread"]]  # fmt: skip
    verdict = (
        f"best bigram log-prob at block {best} (within the seed spread: {near}); lowest relative flow loss at "
        f"block {min(results, key=lambda s: results[s]['with_context'])} -> "
        + ("**reproduced**" if best == 16 and near == [16] else "**consistent, not separated**" if 16 in near
           else "**not reproduced**")
    )  # fmt: skip

    def plot():
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
        xs = list(results)
        for ax, key, label in (
            (axes[0], "in_vocab", "in-vocab words"),
            (axes[1], "bigram_logprob", "bigram logp/token"),
        ):
            ax.errorbar(
                xs, [results[x][key] for x in xs], yerr=[results[x][key + "_spread"] for x in xs], fmt="o-"
            )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("DiT block size")
            ax.set_ylabel(label)
        axes[2].plot(xs, [results[x]["with_context"] for x in xs], "o-", label="with history")
        axes[2].plot(xs, [results[x]["no_context"] for x in xs], "s--", label="block alone")
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("DiT block size")
        axes[2].set_ylabel("flow loss / Gaussian baseline")
        axes[2].legend(fontsize=7)
        return fig

    headers = ["block size", "in-vocab", "distinct-2", "bigram logp", "context sens.", "flow/baseline (hist.)",
               "flow/baseline (alone)", "train s"]  # fmt: skip
    rows = [[s, pm(r["in_vocab"], r["in_vocab_spread"]), pm(r["distinct2"], r["distinct2_spread"]),
             pm(r["bigram_logprob"], r["bigram_logprob_spread"]), r.get("context_sensitivity", ""),
             r["with_context"], r["no_context"], round(r["train_seconds"])] for s, r in results.items()]  # fmt: skip
    write_study(out, "DiT block size", "block size 16 is best among 1 / 4 / 16 / 64.", verdict, headers, rows,
                {"steps": args.steps, "vae": args.vae, "seeds": args.seeds, "variants": results},
                {"block_size.png": plot},
                notes=f"{args.steps} steps each (batch 16 x 128 tokens), fixed VAE; {args.num_prompts} held-out "
                f"prompts x seeds {args.seeds}, +- half the range over seeds.")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
