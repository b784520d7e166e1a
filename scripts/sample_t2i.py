"""Text -> image with a multimodal Cola checkpoint: prompts in, a PNG grid (prompts as labels) out.

    python scripts/sample_t2i.py runs/quickstart_multimodal/prior "a large red circle on the left" \
        "a small blue square at the top" --images-per-prompt 4 --output t2i.png

Without prompts, 16 held-out captions of the embedded shapes set are used.
"""

from __future__ import annotations

import argparse

import torch

from prior.checkpoints.run_folders import resolve_pipeline_folder
from prior.eval.multimodal import held_out, save_grid
from prior.pipelines.pipeline_cola_multimodal import ColaTextToImagePipeline
from unimodal.shapes import caption


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a multimodal run folder or pipeline folder")
    p.add_argument("prompts", nargs="*")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the checkpoint's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="t2i_grid.png")
    args = p.parse_args(argv)
    prompts = args.prompts or [caption(a) for a in held_out(16)]
    pipe = ColaTextToImagePipeline.from_pretrained(resolve_pipeline_folder(args.checkpoint))
    images = pipe(
        prompts,
        num_images_per_prompt=args.images_per_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    labels = [p for p in prompts for _ in range(args.images_per_prompt)]
    print(f"wrote {save_grid(images, labels, args.output, columns=max(4, args.images_per_prompt))}")


if __name__ == "__main__":
    main()
