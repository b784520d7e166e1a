"""Text data layer: embedded corpus, loaders (text/jsonl/HF/webdataset), packing, datasets, errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from unimodal import text_data
from unimodal.text_data import (
    DataConfig,
    PackedTextDataset,
    build_text_datasets,
    clean_document,
    embedded_corpus,
    embedded_documents,
    load_documents,
    pack_documents,
    split_documents,
    tokenize_documents,
)
from unimodal.tokenization import EOS_TOKEN, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _load_make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus():
    start = time.perf_counter()
    train, val = embedded_corpus()
    return train, val, time.perf_counter() - start


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe_tokenizer(corpus[0][:300], vocab_size=512)


def _digest(texts):
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()


# ------------------------------------------------------------------------------------- embedded corpus


def test_embedded_corpus_nonempty_disjoint_and_reported(corpus):
    train, val, seconds = corpus
    docs = train + val
    chars = sum(map(len, docs))
    split = f"train/val {len(train)}/{len(val)}"
    print(f"\nembedded corpus: {len(docs)} docs, {chars} chars, {split}, built in {seconds:.1f}s")
    assert len(docs) > 3000 and chars > 1_000_000
    assert 0.01 < len(val) / len(docs) < 0.06
    assert not set(train) & set(val)
    assert len(set(docs)) == len(docs)  # de-duplicated
    assert all(len(d) >= 40 and not re.search(r"^\s*>>>", d, re.M) for d in docs)  # no doctest lines
    assert any("lambda" in d.lower() for d in docs)  # the language reference is in


def test_embedded_corpus_is_deterministic(corpus, tmp_path):
    train, val, _ = corpus
    rebuilt = list(text_data._embedded_documents_memo.__wrapped__())  # a fresh parse, no memo
    assert _digest(rebuilt) == _digest(embedded_documents())
    assert split_documents(rebuilt, 0.03) == (train, val)
    # the explicit cache round-trips and is the only file written
    assert embedded_documents(cache_dir=tmp_path) == rebuilt
    (cache,) = tmp_path.iterdir()
    assert cache.name.startswith("embedded-corpus-py") and embedded_documents(cache_dir=tmp_path) == rebuilt


def test_split_is_order_independent():
    docs = [f"document number {i}" for i in range(2000)]
    train, val = split_documents(docs, 0.05)
    train_r, val_r = split_documents(docs[::-1], 0.05)
    assert set(val) == set(val_r) and set(train) == set(train_r)
    assert 40 < len(val) < 160 and len(train) + len(val) == 2000
    assert split_documents(docs, 0.0) == (docs, [])


def test_clean_document_keeps_prose_only():
    raw = (
        "Summary line of the function here.\n\n"
        "Heading\n=======\n\n"
        "A longer paragraph that uses :func:`len` and ``code``\nover two lines::\n\n"
        "    indented_code(block) + 1\n\n"
        "Example of use\n>>> f(1)\n2\n\n"
        "x = 1; y = {}[0]"
    )
    assert clean_document(raw) == (
        'Summary line of the function here.\nA longer paragraph that uses len and "code" over two lines:'
    )
    assert clean_document("Too short.") is None


# ------------------------------------------------------------------------------------------- packing


def test_pack_documents_shapes_and_eos():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]  # 3 + 1 + 1 + 1 + 5 + 1 = 12 tokens with EOS
    rows = pack_documents(docs, seq_len=5, eos_id=0)
    assert rows.dtype == torch.long and rows.shape == (2, 5)
    assert rows.tolist() == [[5, 6, 7, 0, 8], [0, 9, 10, 11, 12]]  # tail [13, 0] dropped
    assert pack_documents(docs, seq_len=4, eos_id=0).flatten().tolist() == [
        5,
        6,
        7,
        0,
        8,
        0,
        9,
        10,
        11,
        12,
        13,
        0,
    ]
    assert pack_documents([[1, 2]], seq_len=8, eos_id=0).shape == (0, 8)


def test_packed_dataset_items(tokenizer, corpus):
    ids = tokenize_documents(corpus[1], tokenizer)
    assert ids[0] == tokenizer(corpus[1][0])["input_ids"]  # batched backend == per-text call
    rows = pack_documents(ids, seq_len=64, eos_id=tokenizer.eos_token_id)
    ds = PackedTextDataset(rows, num_documents=len(ids))
    assert len(ds) == sum(len(x) + 1 for x in ids) // 64 and ds.seq_len == 64
    item = ds[3]
    assert (
        set(item) == {"input_ids"}
        and item["input_ids"].shape == (64,)
        and item["input_ids"].dtype == torch.long
    )
    assert (rows == tokenizer.eos_token_id).sum() >= 1


def test_build_embedded_datasets(tokenizer):
    cfg = DataConfig(seq_len=32, max_documents=400)
    train_ds, val_ds = build_text_datasets(cfg, tokenizer)
    assert len(train_ds) > 10 and len(val_ds) >= 1
    assert train_ds[0]["input_ids"].shape == (32,)
    assert train_ds.num_documents + val_ds.num_documents == 400
    text = tokenizer.decode(train_ds.rows.flatten().tolist())
    assert EOS_TOKEN in text


# ---------------------------------------------------------------------------------------------- loaders

PARAGRAPHS = ["First document, one paragraph.", "Second document\nspans two lines.", "Third: café ✓."]


def test_text_loader_paragraph_and_file_units(tmp_path):
    (tmp_path / "b.txt").write_text("\n\n".join(PARAGRAPHS[1:]) + "\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text(PARAGRAPHS[0] + "\n  \n\n", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a .txt file", encoding="utf-8")
    assert text_data.read_text_documents([str(tmp_path)]) == PARAGRAPHS  # folder -> sorted .txt files
    assert text_data.read_text_documents([str(tmp_path / "*.txt")], unit="file") == [
        PARAGRAPHS[0],
        "\n\n".join(PARAGRAPHS[1:]),
    ]
    train, val = load_documents(
        DataConfig(source="text", paths=[str(tmp_path)], val_paths=[str(tmp_path / "a.txt")])
    )
    assert train == PARAGRAPHS and val == [PARAGRAPHS[0]]


def test_jsonl_loader(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(PARAGRAPHS)) + "\n\n")
    assert text_data.read_jsonl_documents([str(path)], text_field="body") == PARAGRAPHS
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:1: no 'text' field$"):
        text_data.read_jsonl_documents([str(path)])


def test_webdataset_shards_round_trip(tmp_path):
    make_shards = _load_make_shards()
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(PARAGRAPHS * 3), encoding="utf-8")
    pattern = str(tmp_path / "shards" / "train-%04d.tar")
    shards = make_shards.write_shards([str(src)], pattern, maxcount=4)
    assert [Path(s).name for s in shards] == ["train-0000.tar", "train-0001.tar", "train-0002.tar"]
    assert text_data.read_webdataset_documents([str(tmp_path / "shards")]) == PARAGRAPHS * 3
    brace = str(tmp_path / "shards" / "train-{0000..0002}.tar")
    cfg = DataConfig(source="webdataset", paths=[brace], val_fraction=0.0)
    assert load_documents(cfg) == (PARAGRAPHS * 3, [])
    make_shards.main([str(src), "--output", str(tmp_path / "cli-%02d.tar"), "--unit", "file"])
    assert text_data.read_webdataset_documents([str(tmp_path / "cli-00.tar")]) == [
        "\n\n".join(PARAGRAPHS * 3)
    ]


def test_hf_datasets_loader_on_local_jsonl(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in PARAGRAPHS) + "\n")
    cfg = DataConfig(source="hf", hf_name=str(path), cache_dir=str(tmp_path / "hf_cache"), val_fraction=0.0)
    assert load_documents(cfg) == (PARAGRAPHS, [])
    with pytest.raises(ValueError, match="has no column 'body'"):
        text_data.read_hf_documents(str(path), text_field="body", cache_dir=str(tmp_path / "hf_cache"))


# ----------------------------------------------------------------------------------------------- errors


def test_missing_data_path(tmp_path):
    missing = tmp_path / "missing.txt"
    for source in ("text", "jsonl", "webdataset"):
        with pytest.raises(FileNotFoundError, match=rf"^data path not found: {re.escape(str(missing))}$"):
            load_documents(DataConfig(source=source, paths=[str(missing)]))
    with pytest.raises(FileNotFoundError, match=r"^data path not found: .*\*\.txt \(no file matches\)$"):
        load_documents(DataConfig(source="text", paths=[str(tmp_path / "*.txt")]))


def test_empty_corpus(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("\n\n   \n", encoding="utf-8")
    cfg = DataConfig(source="text", paths=[str(tmp_path)])
    with pytest.raises(ValueError, match=rf"^no documents found in {re.escape(str(tmp_path))}$"):
        build_text_datasets(cfg, tokenizer)
    (tmp_path / "empty.txt").write_text("A single tiny document.", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"^train split has \d+ tokens \(1 documents\), fewer than seq_len=128$"
    ):
        build_text_datasets(cfg, tokenizer)


def test_config_errors():
    with pytest.raises(
        ValueError, match=r"^data.source='csv' is not one of embedded, text, jsonl, hf, webdataset, shapes$"
    ):
        DataConfig(source="csv")
    with pytest.raises(ValueError, match=r"^data.paths is empty for data.source='jsonl'$"):
        DataConfig(source="jsonl")
    with pytest.raises(ValueError, match=r"^data.paths / data.val_paths are set but data.source='embedded'"):
        DataConfig(paths=["corpus.txt"])
    with pytest.raises(ValueError, match=r"^data.val_fraction=1.0 must be in \[0, 1\)$"):
        DataConfig(val_fraction=1.0)
