"""Chat rendering and loss masks, synthetic tasks, SFT from init_from (and its shape check), accuracy."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_pipeline

from prior.training.flow_matching import FlowMatchingConfig, build_2l_batch
from unimodal.chat_data import (
    ChatDataset,
    check_answer,
    render_chat,
    render_prompt,
    reply_text,
    synthetic_chat,
)

SENTENCES = ["Repeat: red cat", "How many words: a b c", "What is 3 + 4?", "Spell: cat", "<|im_start|>user"]


def _tok():
    return tiny_pipeline(SENTENCES).tokenizer


def test_render_chat_masks_assistant_turns_only():
    tok = _tok()
    messages = [{"role": "user", "content": "Spell: cat"}, {"role": "assistant", "content": "c a t"}]
    ids, mask = render_chat(tok, messages)
    assert len(ids) == len(mask) and any(mask) and not all(mask)
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert target == "c a t<|im_end|>\n"
    prompt = render_prompt(tok, messages[:1])
    assert ids[: len(prompt)] == prompt  # the generation prompt is a prefix of the training row
    assert reply_text("c a t<|im_end|>\n<|im_start|>user") == "c a t"
    with pytest.raises(ValueError, match="role 'robot'"):
        render_chat(tok, [{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="at least one message"):
        render_chat(tok, [])


def test_synthetic_chats_are_deterministic_and_checkable():
    a = [synthetic_chat(i) for i in range(40)]
    assert a == [synthetic_chat(i) for i in range(40)] and a != [synthetic_chat(i, "test") for i in range(40)]
    assert {task for _, task, _ in a} == {"copy", "count", "add", "spell"}
    for messages, task, answer in a:
        assert messages[-1] == {"role": "assistant", "content": answer} and check_answer(
            f" {answer} ", answer
        )
        if task == "add":
            x, y = (int(v) for v in messages[0]["content"][len("What is ") : -1].split(" + "))
            assert int(answer) == x + y


def test_chat_dataset_pads_and_refuses_long_conversations():
    tok = _tok()
    ds = ChatDataset([synthetic_chat(i)[0] for i in range(3)], tok, seq_len=96)
    row = ds[0]
    assert row["input_ids"].shape == (96,) and row["loss_mask"].sum() > 0
    assert not (row["loss_mask"] & ~row["valid"]).any()
    with pytest.raises(ValueError, match="more than chat.seq_len=8"):
        ChatDataset([synthetic_chat(0)[0]], tok, seq_len=8)


def test_target_mask_limits_the_flow_loss_to_targets():
    z0, valid = torch.randn(2, 8, 4), torch.ones(2, 8, dtype=torch.bool)
    target = torch.zeros(2, 8, dtype=torch.bool)
    target[:, 4:] = True
    batch = build_2l_batch(z0, valid, 4, FlowMatchingConfig(prompt_block_prob=0.0), target_mask=target)
    assert torch.equal(batch.loss_mask, target)


def test_sft_trains_from_init_from_and_checks_shapes(tmp_path):
    from prior.eval.chat import chat_accuracy
    from prior.training.recipes import train_sft
    from prior.training.run_config import load_run_config
    from unimodal.config import ConfigError

    pipe = tiny_pipeline(SENTENCES, perturb_scale=0.05)
    pipe.save_pretrained(tmp_path / "base")
    common = [
        f"init_from={tmp_path / 'base'}", "prior.width=32", "prior.heads=2", "prior.head_dim=16",
        "prior.rope_dim=8", "prior.num_layers=1", "prior.prediction=velocity", "chat.num_train=16",
        "chat.num_val=4", "chat.seq_len=96", "train.max_steps=2", "train.batch_size=4", "train.max_time_minutes=null",
        "train.eval_every=2", "train.save_every=2", "train.warmup_steps=1", "train.ema_decay=null",
    ]  # fmt: skip
    result = train_sft(
        load_run_config("configs/text/sft_tiny.yaml", [*common, f"train.output_dir={tmp_path / 'sft'}"])
    )
    assert result.step == 2
    with pytest.raises(ConfigError, match="prior tensor .* is .* there but"):
        train_sft(load_run_config("configs/text/sft_tiny.yaml", [*common, "prior.width=64",
                                                                 f"train.output_dir={tmp_path / 'bad'}"]))  # fmt: skip
    from prior.checkpoints.released import load_cola_pipeline

    tuned = load_cola_pipeline(tmp_path / "sft")
    tuned.set_progress_bar_config(disable=True)
    report = chat_accuracy(tuned, num=4, generation_config=tuned.generation_config.replace(max_new_tokens=4,
                                                                                         num_inference_steps=2))  # fmt: skip
    assert 0.0 <= report.accuracy["all"] <= 1.0 and set(report.accuracy) == {
        "copy",
        "count",
        "add",
        "spell",
        "all",
    }


def test_continued_pretraining_starts_from_the_checkpoint_weights(tmp_path):
    from pathlib import Path

    from prior.training.recipes import build_cola_model
    from prior.training.run_config import load_run_config

    pipe = tiny_pipeline(SENTENCES, perturb_scale=0.05)
    pipe.save_pretrained(tmp_path / "base")
    cfg = load_run_config("configs/text/cola_tiny.yaml", [
        f"stage1={tmp_path / 'base'}", f"init_from={tmp_path / 'base'}", "prior.width=32", "prior.heads=2",
        "prior.head_dim=16", "prior.rope_dim=8", "prior.num_layers=1", "prior.block_size=4",
        f"train.output_dir={tmp_path / 'cont'}",
    ])  # fmt: skip
    model, _ = build_cola_model(cfg, Path(cfg.train.output_dir))
    for key, value in pipe.prior.state_dict().items():
        assert torch.equal(model.prior.state_dict()[key], value), key


def test_chat_cli_streams_replies_and_resets(tmp_path, monkeypatch, capsys):
    import io

    from prior.cli import main
    from prior.pipelines.chat import ChatSession

    pipe = tiny_pipeline(SENTENCES, perturb_scale=0.05)
    session = ChatSession(
        pipe, pipe.generation_config.replace(max_new_tokens=4, num_inference_steps=2), system="be brief"
    )
    reply = "".join(session.stream_reply("Spell: cat"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == reply_text(reply)
    session.reset()
    assert session.messages == [{"role": "system", "content": "be brief"}]
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr("sys.stdin", io.StringIO("Spell: cat\n/reset\nWhat is 3 + 4?\n"))
    assert main(["chat", str(tmp_path / "pipe"), "--steps", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "(conversation reset)" in out


def test_chat_data_from_jsonl_and_hf_files(tmp_path):
    import json

    from unimodal.chat_data import ChatDataConfig, build_chat_datasets

    tok = _tok()
    rows = [{"messages": synthetic_chat(i)[0]} for i in range(12)]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train, val = build_chat_datasets(
        ChatDataConfig(source="jsonl", paths=[str(path)], seq_len=96, num_val=3), tok
    )
    assert len(train) + len(val) == 12 and len(val) >= 1
    pytest.importorskip("datasets")
    train, val = build_chat_datasets(
        ChatDataConfig(source="hf", hf_name=str(path), seq_len=96, num_val=3), tok
    )
    assert len(train) + len(val) == 12
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    with pytest.raises(ValueError, match="no 'messages' list"):
        build_chat_datasets(ChatDataConfig(source="jsonl", paths=[str(tmp_path / "bad.jsonl")]), tok)
