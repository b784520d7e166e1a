"""`unimodal eval` on a tiny random pipeline: the embedded task set (offline) and local jsonl tasks."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_pipeline as build_tiny_pipeline

from prior.cli import main as cli_main
from prior.eval.generative import (
    generate_texts,
    generation_config,
    load_tasks,
    parse_task_names,
    per_sample_noise,
    released_batches,
    run_generative_eval,
    sample_key,
)
from prior.eval.tasks import RELEASED_TASKS, load_task_jsonl
from prior.pipelines.pipeline_cola_text import ColaTextPipeline
from prior.sampling.config import RELEASED_SETTINGS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


DATA = Path(__file__).parent / "data" / "eval_tasks"
SENTENCES = [
    "The answer is (B). Question: what is the capital of France? Answer: Paris.",
    "She poured the tea and said it was too hot to drink.",
    "Read the following article and answer the question. Options: (A) one (B) two",
] * 3
FAST = ["--steps", "2", "--max-new-tokens", "8", "--batch-size", "4"]


def tiny_pipeline() -> ColaTextPipeline:
    return build_tiny_pipeline(SENTENCES, max_seq_len=2048)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipe")
    tiny_pipeline().save_pretrained(path)
    return path


def test_cli_eval_embedded_offline(pipe_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert (
        cli_main(["eval", str(pipe_dir), "--tasks", "embedded", "--limit", "3", "--out", str(out), *FAST])
        == 0
    )
    printed = capsys.readouterr().out
    assert "| Next word (embedded) |" in printed and "| Continuation (embedded) |" in printed
    assert "**Average**" in printed and "our sampling loop" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]["tasks"]) == {"next_word", "continuation"}
    for task, summary in results["summary"]["tasks"].items():
        assert summary["total"] == 3 and 0 <= summary["correct"] <= 3
        records = results["tasks"][task]["records"]
        assert len(records) == 3 and all(isinstance(r["generation"], str) and "correct" in r for r in records)
    assert (out / "results.md").read_text().startswith("| task | accuracy |")
    config = json.loads((out / "eval_config.json").read_text())
    assert config["generation"]["max_new_tokens"] == 8 and config["released"] is False


def test_cli_eval_local_jsonl_released_protocol(pipe_dir, tmp_path, capsys):
    args = ["eval", str(pipe_dir), "--tasks", "lambada,mmlu,squad", "--data-dir", str(DATA), "--limit", "2"]
    assert cli_main([*args, "--released", "--out", str(tmp_path), *FAST]) == 0
    printed = capsys.readouterr().out
    for name in ("LAMBADA", "MMLU", "SQuAD"):
        assert f"| {name} |" in printed
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert [v["total"] for v in summary["tasks"].values()] == [2, 2, 2]
    config = json.loads((tmp_path / "eval_config.json").read_text())
    assert config["released"] and config["generation"]["stop_rule"] == "released"
    assert config["generation"]["repetition_penalty"] == 1.1 and config["generation"]["guidance_scale"] == 7.0


def test_cli_eval_unknown_task_and_missing_data(pipe_dir, tmp_path, capsys):
    assert cli_main(["eval", str(pipe_dir), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli_main(["eval", str(pipe_dir), "--tasks", "lambada", "--data-dir", str(tmp_path)]) == 2
    assert "task 'lambada'" in capsys.readouterr().err


def test_every_released_task_loads_from_local_jsonl():
    names = parse_task_names("released")
    assert names == list(RELEASED_TASKS)
    tasks = load_tasks(names, data_dir=DATA, limit=1)
    assert [len(items) for items in tasks.values()] == [1] * 8
    assert tasks["mmlu"][0].prompt == load_task_jsonl(DATA / "mmlu.jsonl", "mmlu", 1)[0].prompt


def test_released_preset_is_one_switch():
    released, ours = generation_config(released=True).to_dict(), generation_config(released=False).to_dict()
    assert released == {
        "num_inference_steps": 16, "guidance_scale": 7.0, "shift": 1.0, "first_block": "clean_repaint",
        "repaint_fraction": 0.5, "max_new_tokens": 32, "temperature": 0.0, "top_k": 50, "top_p": 0.9,
        "repetition_penalty": 1.1, "stop_on_eos": True, "whole_blocks": True, "pad_prompt_to_block": True,
        "finite_logits": True, "stop_rule": "released", "skip_special_tokens": False, "stop_token_ids": None,
        "pad_token_id": None, "guidance_interval": None, "noise_scale": 1.0, "merge_commit": True,
        "project_latents": False, "autocast": None,  # the released loop runs fp32
        "patch_boundary": "pin",  # merged commits give the released tokens; pin is the released layout
    }  # fmt: skip
    assert ours["stop_rule"] == "first_stop" and ours["whole_blocks"] is False and ours["shift"] is None
    assert {k: ours[k] for k in RELEASED_SETTINGS} == {k: released[k] for k in RELEASED_SETTINGS}
    assert generation_config(guidance_scale=3.0).guidance_scale == 3.0
    with pytest.raises(ValueError, match="unknown generation setting 'bogus'"):
        generation_config(bogus=1)


def test_per_item_noise_makes_results_independent_of_the_batch():
    pipe = tiny_pipeline()
    prompts = ["The answer is", "She poured the tea and", "Options: (A) one"]
    keys = [sample_key(f"item-{i}") for i in range(3)]
    ours = generation_config(released=False, num_inference_steps=2, max_new_tokens=8)
    together = generate_texts(pipe, prompts, keys=keys, generation_config=ours)
    alone = [generate_texts(pipe, [p], keys=[k], generation_config=ours)[0] for p, k in zip(prompts, keys)]
    assert together == alone
    # released loop: a finished sample keeps generating while others run (whole blocks, as released),
    # so alone it yields a prefix of its batched ids
    released = generation_config(num_inference_steps=2, max_new_tokens=12)

    def ids(batch, batch_keys):
        return pipe(
            batch, released, noise=per_sample_noise(batch_keys, 66, "cpu"), output_type="ids"
        ).token_ids

    batched = ids(prompts, keys)
    for i, (p, k) in enumerate(zip(prompts, keys)):
        single = ids([p], [k])[0]
        assert batched[i][: len(single)] == single
    assert sample_key("17") == 17 and sample_key("lambada-0") == sample_key("lambada-0") != sample_key("x")
    a = per_sample_noise([5, 6], seed=66, device="cpu")(1, (2, 4, 3))
    b = per_sample_noise([6], seed=66, device="cpu")(1, (1, 4, 3))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


def test_released_sharded_batching_order():
    items = list(range(7))
    assert released_batches(items, batch_size=2, num_shards=3) == [[0, 3], [6], [1, 4], [2, 5]]
    assert released_batches(items, batch_size=3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_run_generative_eval_scores_every_item(tmp_path):
    pipe = tiny_pipeline()
    tasks = load_tasks(["story_cloze", "siqa"], data_dir=DATA)
    report = run_generative_eval(
        pipe, tasks, batch_size=2, num_inference_steps=2, max_new_tokens=4, progress=False, out_dir=tmp_path
    )
    assert [s.task for s in report.scores] == ["story_cloze", "siqa"]
    assert all(s.total == len(tasks[s.task]) for s in report.scores)
    assert report.average == pytest.approx(sum(s.accuracy for s in report.scores) / 2)
    assert report.files.json.is_file() and "| Story Cloze |" in report.format()


def test_eval_config_written_once_with_the_full_settings(pipe_dir, tmp_path, monkeypatch):
    from prior.eval.generative import evaluate_checkpoint

    writes = []
    original = Path.write_text

    def counting_write(self, *args, **kwargs):
        if self.name == "eval_config.json":
            writes.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", counting_write)
    report = evaluate_checkpoint(
        pipe_dir, tasks="next_word", limit=2, batch_size=2, out_dir=tmp_path, device="cpu", progress=False,
        num_inference_steps=2, max_new_tokens=4,
    )  # fmt: skip
    assert len(writes) == 1
    config = json.loads((tmp_path / "eval_config.json").read_text())
    assert config == json.loads(json.dumps(report.settings))
    assert config["checkpoint"] == str(pipe_dir) and config["tasks"] == ["next_word"]
    assert config["device"] == "cpu" and config["released"] is False
    assert config["generation"]["max_new_tokens"] == 4 and config["num_items"] == {"next_word": 2}
