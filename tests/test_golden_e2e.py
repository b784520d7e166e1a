"""End-to-end parity with the official ``generate_task_repaint_inference`` (golden set A, tests/data/golden/A/README.md §6).

The released checkpoints of set A are loaded with the released loaders, the recorded noise is fed
block by block, and the sampler runs with ``GenerationConfig.released()`` and the settings of the json.
Token ids must be identical; latents and per-step velocities within 1e-4 (fp32).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from modalities.text import TextModality
from prior.checkpoints.released import load_released_prior as load_released_dit
from prior.checkpoints.released import load_released_vae as load_released_text_vae
from prior.sampling.block_sampler import BlockSampler
from prior.sampling.config import GenerationConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOLDEN = Path(__file__).resolve().parent / "data/golden/A"
ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
    return load_released_text_vae(GOLDEN / "cola_vae"), load_released_dit(GOLDEN / "cola_dit")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.numel() == b.numel(), (tuple(a.shape), tuple(b.shape))
    return (a.reshape(b.shape).float() - b).abs().max().item()


@pytest.mark.parametrize("merge", [True, False], ids=["merged_commit", "released_passes"])
@pytest.mark.parametrize("name", ["generate_e2e", "generate_e2e_extra"])
def test_released_generation_matches_golden(models, name, merge):
    """The released preset, token for token, with our merged commits (K passes per block) and with
    the released pass structure (a prefill, then K steps + 1 commit per block)."""
    vae, dit = models
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    ref = load_file(GOLDEN / f"{name}.safetensors")
    s = meta["settings"]
    config = GenerationConfig.released(
        num_inference_steps=s["timestep_num"],
        guidance_scale=s["guidance_scale"],
        max_new_tokens=s["max_new_tokens"],
        temperature=s["temperature"],
        top_k=s["top_k"],
        top_p=s["top_p"],
        repetition_penalty=s["repetition_penalty"],
        stop_token_ids=[i for i in (s["eos_token_id"], s["im_end_token_id"]) if i is not None],
        pad_token_id=s["pad_token_id"],
        merge_commit=merge,
    )
    num_blocks, steps_per_block = meta["num_blocks_generated"], s["timestep_num"]
    noise = [ref[f"block{k}_noise"] for k in range(1, num_blocks + 1)]  # (B*bs, d) sample-major
    steps = []
    text = TextModality(vae, None, dit.config.block_size)
    sampler = BlockSampler(text, dit, FlowMatchEulerDiscreteScheduler(), config)
    out = sampler.sample(meta["prompt_ids"], noise=noise, step_callback=steps.append)

    assert out.token_ids == meta["generated_ids_trimmed"]
    assert out.num_blocks == num_blocks
    assert out.trim == [row["trim"] for row in meta["per_sample_layout"]]
    calls = sum(1 for c in meta["dit_call_sequence"] if not c.endswith("uncond"))  # released cond + commit
    assert calls == 1 + num_blocks * (steps_per_block + 1)
    assert out.num_prior_calls == (num_blocks * steps_per_block if merge else calls)
    assert len(steps) == num_blocks * steps_per_block
    for k in range(num_blocks):
        b = k + 1
        assert torch.equal(out.block_ids[k], ref[f"block{b}_sampled_ids"])
        assert max_diff(out.block_latents[k], ref[f"block{b}_final_latents"]) < ATOL
        for j in range(steps_per_block):
            state = steps[k * steps_per_block + j]
            assert max_diff(state.timesteps, ref[f"block{b}_step_timestep"][j]) == 0.0
            assert max_diff(state.model_input, ref[f"block{b}_step_x"][j]) < ATOL
            assert max_diff(state.velocity_cond, ref[f"block{b}_step_v_cond"][j]) < ATOL
            assert max_diff(state.velocity_uncond, ref[f"block{b}_step_v_uncond"][j]) < ATOL


def test_released_grid_is_the_golden_grid():
    meta = json.loads((GOLDEN / "generate_e2e_extra.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler()
    config = GenerationConfig.released(num_inference_steps=meta["settings"]["timestep_num"], pad_token_id=0)
    BlockSampler.set_grid(scheduler, config)
    assert scheduler.timesteps.tolist() == meta["timesteps_grid"][:-1]
    dt = (scheduler.sigmas[:-1] - scheduler.sigmas[1:]).tolist()
    assert dt == meta["dt_values_as_float32"]
