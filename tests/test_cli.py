"""The ``unimodal`` command line end to end on tiny settings, and its one-line errors.

Every bad input exits with status 2, prints one ``error: ...`` line naming the culprit, and leaves
what is on disk untouched.
"""

from pathlib import Path

import pytest

from prior.cli import main

ROOT = Path(__file__).resolve().parents[1]
VAE_YAML = str(ROOT / "configs/text/vae_tiny.yaml")
COLA_YAML = str(ROOT / "configs/text/cola_tiny.yaml")
TINY_DATA = ["data.max_documents=300", "data.seq_len=32", "tokenizer.vocab_size=300", "vae.vocab_size=300"]
TINY_VAE = [
    "vae.dim=32",
    "vae.ffn_dim=64",
    "vae.num_heads=2",
    "vae.encoder_num_blocks=1",
    "vae.decoder_num_blocks=1",
]
TINY_TRAIN = ["train.max_steps=3", "train.batch_size=4", "train.eval_every=3", "train.eval_batches=1"]
TINY_TRAIN += ["train.log_every=1", "train.progress_bar=false", "train.tensorboard=false"]
TINY_PRIOR = [
    "prior.width=32",
    "prior.heads=2",
    "prior.head_dim=16",
    "prior.rope_dim=8",
    "prior.num_layers=1",
]
TINY_PRIOR += ["prior.block_size=4"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    assert main(["train", VAE_YAML, f"train.output_dir={out}", *TINY_DATA, *TINY_VAE, *TINY_TRAIN]) == 0
    return out


def test_train_eval_sample_end_to_end(stage1, tmp_path, capsys):
    assert (stage1 / "config.yaml").is_file() and (stage1 / "tokenizer" / "tokenizer.json").is_file()
    assert main(["eval-vae", str(stage1), "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "reconstruction accuracy (posterior mean)" in out and "t=0.25" in out

    cola = tmp_path / "cola"
    args = ["train", COLA_YAML, f"stage1={stage1}", f"train.output_dir={cola}", "data.max_documents=300"]
    assert main([*args, "data.seq_len=32", *TINY_PRIOR, *TINY_TRAIN]) == 0
    assert (cola / "checkpoints" / "step_0000003" / "model" / "model_index.json").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                str(cola),
                "--prompt",
                "The value",
                "--prompt",
                "",
                "--max-new-tokens",
                "8",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("The value\u2502") and len(lines) == 2
    sample = ["sample", str(cola), "--prompt", "The value", "--max-new-tokens", "8", "--steps", "2"]
    assert main([*sample, "--dtype", "bfloat16"]) == 0  # bf16 weights: runs (tokens may differ)
    assert capsys.readouterr().out.startswith("The value\u2502")


def test_unknown_config_key(tmp_path, capsys):
    assert main(["train", VAE_YAML, f"train.output_dir={tmp_path / 'x'}", "train.lrr=1"]) == 2
    assert "train.lrr" in _error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_missing_config_file(capsys):
    assert main(["train", "no/such.yaml"]) == 2
    assert "no/such.yaml" in _error_line(capsys)


def test_missing_data_path(tmp_path, capsys):
    args = [
        "train",
        VAE_YAML,
        f"train.output_dir={tmp_path / 'x'}",
        "data.source=text",
        "data.paths=[/no/such/file.txt]",
    ]
    assert main(args) == 2
    assert "/no/such/file.txt" in _error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    args = [
        "train",
        VAE_YAML,
        f"train.output_dir={tmp_path / 'x'}",
        "data.source=text",
        f"data.paths=[{empty}]",
    ]
    assert main(args) == 2
    assert "no documents found" in _error_line(capsys)


def test_tokenizer_without_pad_token(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(
        tmp_path / "tok"
    )
    args = [
        "train",
        VAE_YAML,
        f"train.output_dir={tmp_path / 'x'}",
        f"tokenizer.name_or_path={tmp_path / 'tok'}",
    ]
    assert main(args) == 2
    assert "no pad token" in _error_line(capsys)


def test_sequence_longer_than_model_maximum(tmp_path, capsys):
    args = ["train", VAE_YAML, f"train.output_dir={tmp_path / 'x'}", "data.seq_len=64", "vae.max_seq_len=32"]
    assert main([*args, *TINY_DATA[:1]]) == 2
    assert "max_seq_len=32" in _error_line(capsys)


def test_existing_run_is_not_overwritten(stage1, capsys):
    before = {p: p.stat().st_mtime_ns for p in stage1.rglob("*") if p.is_file()}
    assert main(["train", VAE_YAML, f"train.output_dir={stage1}", *TINY_DATA, *TINY_VAE, *TINY_TRAIN]) == 2
    assert str(stage1) in _error_line(capsys)
    assert before == {p: p.stat().st_mtime_ns for p in stage1.rglob("*") if p.is_file()}


def test_corrupt_checkpoint(stage1, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stage1, run)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args = [
        "train",
        VAE_YAML,
        f"train.output_dir={run}",
        "train.resume=latest",
        *TINY_DATA,
        *TINY_VAE,
        *TINY_TRAIN,
    ]
    assert main(args) == 2
    assert str(ckpt) in _error_line(capsys)
    assert weights.stat().st_size == 100


def test_eval_vae_missing_checkpoint(capsys):
    assert main(["eval-vae", "/no/such/run"]) == 2
    assert "/no/such/run" in _error_line(capsys)
