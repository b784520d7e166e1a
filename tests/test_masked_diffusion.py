"""The masked-diffusion baseline's pieces: the 1/t-weighted loss on a hand-computed case, the
unmasking schedule and the sampler, the bidirectional transformer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from prior.checkpoints.released import load_pipeline
from prior.models.ar import ARTransformer
from prior.pipelines.folders import pipeline_class_name
from prior.pipelines.pipeline_mdm_text import MDMTextPipeline
from prior.sampling.masked_diffusion import masked_diffusion_sample, unmask_schedule
from prior.training.masked_diffusion import masked_diffusion_loss
from unimodal.tokenization import model_vocab_size


@dataclass
class _Out:
    logits: torch.Tensor


class FixedLogits(torch.nn.Module):
    """Logits that ignore the input: log-probs [log .5, log .25, log .25] over ids 0, 1, 2 (3 = mask)."""

    def forward(self, ids, valid=None):
        row = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25), 5.0])
        return _Out(row.expand(*ids.shape, 4).clone())


def test_loss_on_a_hand_computed_case():
    ids = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2]])
    masked = torch.tensor([[True, True, False, False], [False, False, False, True]])
    t = torch.tensor([0.5, 0.25])
    out = masked_diffusion_loss(FixedLogits(), ids, mask_id=3, t=t, masked=masked)
    # row 0: (-log .5 - log .25) / 0.5; row 1: -log .25 / 0.25; divided by the 8 valid tokens
    expected = ((math.log(2) + math.log(4)) / 0.5 + math.log(4) / 0.25) / 8
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_schedule_and_sampler_unmask_exactly_what_the_schedule_says():
    assert unmask_schedule(8, 3) == [3, 3, 2] and sum(unmask_schedule(16, 5)) == 16
    with pytest.raises(ValueError):
        unmask_schedule(4, 5)
    torch.manual_seed(0)
    model = ARTransformer(
        vocab_size=21, width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, causal=False
    ).eval()
    mask_id = 20
    seen = []
    original = model.forward

    def counting(ids, **kw):  # the masks left before every forward of the generated span
        seen.append(int((ids[0, 3:] == mask_id).sum()))
        return original(ids, **kw)

    model.forward = counting
    out = masked_diffusion_sample(model, [1, 2, 3], mask_id, gen_len=8, block_len=4, steps_per_block=3)
    assert out.committed == [2, 1, 1] * 2 and out.num_forwards == 6
    assert seen == [8, 6, 5, 4, 2, 1]  # each step commits exactly its schedule's count
    assert mask_id not in out.token_ids and len(out.token_ids) == 8


def test_bidirectional_transformer_sees_later_tokens():
    torch.manual_seed(0)
    model = ARTransformer(
        vocab_size=10, width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, causal=False
    )
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 5]])
    assert not torch.allclose(model(a).logits[:, 0], model(b).logits[:, 0])  # position 0 sees position 3
    causal = ARTransformer(vocab_size=10, width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1)
    assert torch.allclose(causal(a).logits[:, 0], causal(b).logits[:, 0])
    with pytest.raises(ValueError, match="no KV cache"):
        model(a, kv_cache=model.new_kv_cache())


def test_mdm_task_trains_and_exports(tmp_path):
    from helpers import tiny_pipeline

    from prior.training.recipes import train_mdm
    from prior.training.run_config import load_run_config

    pipe = tiny_pipeline(["the cat sat on the mat. " * 8, "a dog ran in the park. " * 8])
    pipe.save_pretrained(tmp_path / "stage1")  # text_vae/ + tokenizer/: a Stage-1 export
    cfg = load_run_config("configs/text/mdm_tiny.yaml", [
        f"stage1={tmp_path / 'stage1'}", f"train.output_dir={tmp_path / 'mdm'}", "mdm.width=32", "mdm.heads=2",
        "mdm.head_dim=16", "mdm.rope_dim=8", "mdm.num_layers=1", "data.source=text",
        f"data.paths=[{tmp_path / 'corpus.txt'}]", "data.seq_len=16", "data.val_fraction=0.0", "train.max_steps=2",
        "train.batch_size=2", "train.max_time_minutes=null", "train.save_every=2", "train.eval_every=100",
        "train.warmup_steps=1", "train.ema_decay=null",
    ])  # fmt: skip
    (tmp_path / "corpus.txt").write_text(
        "\n\n".join(["the cat sat on the mat " * 6, "a dog ran in the park " * 6] * 4)
    )
    assert train_mdm(cfg).step == 2
    run = tmp_path / "mdm"
    folder = run / "checkpoints" / "step_0000002" / "model"
    assert pipeline_class_name(folder) == "MDMTextPipeline"
    loaded = load_pipeline(run)  # a run folder resolves to its newest export, as for Cola and AR
    assert isinstance(loaded, MDMTextPipeline)
    assert not loaded.transformer.config.causal
    assert loaded.transformer.config.vocab_size == model_vocab_size(loaded.tokenizer) + 1
    assert loaded.config.block_length == 16 and loaded.generation_config.max_new_tokens == 48
    out = loaded(["the cat", ""], max_new_tokens=5, num_inference_steps=4, stop_on_eos=False)
    assert [len(ids) for ids in out.token_ids] == [5, 5] and out.num_model_calls == 4
    with pytest.raises(ValueError, match="block_length=16"):
        loaded("the cat", num_inference_steps=17)
    with pytest.raises(ValueError, match="causal=False"):
        MDMTextPipeline(
            ARTransformer(vocab_size=10, width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1), None
        )


def _tiny_mdm_pipeline(block_length: int = 4) -> MDMTextPipeline:
    from helpers import tiny_pipeline

    tokenizer = tiny_pipeline(["the cat sat on the mat. " * 4]).tokenizer
    torch.manual_seed(0)
    model = ARTransformer(
        vocab_size=model_vocab_size(tokenizer) + 1, width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1,
        causal=False,
    ).eval()  # fmt: skip
    return MDMTextPipeline(model, tokenizer, block_length=block_length)


def test_mdm_batch_rows_equal_single_prompts_and_stream_equals_call():
    pipe = _tiny_mdm_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["the cat sat on", "a", ""]
    kw = dict(max_new_tokens=10, num_inference_steps=2, stop_on_eos=False)
    batch = pipe(prompts, **kw).token_ids
    assert [len(r) for r in batch] == [10, 10, 10]
    for prompt, row in zip(prompts, batch):
        assert pipe(prompt, **kw).token_ids[0] == row  # left padding is invisible
    streamed = [[] for _ in prompts]
    for chunk in pipe.stream(prompts, **kw):
        for acc, ids in zip(streamed, chunk.token_ids):
            acc.extend(ids)
    assert streamed == batch


def test_mdm_stops_after_the_block_where_every_row_stopped():
    pipe = _tiny_mdm_pipeline(block_length=4)
    pipe.set_progress_bar_config(disable=True)
    first = pipe("the cat", max_new_tokens=12, num_inference_steps=4, stop_on_eos=False)
    stop_id = first.token_ids[0][1]  # a token of block 0: stopping on it ends the loop after block 0
    out = pipe("the cat", max_new_tokens=12, num_inference_steps=4, stop_token_ids=[stop_id])
    assert out.num_model_calls == 4 and out.token_ids[0][-1] == stop_id and len(out.token_ids[0]) <= 4
    assert first.num_model_calls == 12


def test_sampling_config_and_sampler_arguments_fail_loudly():
    from prior.sampling.masked_diffusion import MaskedDiffusionSamplingConfig

    with pytest.raises(ValueError, match="block_length"):
        MaskedDiffusionSamplingConfig(block_length=0)
    with pytest.raises(ValueError, match="remasking"):
        MaskedDiffusionSamplingConfig(remasking="greedy")
    model = ARTransformer(
        vocab_size=9, width=32, heads=2, head_dim=16, rope_dim=8, num_layers=1, causal=False
    )
    with pytest.raises(ValueError, match="multiple of block_len"):
        masked_diffusion_sample(model, [1, 2], 8, gen_len=6, block_len=4, steps_per_block=2)
    with pytest.raises(ValueError, match="at least one token"):
        masked_diffusion_sample(model, [[1], []], 8, gen_len=4, block_len=4, steps_per_block=2)
    out = masked_diffusion_sample(model, [[1, 2, 3], [4]], 8, gen_len=4, block_len=4, steps_per_block=4,
                                  remasking="random", generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert [len(r) for r in out.token_ids] == [4, 4] and out.committed == [1, 1, 1, 1]
