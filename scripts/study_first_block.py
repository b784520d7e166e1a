"""Study: how should the first generated block be conditioned on a prompt that ends mid-block?

Held-out prompts of ``--prompt-tokens`` tokens (default 24: not a multiple of the block size 16,
so the first block holds 8 known tokens) are continued with each ``first_block`` strategy of the
block sampler: ``clean_repaint`` (the known latents held clean), ``partial_repaint`` (re-noised
for the first half of the steps, RePaint), ``left_pad`` / ``right_pad`` (the prompt padded to a
whole block). Same checkpoint, same prompts, two sampling seeds. Paper: clean repaint is best.
Budget: evaluation only (~2 min for 32 prompts x 2 seeds x 4 strategies on the tiny config).

    python scripts/study_first_block.py runs/q_def/cola
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _study import add_common_args, beats, common_settings, plt, pm, sample_figures, write_study

from prior.sampling.config import FIRST_BLOCK_STRATEGIES
from prior.training.run_config import load_run_config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cola", help="a Stage-2 run folder")
    p.add_argument("--prompt-tokens", type=int, default=24)
    add_common_args(p, "runs/studies/first_block")
    args = common_settings(p.parse_args(argv))
    cfg = load_run_config(Path(args.cola) / "config.yaml")
    results = {}
    for strategy in FIRST_BLOCK_STRATEGIES:
        results[strategy] = sample_figures(args.cola, cfg, args.num_prompts, args.seeds,
                                           prompt_tokens=args.prompt_tokens, first_block=strategy)  # fmt: skip
    r0 = results["clean_repaint"]
    words = {1: "better", 0: "tied", -1: "worse"}
    lines = []
    for key, label in (("in_vocab", "in-vocab words"), ("bigram_logprob", "bigram log-prob")):
        cmp = {n: beats(r0, r, key) for n, r in results.items() if n != "clean_repaint"}
        lines.append(
            f"{label}: clean repaint is " + ", ".join(f"{words[v]} vs `{n}`" for n, v in cmp.items())
        )
    votes = [
        beats(r0, r, k)
        for n, r in results.items()
        if n != "clean_repaint"
        for k in ("in_vocab", "bigram_logprob")
    ]
    verdict = "; ".join(lines) + " (beyond the two-seed spread) -> " + (
        "**reproduced**" if all(v > 0 for v in votes)
        else "**partly reproduced**" if min(votes) >= 0 and max(votes) > 0
        else "**inconclusive at this scale**" if min(votes) >= 0
        else "**not reproduced**"
    )  # fmt: skip

    def plot():
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        names = list(results)
        for ax, key, label in (
            (axes[0], "in_vocab", "in-vocab words"),
            (axes[1], "bigram_logprob", "bigram logp/token"),
        ):
            ax.bar(names, [results[n][key] for n in names], yerr=[results[n][key + "_spread"] for n in names])
            ax.set_ylabel(label)
            ax.tick_params(axis="x", rotation=20, labelsize=8)
        axes[0].axhline(r0["real_in_vocab"], color="g", ls="--", label="real text")
        axes[0].axhline(r0["unigram_in_vocab"], color="r", ls=":", label="unigram salad")
        axes[0].legend(fontsize=7)
        return fig

    headers = ["first block", "in-vocab", "distinct-2", "bigram logp", "context sensitivity"]
    rows = [[n, pm(r["in_vocab"], r["in_vocab_spread"]), pm(r["distinct2"], r["distinct2_spread"]),
             pm(r["bigram_logprob"], r["bigram_logprob_spread"]), r.get("context_sensitivity", "")]
            for n, r in results.items()]  # fmt: skip
    rows.append(["real held-out text", r0["real_in_vocab"], "", "", ""])
    write_study(Path(args.output_dir), "First-block conditioning",
                "clean repaint beats partial repaint and left/right padding.", verdict, headers, rows,
                {"checkpoint": args.cola, "prompt_tokens": args.prompt_tokens, "seeds": args.seeds,
                 "variants": results}, {"first_block.png": plot},
                notes=f"{args.num_prompts} prompts of {args.prompt_tokens} tokens x seeds {args.seeds}; "
                "+- is half the range over seeds.")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
