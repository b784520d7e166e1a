"""Image -> text with a multimodal Cola checkpoint: image files in, captions out.

    python scripts/sample_i2t.py runs/quickstart_multimodal/prior photo1.png photo2.png

Images of another size are resized and RGBA / greyscale images converted to RGB (diffusers'
``VaeImageProcessor``). Without files, 8 held-out renders of the embedded shapes set are captioned
next to their true captions.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from prior.checkpoints.run_folders import resolve_pipeline_folder
from prior.eval.multimodal import held_out
from prior.pipelines.pipeline_cola_multimodal import ColaImageToTextPipeline
from unimodal.shapes import caption, render


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a multimodal run folder or pipeline folder")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images:
        images, truths = [Image.open(path) for path in args.images], list(args.images)
    else:
        attrs = held_out(8)
        images, truths = [render(a) for a in attrs], [f"truth: {caption(a)}" for a in attrs]
    pipe = ColaImageToTextPipeline.from_pretrained(resolve_pipeline_folder(args.checkpoint))
    overrides = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    texts = pipe(images, generator=torch.Generator().manual_seed(args.seed), **overrides).texts
    for truth, text in zip(truths, texts):
        print(f"{truth}\n  -> {text}")


if __name__ == "__main__":
    main()
