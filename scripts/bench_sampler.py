"""Benchmark the KV-cached Cola DLM sampler against a no-cache loop, the released loop and an AR model.

One run, batch 1, random-weight models built from run configs (``--prior-config``, default
``configs/text/cola_tiny.yaml``, its ``prior:``; ``--vae-config``, default
``configs/text/vae_tiny.yaml``, its ``vae:`` and ``tokenizer.vocab_size``), loaded with
:func:`prior.training.run_config.load_run_config`; a size flag (``--width``, ``--vae-dim``, ...)
becomes an override of that config. Prints:

1. tokens/s of :class:`~prior.sampling.block_sampler.BlockSampler` (ours: KV caches, CFG batched,
   the commit of each block merged into the next block's first step: ``K`` prior passes per block)
   against the same sampler unmerged (``merge_commit=False``: ``K + 1`` and a prefill pass), against
   ``RecomputeLoop`` (no cache: every denoising step re-runs the prior over the whole
   ``[context | block]`` sequence, and every block re-runs the VAE decoder over everything), and
   ours with the prior's matmuls in bf16 (``GenerationConfig.autocast``, fp32 weights) and with every
   weight in bf16 (AMX / avx512-bf16 on CPUs that have them), each with its token agreement to fp32
   (on trained checkpoints: ``scripts/bench_precision.py``), and the autocast row over the faster AR;
2. the first and the last block time of our sampler at the longest run;
3. prior and VAE-decoder passes per block and per token of every loop (prefill included);
4. tokens/s of ours against ``ReleasedLoop``, the released inference loop (docs/released-format.md
   §6) re-built on the same models: per block ``2K + 1`` prior calls (the conditional branch with
   the cache, the unconditional branch alone as a second call, the commit) and a dense additive
   mask built by a Python loop over the samples on every call (the released
   ``create_na_block_causal_mask``, docs/released-format.md §5);
5. tokens/s against a transformers ``LlamaForCausalLM`` of the prior's width/depth (random
   weights, KV cache, greedy, batch 1), in fp32 and in bf16, and the theoretical pass ratio
   ``bs / (K + 1)``.

Design choices
--------------
* **Same models, same noise, same tokens.** All fp32 Cola loops share the VAE, the prior, the
  prompt, the per-block noise, the time grid (released fp32 ``linspace(1000, 0, K + 1)``), greedy
  decoding and the repetition penalty; in fp32 they must give the same tokens, which the report
  checks (and the smoke test asserts), so every speedup is between equivalent computations.
* **Passes are measured, not assumed.** Forward hooks on the prior and on the VAE decoder count
  every pass; the end of each decoder pass marks a block boundary, so per-block call counts and
  block times come from the same marks for every loop (the prefill window is reported apart).
* **Timing.** ``time.perf_counter`` around each generation (prompt encoding and prefill
  included), one short warm-up generation of every loop first, ``torch.no_grad`` (the sampler's own mode),
  default thread count (``--threads`` sets it: on a loaded machine one thread per process gives
  far steadier figures than OpenMP threads fighting for cores). Every run is repeated
  ``--repeats`` times, round-robin over the loops so that a change of load hits all of them
  alike, and the fastest time is kept (per block: the fastest time of that block). The ratios
  come from one process; absolute figures move with the machine's load. CPU only.
* **Released loop caveats.** The baseline keeps our post-RoPE KV cache, where the released code
  caches pre-RoPE keys and re-applies RoPE / the VAE's k-norm to the whole cache on every call,
  so if anything the baseline is faster than the real released loop. The Python mask loop is the
  lenient reading (a loop over samples building index vectors, then one broadcast comparison).
* The two baselines live in ``scripts/_reference_loops.py``, the results and the report in
  ``scripts/_bench_report.py``.
* Prompts are a whole number of blocks and the token counts are multiples of the block size, so
  no first-block repaint happens and every loop generates whole blocks.

    python scripts/bench_sampler.py                      # tiny config, fp32, 256 and 1,024 tokens
    python scripts/bench_sampler.py --threads 1 --json bench.json   # steadier on a shared machine
    python scripts/bench_sampler.py --tokens 256 --no-bf16   # fp32 rows only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

from modalities.text import TextModality
from prior.models.mmdit import MMDiT
from prior.sampling.block_sampler import BlockSampler
from prior.sampling.config import GenerationConfig
from prior.training.run_config import RunConfig, load_run_config
from unimodal.config import ConfigError
from unimodal.text_vae import TextVAE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package
from _bench_report import LOOP_TITLES, ARResult, BenchReport, RunResult, format_table, summarize  # noqa: E402
from _reference_loops import RecomputeLoop, ReleasedLoop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRIOR_CONFIG = ROOT / "configs/text/cola_tiny.yaml"
VAE_CONFIG = ROOT / "configs/text/vae_tiny.yaml"
# size flag -> the run-config keys it overrides
PRIOR_FLAGS = {
    "width": ("prior.width",), "heads": ("prior.heads",), "head_dim": ("prior.head_dim",),
    "rope_dim": ("prior.rope_dim",), "mlp_ratio": ("prior.mlp_ratio",), "layers": ("prior.num_layers",),
    "block_size": ("prior.block_size",),
}  # fmt: skip
VAE_FLAGS = {
    "vocab": ("vae.vocab_size",), "vae_dim": ("vae.dim",), "vae_ffn_dim": ("vae.ffn_dim",),
    "vae_heads": ("vae.num_heads",), "vae_layers": ("vae.encoder_num_blocks", "vae.decoder_num_blocks"),
    "latent_dim": ("vae.latent_dim",), "vae_block_size": ("vae.block_size",),
    "max_seq_len": ("vae.max_seq_len",),
}  # fmt: skip

# ----------------------------------------------------------------------------- pass counting


class PassCounter:
    """Counts prior and VAE-decoder forwards with hooks; marks (time, prior, decoder) after each decoder pass."""

    def __init__(self, prior: torch.nn.Module, decoder: torch.nn.Module) -> None:
        self.prior_calls, self.decoder_calls = 0, 0
        self.marks: list[tuple[float, int, int]] = []
        self._handles = [
            prior.register_forward_hook(self._on_prior),
            decoder.register_forward_hook(self._on_decoder),
        ]

    def _on_prior(self, *_) -> None:
        self.prior_calls += 1

    def _on_decoder(self, *_) -> None:
        self.decoder_calls += 1
        self.mark()

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), self.prior_calls, self.decoder_calls))

    def __enter__(self) -> PassCounter:
        return self

    def __exit__(self, *_) -> None:
        for handle in self._handles:
            handle.remove()


# ----------------------------------------------------------------------------- the loops


class CachedLoop:
    """Ours: :class:`BlockSampler` (KV caches, CFG in one batched call; ``K`` prior calls per block
    with merged commits, ``K + 1`` and a prefill pass with ``merge_commit=False``)."""

    def __init__(
        self, vae: TextVAE, prior: MMDiT, steps: int, guidance: float, repetition_penalty: float,
        merge: bool = True, autocast: str | None = None,
    ):  # fmt: skip
        self.vae, self.prior = vae, prior
        self.settings = dict(
            num_inference_steps=steps, guidance_scale=guidance, repetition_penalty=repetition_penalty,
            stop_on_eos=False, whole_blocks=True, merge_commit=merge, autocast=autocast,
        )  # fmt: skip

    def generate(self, prompt: list[int], noise: torch.Tensor, bar: tqdm) -> tuple[list[int], torch.Tensor]:
        """noise (blocks, 1, bs, d) -> (token ids, latents (blocks, bs, d))."""
        num_blocks, _, bs, _ = noise.shape
        config = GenerationConfig(max_new_tokens=num_blocks * bs, **self.settings)
        text = TextModality(self.vae, None, self.prior.config.block_size)  # ids only: no tokenizer
        sampler = BlockSampler(text, self.prior, FlowMatchEulerDiscreteScheduler(), config)
        ids, latents = [], []
        for out in sampler.stream([prompt], noise=lambda k, shape: noise[k]):
            ids += out.token_ids[0]
            latents.append(out.latents[0])
            bar.update()
        return ids, torch.stack(latents)


# ----------------------------------------------------------------------------- measuring


def measure(name: str, loop, prompt: list[int], noise: torch.Tensor, progress: bool) -> RunResult:
    """Time one generation and split its passes and time into prefill and per-block windows."""
    vae, prior = loop.vae, loop.prior
    num_blocks, _, bs, _ = noise.shape
    bar = tqdm(total=num_blocks, desc=f"{LOOP_TITLES[name]} {num_blocks * bs} tok", disable=not progress,
               leave=False, unit="block")  # fmt: skip
    with PassCounter(prior, vae.decoder) as counter:
        counter.mark()
        start = time.perf_counter()
        ids, latents = loop.generate(prompt, noise, bar)
        seconds = time.perf_counter() - start
    bar.close()
    marks = counter.marks  # [start, end of each decoder pass]
    windows = [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks, marks[1:])]
    prefill = len(windows) - num_blocks  # 1 when the loop prefills the decoder cache, else 0
    if prefill not in (0, 1):
        raise RuntimeError(f"{name}: {len(windows)} decoder passes for {num_blocks} blocks")
    pre = windows[0] if prefill else (0.0, 0, 0)  # the recompute loop has no prefill
    blocks = windows[prefill:]
    return RunResult(
        loop=name, new_tokens=len(ids), seconds=seconds, prior_calls=counter.prior_calls,
        decoder_calls=counter.decoder_calls, prefill_prior_calls=pre[1], prefill_decoder_calls=pre[2],
        block_seconds=[w[0] for w in blocks], block_prior_calls=[w[1] for w in blocks],
        block_decoder_calls=[w[2] for w in blocks], token_ids=ids, latents=latents,
    )  # fmt: skip


def best_of(tries: list[RunResult]) -> RunResult:
    """The fastest of repeated runs, with the per-block minimum times (the machine is shared)."""
    for r in tries[1:]:
        if r.token_ids != tries[0].token_ids or r.block_prior_calls != tries[0].block_prior_calls:
            raise RuntimeError(f"{r.loop}: repeated runs differ (tokens or pass counts)")
    fastest = min(tries, key=lambda r: r.seconds)
    return replace(fastest, block_seconds=[min(col) for col in zip(*(r.block_seconds for r in tries))])


def _overrides(args: argparse.Namespace, flags: dict[str, tuple[str, ...]]) -> list[str]:
    return [f"{key}={getattr(args, flag)}" for flag, keys in flags.items() for key in keys
            if getattr(args, flag) is not None]  # fmt: skip


def load_configs(args: argparse.Namespace) -> tuple[RunConfig, RunConfig]:
    """The prior's and the VAE's run configs, the size flags applied as overrides; then every size
    flag of ``args`` is set to the resolved value (what the loops, the AR model and the report use)."""
    prior_run = load_run_config(args.prior_config, _overrides(args, PRIOR_FLAGS))
    vae_run = load_run_config(args.vae_config, _overrides(args, VAE_FLAGS))
    if vae_run.vae is None:
        raise ConfigError(f"{args.vae_config} builds no VAE (it needs task: vae or joint.mode: scratch)")
    p, v = prior_run.prior, vae_run.vae
    if p.in_channels is not None and list(p.in_channels) != [v.latent_dim]:
        raise ConfigError(f"prior.in_channels={p.in_channels} disagrees with vae.latent_dim={v.latent_dim}")
    resolved = dict(
        width=p.width, heads=p.heads, head_dim=p.head_dim, rope_dim=p.rope_dim, mlp_ratio=p.mlp_ratio,
        layers=p.num_layers, block_size=p.block_size, vae_dim=v.dim, vae_ffn_dim=v.ffn_dim,
        vae_heads=v.num_heads, vae_layers=v.encoder_num_blocks, latent_dim=v.latent_dim,
        vae_block_size=v.block_size, max_seq_len=v.max_seq_len,
        vocab=v.vocab_size or vae_run.tokenizer.vocab_size,  # derived: the size of the BPE it trains
    )  # fmt: skip
    if v.decoder_num_blocks != v.encoder_num_blocks:
        raise ConfigError("the benchmark's --vae-layers reading needs as many decoder as encoder blocks")
    vars(args).update(resolved)
    return prior_run, vae_run


def build_models(args: argparse.Namespace, prior_run: RunConfig, vae_run: RunConfig) -> tuple[TextVAE, MMDiT]:
    """Random-weight VAE and prior from the configs (adaLN not zeroed, so the velocity is not 0)."""
    torch.manual_seed(args.seed)
    vae = TextVAE(**{**dataclasses.asdict(vae_run.vae), "vocab_size": args.vocab}).eval()
    prior_kwargs = {**dataclasses.asdict(prior_run.prior), "in_channels": [args.latent_dim]}
    prior = MMDiT(**{**prior_kwargs, "adaln_zero_init": False}).eval()
    return vae, prior


def run_autoregressive(
    args: argparse.Namespace,
    prompt: list[int],
    new_tokens: int,
    repeats: int = 1,
    dtype: torch.dtype = torch.float32,
) -> ARResult:
    """Greedy KV-cached generation with a ``LlamaForCausalLM`` of the prior's width and depth (fastest of
    ``repeats``), its weights in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=round(args.mlp_ratio * args.width),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).eval().to(dtype)  # SDPA attention (transformers' default)
    input_ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(input_ids), use_cache=True, do_sample=False, pad_token_id=0)

    def generate(n: int) -> torch.Tensor:
        return model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

    generate(min(8, new_tokens))  # warm-up
    best, calls = float("inf"), []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for _ in range(repeats):
            calls.clear()
            start = time.perf_counter()
            out = generate(new_tokens)
            best = min(best, time.perf_counter() - start)
    finally:
        handle.remove()
    generated = out.shape[1] - input_ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"the AR model generated {generated} tokens instead of {new_tokens}")
    return ARResult(
        generated, best, len(calls), sum(p.numel() for p in model.parameters()), str(dtype).split(".")[-1]
    )


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--tokens", type=int, nargs="+", default=[256, 1024], help="new-token counts (block multiples)")
    add("--steps", type=int, default=10, help="Euler steps K per block")
    add("--guidance", type=float, default=3.0, help="CFG weight (must not be 1: CFG on)")
    add("--repetition-penalty", type=float, default=1.1, help="released default 1.1")
    add("--prompt-len", type=int, default=16, help="prompt tokens (a positive multiple of the block size)")
    add("--ar-tokens", type=int, default=256, help="new tokens for the AR comparison (0 = skip it)")
    add(
        "--repeats",
        type=int,
        default=2,
        help="time every run this many times (round-robin), keep the fastest",
    )
    add("--no-bf16", action="store_true", help="skip the bf16 rows (ours with bf16 weights, AR in bf16)")
    add("--skip", nargs="+", default=[], choices=["unmerged", "recompute", "released"],
        help="loops to leave out (e.g. recompute at 2,048 tokens: it is quadratic)")  # fmt: skip
    add("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    add("--seed", type=int, default=0)
    add("--json", type=Path, default=None, help="also write the report as JSON")
    add("--no-progress", action="store_true", help="hide the tqdm bars")
    add("--prior-config", type=Path, default=PRIOR_CONFIG, help="run YAML whose prior: section is used")
    add("--vae-config", type=Path, default=VAE_CONFIG, help="run YAML whose vae: section is used")
    # size overrides (default: the configs' values)
    for flag, key in (("--width", "prior.width"), ("--heads", "prior.heads"), ("--head-dim", "prior.head_dim"),
                      ("--rope-dim", "prior.rope_dim"), ("--layers", "prior.num_layers"),
                      ("--block-size", "prior.block_size"), ("--vocab", "vae.vocab_size"),
                      ("--vae-dim", "vae.dim"), ("--vae-ffn-dim", "vae.ffn_dim"), ("--vae-heads", "vae.num_heads"),
                      ("--latent-dim", "vae.latent_dim"), ("--vae-block-size", "vae.block_size"),
                      ("--max-seq-len", "vae.max_seq_len")):  # fmt: skip
        add(flag, type=int, default=None, help=f"override {key}")
    add("--mlp-ratio", type=float, default=None, help="override prior.mlp_ratio")
    add("--vae-layers", type=int, default=None, help="override vae.encoder_num_blocks and decoder_num_blocks")
    return p


def check_args(args: argparse.Namespace) -> None:
    bs = args.block_size
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance == 1.0 or args.guidance < 0:
        raise ValueError(
            f"--guidance must be >= 0 and != 1 (the benchmark runs with CFG), got {args.guidance}"
        )
    if args.prompt_len < bs or args.prompt_len % bs:
        raise ValueError(
            f"--prompt-len must be a positive multiple of the block size {bs}, got {args.prompt_len}"
        )
    for n in args.tokens:
        if n < 2 * bs or n % bs:
            raise ValueError(f"--tokens {n} must be a multiple of the block size {bs} and >= 2 blocks")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.ar_tokens < 0 or args.ar_tokens % bs:
        raise ValueError(f"--ar-tokens must be 0 or a multiple of the block size {bs}, got {args.ar_tokens}")
    longest = args.prompt_len + max(max(args.tokens), args.ar_tokens)
    if longest > args.max_seq_len:
        raise ValueError(f"prompt + new tokens = {longest} exceed --max-seq-len {args.max_seq_len}")


def main(argv: Sequence[str] | None = None) -> BenchReport:
    args = build_parser().parse_args(argv)
    configs = load_configs(args)
    check_args(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, *configs)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (the smoke test)


def _run(args: argparse.Namespace, prior_run: RunConfig, vae_run: RunConfig) -> BenchReport:
    """Build the models, warm up, time every loop (round-robin), print and return the report."""
    vae, prior = build_models(args, prior_run, vae_run)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, args.vocab, (args.prompt_len,), generator=gen).tolist()
    max_blocks = max(*args.tokens, args.ar_tokens) // args.block_size
    noise = torch.randn(max_blocks, 1, args.block_size, args.latent_dim, generator=gen)  # (blocks, 1, bs, d)
    common = (args.steps, args.guidance, args.repetition_penalty)
    loops = {
        "cached": CachedLoop(vae, prior, *common),
        "unmerged": CachedLoop(vae, prior, *common, merge=False),
        "recompute": RecomputeLoop(vae, prior, *common),
        "released": ReleasedLoop(vae, prior, *common, mask_dtype=torch.float32),
    }
    for name in args.skip:
        del loops[name]
    if not args.no_bf16:  # fp32 weights, the prior's matmuls in bf16; the weights rounded to bf16
        loops["cached_autocast"] = CachedLoop(vae, prior, *common, autocast="bfloat16")
        loops["cached_bf16"] = CachedLoop(
            copy.deepcopy(vae).to(torch.bfloat16), copy.deepcopy(prior).to(torch.bfloat16), *common
        )
    progress = not args.no_progress
    runs, ar, ar_bf16 = [], None, None
    with (
        torch.no_grad()
    ):  # what the sampler runs under (inference_mode would defeat autocast's weight-cast cache)
        for name, loop in loops.items():  # warm-up: two blocks of every loop
            measure(name, loop, prompt, noise[:2], progress=False)
        for n in args.tokens:
            tries = {name: [] for name in loops}
            for _ in range(args.repeats):  # round-robin, so load changes hit every loop alike
                for name, loop in loops.items():
                    tries[name].append(measure(name, loop, prompt, noise[: n // args.block_size], progress))
            runs += [best_of(t) for t in tries.values()]
        if args.ar_tokens:
            ar = run_autoregressive(args, prompt, args.ar_tokens, args.repeats)
            if not args.no_bf16:
                ar_bf16 = run_autoregressive(args, prompt, args.ar_tokens, args.repeats, torch.bfloat16)
        if ar is not None and ar.new_tokens not in args.tokens:  # Cola at the AR token count too
            blocks = noise[: ar.new_tokens // args.block_size]
            for name in ("cached", "cached_autocast", "cached_bf16") if not args.no_bf16 else ("cached",):
                runs.append(best_of([measure(name, loops[name], prompt, blocks, progress)
                                     for _ in range(args.repeats)]))  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["threads"] = torch.get_num_threads()
    report = BenchReport(settings, runs, ar, summarize(args, runs, ar, ar_bf16), ar_bf16)
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return report


if __name__ == "__main__":
    main()
