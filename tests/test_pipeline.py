"""ColaTextPipeline on a tiny random model and a tiny BPE tokenizer (CPU, seconds)."""

import json
import os

import pytest
import torch
from helpers import tiny_pipeline as build_tiny_pipeline

from prior.pipelines.pipeline_cola_text import ColaTextPipeline, ColaTextPipelineOutput
from prior.sampling.config import GenerationConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park and the cat slept.",
    "latent diffusion writes text one block at a time.",
    "the prior moves noise to clean latents, the decoder reads them.",
] * 4


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_tiny_pipeline(SENTENCES, max_seq_len=128, prior_layers=2, perturb_scale=0.1)
    return pipeline


ARGS = dict(max_new_tokens=6, num_inference_steps=2, guidance_scale=3.0, temperature=1.0, top_k=20)


def test_generates_text_for_prompts_of_different_lengths(pipe):
    out = pipe(["the cat", "a dog ran in the park and"], generator=torch.Generator().manual_seed(0), **ARGS)
    assert isinstance(out, ColaTextPipelineOutput)
    assert len(out.texts) == len(out.token_ids) == 2
    assert all(isinstance(t, str) for t in out.texts)
    eos = pipe.tokenizer.eos_token_id
    for ids in out.token_ids:  # max_new_tokens, unless cut after an EOS
        assert len(ids) == 6 or (ids and ids[-1] == eos)
    assert out.num_prior_calls == out.num_blocks * 2  # K passes per block (merged commits)


def test_same_generator_same_output_and_string_prompt(pipe):
    a = pipe("the cat sat", generator=torch.Generator().manual_seed(3), **ARGS)
    b = pipe(["the cat sat"], generator=torch.Generator().manual_seed(3), **ARGS)
    assert a.token_ids == b.token_ids and a.texts == b.texts


def test_save_and_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_vae"] == ["unimodal.text_vae", "TextVAE"]
    assert index["prior"] == ["prior.models.mmdit", "MMDiT"]
    loaded = ColaTextPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    prompts = ["the dog", "latent diffusion writes"]
    assert loaded.tokenizer(prompts)["input_ids"] == pipe.tokenizer(prompts)["input_ids"]
    a = pipe(prompts, generator=torch.Generator().manual_seed(1), **ARGS)
    b = loaded(prompts, generator=torch.Generator().manual_seed(1), **ARGS)
    assert a.token_ids == b.token_ids and a.texts == b.texts


def test_output_types(pipe):
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    text = pipe("the cat", generator=gen(), **ARGS)
    ids = pipe("the cat", generator=gen(), output_type="ids", **ARGS)
    latents = pipe("the cat", generator=gen(), output_type="latents", **ARGS)
    assert ids.texts is None and ids.token_ids == text.token_ids
    assert latents.texts is None and len(latents.latents) == latents.num_blocks
    assert latents.latents[0].shape == (1, 4, 4)
    (only_ids,) = pipe("the cat", generator=gen(), output_type="ids", return_dict=False, **ARGS)
    assert only_ids == text.token_ids
    with pytest.raises(ValueError, match="output_type"):
        pipe("the cat", output_type="image")


def test_callback_is_called_every_step_and_can_edit_latents(pipe):
    calls = []

    def callback(p, step, timestep, kwargs):
        calls.append((step, timestep, tuple(kwargs)))
        return {"latents": kwargs["latents"]}

    out = pipe("the cat", generator=torch.Generator().manual_seed(0), callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "velocity"], **ARGS)  # fmt: skip
    assert [c[0] for c in calls] == list(range(2 * out.num_blocks))
    assert calls[0][1] == 1000.0 and calls[1][1] == 500.0
    assert calls[0][2] == ("latents", "velocity")
    with pytest.raises(ValueError, match="callback tensor input"):
        pipe("the cat", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"], **ARGS)


def test_progress_bar_can_be_disabled(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    pipe("the cat", generator=torch.Generator().manual_seed(0), **ARGS)
    assert capsys.readouterr().err != ""  # tqdm writes to stderr when enabled
    pipe.set_progress_bar_config(disable=True)
    pipe("the cat", generator=torch.Generator().manual_seed(0), **ARGS)
    assert capsys.readouterr().err == ""


def test_stream_yields_the_same_text_block_by_block(pipe):
    prompts = ["the cat", "the prior moves noise to"]
    full = pipe(prompts, generator=torch.Generator().manual_seed(4), **ARGS)
    streamed_ids, streamed_text = [[], []], ["", ""]
    chunks = list(pipe.stream(prompts, generator=torch.Generator().manual_seed(4), **ARGS))
    for chunk in chunks:
        for i in range(2):
            streamed_ids[i] += chunk.token_ids[i]
            streamed_text[i] += chunk.texts[i]
    assert len(chunks) == full.num_blocks
    assert streamed_ids == full.token_ids
    assert streamed_text == full.texts


def test_released_preset_through_the_pipeline(pipe):
    out = pipe(["the cat sat", ""], GenerationConfig.released(), generator=torch.Generator().manual_seed(0),
               max_new_tokens=5, num_inference_steps=2, repetition_penalty=1.1)  # fmt: skip
    assert out.num_blocks == 2  # whole blocks: 2 * 4 >= 5
    n = len(pipe.tokenizer("the cat sat")["input_ids"])
    assert len(out.token_ids[0]) == 8 - n % 4 and len(out.token_ids[1]) == 8


@pytest.mark.parametrize("preset", ["default", "released"])
def test_call_and_stream_agree_under_each_preset(pipe, preset):
    """Both run the same streaming path: the same noise gives the same tokens (default and released)."""
    config = GenerationConfig() if preset == "default" else GenerationConfig.released()
    config = config.replace(max_new_tokens=7, num_inference_steps=2)
    prompts = ["the cat sat", "", "a dog ran in the park and"]
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(8))  # (B, blocks, bs, d)

    def per_block(k, shape):
        return noise[:, k]

    full = pipe(prompts, config, noise=per_block)
    streamed = [[], [], []]
    for chunk in pipe.stream(prompts, config, noise=per_block):
        for acc, new in zip(streamed, chunk.token_ids):
            acc.extend(new)
    assert streamed == full.token_ids
    resolved = pipe.resolve_generation_config(config)
    assert resolved.repetition_penalty == (1.1 if preset == "released" else 1.0)  # one setting for both paths


def test_generation_config_is_saved_and_overridable(pipe, tmp_path):
    pipe.generation_config = GenerationConfig(max_new_tokens=5, guidance_scale=2.0, num_inference_steps=2)
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.generation_config = GenerationConfig()
    assert json.loads((tmp_path / "generation_config.json").read_text())["guidance_scale"] == 2.0
    loaded = ColaTextPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.generation_config == GenerationConfig(
        max_new_tokens=5, guidance_scale=2.0, num_inference_steps=2
    )
    out = loaded("the cat", generator=torch.Generator().manual_seed(0), output_type="ids")
    assert len(out.token_ids[0]) <= 5  # the saved max_new_tokens
    longer = loaded(
        "the cat", generator=torch.Generator().manual_seed(0), max_new_tokens=9, output_type="ids"
    )
    assert len(longer.token_ids[0]) > 5 or pipe.tokenizer.eos_token_id in longer.token_ids[0]
    with pytest.raises(ValueError, match="unknown generation setting 'released_compat'"):
        loaded("the cat", released_compat=True)
    (tmp_path / "generation_config.json").write_text('{"bogus": 1}')
    with pytest.raises(ValueError, match="unknown generation setting 'bogus'"):
        ColaTextPipeline.from_pretrained(tmp_path)


def test_cli_generation_flags_are_the_config_fields():
    import dataclasses

    from prior.cli import build_parser, generation_overrides

    parser = build_parser()
    args = parser.parse_args(
        ["sample", "ckpt", "--prompt", "x", "--steps", "3", "--no-skip-special-tokens", "--stop-token-ids", "1", "2",
         "--first-block", "left_pad", "--top-p", "0.5"]
    )  # fmt: skip
    assert generation_overrides(args) == {
        "num_inference_steps": 3, "skip_special_tokens": False, "stop_token_ids": [1, 2], "first_block": "left_pad",
        "top_p": 0.5,
    }  # fmt: skip
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["sample"]._actions}
    assert {f.name for f in dataclasses.fields(GenerationConfig)} <= flags
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "ckpt", "--prompt", "x", "--stop-rule", "never"])
