"""Write webdataset tar shards from text files, for ``data.source: webdataset``.

Each document becomes one sample ``{"__key__": "000000042", "txt": <utf-8 text>}``. Inputs ending in
``.jsonl`` are read with the ``jsonl`` loader (``--text-field``); everything else is plain text, one
document per blank-line-separated paragraph or per file (``--unit``), exactly as ``data.source: text``
reads it. Documents keep their input order, so shards are reproducible.

    python scripts/make_shards.py corpus/*.txt --output shards/train-%06d.tar --maxcount 10000
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import webdataset as wds

from unimodal.text_data import TEXT_UNITS, read_jsonl_documents, read_text_documents


def read_inputs(inputs: Sequence[str], unit: str = "paragraph", text_field: str = "text") -> list[str]:
    """Documents of ``inputs`` in order (``.jsonl`` files by field, the rest as plain text)."""
    docs: list[str] = []
    for path in inputs:
        if path.endswith(".jsonl"):
            docs += read_jsonl_documents([path], text_field)
        else:
            docs += read_text_documents([path], unit)
    return docs


def write_shards(
    inputs: Sequence[str],
    pattern: str,
    maxcount: int = 10000,
    unit: str = "paragraph",
    text_field: str = "text",
) -> list[str]:
    """Write the documents of ``inputs`` to shards named ``pattern % i``; returns the shard paths."""
    if "%" not in pattern:
        raise ValueError(f"output pattern {pattern!r} needs a shard number field such as %06d")
    if maxcount < 1:
        raise ValueError(f"maxcount={maxcount} must be >= 1")
    docs = read_inputs(inputs, unit, text_field)
    if not docs:
        raise ValueError(f"no documents found in {', '.join(inputs)}")
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for i, doc in enumerate(docs):
            sink.write({"__key__": f"{i:09d}", "txt": doc.encode("utf-8")})
        num_shards = sink.shard
    return [pattern % i for i in range(num_shards)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="text files, folders, globs or .jsonl files")
    parser.add_argument("--output", required=True, help="shard name pattern, e.g. shards/train-%%06d.tar")
    parser.add_argument("--maxcount", type=int, default=10000, help="documents per shard")
    parser.add_argument("--unit", choices=TEXT_UNITS, default="paragraph", help="document unit of text files")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    args = parser.parse_args(argv)
    shards = write_shards(args.inputs, args.output, args.maxcount, args.unit, args.text_field)
    print(f"wrote {len(shards)} shard(s): {shards[0]} .. {shards[-1]}")


if __name__ == "__main__":
    main()
