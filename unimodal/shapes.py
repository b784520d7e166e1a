"""Embedded image-caption data: procedurally drawn shapes whose every stated attribute a program checks.

No download is needed to train or test the unified text-image path: :func:`render` draws a
``size x size`` RGB image (default 32 x 32) of one filled shape on a plain background from
:class:`ShapeAttributes`, and :func:`caption` describes it in one of a few English phrasings.

Design choices
--------------
* **Four attributes, all stated, all checkable.** ``shape`` (circle / square / triangle),
  ``colour`` (6 well-separated RGB values), ``size`` (small / large) and ``where`` (left, right,
  top, bottom, center), plus a +-2 px jitter of the centre so no two renders are alike. Every
  caption names all four (``"a large red circle on the left"``).
* **The checker is a program, not a model** (:func:`check_image`): foreground pixels are those far
  from the background colour; ``colour`` is the palette entry nearest their mean, ``where`` the
  region of their bounding-box centre, ``size`` their area against a threshold, ``shape`` their *fill ratio*
  (foreground area / bounding-box area: ~1.0 square, ~0.79 circle, ~0.5 triangle). Its accuracy on
  real renders is measured by :func:`checker_accuracy` (1.0 on the test split) and reported next to
  every generated-image score.
* **Deterministic splits.** Example ``i`` of split ``s`` is drawn from ``numpy.random.default_rng
  ((seed, split_id, i))``: the splits are disjoint streams of draws, reproducible on any machine,
  and an index can be read without reading the ones before it.
* :func:`parse_caption` reads the attributes named in a generated caption (the first word of each
  vocabulary), so image->text accuracy is a string check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SIZES = {"small": 5.0, "large": 9.0}  # radius in pixels at 32 x 32 (scaled with the image size)
WHERE = {  # centre as fractions of the image side (x, y)
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
WHERE_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PHRASINGS = (
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "a {colour} {shape}, {size}, {where}",
    "{where}, a {size} {colour} {shape}",
)
BACKGROUND = (30, 30, 30)
SPLITS = {"train": 0, "val": 1, "test": 2}
FILL_THRESHOLDS = (0.64, 0.9)  # triangle < 0.64 <= circle < 0.9 <= square (fill ratio)
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel is foreground


@dataclass(frozen=True)
class ShapeAttributes:
    """What one image shows (and its caption states); ``dx, dy`` is the centre jitter in pixels."""

    shape: str
    colour: str
    size: str
    where: str
    dx: int = 0
    dy: int = 0
    phrasing: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("where", WHERE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {sorted(allowed)}")
        if not 0 <= self.phrasing < len(PHRASINGS):
            raise ValueError(f"phrasing={self.phrasing} must be in [0, {len(PHRASINGS)})")


def draw_attributes(index: int, split: str = "train", seed: int = 0) -> ShapeAttributes:
    """The attributes of example ``index`` of ``split`` (a pure function of its arguments)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLITS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng((seed, SPLITS[split], index))
    pick = lambda options: list(options)[int(rng.integers(len(options)))]  # noqa: E731
    shape, colour, size, where = pick(SHAPES), pick(COLOURS), pick(SIZES), pick(WHERE)
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    return ShapeAttributes(shape, colour, size, where, dx, dy, int(rng.integers(len(PHRASINGS))))


def _shape_mask(attrs: ShapeAttributes, image_size: int) -> np.ndarray:
    """(S, S) bool: the pixels the shape covers (pixel centres inside the figure)."""
    scale = image_size / 32.0
    fx, fy = WHERE[attrs.where]
    cx, cy = fx * image_size + attrs.dx * scale, fy * image_size + attrs.dy * scale
    r = SIZES[attrs.size] * scale
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5
    if attrs.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if attrs.shape == "square":
        half = 0.85 * r
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    # an upward isosceles triangle: apex (cx, cy - r), base y = cy + r from cx - r to cx + r
    inside_y = (y >= cy - r) & (y <= cy + r)
    half_width = (y - (cy - r)) / 2.0  # grows from 0 at the apex to r at the base
    return inside_y & (np.abs(x - cx) <= half_width)


def render(attrs: ShapeAttributes, image_size: int = 32) -> Image.Image:
    """An RGB PIL image of ``attrs``: the filled shape on the plain background."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    pixels[_shape_mask(attrs, image_size)] = COLOURS[attrs.colour]
    return Image.fromarray(pixels, mode="RGB")


def caption(attrs: ShapeAttributes) -> str:
    """The caption of ``attrs`` in its phrasing (all four attributes stated)."""
    return PHRASINGS[attrs.phrasing].format(
        size=attrs.size, colour=attrs.colour, shape=attrs.shape, where=WHERE_PHRASE[attrs.where]
    )


def example(index: int, split: str = "train", seed: int = 0, image_size: int = 32) -> tuple[Image.Image, str]:
    """(image, caption) of example ``index`` of ``split``."""
    attrs = draw_attributes(index, split, seed)
    return render(attrs, image_size), caption(attrs)


# ----------------------------------------------------------------------------- checking


@dataclass
class ImageCheck:
    """What :func:`check_image` reads off an image (None where no foreground was found)."""

    shape: str | None
    colour: str | None
    size: str | None
    where: str | None
    fill_ratio: float
    area: int

    def as_dict(self) -> dict:
        return asdict(self)


def check_image(image: Image.Image | np.ndarray) -> ImageCheck:
    """Read shape, colour, size and position off an RGB image (PIL, or uint8 array (H, W, 3))."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {pixels.shape}")
    side = pixels.shape[0]
    fg = np.linalg.norm(pixels - np.asarray(BACKGROUND, dtype=np.float64), axis=-1) > FOREGROUND_DISTANCE
    area = int(fg.sum())
    if area < 3:
        return ImageCheck(None, None, None, None, 0.0, area)
    ys, xs = np.nonzero(fg)
    mean = pixels[fg].mean(0)
    colour = min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c]) - mean) ** 2)))
    bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = area / bbox
    lo, hi = FILL_THRESHOLDS
    shape = "triangle" if fill < lo else "circle" if fill < hi else "square"
    scale = (side / 32.0) ** 2
    size = "large" if area > 120 * scale else "small"  # small ~ 50-80 px, large ~ 160-250 px at 32 x 32
    cx, cy = (xs.min() + xs.max() + 1) / (2 * side), (ys.min() + ys.max() + 1) / (2 * side)  # bbox centre
    where = min(WHERE, key=lambda w: (WHERE[w][0] - cx) ** 2 + (WHERE[w][1] - cy) ** 2)
    return ImageCheck(shape, colour, size, where, float(fill), area)


def parse_caption(text: str) -> dict[str, str | None]:
    """The shape, colour, size and position words a caption names (the first of each kind; None if absent)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    found: dict[str, str | None] = {"shape": None, "colour": None, "size": None, "where": None}
    phrases = {w: p.split()[-1] for w, p in WHERE_PHRASE.items()}  # "on the left" -> "left"
    for word in words:
        for key, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
            if found[key] is None and word in vocab:
                found[key] = word
        if found["where"] is None:
            for where, last in phrases.items():
                if word == last:
                    found["where"] = where
    return found


def checker_accuracy(
    num: int = 500, split: str = "test", seed: int = 0, image_size: int = 32
) -> dict[str, float]:
    """Accuracy of :func:`check_image` per attribute on ``num`` real renders of ``split``."""
    hits = {"shape": 0, "colour": 0, "size": 0, "where": 0}
    for i in range(num):
        attrs = draw_attributes(i, split, seed)
        read = check_image(render(attrs, image_size))
        for key in hits:
            hits[key] += int(getattr(read, key) == getattr(attrs, key))
    return {key: value / num for key, value in hits.items()}


CHANCE = {
    "shape": 1 / len(SHAPES),
    "colour": 1 / len(COLOURS),
    "size": 1 / len(SIZES),
    "where": 1 / len(WHERE),
}

__all__ = [
    "CHANCE",
    "COLOURS",
    "SIZES",
    "WHERE",
    "ImageCheck",
    "SHAPES",
    "ShapeAttributes",
    "caption",
    "check_image",
    "checker_accuracy",
    "draw_attributes",
    "example",
    "parse_caption",
    "render",
]
