"""Token agreement of bf16 sampling with fp32 on trained checkpoints: which bf16 mode is safe.

For every run folder given (a Stage-2 run or a pipeline export with the run's ``config.yaml``), the
held-out prompts of its data (the first ``--num-prompts`` validation documents with enough tokens,
as ``unimodal eval-samples`` picks them) are continued three ways with the same noise (the same
generator seed) and greedy decoding:

* **fp32**: the reference;
* **bf16 autocast** (``GenerationConfig.autocast="bfloat16"``): fp32 weights, the prior's matmuls in
  bf16, norms, softmax, the categorical head's clean estimate, the Euler update and the VAE decoder
  in fp32;
* **bf16 weights** (``pipe.to(torch.bfloat16)``, ``unimodal sample --dtype bfloat16``): every model's
  weights and activations in bf16;
* **fp32, one prompt at a time** (``--alone-seeds``, default the first seed): fp32 again, each prompt
  in a batch of its own. Every prompt draws its noise from its own generator (one per prompt, seeded
  by seed and index), so this differs from the batched fp32 run only by float reordering: the
  floor against which the bf16 agreement is read.

Reported per run and seed: the share of generated positions whose token equals fp32's (position by
position, up to the shorter of the two continuations), the share of prompts whose whole
continuation is identical, and tokens/s of the batch (all prompts in one call). The README "Speed"
section quotes the figures and the default follows them: bf16 autocast is the default only for the
recipes where its agreement holds.

    python scripts/bench_precision.py runs/q_b1/cola runs/levers/paper_fixed
    python scripts/bench_precision.py runs/q_b1/cola --seeds 0 --num-prompts 8 --alone-seeds --json p.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from prior.checkpoints.released import load_pipeline
from prior.eval.samples import held_out_prompts
from prior.training.run_config import load_run_config
from unimodal.text_data import load_documents

MODES = ("fp32", "bf16 autocast", "bf16 weights")
ALONE = "fp32 one by one"


def generators(seed: int, rows) -> list[torch.Generator]:
    """One generator per prompt (row ``i`` of run ``seed``): a row's noise never depends on its batch."""
    return [torch.Generator().manual_seed(seed * 100_003 + i) for i in rows]


def agreement(ref: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(share of equal tokens position by position, share of identical continuations)."""
    equal = total = 0
    for a, b in zip(ref, other):
        n = min(len(a), len(b))
        equal += sum(x == y for x, y in zip(a[:n], b[:n]))
        total += max(len(a), len(b))  # a length difference counts as disagreement
    same = sum(list(a) == list(b) for a, b in zip(ref, other))
    return equal / max(total, 1), same / len(ref)


def measure_run(run: Path, args: argparse.Namespace) -> dict:
    pipes = {"fp32": load_pipeline(run)}
    pipes["bf16 autocast"] = pipes["fp32"]
    pipes["bf16 weights"] = load_pipeline(run).to(torch.bfloat16)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    base = pipes["fp32"].resolve_generation_config(None, max_new_tokens=args.max_new_tokens)
    configs = {"fp32": base, "bf16 autocast": base.replace(autocast="bfloat16"), "bf16 weights": base}
    _, val_texts = load_documents(load_run_config(run / "config.yaml").data)
    prompts, _ = held_out_prompts(
        pipes["fp32"].tokenizer, val_texts, args.num_prompts, args.prompt_tokens, args.max_new_tokens
    )
    alone_seeds = args.seeds[:1] if args.alone_seeds is None else args.alone_seeds
    rows = []
    for seed in args.seeds:
        ids, speed = {}, {}
        for mode in MODES:
            start = time.perf_counter()
            gens = generators(seed, range(len(prompts)))
            out = pipes[mode](prompts, configs[mode], generator=gens, output_type="ids")
            ids[mode] = out.token_ids
            speed[mode] = sum(len(t) for t in out.token_ids) / (time.perf_counter() - start)
        modes = MODES[1:]
        if seed in alone_seeds:  # fp32 again, each prompt in a batch of its own
            start = time.perf_counter()
            ids[ALONE] = [pipes["fp32"]([p], base, generator=generators(seed, [i]), output_type="ids").token_ids[0]
                          for i, p in enumerate(prompts)]  # fmt: skip
            speed[ALONE] = sum(len(t) for t in ids[ALONE]) / (time.perf_counter() - start)
            modes = (*modes, ALONE)
        for mode in modes:
            tokens, texts = agreement(ids["fp32"], ids[mode])
            rows.append(dict(seed=seed, mode=mode, token_agreement=tokens, identical_continuations=texts,
                             tokens_per_s=speed[mode], fp32_tokens_per_s=speed["fp32"]))  # fmt: skip
    prior = pipes["fp32"].prior.config
    recipe = f"{prior.prediction} prior, DiT block {prior.block_size}, K={base.num_inference_steps}, CFG {base.guidance_scale}"
    return {"run": str(run), "recipe": recipe, "prompts": len(prompts), "rows": rows}


def format_report(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"bf16 vs fp32 sampling | {args.num_prompts} held-out prompts x {args.max_new_tokens} new tokens | "
        f"greedy, same noise | seeds {args.seeds} | {torch.get_num_threads()} threads",
        "",
        f"{'run':<28}{'recipe':<46}{'mode':<15}{'token agreement':>17}{'identical':>11}{'tok/s (fp32)':>16}",
    ]
    for res in results:
        for mode in (*MODES[1:], ALONE):
            rows = [r for r in res["rows"] if r["mode"] == mode]
            if not rows:
                continue
            agree = " / ".join(f"{r['token_agreement']:.1%}" for r in rows)
            same = " / ".join(f"{r['identical_continuations']:.0%}" for r in rows)
            speed = sum(r["tokens_per_s"] for r in rows) / len(rows)
            base = sum(r["fp32_tokens_per_s"] for r in rows) / len(rows)
            lines.append(f"{res['run']:<28}{res['recipe']:<46}{mode:<15}{agree:>17}{same:>11}"
                         f"{f'{speed:.0f} ({base:.0f})':>16}")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="Stage-2 run folders (with config.yaml)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--alone-seeds", type=int, nargs="*", default=None,
                   help="seeds that also run fp32 one prompt at a time (default: the first seed; none: no value)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = [measure_run(run, args) for run in args.runs]
    print(format_report(results, args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
