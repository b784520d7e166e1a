"""Does the prior use its history? Flow loss per t, with and without context, against the baseline.

The toy-scale diagnostic of docs/design.md §8 for a Stage-2 run: on held-out rows, every block is noised to the same
``t`` and the prior's velocity MSE is measured twice with identical noise, once with the clean
history of earlier blocks and once with each block alone (the CFG unconditional branch), next to
the Gaussian baseline (the best predictor that knows only the latents' per-channel variance).
A prior that uses its context sits below the no-context curve; one that learned nothing sits on
the baseline. Also prints the decoder's mean max-probability on real vs. generated latents.

    python scripts/study_context.py runs/quickstart/cola --out context.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from prior.checkpoints.released import load_cola_pipeline  # noqa: E402
from prior.training.flow_matching import flow_loss_by_t  # noqa: E402
from unimodal.text_data import DataConfig, build_text_datasets  # noqa: E402


@torch.no_grad()
def decoder_confidence(pipe, latents: torch.Tensor, start: int | list[int] = 0) -> float:
    """Mean max-probability of the decoder's token distribution on latents (B, N, d), over the
    positions from ``start`` (per row) on: the latents before them are the decoder's history."""
    probs = pipe.text_vae.decode(latents).logits.float().softmax(dim=-1).max(dim=-1).values  # (B, N*p)
    starts = [start] * len(probs) if isinstance(start, int) else start
    return torch.cat([row[s:] for row, s in zip(probs, starts)]).mean().item()


@torch.no_grad()
def generated_after_history(
    pipe, prompts: list[str], max_new_tokens: int = 48
) -> tuple[torch.Tensor, list[int]]:
    """[prompt's whole blocks ; generated blocks] per prompt (B, N, d), as the sampler's decoder saw
    them, and where each row's new tokens start (the first block's prompt tokens are history too)."""
    text = pipe.text_modality
    out = pipe(
        prompts,
        max_new_tokens=max_new_tokens,
        output_type="latents",
        generator=torch.Generator().manual_seed(0),
    )
    generated = torch.cat(out.latents, dim=1)  # (B, blocks * bs, d)
    chunk = pipe.prior.config.block_size * text.patch_size
    rows, starts = [], []
    for i, ids in enumerate(text.prompt_ids(prompts)):
        whole = (len(ids) // chunk) * chunk  # tokens of the prompt's whole blocks (the prefix)
        history = (
            text.encode_ids([ids[:whole]]).latents[0]
            if whole
            else generated.new_zeros(0, generated.shape[-1])
        )
        rows.append(torch.cat((history, generated[i])))
        starts.append(len(ids))  # the first new token
    return torch.stack(rows), starts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="Stage-2 run folder or pipeline folder")
    parser.add_argument("--rows", type=int, default=32, help="held-out rows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--t", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--out", default="context.png")
    args = parser.parse_args(argv)

    pipe = load_cola_pipeline(args.checkpoint, "scripts/study_context.py")
    pipe.set_progress_bar_config(disable=True)
    vae, prior = pipe.text_vae.eval(), pipe.prior.eval()
    _, val = build_text_datasets(DataConfig(seq_len=args.seq_len), pipe.tokenizer)
    ids = torch.stack([val[i]["input_ids"] for i in range(min(args.rows, len(val)))])
    with torch.no_grad():
        z0 = vae.encode(ids).latents
    valid = torch.ones(z0.shape[:2], dtype=torch.bool)
    bs = prior.config.block_size
    ctx = flow_loss_by_t(prior, z0, valid, args.t, with_context=True, block_size=bs)
    alone = flow_loss_by_t(prior, z0, valid, args.t, with_context=False, block_size=bs)

    print(f"{'t':>5} {'with context':>13} {'block alone':>12} {'baseline':>9} {'context gain':>13}")
    for i, t in enumerate(ctx.t.tolist()):
        gain = 1 - ctx.loss[i] / alone.loss[i]
        print(f"{t:5.2f} {ctx.loss[i]:13.3f} {alone.loss[i]:12.3f} {ctx.baseline[i]:9.3f} {gain:12.1%}")

    prompts = pipe.tokenizer.batch_decode(ids[:8, :16])
    generated, starts = generated_after_history(pipe, prompts)
    print(  # both decoded after their history: real rows from token 16 on, generated ones after the prompt
        f"decoder mean max-prob after the history: real latents {decoder_confidence(pipe, z0[:8], 16):.3f}, "
        f"generated {decoder_confidence(pipe, generated, starts):.3f}"
    )
    print(f"latent RMS: real {z0.pow(2).mean().sqrt():.3f}, generated {generated.pow(2).mean().sqrt():.3f}")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ctx.t, ctx.loss, "o-", label="with context")
    ax.plot(alone.t, alone.loss, "s--", label="block alone")
    ax.plot(ctx.t, ctx.baseline, ":", color="gray", label="Gaussian baseline")
    ax.set_xlabel("t (noise level)")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title(f"Prior use of context: {Path(args.checkpoint).name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
