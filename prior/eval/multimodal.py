"""Both directions of the unified prior, scored by a program on held-out shapes (no model judges).

* **text -> image**: held-out captions (test split of :mod:`unimodal.shapes`) are the prompts; each
  generated image is read by :func:`unimodal.shapes.check_image` (colour, shape, size, position)
  and compared with what the caption states.
* **image -> text**: held-out renders are captioned; :func:`unimodal.shapes.parse_caption` reads
  the attributes the caption names; a caption is *correct* when it names both the colour and the
  shape of the image (the target), and each attribute is also scored alone.
* Next to each figure: **chance** (1 / the number of values of the attribute; for colour-and-shape
  1 / (6 x 3)) and the **checker's accuracy on real renders** (how far the program itself can be
  trusted).
* **Image VAE**: PSNR (dB, [-1, 1] range, peak-to-peak 2) of posterior-mode reconstructions.
* :func:`save_grid` writes a PNG grid of images with their prompts as labels (PIL only).
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from unimodal import shapes
from unimodal.image_text_data import ImageTextCollator
from unimodal.image_vae import ImageVAE, psnr_db

ATTRIBUTES = ("colour", "shape", "size", "where")


@dataclass
class DirectionScore:
    """Accuracy per attribute (and of colour and shape together) over ``num`` held-out examples."""

    num: int
    accuracy: dict[str, float]  # attribute -> fraction correct; "colour+shape" both right
    chance: dict[str, float]
    checker: dict[str, float]  # the checker on real renders (text->image) or real captions (image->text)
    examples: list[dict] = field(default_factory=list)  # a few (prompt or truth, what came out)


@dataclass
class MultimodalReport:
    image_vae_psnr: float
    text_to_image: DirectionScore
    image_to_text: DirectionScore

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"image VAE reconstruction PSNR: {self.image_vae_psnr:.2f} dB (held-out renders)"]
        for name, score in (("text -> image", self.text_to_image), ("image -> text", self.image_to_text)):
            lines.append(
                f"{name} ({score.num} held-out examples): attribute accuracy (chance, checker on real data)"
            )
            for key in ("colour", "shape", "colour+shape", "size", "where"):
                lines.append(
                    f"  {key:13s} {score.accuracy[key]:.3f}  (chance {score.chance[key]:.3f}, "
                    f"checker {score.checker[key]:.3f})"
                )
        return "\n".join(lines)


def chance() -> dict[str, float]:
    out = dict(shapes.CHANCE)
    out["colour+shape"] = shapes.CHANCE["colour"] * shapes.CHANCE["shape"]
    return out


def _score(pairs: list[tuple[dict, dict]]) -> dict[str, float]:
    """pairs of (truth, read) attribute dicts -> accuracy per attribute and colour+shape."""
    n = max(len(pairs), 1)
    acc = {k: sum(t[k] == r[k] for t, r in pairs) / n for k in ATTRIBUTES}
    acc["colour+shape"] = sum(t["colour"] == r["colour"] and t["shape"] == r["shape"] for t, r in pairs) / n
    return acc


def _truth(attrs: shapes.ShapeAttributes) -> dict:
    return {k: getattr(attrs, k) for k in ATTRIBUTES}


def held_out(num: int, seed: int = 0, split: str = "test") -> list[shapes.ShapeAttributes]:
    return [shapes.draw_attributes(i, split, seed) for i in range(num)]


def checker_on_renders(attrs: list[shapes.ShapeAttributes], image_size: int) -> dict[str, float]:
    return _score([(_truth(a), shapes.check_image(shapes.render(a, image_size)).as_dict()) for a in attrs])


def checker_on_captions(attrs: list[shapes.ShapeAttributes]) -> dict[str, float]:
    return _score([(_truth(a), shapes.parse_caption(shapes.caption(a))) for a in attrs])


@torch.no_grad()
def image_vae_psnr(vae: ImageVAE, num: int = 256, seed: int = 0, image_size: int = 32) -> float:
    """PSNR of posterior-mode reconstructions of ``num`` held-out renders."""
    collate = ImageTextCollator(image_size)
    images = collate([{"image": shapes.render(a, image_size), "caption": ""} for a in held_out(num, seed)])[
        "images"
    ]
    recon = torch.cat([vae(chunk).float().clamp(-1, 1) for chunk in images.split(64)])
    return float(psnr_db(recon, images))


@torch.no_grad()
def score_text_to_image(
    pipe,
    num: int = 96,
    seed: int = 0,
    batch_size: int = 32,
    image_size: int = 32,
    generator_seed: int = 0,
    **kwargs,
) -> tuple[DirectionScore, list[Image.Image], list[str]]:
    """Generate one image per held-out caption and read it with the checker."""
    attrs = held_out(num, seed)
    prompts = [shapes.caption(a) for a in attrs]
    gen = torch.Generator().manual_seed(generator_seed)
    images: list[Image.Image] = []
    for start in range(0, num, batch_size):
        chunk = prompts[start : start + batch_size]
        images += pipe(
            chunk, height=image_size, width=image_size, generator=gen, output_type="pil", **kwargs
        ).images
    pairs = [(_truth(a), shapes.check_image(img).as_dict()) for a, img in zip(attrs, images)]
    examples = [{"prompt": p, "read": r} for p, (_, r) in zip(prompts[:8], pairs[:8])]
    score = DirectionScore(num, _score(pairs), chance(), checker_on_renders(attrs, image_size), examples)
    return score, images, prompts


@torch.no_grad()
def score_image_to_text(
    pipe,
    num: int = 96,
    seed: int = 0,
    batch_size: int = 32,
    image_size: int = 32,
    generator_seed: int = 0,
    **kwargs,
) -> DirectionScore:
    """Caption held-out renders and read the attributes the captions name."""
    attrs = held_out(num, seed)
    gen = torch.Generator().manual_seed(generator_seed)
    captions: list[str] = []
    for start in range(0, num, batch_size):
        chunk = [shapes.render(a, image_size) for a in attrs[start : start + batch_size]]
        captions += pipe(chunk, generator=gen, **kwargs).texts
    pairs = [(_truth(a), shapes.parse_caption(c)) for a, c in zip(attrs, captions)]
    examples = [{"truth": shapes.caption(a), "caption": c} for a, c in zip(attrs[:8], captions[:8])]
    return DirectionScore(num, _score(pairs), chance(), checker_on_captions(attrs), examples)


def save_grid(
    images: list[Image.Image], labels: list[str], path: str | Path, columns: int = 8, scale: int = 3
) -> Path:
    """A PNG grid: each image upscaled ``scale`` x (nearest) with its label wrapped below it."""
    if len(images) != len(labels) or not images:
        raise ValueError(f"need as many labels as images (>= 1), got {len(images)} and {len(labels)}")
    w, h = images[0].size
    cell_w, text_h = w * scale, 44
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (cell_w + 8), rows * (h * scale + text_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * (cell_w + 8) + 4, (i // columns) * (h * scale + text_h + 8) + 4
        grid.paste(img.convert("RGB").resize((cell_w, h * scale), Image.NEAREST), (x, y))
        wrapped = "\n".join(textwrap.wrap(label, width=max(8, cell_w // 6))[:3])
        draw.multiline_text((x, y + h * scale + 2), wrapped, fill="black", spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


__all__ = [
    "DirectionScore",
    "MultimodalReport",
    "image_vae_psnr",
    "save_grid",
    "score_image_to_text",
    "score_text_to_image",
]
