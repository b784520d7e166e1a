"""Image-caption data: the embedded shapes, webdataset shards, HF ``datasets``; diffusers preprocessing.

Design choices
--------------
* **Three sources, one record.** Every dataset yields ``{"image": PIL.Image, "caption": str,
  "index": int}`` (the index keys the per-sample randomness of the multimodal objective):
  ``shapes`` (the embedded procedural set of :mod:`unimodal.shapes`, no download), ``webdataset``
  (tar shards whose samples hold an image entry ``png|jpg|jpeg|webp`` and a ``txt`` caption;
  ``scripts/make_image_shards.py`` writes them from a folder of images with caption files) and
  ``hf`` (a hub name, a local dataset folder or data files read by ``datasets.load_dataset``, with
  ``image_column`` / ``caption_column``). Shards and HF sets are read into memory as map-style
  datasets, so the trainer's seeded, resumable data order applies to all three.
* **Splits.** ``shapes`` draws disjoint streams per split. Shards use ``val_paths`` when given,
  else every example whose index ``i`` has ``i % round(1 / val_fraction) == 0`` goes to validation;
  HF sets use ``hf_val_split`` or the same rule.
* **Preprocessing is diffusers' ``VaeImageProcessor``** (:func:`image_processor`): RGB conversion
  (RGBA and greyscale images are converted, not refused), resize to ``resolution`` x
  ``resolution`` (an image of another size is resized, as diffusers' pipelines do), scaling to
  [-1, 1]. Nothing is done by hand.
* **Fail loudly**: a shard sample without its image or caption, an image that does not decode,
  a caption longer than ``max_caption_tokens`` tokens: one ValueError line naming the sample.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch.utils.data import Dataset

from unimodal import shapes
from unimodal.tokenization import document_ids

IMAGE_SOURCES = ("shapes", "webdataset", "hf")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


@dataclass
class ImageTextDataConfig:
    """Where image-caption pairs come from (YAML ``image_data:`` section)."""

    source: str = "shapes"  # shapes | webdataset | hf
    paths: list[str] = field(default_factory=list)  # webdataset shards (files, globs)
    val_paths: list[str] = field(default_factory=list)  # explicit validation shards
    hf_name: str | None = None  # datasets: hub name, local folder or data files
    hf_split: str = "train"
    hf_val_split: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 32  # images are resized to resolution x resolution
    num_train: int = 20000  # shapes: training examples
    num_val: int = 256  # shapes: validation examples (the test split is separate)
    val_fraction: float = 0.02  # shards / HF without an explicit validation set
    max_caption_tokens: int = 24  # longer captions are an error
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in IMAGE_SOURCES:
            raise ValueError(f"image_data.source={self.source!r} is not one of {', '.join(IMAGE_SOURCES)}")
        if self.source == "webdataset" and not self.paths:
            raise ValueError("image_data.paths is empty for image_data.source='webdataset'")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("image_data.hf_name is required for image_data.source='hf'")
        if self.resolution < 8:
            raise ValueError(f"image_data.resolution={self.resolution} must be >= 8")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"image_data.val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("num_train", "num_val", "max_caption_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"image_data.{name}={getattr(self, name)} must be >= 1")


# ----------------------------------------------------------------------------- datasets


class ShapesDataset(Dataset):
    """``num`` examples of a split of the embedded shapes set (rendered on access)."""

    def __init__(self, num: int, split: str = "train", seed: int = 0, image_size: int = 32) -> None:
        self.num, self.split, self.seed, self.image_size = int(num), split, int(seed), int(image_size)
        shapes.draw_attributes(0, split, seed)  # validates the split name

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num:
            raise IndexError(f"index {i} out of range for {self.num} examples")
        image, text = shapes.example(i, self.split, self.seed, self.image_size)
        return {"image": image, "caption": text, "index": i}


class ImageTextList(Dataset):
    """An in-memory list of ``{"image", "caption"}`` records (shards and HF sets)."""

    def __init__(self, records: list[dict]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {**self.records[i], "index": i}


def _expand(paths: Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        matches = sorted(glob.glob(str(Path(p).expanduser())))
        if not matches:
            raise FileNotFoundError(f"no shard matches {p!r}")
        out += matches
    return out


def read_image_text_shards(paths: Sequence[str]) -> list[dict]:
    """Records of webdataset tar shards (in shard order): each sample's image entry and ``txt`` caption."""
    import webdataset as wds

    records = []
    for shard in _expand(paths):
        dataset = wds.WebDataset(shard, shardshuffle=False, nodesplitter=None, workersplitter=None)
        for sample in dataset:
            key = sample.get("__key__", "?")
            image_keys = [k for k in IMAGE_EXTENSIONS if k in sample]
            if not image_keys:
                raise ValueError(f"{shard}: sample {key!r} has no image entry ({'/'.join(IMAGE_EXTENSIONS)})")
            if "txt" not in sample:
                raise ValueError(f"{shard}: sample {key!r} has no caption entry (txt)")
            try:
                image = Image.open(io.BytesIO(sample[image_keys[0]]))
                image.load()
            except Exception as e:  # PIL raises several types for broken files
                raise ValueError(f"{shard}: sample {key!r} image does not decode ({e})") from e
            records.append({"image": image, "caption": sample["txt"].decode("utf-8").strip()})
    if not records:
        raise ValueError(f"the shards {list(paths)} hold no samples")
    return records


def _hf_records(cfg: ImageTextDataConfig, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - the eval extra
        raise ImportError("image_data.source='hf' needs `pip install datasets`") from e
    path = Path(cfg.hf_name).expanduser()
    if path.is_dir() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}[path.suffix]
        ds = datasets.load_dataset(builder, data_files=str(path), split=split)
    else:
        ds = datasets.load_dataset(cfg.hf_name, split=split)
    for column in (cfg.image_column, cfg.caption_column):
        if column not in ds.column_names:
            raise ValueError(
                f"HF dataset {cfg.hf_name!r} has no column {column!r} (columns: {ds.column_names})"
            )
    records = []
    for row in ds:
        image = row[cfg.image_column]
        if not isinstance(image, Image.Image):
            image = Image.open(image if isinstance(image, str) else io.BytesIO(image["bytes"]))
        records.append({"image": image, "caption": str(row[cfg.caption_column]).strip()})
    return records


def _split_every(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    every = max(2, round(1 / fraction))
    return [r for i, r in enumerate(records) if i % every], [
        r for i, r in enumerate(records) if i % every == 0
    ]


def build_image_text_datasets(cfg: ImageTextDataConfig) -> tuple[Dataset, Dataset]:
    """(train, validation) datasets of ``{"image", "caption"}`` records for ``cfg``."""
    if cfg.source == "shapes":
        return (
            ShapesDataset(cfg.num_train, "train", cfg.seed, cfg.resolution),
            ShapesDataset(cfg.num_val, "val", cfg.seed, cfg.resolution),
        )
    if cfg.source == "webdataset":
        records = read_image_text_shards(cfg.paths)
        if cfg.val_paths:
            return ImageTextList(records), ImageTextList(read_image_text_shards(cfg.val_paths))
        train, val = _split_every(records, cfg.val_fraction)
        return ImageTextList(train), ImageTextList(val)
    records = _hf_records(cfg, cfg.hf_split)
    if cfg.hf_val_split:
        return ImageTextList(records), ImageTextList(_hf_records(cfg, cfg.hf_val_split))
    train, val = _split_every(records, cfg.val_fraction)
    return ImageTextList(train), ImageTextList(val)


# ----------------------------------------------------------------------------- preprocessing


def image_processor(vae_scale_factor: int = 1) -> VaeImageProcessor:
    """diffusers' processor: RGB conversion, resize, [0, 1] -> [-1, 1] (and back for outputs)."""
    return VaeImageProcessor(
        vae_scale_factor=vae_scale_factor, do_resize=True, do_normalize=True, do_convert_rgb=True
    )


class ImageTextCollator:
    """Records -> a batch: ``images`` (B, 3, R, R) in [-1, 1] and, with a tokenizer, caption ids.

    ``input_ids`` (B, L) right-padded with PAD, ``valid`` (B, L); captions are tokenized without
    special tokens plus EOS (a caption is a whole document) and must fit ``max_caption_tokens``."""

    def __init__(self, resolution: int, tokenizer=None, max_caption_tokens: int = 24) -> None:
        self.resolution, self.tokenizer, self.max_tokens = int(resolution), tokenizer, int(max_caption_tokens)
        self.processor = image_processor()

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any size or mode) -> (B, 3, R, R) float in [-1, 1]."""
        return self.processor.preprocess(list(images), height=self.resolution, width=self.resolution)

    def caption_ids(self, captions: Sequence[str]) -> list[list[int]]:
        out = []
        for text, ids in zip(captions, document_ids(self.tokenizer, list(captions))):
            if len(ids) > self.max_tokens:
                raise ValueError(
                    f"caption {text[:40]!r} is {len(ids)} tokens (EOS included), more than "
                    f"max_caption_tokens={self.max_tokens}"
                )
            out.append(ids)
        return out

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = {"images": self.images([r["image"] for r in records])}
        if all("index" in r for r in records):  # per-sample randomness keys (see prior.training.multimodal)
            batch["keys"] = torch.tensor([int(r["index"]) for r in records])
        if self.tokenizer is not None:
            ids = self.caption_ids([r["caption"] for r in records])
            length = max(len(x) for x in ids)
            pad = self.tokenizer.pad_token_id
            batch["input_ids"] = torch.tensor([x + [pad] * (length - len(x)) for x in ids])
            batch["valid"] = torch.tensor([[True] * len(x) + [False] * (length - len(x)) for x in ids])
        return batch


__all__ = [
    "IMAGE_SOURCES",
    "ImageTextCollator",
    "ImageTextDataConfig",
    "ImageTextList",
    "ShapesDataset",
    "build_image_text_datasets",
    "image_processor",
    "read_image_text_shards",
]
