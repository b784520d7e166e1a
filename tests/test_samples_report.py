"""Sample-quality figures: the per-text spread and the context-sensitivity figure."""

import torch
from helpers import tiny_pipeline

from prior.eval.samples import TextQuality, context_sensitivity, shared_noise, token_identity
from prior.sampling.config import GenerationConfig

SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "latent diffusion writes text."] * 4


def test_token_identity_and_shared_noise():
    assert token_identity([[1, 2, 3], [1, 5, 3, 9], [7, 7]]) == (2 / 3 + 0 + 0) / 3
    assert token_identity([[1, 2]]) is None
    noise = shared_noise(3)(1, (4, 2, 5))
    assert noise.shape == (4, 2, 5) and all(torch.equal(noise[0], row) for row in noise)
    assert not torch.equal(shared_noise(3)(2, (1, 2, 5))[0], noise[0])  # a fresh draw per block


def test_context_sensitivity_is_one_for_identical_prompts():
    pipe = tiny_pipeline(SENTENCES, perturb_scale=0.1)
    config = GenerationConfig(max_new_tokens=6, num_inference_steps=2, stop_on_eos=False)
    assert context_sensitivity(pipe, ["the cat", "the cat", "the cat"], config) == 1.0
    value = context_sensitivity(pipe, ["the cat", "a dog ran in the", "latent"], config)
    assert 0.0 <= value <= 1.0


def test_in_vocab_spread_over_texts():
    pipe = tiny_pipeline(SENTENCES)
    quality = TextQuality(SENTENCES, pipe.tokenizer)
    same = quality.figures(["the cat sat", "the dog ran"])
    mixed = quality.figures(["the cat sat", "zzz qqq xxx"])
    assert same.in_vocab == 1.0 and same.in_vocab_se == 0.0
    assert mixed.in_vocab == 0.5 and abs(mixed.in_vocab_se - 0.5) < 1e-9
