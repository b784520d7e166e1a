"""Modality-level tests: the image VAE adapter, patchify, the text/image modalities and the registry.

Tiny random models on CPU (fp32, seconds). Nothing here imports ``prior`` (import direction).
"""

import os

import pytest
import torch
from diffusers import AutoencoderKL

from modalities import (
    ImageModality,
    LatentSequence,
    Modality,
    TextModality,
    available_modalities,
    get_modality,
    patchify,
    register_modality,
    unpatchify,
)
from modalities import registry as registry_module
from unimodal.image_vae import ImageVAE
from unimodal.text_vae import TextVAE, TextVAEDecoderOutput
from unimodal.tokenization import model_vocab_size, train_bpe_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "the bird sang a song.",
    "we walked to the river and back.",
] * 4
SCALE, SHIFT = 0.5, 0.1


# ----------------------------------------------------------------------------- fixtures


def tiny_autoencoder(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    cfg = dict(
        block_out_channels=(8, 8),  # two blocks: one 2x downsampling
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
    )
    return AutoencoderKL(**{**cfg, **overrides}).eval()


def random_images(batch: int = 2, height: int = 16, width: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1  # [-1, 1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(SENTENCES, vocab_size=300)


def tiny_text_vae(tokenizer, patch_size: int = 2) -> TextVAE:
    torch.manual_seed(0)
    vae = TextVAE(
        vocab_size=model_vocab_size(tokenizer), dim=32, ffn_dim=64, num_heads=2, encoder_num_blocks=1,
        decoder_num_blocks=1, latent_dim=4, patch_size=patch_size, block_size=2, max_seq_len=128,
        scaling_factor=1.5, shifting_factor=0.2,
    ).eval()  # fmt: skip
    with torch.no_grad():  # break the LayerNorm 1/0 and zero-bias symmetry of the init
        for param in vae.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return vae


# ----------------------------------------------------------------------------- image VAE adapter


def test_image_vae_normalisation_matches_the_autoencoder_and_inverts():
    ae = tiny_autoencoder()
    vae = ImageVAE(ae)
    assert (vae.scaling_factor, vae.shift_factor, vae.downsample_factor) == (SCALE, SHIFT, 2)
    images = random_images()
    with torch.no_grad():
        latents = vae.encode(images)  # (B, C, h, w)
        raw = ae.encode(images).latent_dist.mode()
        assert latents.shape == (2, 4, 8, 8)
        torch.testing.assert_close(latents, (raw - SHIFT) * SCALE)
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)
        torch.testing.assert_close(vae.normalize(vae.denormalize(z)), z)
        out = vae.decode(latents)
        assert out.shape == images.shape
        torch.testing.assert_close(out, ae.decode(raw).sample)  # decode de-normalises first


def test_image_vae_shift_none_is_zero_and_sampling_is_seeded():
    vae = ImageVAE(tiny_autoencoder(shift_factor=None))
    assert vae.shift_factor == 0.0
    images = random_images()
    with torch.no_grad():
        mode = vae.encode(images)
        a = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        b = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        c = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mode)


def test_image_vae_from_pretrained_local_and_errors(tmp_path):
    ae = tiny_autoencoder()
    ae.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = ImageVAE.from_pretrained(tmp_path / "pipe", subfolder="vae")
    assert (loaded.scaling_factor, loaded.shift_factor) == (SCALE, SHIFT)
    for key, value in ae.state_dict().items():
        assert torch.equal(loaded.autoencoder.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageVAE.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageVAE.from_pretrained(tmp_path / "pipe", subfolder="nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="could not be loaded"):
        ImageVAE.from_pretrained(tmp_path / "empty")


def test_image_vae_errors_are_loud():
    vae = ImageVAE(tiny_autoencoder())
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae.encode(random_images() * 100)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="15x16"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="latents_mean"):
        ImageVAE(tiny_autoencoder(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4))
    with pytest.raises(TypeError, match="AutoencoderKL"):
        ImageVAE(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- patchify


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_unpatchify_are_exact_inverses(p):
    latents = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    tokens = patchify(latents, p)
    assert tokens.shape == (2, (8 // p) * (12 // p), 3 * p * p)
    assert torch.equal(unpatchify(tokens, p, (8 // p, 12 // p)), latents)
    back = torch.randn_like(tokens)
    assert torch.equal(patchify(unpatchify(back, p, (8 // p, 12 // p)), p), back)


def test_patchify_is_row_major_with_channel_major_tokens():
    latents = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # C=2, h=4, w=6
    tokens = patchify(latents, 2)  # grid 2 x 3
    row, col = 1, 2
    expected = latents[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].reshape(-1)  # (c, ph, pw)
    assert torch.equal(tokens[0, row * 3 + col], expected)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 2, 5, 6), 2)
    with pytest.raises(ValueError, match="grid 3x3"):
        unpatchify(tokens, 2, (3, 3))


# ----------------------------------------------------------------------------- image modality


def test_image_modality_round_trip_shapes_positions_and_block():
    vae = ImageVAE(tiny_autoencoder())
    modality = ImageModality(vae, patch_size=2)
    assert modality.latent_dim == 16 and modality.name == "image"
    images = random_images(batch=2, height=16, width=8)
    with torch.no_grad():
        seq = modality.encode(images)
        assert isinstance(seq, LatentSequence)
        assert seq.latents.shape == (2, 8, 16) and modality.num_tokens(16, 8) == 8
        assert torch.equal(seq.latents, patchify(vae.encode(images), 2))
        assert torch.equal(seq.positions, torch.arange(8).expand(2, 8))
        assert torch.equal(seq.block_ids, torch.zeros(2, 8, dtype=torch.long))
        assert bool(seq.valid.all())
        out = modality.decode(seq, grid_size=modality.grid_size(16, 8))
        assert out.shape == images.shape
        torch.testing.assert_close(out, vae.decode(vae.encode(images)))
        square = modality.encode(random_images(batch=1))
        assert modality.decode(square.latents).shape == (1, 3, 16, 16)  # bare tokens, square grid
    with pytest.raises(ValueError, match="square"):
        modality.decode(seq)
    with pytest.raises(ValueError, match="multiple of 4"):
        modality.encode(random_images(height=16, width=10))


# ----------------------------------------------------------------------------- text modality


def test_text_modality_encode_equals_text_vae_encode(tokenizer):
    vae = tiny_text_vae(tokenizer, patch_size=2)
    modality = TextModality(vae, tokenizer, block_size=3)
    texts = ["the cat sat on the mat.", "a dog", "we walked to the river and back."]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    length = max(map(len, rows))
    length += length % 2  # multiple of the patch size
    ids = torch.full((3, length), tokenizer.pad_token_id)
    valid = torch.zeros(3, length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)], valid[i, : len(row)] = torch.tensor(row), True
    with torch.no_grad():
        seq = modality.encode(texts)
        ref = vae.encode(ids, valid)
        alone = modality.encode(texts[1:2])  # padding never changes a sample's latents
    assert seq.latents.shape == (3, length // 2, 4) and modality.latent_dim == 4
    assert torch.equal(seq.latents, ref.latents) and torch.equal(seq.valid, ref.valid)
    n = alone.num_tokens
    torch.testing.assert_close(alone.latents[0], seq.latents[1, :n])
    assert torch.equal(seq.positions, torch.arange(length // 2).expand(3, -1))
    assert torch.equal(seq.block_ids, seq.positions // 3)


def test_text_modality_decode_is_greedy_and_returns_strings(tokenizer):
    vae = tiny_text_vae(tokenizer)
    modality = TextModality(vae, tokenizer, block_size=4)
    with torch.no_grad():
        seq = modality.encode(["the cat sat on the mat.", "a bird"])
        texts = modality.decode(seq)
        out = vae.decode(seq.latents, seq.valid)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = out.logits.argmax(-1)
    for i, text in enumerate(texts):
        row = [t for t in ids[i][out.valid[i]].tolist() if t != tokenizer.pad_token_id]
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        assert text == tokenizer.decode(row)


def test_text_modality_decode_drops_pad_and_stops_at_eos(tokenizer, monkeypatch):
    vae = tiny_text_vae(tokenizer, patch_size=1)
    modality = TextModality(vae, tokenizer, block_size=4)
    word = tokenizer("cat", add_special_tokens=False)["input_ids"]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    planned = torch.tensor([word + [pad, eos] + word, word + [pad] + word + [eos]])  # (2, 2|w| + 2)
    vocab = vae.config.vocab_size

    def fake_decode(latents, valid=None, **kwargs):
        return TextVAEDecoderOutput(logits=torch.nn.functional.one_hot(planned, vocab).float(), valid=valid)

    monkeypatch.setattr(vae, "decode", fake_decode)
    latents = torch.zeros(2, planned.shape[1], 4)
    assert modality.token_ids(latents) == [word, word + word]
    assert modality.decode(latents) == ["cat", "catcat"]
    assert modality.token_ids(latents, stop_at_eos=False)[0] == word + [eos] + word


def test_text_modality_errors_are_loud(tokenizer):
    vae = tiny_text_vae(tokenizer)
    with pytest.raises(ValueError, match="block_size"):
        TextModality(vae, tokenizer, block_size=0)
    modality = TextModality(vae, tokenizer, block_size=2)
    with pytest.raises(ValueError, match="list of strings"):
        modality.encode("a single string")
    with pytest.raises(ValueError, match="text 1"):
        modality.encode(["the cat", ""])
    with pytest.raises(ValueError, match=r"\(B, N, 4\)"):
        modality.decode(torch.zeros(1, 3, 5))
    small = TextVAE(vocab_size=10, dim=8, ffn_dim=16, num_heads=2, latent_dim=2, encoder_num_blocks=1)
    with pytest.raises(ValueError, match="embeds 10"):
        TextModality(small, tokenizer, block_size=2)


# ----------------------------------------------------------------------------- registry


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_registry_builtins_and_errors(isolated_registry):
    assert {"text", "image"} <= set(available_modalities())
    assert get_modality("text") is TextModality and get_modality("image") is ImageModality
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        get_modality("audio")
    with pytest.raises(ValueError, match="'text' is already registered"):
        register_modality("text")
    with pytest.raises(ValueError, match="identifier"):
        register_modality("two words")
    with pytest.raises(TypeError, match="Modality subclass"):
        register_modality("thing")(object)

    @register_modality("constant")
    class Constant(Modality):
        latent_dim = 2

        def encode(self, data):
            return self.layout(torch.zeros(len(data), 3, 2))

        def decode(self, sequence):
            return self._as_sequence(sequence).num_tokens

        def block_ids(self, positions):
            return positions

    assert Constant.name == "constant" and "constant" in available_modalities()
    seq = get_modality("constant")().encode([1, 2])
    assert torch.equal(seq.block_ids, torch.arange(3).expand(2, 3))
    with pytest.raises(ValueError, match="'constant' is already registered"):
        register_modality("constant")


def test_latent_sequence_checks_and_offset():
    latents, valid = torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    pos = torch.arange(3).expand(2, 3)
    seq = LatentSequence(latents, valid, pos, torch.zeros(2, 3, dtype=torch.long))
    moved = seq.offset(positions=torch.tensor([5, 7]), blocks=2)
    assert moved.positions.tolist() == [[5, 6, 7], [7, 8, 9]] and moved.block_ids.tolist() == [[2] * 3] * 2
    assert moved.latents is latents
    with pytest.raises(ValueError, match="valid shape"):
        LatentSequence(latents, valid[:, :2], pos, pos)
    with pytest.raises(ValueError, match="positions must be an integer"):
        LatentSequence(latents, valid, pos.float(), pos)
    with pytest.raises(ValueError, match="valid must be a bool"):
        LatentSequence(latents, valid.long(), pos, pos)
    with pytest.raises(ValueError, match="offset must be"):
        seq.offset(positions=torch.tensor([1, 2, 3]))
