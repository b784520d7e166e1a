"""Sampling: the generation config, the KV-cached block sampler, token sampling and stop rules."""

from prior.sampling.block_sampler import BlockOutput, BlockSampler, NoiseSource, SamplerOutput, StepState
from prior.sampling.config import GenerationConfig

__all__ = ["BlockOutput", "BlockSampler", "GenerationConfig", "NoiseSource", "SamplerOutput", "StepState"]
