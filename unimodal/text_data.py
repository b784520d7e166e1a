"""Text corpora for the Text VAE and the prior: the embedded corpus, user-data loaders and packing.

Design choices
--------------
- **Embedded corpus** (``source: embedded``, the default): real English prose that ships with every
  Python install, so tiny configs train offline with no download. Two parts, both read without
  importing anything with side effects:
  1. the language reference, ``pydoc_data.topics.topics`` (one document per topic);
  2. module, class and function docstrings of the standard library, read by parsing the source
     files with ``ast`` (``ast.get_docstring``); ``test``/``tests``/``idle_test``/``site-packages``
     folders are skipped and files are visited in sorted relative-path order.
  Cleaning works per paragraph (blank-line separated): indented paragraphs (code, literal blocks,
  grammar rules, tables) are dropped, a doctest (``>>>`` / ``...``) ends its paragraph, RST heading
  underlines and roles (``:func:`x``` -> ``x``) are removed, whitespace inside a paragraph collapses
  to single spaces, paragraphs with fewer than 4 words or under 80% letters/spaces are dropped.
  Kept paragraphs are joined by ``"\\n"``; documents under 40 characters are dropped. Exact
  duplicates (same cleaned text) are removed, keeping the first. The result depends only on the
  Python version's stdlib sources: the same on every machine with the same Python version.
  Python 3.11.7: 6,899 documents, 1,694,716 characters; train/val (3%) = 6,702 / 197 documents.
  A 4096-entry byte-level BPE trained on the train split (~1 s) encodes it in 421,971 tokens
  (411,608 train, ~4.0 characters per token): 3,268 train and 82 validation rows of 128 tokens.
  Building takes ~4 s on an idle CPU core (``ast.parse`` of ~730 files, 12 MB, dominates);
  tokenizing the whole corpus takes ~1 s. The corpus is memoised per process, and cached as JSON
  only inside an explicit ``cache_dir``.
- **Split**: a document goes to validation when the first 8 bytes of the SHA-1 of its text, read as
  a fraction of 2**64, fall below ``val_fraction``. Deterministic, order-independent, disjoint, and
  stable when documents are added. Sources with an explicit validation set (``val_paths``,
  ``hf_val_split``) are not split.
- **User data** (``source``): ``text`` = UTF-8 files, one document per blank-line-separated
  paragraph (``text_unit: paragraph``, the default) or one per file (``text_unit: file``);
  ``jsonl`` = one JSON object per line, the document in ``text_field``; ``hf`` = ``datasets.
  load_dataset`` on a hub name, a local dataset folder or a single data file (json/jsonl/csv/
  parquet/txt), column ``text_field``; ``webdataset`` = tar shards (local paths, globs, brace
  patterns or URLs), the document in each sample's ``.txt`` entry (``scripts/make_shards.py``
  writes such shards). Folders in ``paths`` expand to their matching files, sorted. User text is not
  cleaned; only whitespace-only documents are skipped. ``shapes`` = the captions of the embedded
  image-caption set's training split (:mod:`unimodal.shapes`, 20,000 captions): the Text VAE of the
  image-text path.
- **Packing**: every document is followed by EOS, all are concatenated and cut into rows of
  ``seq_len`` tokens; the tail remainder is dropped. Rows are full (no padding), so the padded-batch
  convention of the trainer is met with an all-True ``valid`` mask. The datasets are map-style and
  hold the whole packed corpus in memory (fine up to ~10^8 tokens); web-scale data would need a
  streaming ``IterableDataset`` instead.
- Tokenization goes through the fast tokenizer's Rust backend in batches, without special tokens.
- Errors are one line: a missing path raises FileNotFoundError naming it; an empty corpus raises
  ValueError ``no documents found in ...``.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

from unimodal.tokenization import check_special_tokens

SOURCES = ("embedded", "text", "jsonl", "hf", "webdataset", "shapes")
SHAPES_CAPTIONS = 20000  # data.source=shapes: captions of the embedded image set's training split
TEXT_UNITS = ("paragraph", "file")
EMBEDDED_CORPUS_VERSION = 1  # bump when the extraction or cleaning rules change (invalidates caches)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_TOKENIZE_BATCH = 1024


@dataclass
class DataConfig:
    """Where the text comes from and how it is packed. The ``data:`` YAML section mirrors it."""

    source: str = "embedded"  # embedded | text | jsonl | hf | webdataset | shapes (image captions)
    paths: list[str] = field(default_factory=list)  # files, folders, globs (text/jsonl/webdataset)
    val_paths: list[str] = field(default_factory=list)  # explicit validation files; else hash split
    text_field: str = "text"  # jsonl key / HF column
    text_unit: str = "paragraph"  # text files: paragraph | file
    hf_name: str | None = None  # hub name, local dataset folder or data file
    hf_config: str | None = None
    hf_split: str = "train"
    hf_val_split: str | None = None  # explicit validation split; else hash split
    seq_len: int = 128
    val_fraction: float = 0.03
    max_documents: int | None = None  # keep only the first N documents (quick runs)
    cache_dir: str | None = None  # embedded-corpus JSON cache + HF datasets cache (None: HF default)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.text_unit not in TEXT_UNITS:
            raise ValueError(f"data.text_unit={self.text_unit!r} is not one of {', '.join(TEXT_UNITS)}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents={self.max_documents} must be >= 1")
        if self.source in ("text", "jsonl", "webdataset") and not self.paths:
            raise ValueError(f"data.paths is empty for data.source={self.source!r}")
        if self.source in ("embedded", "hf", "shapes") and (self.paths or self.val_paths):
            where = f"data.source={self.source!r}"
            raise ValueError(f"data.paths / data.val_paths are set but {where} reads no files")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name is required for data.source='hf'")


# ------------------------------------------------------------------------------------- embedded corpus

_ROLE = re.compile(r":[A-Za-z]+(?::[A-Za-z]+)?:`[~!]?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`x <y>` -> x
_UNDERLINE = re.compile(r"^\s*([=\-*~^#+\"'`.])\1{2,}\s*$")  # RST heading underline
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_WHITESPACE = re.compile(r"\s+")


def clean_document(text: str, min_words: int = 4, min_chars: int = 40) -> str | None:
    """Keep the prose paragraphs of a docstring / reference topic; None if nothing worth keeping."""
    kept = []
    for para in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n").expandtabs(8)):
        if not para.strip() or para[0] in " \t\n":  # indented: code, literal block, grammar, table
            continue
        lines = []
        for line in para.split("\n"):
            stripped = line.strip()
            if stripped.startswith((">>>", "...")):  # a doctest ends the paragraph
                break
            if not _UNDERLINE.match(line):
                lines.append(stripped)
        para = _WHITESPACE.sub(" ", _ROLE.sub(r"\1", " ".join(lines)).replace("``", '"')).strip()
        if para.endswith("::"):  # RST literal-block marker
            para = para[:-1]
        letters = sum(c.isalpha() or c == " " for c in para)
        if len(para.split()) >= min_words and letters >= 0.8 * len(para):
            kept.append(para)
    doc = "\n".join(kept)
    return doc if len(doc) >= min_chars else None


def _stdlib_sources() -> list[Path]:
    """Standard-library ``.py`` files outside test folders, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: bytes, filename: str) -> Iterator[str]:
    """Module, class and function docstrings of one source file (parsed, never imported)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source, filename=filename)
    except (SyntaxError, ValueError):  # e.g. lib2to3 test data written for Python 2
        return
    stack: list[ast.AST] = [tree]
    while stack:  # depth-first over statements only: defs never sit inside expressions
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        for name in ("cases", "handlers", "finalbody", "orelse", "body"):  # reversed: pop() visits body first
            stack += reversed(getattr(node, name, None) or [])


def _raw_embedded_texts() -> Iterator[str]:
    from pydoc_data.topics import topics  # a plain dict literal: no side effects

    for key in sorted(topics):
        yield topics[key]
    for path in _stdlib_sources():
        yield from _docstrings(path.read_bytes(), str(path))


def deduplicate(texts: Sequence[str]) -> list[str]:
    """Drop exact duplicates, keeping the first occurrence."""
    seen, out = set(), []
    for text in texts:
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if digest not in seen:
            seen.add(digest)
            out.append(text)
    return out


@functools.lru_cache(maxsize=1)
def _embedded_documents_memo() -> tuple[str, ...]:
    cleaned = (clean_document(t) for t in _raw_embedded_texts())
    return tuple(deduplicate([doc for doc in cleaned if doc is not None]))


def embedded_documents(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """All cleaned, de-duplicated documents of the embedded corpus, in a fixed order."""
    if cache_dir is None:
        return list(_embedded_documents_memo())
    version = ".".join(map(str, sys.version_info[:3]))
    cache = Path(cache_dir) / f"embedded-corpus-py{version}-v{EMBEDDED_CORPUS_VERSION}.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    docs = list(_embedded_documents_memo())
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, cache)  # atomic: concurrent processes never read a partial file
    return docs


def split_documents(texts: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic hash split into (train, val); a document's side depends only on its text."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    threshold = int(val_fraction * 2**64)
    train, val = [], []
    for text in texts:
        h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
        (val if h < threshold else train).append(text)
    return train, val


def embedded_corpus(
    val_fraction: float = 0.03, cache_dir: str | os.PathLike | None = None
) -> tuple[list[str], list[str]]:
    """(train, val) texts of the embedded Python-docs corpus."""
    return split_documents(embedded_documents(cache_dir), val_fraction)


# ------------------------------------------------------------------------------------------ user data


def resolve_paths(paths: Sequence[str], suffixes: tuple[str, ...]) -> list[str]:
    """Expand folders (files with ``suffixes``, recursive, sorted) and globs; missing -> FileNotFoundError."""
    out: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if any(c in p for c in "*?["):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise FileNotFoundError(f"data path not found: {p} (no file matches)")
            out += matches
        elif path.is_dir():
            out += sorted(str(f) for f in path.rglob("*") if f.is_file() and f.name.endswith(suffixes))
        elif path.is_file():
            out.append(str(path))
        else:
            raise FileNotFoundError(f"data path not found: {p}")
    return out


def _read_utf8(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from e


def read_text_documents(paths: Sequence[str], unit: str = "paragraph") -> list[str]:
    """Documents of plain-text files: one per blank-line-separated paragraph, or one per file."""
    if unit not in TEXT_UNITS:
        raise ValueError(f"text_unit={unit!r} is not one of {', '.join(TEXT_UNITS)}")
    docs = []
    for path in resolve_paths(paths, (".txt",)):
        text = _read_utf8(path)
        parts = _PARAGRAPH_BREAK.split(text) if unit == "paragraph" else [text]
        docs += [part.strip() for part in parts if part.strip()]
    return docs


def iter_jsonl(path: str | os.PathLike, required: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file; each object must hold
    the field ``required``. A bad line raises one ValueError naming ``path:line``."""
    for lineno, line in enumerate(_read_utf8(str(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or required not in record:
            raise ValueError(f"{path}:{lineno}: no {required!r} field")
        yield lineno, record


def read_jsonl_documents(paths: Sequence[str], text_field: str = "text") -> list[str]:
    """Documents of JSON-lines files: the string in ``text_field`` of every object."""
    docs = []
    for path in resolve_paths(paths, (".jsonl",)):
        for lineno, record in iter_jsonl(path, text_field):
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: {text_field!r} is {type(text).__name__}, not a string")
            if text.strip():
                docs.append(text)
    return docs


_HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def read_hf_documents(
    name: str,
    split: str = "train",
    text_field: str = "text",
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> list[str]:
    """Documents of a ``datasets`` dataset: a hub name, a local dataset folder or one data file."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data.source='hf' needs the `datasets` package: pip install datasets") from e
    path = Path(name).expanduser()
    if path.is_file():
        builder = _HF_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"cannot load {name} with datasets: unknown suffix {path.suffix!r}")
        ds = datasets.load_dataset(builder, data_files=str(path), split=split, cache_dir=cache_dir)
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), config_name, split=split, cache_dir=cache_dir)
    elif name.startswith((".", "/", "~")) or path.suffix in _HF_FILE_BUILDERS:
        raise FileNotFoundError(f"data path not found: {name}")
    else:
        ds = datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_field!r} (columns: {ds.column_names})")
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def read_webdataset_documents(urls: Sequence[str]) -> list[str]:
    """Documents of webdataset tar shards: the UTF-8 ``.txt`` entry of every sample, in shard order."""
    import webdataset as wds
    from braceexpand import braceexpand

    shards: list[str] = []
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            shards += list(braceexpand(url))
        else:
            shards += resolve_paths(list(braceexpand(url)), (".tar",))
    # Every process reads every shard (the corpus is materialised; batches are split later).
    dataset = wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None)
    docs = []
    for sample in dataset:
        if "txt" not in sample:
            raise ValueError(f"sample {sample['__key__']!r} in {sample['__url__']} has no .txt entry")
        text = sample["txt"].decode("utf-8")
        if text.strip():
            docs.append(text)
    return docs


def _read_source(cfg: DataConfig, paths: Sequence[str], hf_split: str) -> list[str]:
    if cfg.source == "embedded":
        return embedded_documents(cfg.cache_dir)
    if cfg.source == "shapes":  # the captions of unimodal.shapes (a Text VAE for the image-text path)
        from unimodal.shapes import caption, draw_attributes

        return [caption(draw_attributes(i, "train")) for i in range(SHAPES_CAPTIONS)]
    if cfg.source == "text":
        return read_text_documents(paths, cfg.text_unit)
    if cfg.source == "jsonl":
        return read_jsonl_documents(paths, cfg.text_field)
    if cfg.source == "hf":
        return read_hf_documents(cfg.hf_name, hf_split, cfg.text_field, cfg.hf_config, cfg.cache_dir)
    return read_webdataset_documents(paths)


def load_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train, val) document texts for ``cfg``; ValueError ``no documents found in ...`` if empty."""
    where = cfg.hf_name if cfg.source == "hf" else ", ".join(cfg.paths) or "the embedded corpus"
    docs = _read_source(cfg, cfg.paths, cfg.hf_split)
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise ValueError(f"no documents found in {where}")
    if cfg.val_paths or cfg.hf_val_split:
        val = _read_source(cfg, cfg.val_paths, cfg.hf_val_split or cfg.hf_split)
        if not val:
            raise ValueError(f"no documents found in {', '.join(cfg.val_paths) or cfg.hf_val_split}")
        return docs, val
    return split_documents(docs, cfg.val_fraction)


# -------------------------------------------------------------------------------- tokenizing + packing


def tokenize_documents(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    """Token ids of each text, without special tokens, through the Rust backend in batches."""
    backend = tokenizer.backend_tokenizer
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = list(texts[start : start + _TOKENIZE_BATCH])
        ids += [enc.ids for enc in backend.encode_batch(batch, add_special_tokens=False)]
    return ids


def pack_documents(token_id_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``eos_id``, into rows of ``seq_len``: LongTensor (N, seq_len).

    The tail that does not fill a row is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    total = sum(len(ids) + 1 for ids in token_id_lists)
    flat = np.empty(total, dtype=np.int64)  # (T,)
    pos = 0
    for ids in token_id_lists:
        flat[pos : pos + len(ids)] = ids
        pos += len(ids)
        flat[pos] = eos_id
        pos += 1
    rows = total // seq_len
    return torch.from_numpy(flat[: rows * seq_len].reshape(rows, seq_len).copy())  # (N, seq_len)


class PackedTextDataset(Dataset):
    """Packed rows of token ids; item ``i`` is ``{"input_ids": LongTensor (seq_len,)}``."""

    def __init__(self, rows: torch.Tensor, num_documents: int = 0) -> None:
        if rows.dim() != 2 or rows.dtype != torch.long:
            raise ValueError(f"rows must be a 2-D LongTensor, got {tuple(rows.shape)} {rows.dtype}")
        self.rows = rows  # (N, seq_len)
        self.num_documents = num_documents

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.rows.numel()

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index]}


def build_text_datasets(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerFast
) -> tuple[PackedTextDataset, PackedTextDataset]:
    """Load, split, tokenize and pack ``data_cfg``'s corpus: (train, val) datasets.

    The validation set may be empty only when ``val_fraction == 0`` and no explicit validation data is
    given; a split too small to fill one row otherwise raises ValueError.
    """
    check_special_tokens(tokenizer)
    train_texts, val_texts = load_documents(data_cfg)
    datasets_ = []
    for name, texts in (("train", train_texts), ("validation", val_texts)):
        ids = tokenize_documents(texts, tokenizer)
        rows = pack_documents(ids, data_cfg.seq_len, tokenizer.eos_token_id)
        wants_rows = name == "train" or bool(texts) or data_cfg.val_fraction > 0
        if len(rows) == 0 and wants_rows:
            n = sum(len(x) + 1 for x in ids)
            raise ValueError(
                f"{name} split has {n} tokens ({len(texts)} documents), fewer than seq_len={data_cfg.seq_len}"
            )
        datasets_.append(PackedTextDataset(rows, num_documents=len(texts)))
    return datasets_[0], datasets_[1]


__all__ = [
    "DataConfig",
    "PackedTextDataset",
    "build_text_datasets",
    "clean_document",
    "deduplicate",
    "embedded_corpus",
    "embedded_documents",
    "iter_jsonl",
    "load_documents",
    "pack_documents",
    "read_hf_documents",
    "read_jsonl_documents",
    "read_text_documents",
    "read_webdataset_documents",
    "resolve_paths",
    "split_documents",
    "tokenize_documents",
]
