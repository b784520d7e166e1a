"""Benchmark attention over the 2L training layout: the one dense-mask call against a split by query half.

The Stage-2 step attends over ``[clean ; noisy]`` (2N tokens) under the 2L mask; clean queries never
see noisy keys, so the call can be split into clean queries over the N clean keys and noisy
queries over all 2N keys (3/4 of the score entries). One run, the tiny config's shapes (batch 16,
4 heads of 64, N = 128, block 16), forward + backward of one layer's attention, fp32 and bf16,
SDPA and the eager kernel, printed as ms and as ratios to the single SDPA call.

    python scripts/bench_attention_2l.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from unimodal.masks import two_l_mask


def eager(q, k, v, mask):
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min).float().softmax(-1).to(v.dtype) @ v


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def split(kernel):
    def run(q, k, v, mask):
        n = q.shape[2] // 2
        clean = kernel(q[:, :, :n], k[:, :, :n], v[:, :, :n], mask[:, :, :n, :n])
        return torch.cat((clean, kernel(q[:, :, n:], k, v, mask[:, :, n:])), dim=2)

    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128, help="N latents (the layout has 2N)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, heads, head_dim = args.tokens, 4, 64
    pos = torch.arange(n).expand(args.batch, n)
    noisy = torch.cat((torch.zeros_like(pos), torch.ones_like(pos)), 1).bool()
    mask = two_l_mask(torch.cat((pos, pos), 1), noisy, args.block_size).dense()  # (B, 1, 2N, 2N)
    kernels = {"sdpa": sdpa, "eager": eager, "split sdpa": split(sdpa), "split eager": split(eager)}
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (
            torch.randn(args.batch, heads, 2 * n, head_dim, dtype=dtype, requires_grad=True) for _ in range(3)
        )
        ref = sdpa(q, k, v, mask)
        for name, kernel in kernels.items():
            torch.testing.assert_close(kernel(q, k, v, mask), ref, atol=2e-2, rtol=2e-2)  # the same function
            for _ in range(2):
                kernel(q, k, v, mask).sum().backward()
            start = time.perf_counter()
            for _ in range(args.iters):
                kernel(q, k, v, mask).sum().backward()
            out[(str(dtype).split(".")[-1], name)] = 1000 * (time.perf_counter() - start) / args.iters
    print("| attention fwd+bwd, ms (x single SDPA call) | fp32 | bf16 |\n|---|---:|---:|")
    for name in kernels:
        cells = [
            f"{out[(d, name)]:.1f} ({out[(d, name)] / out[(d, 'sdpa')]:.2f}x)"
            for d in ("float32", "bfloat16")
        ]
        print(f"| {name} | {' | '.join(cells)} |")
    return out


if __name__ == "__main__":
    main()
