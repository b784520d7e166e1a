"""Write webdataset tar shards of image + caption pairs, for ``image_data.source: webdataset``.

Every image file (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) in the folder with a caption file of the
same stem (``cat.png`` + ``cat.txt``) becomes one sample ``{"__key__": stem, <ext>: bytes, "txt":
caption}``; files are taken in sorted order, so shards are reproducible. An image without its
caption file is an error naming it.

    python scripts/make_image_shards.py my_images/ --output shards/train-%06d.tar --maxcount 5000
    python scripts/make_image_shards.py --shapes 2000 --output shards/shapes-%06d.tar   # embedded set
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import webdataset as wds

from unimodal.image_text_data import IMAGE_EXTENSIONS
from unimodal.shapes import example


def folder_samples(folder: str | Path) -> list[dict]:
    """Samples of ``folder``: each image with the text of its ``.txt`` caption file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    samples = []
    for path in sorted(folder.iterdir()):
        ext = path.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS:
            continue
        text = path.with_suffix(".txt")
        if not text.is_file():
            raise ValueError(f"{path} has no caption file {text.name}")
        samples.append({"__key__": path.stem, ext: path.read_bytes(), "txt": text.read_text().strip()})
    if not samples:
        raise ValueError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in {folder}")
    return samples


def shapes_samples(num: int, split: str = "train") -> list[dict]:
    """``num`` samples of the embedded shapes set, as PNG bytes + caption."""
    samples = []
    for i in range(num):
        image, text = example(i, split)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        samples.append({"__key__": f"{i:09d}", "png": buffer.getvalue(), "txt": text})
    return samples


def write_shards(samples: list[dict], pattern: str, maxcount: int = 10000) -> list[str]:
    """Write ``samples`` to shards named ``pattern % i``; returns the shard paths."""
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return sorted(str(p) for p in Path(pattern).parent.glob("*.tar"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", help="folder of images with caption files")
    p.add_argument("--shapes", type=int, default=None, help="write N embedded shapes examples instead")
    p.add_argument("--output", required=True, help="shard name pattern, e.g. shards/train-%%06d.tar")
    p.add_argument("--maxcount", type=int, default=10000)
    args = p.parse_args(argv)
    if (args.folder is None) == (args.shapes is None):
        p.error("give a folder or --shapes N")
    samples = folder_samples(args.folder) if args.folder else shapes_samples(args.shapes)
    print("\n".join(write_shards(samples, args.output, args.maxcount)))


if __name__ == "__main__":
    main()
