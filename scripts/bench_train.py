"""Benchmark one training step: the Cola Stage-2 step against the matched AR step, fp32 and bf16.

One run, random-weight models built from the tiny run configs (``configs/text/vae_tiny.yaml``,
``cola_tiny.yaml``, ``ar_tiny.yaml``: the shapes, batch size and sequence length the quickstart
trains), random token batches. Prints, measured in this one process:

1. tokens/s of one optimizer step (forward, backward, AdamW step) of the Cola Stage-2 model
   (``fixed_vae``: the frozen VAE encodes, the prior trains on the 2L layout) and of the AR
   baseline, in fp32 and under bf16 autocast, and their ratio (Cola / AR);
2. the Cola step's time split into VAE encode, 2L batch construction, prior forward, backward and
   optimizer step, and the profiler's top operators (bf16);
3. with ``--before REV`` (default: the commit before this benchmark's issue), the same Cola step
   of that revision, run in a subprocess from a temporary ``git worktree``, so the speedup of the
   current code over it comes from one run on one machine.

Design choices
--------------
* **The quickstart's step.** Batch and length come from ``train.batch_size`` / ``data.seq_len`` of
  the configs; the optimizer is AdamW over what the model trains. The data loader, logging and
  checkpointing are left out: they are the same for both systems and not what the ratio is about.
* **Timing**: ``--warmup`` untimed steps, then ``--steps`` timed steps, ``time.perf_counter``;
  repeated ``--repeats`` times round-robin over the configurations, keeping the fastest (steadier
  on a shared machine). Threads: ``--threads`` (default 2).
* **The before-revision snippet** builds the Stage-2 model with that revision's own API and
  configs; it is written for the layout of commit ``ccb8e34`` (``prior.joint``, ``prior.mmdit``).

    python scripts/bench_train.py                  # fp32 + bf16, Cola vs AR, vs ccb8e34
    python scripts/bench_train.py --before none --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from prior.models.ar import ARTransformer
from prior.models.mmdit import MMDiT
from prior.training.flow_matching import build_2l_batch, predict
from prior.training.joint import ColaModel
from prior.training.run_config import load_run_config
from unimodal.text_vae import TextVAE

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "text"
DEFAULT_BEFORE = "ccb8e34"

BEFORE_SNIPPET = r"""
import json, sys, time, dataclasses, torch
from prior.run_config import load_run_config
from prior.mmdit import MMDiT
from prior.joint import ColaModel
from unimodal.text_vae import TextVAE
steps, warmup, threads, bf16, repeats = (int(a) for a in sys.argv[1:6])
torch.set_num_threads(threads)
torch.manual_seed(0)
vcfg = load_run_config("configs/text/vae_tiny.yaml")
ccfg = load_run_config("configs/text/cola_tiny.yaml")
vae = TextVAE(**dataclasses.asdict(vcfg.vae))
prior = MMDiT(**dataclasses.asdict(ccfg.prior))
model = ColaModel(vae, prior, ccfg.joint, ccfg.flow)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(0, vae.config.vocab_size, (ccfg.train.batch_size, ccfg.data.seq_len))
def step():
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(ids, None, step=1)
    out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(warmup): step()
best = float("inf")
for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps): step()
    best = min(best, (time.perf_counter() - t) / steps)
print(json.dumps({"seconds": best, "tokens": ids.numel()}))
"""


# ----------------------------------------------------------------------------- models


def build_models(seed: int = 0) -> tuple[ColaModel, ARTransformer, torch.Size]:
    """The Cola Stage-2 model and the AR baseline of the tiny configs (random weights)."""
    vae_run = load_run_config(CONFIGS / "vae_tiny.yaml")
    cola_run = load_run_config(CONFIGS / "cola_tiny.yaml")
    ar_run = load_run_config(CONFIGS / "ar_tiny.yaml")
    vocab = vae_run.tokenizer.vocab_size
    torch.manual_seed(seed)
    vae = TextVAE(**{**dataclasses.asdict(vae_run.vae), "vocab_size": vocab})
    prior = MMDiT(**{**dataclasses.asdict(cola_run.prior), "in_channels": [vae.config.latent_dim]})
    cola = ColaModel(vae, prior, cola_run.joint, cola_run.flow)
    ar = ARTransformer(**{**dataclasses.asdict(ar_run.ar), "vocab_size": vocab})
    shape = torch.Size((cola_run.train.batch_size, cola_run.data.seq_len))
    return cola, ar, shape


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def make_step(model: torch.nn.Module, ids: torch.Tensor, bf16: bool, kind: str):
    params = (
        model.trainable_parameters() if hasattr(model, "trainable_parameters") else list(model.parameters())
    )
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        with _autocast(bf16):
            if kind == "cola":
                loss = model(ids, None, step=1).loss
            else:
                logits = model(ids[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


# ----------------------------------------------------------------------------- breakdown


def cola_breakdown(model: ColaModel, ids: torch.Tensor, steps: int) -> dict[str, float]:
    """Milliseconds per step of each part of the bf16 Cola step (fixed_vae)."""
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    parts = dict.fromkeys(("vae encode", "2L batch", "prior forward", "backward", "optimizer"), 0.0)
    bs = model.prior.config.block_size
    for _ in range(steps):
        marks = [time.perf_counter()]
        with _autocast(True):
            with torch.no_grad():
                z0 = model.vae.encode(ids).latents
            marks.append(time.perf_counter())
            batch = build_2l_batch(z0.float(), torch.ones(ids.shape, dtype=torch.bool), bs, model.flow_cfg)
            batch.attn_mask.dense()
            marks.append(time.perf_counter())
            velocity, _ = predict(model.prior, batch)
            loss = (velocity.float() - batch.target).pow(2).mean()
            marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        for name, a, b in zip(parts, marks[:-1], marks[1:]):
            parts[name] += 1000 * (b - a) / steps
    return parts


def top_ops(step, n: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


# ----------------------------------------------------------------------------- before


def measure_before(rev: str, steps: int, warmup: int, threads: int, repeats: int) -> dict[str, float]:
    """The Cola step of revision ``rev`` (fp32 and bf16), from a temporary git worktree."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)  # fmt: skip
        try:
            for bf16 in (0, 1):
                args = [str(a) for a in (steps, warmup, threads, bf16, repeats)]
                done = subprocess.run(
                    [sys.executable, "-c", BEFORE_SNIPPET, *args], cwd=tree, capture_output=True, text=True,
                    env={"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                )  # fmt: skip
                if done.returncode:
                    raise RuntimeError(f"the {rev} step failed:\n{done.stderr[-2000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                out["bf16" if bf16 else "fp32"] = result["tokens"] / result["seconds"]
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True
            )
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--before", default=DEFAULT_BEFORE, help="git revision to compare with; 'none' = skip"
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cola, ar, shape = build_models()
    ids = torch.randint(0, ar.config.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    steps = {(kind, prec): make_step(model, ids, prec == "bf16", kind)
             for kind, model in (("cola", cola), ("ar", ar)) for prec in ("fp32", "bf16")}  # fmt: skip
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.repeats):  # round-robin: a change of load hits every configuration alike
        for key, step in steps.items():
            best[key] = min(best[key], time_steps(step, args.steps))
    tps = {f"{k}_{p}": ids.numel() / s for (k, p), s in best.items()}
    n_prior = sum(p.numel() for p in cola.prior.parameters())
    n_ar = sum(p.numel() for p in ar.parameters())
    print(
        f"batch {shape[0]} x {shape[1]} tokens; prior {n_prior / 1e6:.2f}M trains (VAE frozen), AR {n_ar / 1e6:.2f}M"
    )
    print("| step (tokens/s) | fp32 | bf16 |\n|---|---:|---:|")
    for kind, name in (("cola", "Cola Stage 2 (fixed_vae)"), ("ar", "matched AR")):
        print(f"| {name} | {tps[f'{kind}_fp32']:,.0f} | {tps[f'{kind}_bf16']:,.0f} |")
    ratio = {p: tps[f"cola_{p}"] / tps[f"ar_{p}"] for p in ("fp32", "bf16")}
    print(f"| Cola / AR | {ratio['fp32']:.2f}x | {ratio['bf16']:.2f}x |")
    result = {"tokens_per_s": tps, "cola_over_ar": ratio, "shape": list(shape)}

    parts = cola_breakdown(cola, ids, args.steps)
    total = sum(parts.values())
    print(
        "Cola step, bf16, ms: " + ", ".join(f"{k} {v:.0f} ({100 * v / total:.0f}%)" for k, v in parts.items())
    )
    result["breakdown_ms"] = parts
    if not args.no_profile:
        print(top_ops(steps[("cola", "bf16")]))

    if args.before.lower() != "none":
        before = measure_before(args.before, args.steps, args.warmup, args.threads, args.repeats)
        speedup = {p: tps[f"cola_{p}"] / before[p] for p in before}
        print(
            f"Cola step at {args.before}: fp32 {before['fp32']:,.0f} tokens/s, bf16 {before['bf16']:,.0f} tokens/s"
        )
        print(f"now / {args.before}: fp32 {speedup['fp32']:.2f}x, bf16 {speedup['bf16']:.2f}x")
        result.update(before=before, speedup=speedup)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
