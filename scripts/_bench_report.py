"""The results of ``scripts/bench_sampler.py``: what one timed generation measured, the derived
figures (speedups, block-time ratio, passes per token, token agreement) and the printed table."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

import torch

LOOPS = ("cached", "unmerged", "cached_autocast", "cached_bf16", "recompute", "released")
LOOP_TITLES = {
    "cached": "ours (merged)", "unmerged": "ours unmerged", "cached_autocast": "ours bf16 autocast",
    "cached_bf16": "ours bf16 weights",
    "recompute": "recompute all", "released": "released loop",
}  # fmt: skip


# ----------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """One timed generation of one loop."""

    loop: str
    new_tokens: int
    seconds: float
    prior_calls: int  # all prior passes, prefill included
    decoder_calls: int  # all VAE-decoder passes, prefill included
    prefill_prior_calls: int
    prefill_decoder_calls: int
    block_seconds: list[float]  # per generated block, between consecutive decoder passes
    block_prior_calls: list[int]
    block_decoder_calls: list[int]
    token_ids: list[int]
    latents: torch.Tensor | None = field(default=None, repr=False)  # (blocks, bs, d); not in JSON

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "latents"}
        return {**out, "tokens_per_s": self.tokens_per_s}


@dataclass
class ARResult:
    """One timed greedy generation of the matched ``LlamaForCausalLM``."""

    new_tokens: int
    seconds: float
    forward_calls: int
    num_parameters: int
    dtype: str = "float32"

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


@dataclass
class BenchReport:
    settings: dict
    runs: list[RunResult]
    ar: ARResult | None
    summary: dict  # derived figures (speedups, ratios, equality checks), keyed by name
    ar_bf16: ARResult | None = None

    def run(self, loop: str, new_tokens: int) -> RunResult:
        return next(r for r in self.runs if r.loop == loop and r.new_tokens == new_tokens)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "runs": [r.to_dict() for r in self.runs],
            "ar": None if self.ar is None else self.ar.to_dict(),
            "ar_bf16": None if self.ar_bf16 is None else self.ar_bf16.to_dict(),
            "summary": self.summary,
        }


# ----------------------------------------------------------------------------- report


def summarize(
    args: argparse.Namespace, runs: list[RunResult], ar: ARResult | None, ar_bf16: ARResult | None
) -> dict:
    """Speedups, block-time ratio, passes per token and equality checks."""
    by = {(r.loop, r.new_tokens): r for r in runs}
    k, bs = args.steps, args.block_size
    out: dict = {"theoretical_cola_passes_per_token": (k + 1) / bs, "theoretical_ar_passes_per_token": 1.0}
    out["theoretical_pass_ratio_ar_over_cola"] = bs / (k + 1)  # K prior passes + 1 decoder pass per block
    for n in args.tokens:
        ours = by[("cached", n)]
        for other in ("unmerged", "cached_autocast", "cached_bf16", "recompute", "released"):
            if (other, n) not in by:
                continue
            ref = by[(other, n)]
            out[f"speedup_vs_{other}@{n}"] = ours.tokens_per_s / ref.tokens_per_s
            out[f"same_tokens_{other}@{n}"] = ours.token_ids == ref.token_ids
            same = sum(a == b for a, b in zip(ours.token_ids, ref.token_ids))
            out[f"token_agreement_{other}@{n}"] = same / len(ours.token_ids)
            out[f"max_latent_diff_{other}@{n}"] = float((ours.latents - ref.latents.float()).abs().max())
        for low in ("cached_autocast", "cached_bf16"):
            if (low, n) in by and ("released", n) in by:
                out[f"{low}_speedup_vs_released@{n}"] = (
                    by[(low, n)].tokens_per_s / by[("released", n)].tokens_per_s
                )
        out[f"distinct_tokens@{n}"] = len(set(ours.token_ids))
        passes = ours.prior_calls + ours.decoder_calls
        out[f"passes_per_token@{n}"] = passes / ours.new_tokens  # prior + decoder, prefill included
    longest = by[("cached", max(args.tokens))]
    times = longest.block_seconds
    out["first_block_s"], out["last_block_s"] = times[0], times[-1]
    out["last_over_first_block"] = times[-1] / times[0]
    head, tail = sorted(times[:4]), sorted(times[-4:])
    out["last_over_first_block_median4"] = tail[len(tail) // 2] / head[len(head) // 2]
    fastest_ar = max((a for a in (ar, ar_bf16) if a is not None), key=lambda a: a.tokens_per_s, default=None)
    for name, result, loop in (
        ("cola_over_ar", ar, "cached"),
        ("cola_bf16_over_ar_bf16", ar_bf16, "cached_bf16"),
        ("cola_autocast_over_fastest_ar", fastest_ar, "cached_autocast"),
    ):
        cola = None if result is None else by.get((loop, result.new_tokens))
        if cola is not None:
            out[f"{name}_tokens_per_s"] = cola.tokens_per_s / result.tokens_per_s
    return out


def format_table(report: BenchReport) -> str:
    s, summ = report.settings, report.summary
    bs = s["block_size"]
    lines = [
        f"Cola DLM sampler benchmark | prior w{s['width']} L{s['layers']} {s['heads']}x{s['head_dim']} "
        f"bs{bs} | VAE d{s['vae_dim']} {s['vae_layers']}+{s['vae_layers']} V{s['vocab']} | K={s['steps']} "
        f"CFG={s['guidance']} | fp32 (bf16: the bf16 rows) | batch 1 | prompt {s['prompt_len']} | "
        f"{s['threads']} threads",
        "",
        f"{'loop':<19}{'new tok':>8}{'time s':>9}{'tok/s':>9}{'prior/blk':>10}{'dec/blk':>8}"
        f"{'prior/tok':>10}{'dec/tok':>8}{'prefill p/d':>12}{'same tok':>9}",
    ]
    for r in sorted(report.runs, key=lambda r: (r.new_tokens, LOOPS.index(r.loop))):
        per_blk = sum(r.block_prior_calls) / len(r.block_prior_calls)
        dec_blk = sum(r.block_decoder_calls) / len(r.block_decoder_calls)
        same = "-"
        if r.loop != "cached" and f"token_agreement_{r.loop}@{r.new_tokens}" in summ:
            agree = summ[f"token_agreement_{r.loop}@{r.new_tokens}"]
            same = "yes" if summ[f"same_tokens_{r.loop}@{r.new_tokens}"] else f"{agree:.0%}"
        lines.append(
            f"{LOOP_TITLES[r.loop]:<19}{r.new_tokens:>8}{r.seconds:>9.2f}{r.tokens_per_s:>9.1f}"
            f"{per_blk:>10.1f}{dec_blk:>8.1f}{per_blk / bs:>10.3f}{dec_blk / bs:>8.3f}"
            f"{r.prefill_prior_calls:>6}/{r.prefill_decoder_calls:<5}{same:>9}"
        )
    for a in (report.ar, report.ar_bf16):
        if a is not None:
            lines.append(
                f"{'AR (Llama) ' + ('bf16' if a.dtype == 'bfloat16' else 'fp32'):<19}{a.new_tokens:>8}{a.seconds:>9.2f}"
                f"{a.tokens_per_s:>9.1f}{'':>10}{'':>8}{a.forward_calls / a.new_tokens:>10.3f}{'-':>8}"
            )
    lines.append("")
    for n in s["tokens"]:
        parts = [f"merged / {other} = {summ[f'speedup_vs_{other}@{n}']:.2f}x"
                 for other in ("recompute", "released", "unmerged") if f"speedup_vs_{other}@{n}" in summ]  # fmt: skip
        for low in ("cached_autocast", "cached_bf16"):
            if f"{low}_speedup_vs_released@{n}" in summ:
                parts.append(f"{LOOP_TITLES[low]} / released = {summ[f'{low}_speedup_vs_released@{n}']:.2f}x (its "
                             f"tokens = fp32 tokens at {summ[f'token_agreement_{low}@{n}']:.0%} of positions)")  # fmt: skip
        parts.append(f"passes/token (prior + decoder) {summ[f'passes_per_token@{n}']:.3f}")
        lines.append(f"@{n} tokens: " + "; ".join(parts))
    lines.append(
        f"block time at {max(s['tokens'])} tokens (merged, fp32): first {summ['first_block_s'] * 1e3:.1f} ms, last "
        f"{summ['last_block_s'] * 1e3:.1f} ms, last/first {summ['last_over_first_block']:.2f} "
        f"(median of 4: {summ['last_over_first_block_median4']:.2f})"
    )
    fastest = max((a for a in (report.ar, report.ar_bf16) if a is not None), key=lambda a: a.tokens_per_s,
                  default=None)  # fmt: skip
    for name, a, label in (
        ("cola_over_ar", report.ar, "Cola fp32 / AR fp32"),
        ("cola_bf16_over_ar_bf16", report.ar_bf16, "Cola bf16 weights / AR bf16"),
        ("cola_autocast_over_fastest_ar", fastest, "Cola bf16 autocast / the faster AR"),
    ):
        if a is not None and f"{name}_tokens_per_s" in summ:
            lines.append(
                f"vs AR ({a.num_parameters / 1e6:.2f}M params) at {a.new_tokens} tokens: {label} tokens/s = "
                f"{summ[f'{name}_tokens_per_s']:.2f}x"
            )
    lines.append(
        f"theoretical passes per token: Cola (K+1)/{bs} = {summ['theoretical_cola_passes_per_token']:.3f} vs AR 1"
    )
    lines.append(
        "targets (issue 12): Cola/AR >= 1.5x, ours/released >= 4.5x, cached/recompute >= 10x at 1,024 tokens, "
        "last/first block <= 1.5 at 2,048 latents, passes/token <= 0.7"
    )
    return "\n".join(lines)
