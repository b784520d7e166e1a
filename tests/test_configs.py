"""Every shipped YAML loads against the config dataclasses, and the model sizes are the advertised ones."""

import dataclasses
from pathlib import Path

import pytest
import torch

from prior.models.mmdit import MMDiT
from prior.training.run_config import load_run_config
from unimodal.text_vae import TextVAE

TEXT = Path(__file__).resolve().parents[1] / "configs" / "text"
CONFIGS = sorted(TEXT.parent.rglob("*.yaml"))


def _count(cls, kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(**kwargs).parameters())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_run_config(path)
    assert cfg.task in ("vae", "cola")
    assert cfg.train.output_dir.startswith("runs/")


def test_cola_2b_is_the_released_size():
    cfg = load_run_config(TEXT / "cola_2b.yaml")
    vae = load_run_config(TEXT / "vae_2b.yaml")
    assert _count(MMDiT, dataclasses.asdict(cfg.prior)) == 1_829_875_728  # the released DiT (spec §1)
    n_vae = _count(TextVAE, dataclasses.asdict(vae.vae))
    assert 0.49e9 < n_vae < 0.51e9
    assert cfg.prior.block_size == cfg.flow.block_size == 16
    assert (cfg.flow.loc, cfg.joint.mode, cfg.joint.vae_grad_scale) == (1.0, "joint", 1.0)
    assert (cfg.sampler.num_inference_steps, cfg.sampler.guidance_scale) == (16, 7.0)
    assert vae.vae.posterior == "logsnr" and vae.vae.logsnr_learnable and vae.vae.bert_weight > 0


def test_tiny_configs_are_tiny():
    root = TEXT
    vae = load_run_config(root / "vae_tiny.yaml")
    cola = load_run_config(root / "cola_tiny.yaml")
    assert _count(TextVAE, dataclasses.asdict(vae.vae)) < 6e6
    assert _count(MMDiT, dataclasses.asdict(cola.prior)) < 6e6
    assert cola.prior.in_channels == [vae.vae.latent_dim]
