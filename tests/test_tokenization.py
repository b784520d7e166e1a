"""Tokenizer layer: BPE training, save/load round trips, bare tokenizer.json, special-token checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from unimodal.tokenization import (
    EOS_TOKEN,
    PAD_TOKEN,
    TokenizerConfig,
    build_tokenizer,
    check_special_tokens,
    load_tokenizer,
    model_vocab_size,
    train_bpe_tokenizer,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in the sequence, or raise an error if it is empty.",
    "A module is a file containing Python definitions and statements.",
    "Unicode: naïve café, 東京, emoji 🙂 and tabs\tand  double spaces.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=400)


def test_trained_bpe_special_tokens_and_no_bos(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == 1
    assert len(tokenizer) == 400 and model_vocab_size(tokenizer) == 400
    ids = tokenizer("hello world")["input_ids"]
    assert 0 not in ids and 1 not in ids  # encoding adds neither BOS nor EOS
    check_special_tokens(tokenizer)


def test_byte_level_round_trip_on_unseen_text(tokenizer):
    text = "Ünseen bytes: ∑ 𝔘 \x00 and\nnewlines  kept"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_training_is_deterministic(tokenizer):
    again = train_bpe_tokenizer(TEXTS, vocab_size=400)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_save_load_round_trip(tmp_path, tokenizer):
    out = tmp_path / "tok"
    trained = train_bpe_tokenizer(TEXTS, vocab_size=400, out_dir=out)
    loaded = load_tokenizer(out)
    assert (out / "tokenizer_config.json").is_file()
    assert loaded.is_fast and loaded.get_vocab() == trained.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (0, 1)
    text = TEXTS[3]
    assert loaded(text)["input_ids"] == trained(text)["input_ids"]


def test_bare_tokenizer_json_gets_conventional_special_tokens(tmp_path, tokenizer):
    file = tmp_path / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(file))  # what the released Cola DLM ships: no config files
    loaded = load_tokenizer(file)
    assert (loaded.eos_token, loaded.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert loaded(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]
    assert load_tokenizer(tmp_path).get_vocab() == loaded.get_vocab()  # folder holding only tokenizer.json


def _bare_tokenizer(tmp_path, specials: list[str]):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(specials)
    file = tmp_path / "bare.json"
    backend.save(str(file))
    return load_tokenizer(file), file


def test_missing_pad_token_is_reported(tmp_path):
    tok, file = _bare_tokenizer(tmp_path, [EOS_TOKEN])
    with pytest.raises(ValueError, match=rf"^tokenizer at {re.escape(str(file))} has no pad token; add one"):
        check_special_tokens(tok)


def test_missing_eos_token_is_reported(tmp_path):
    tok, file = _bare_tokenizer(tmp_path, [PAD_TOKEN])
    with pytest.raises(ValueError, match=rf"^tokenizer at {re.escape(str(file))} has no eos token; add one"):
        check_special_tokens(tok)


def test_build_tokenizer_checks_special_tokens(tmp_path):
    _, file = _bare_tokenizer(tmp_path, [EOS_TOKEN])
    with pytest.raises(ValueError, match="has no pad token"):
        build_tokenizer(TokenizerConfig(name_or_path=str(file)))
    tok = build_tokenizer(TokenizerConfig(vocab_size=300), train_texts=TEXTS)
    assert len(tok) == 300
    with pytest.raises(ValueError, match="training a BPE needs train_texts"):
        build_tokenizer(TokenizerConfig(vocab_size=300))  # no corpus default: the caller passes its split


@pytest.mark.parametrize("module", ["unimodal.tokenization", "unimodal.text_data"])
def test_tokenization_does_not_import_the_data_layer(module):
    """text_data depends on tokenization, never the reverse: each imports alone in a fresh interpreter."""
    code = f"import sys, {module}; print('unimodal.text_data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(module == "unimodal.text_data")


def test_load_errors(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=rf"^tokenizer path not found: {re.escape(str(missing))}$"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="'no-such-org/no-such-tokenizer' is not a local path"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small for a byte-level BPE \(min 258\)"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=10 is too small"):
        TokenizerConfig(vocab_size=10)
