"""Every shipped YAML loads against the config dataclasses, and the model sizes are the advertised ones."""

import dataclasses
from pathlib import Path

import pytest
import torch

from prior.models.mmdit import MMDiT
from prior.training.recipes import prior_kwargs, vae_kwargs
from prior.training.run_config import TASKS, load_run_config
from unimodal.config import ConfigError
from unimodal.text_vae import TextVAE
from unimodal.tokenization import model_vocab_size, train_bpe_tokenizer

TEXT = Path(__file__).resolve().parents[1] / "configs" / "text"
CONFIGS = sorted(TEXT.parent.rglob("*.yaml"))
RELEASED_VOCAB = 100_278  # ids of the released OLMo 2 BPE that vae_2b.yaml names


def _count(cls, kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(**kwargs).parameters())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_run_config(path)
    assert cfg.task in TASKS
    assert cfg.train.output_dir.startswith("runs/")


def test_cola_2b_is_the_released_size():
    cfg = load_run_config(TEXT / "cola_2b.yaml")
    vae = load_run_config(TEXT / "vae_2b.yaml")
    # the released DiT (docs/released-format.md §1)
    assert _count(MMDiT, prior_kwargs(cfg, vae.vae.latent_dim)) == 1_829_875_728
    n_vae = _count(TextVAE, {**dataclasses.asdict(vae.vae), "vocab_size": RELEASED_VOCAB})
    assert 0.49e9 < n_vae < 0.51e9
    assert cfg.prior.block_size == 16 and not hasattr(cfg.flow, "block_size")  # the flow follows the prior
    assert (cfg.flow.loc, cfg.joint.mode, cfg.joint.vae_grad_scale) == (1.0, "joint", 1.0)
    assert (cfg.generation.num_inference_steps, cfg.generation.guidance_scale) == (16, 7.0)
    assert vae.vae.posterior == "logsnr" and vae.vae.logsnr_learnable and vae.vae.bert_weight > 0


def test_tiny_configs_are_tiny():
    root = TEXT
    vae = load_run_config(root / "vae_tiny.yaml")
    cola = load_run_config(root / "cola_tiny.yaml")
    assert _count(TextVAE, {**dataclasses.asdict(vae.vae), "vocab_size": vae.tokenizer.vocab_size}) < 6e6
    assert _count(MMDiT, prior_kwargs(cola, vae.vae.latent_dim)) < 6e6
    assert cola.prior.in_channels is None  # derived from the VAE's latent_dim:
    assert prior_kwargs(cola, vae.vae.latent_dim)["in_channels"] == [vae.vae.latent_dim]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_do_not_repeat_derived_values(path):
    cfg = load_run_config(path)
    if cfg.task == "vae":
        assert cfg.vae.vocab_size is None  # from the tokenizer
    else:
        assert cfg.vae is None and cfg.prior.in_channels is None  # the VAE comes from stage1
        assert cfg.ar.vocab_size is None  # task: ar: from the Stage-1 tokenizer


def test_stage2_rejects_an_unused_vae_section():
    with pytest.raises(ConfigError, match="vae: is unused by task: cola with joint.mode=fixed_vae"):
        load_run_config(TEXT / "cola_tiny.yaml", ["vae.dim=32"])
    scratch = load_run_config(TEXT / "cola_tiny.yaml", ["joint.mode=scratch", "vae.dim=32"])
    assert scratch.vae.dim == 32 and load_run_config(TEXT / "cola_tiny.yaml", ["joint.mode=scratch"]).vae
    with pytest.raises(ConfigError, match="unknown config key 'flow.block_size'"):
        load_run_config(TEXT / "cola_tiny.yaml", ["flow.block_size=16"])


def test_derived_values_fill_in_and_disagreeing_ones_fail():
    tokenizer = train_bpe_tokenizer(["a few words of text to train on"] * 10, vocab_size=300)
    vocab = model_vocab_size(tokenizer)
    cfg = load_run_config(TEXT / "vae_tiny.yaml")
    assert vae_kwargs(cfg, tokenizer)["vocab_size"] == vocab
    assert vae_kwargs(load_run_config(TEXT / "vae_tiny.yaml", [f"vae.vocab_size={vocab}"]), tokenizer)
    bad = load_run_config(TEXT / "vae_tiny.yaml", ["vae.vocab_size=4096"])
    with pytest.raises(
        ConfigError, match=rf"vae.vocab_size=4096 disagrees with the tokenizer's .* \({vocab}\)"
    ):
        vae_kwargs(bad, tokenizer)
    cola = load_run_config(TEXT / "cola_tiny.yaml", ["prior.in_channels=[16]"])
    assert prior_kwargs(cola, 16)["in_channels"] == [16]
    with pytest.raises(ConfigError, match=r"prior.in_channels=\[16\] disagrees with the VAE's latent_dim"):
        prior_kwargs(cola, 8)


def test_quickstart_recipes_are_valid_config_overrides():
    from prior.cli import DEFAULT_RECIPE, QUICKSTART_RECIPES

    assert DEFAULT_RECIPE in QUICKSTART_RECIPES and QUICKSTART_RECIPES["paper"] == {"vae": [], "cola": []}
    for recipe in QUICKSTART_RECIPES.values():
        vae = load_run_config(TEXT / "vae_tiny.yaml", recipe["vae"])
        cola = load_run_config(TEXT / "cola_tiny.yaml", recipe["cola"])
        assert vae.task == "vae" and cola.task == "cola"
    cat = QUICKSTART_RECIPES["categorical"]
    assert load_run_config(TEXT / "vae_tiny.yaml", cat["vae"]).vae.encoder_context == "token"
    cola = load_run_config(TEXT / "cola_tiny.yaml", cat["cola"])
    assert (cola.prior.prediction, cola.prior.block_size, cola.generation.noise_scale) == (
        "categorical",
        1,
        0.5,
    )
