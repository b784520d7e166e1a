"""Embedded shapes, the program checker, image-caption loaders (shards, HF), the image VAE and the
image-text training recipes."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from unimodal import shapes
from unimodal.image_text_data import (
    ImageTextCollator,
    ImageTextDataConfig,
    build_image_text_datasets,
    read_image_text_shards,
)
from unimodal.image_vae import ImageVAE, ImageVAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_splits_are_deterministic_and_disjoint_streams():
    a = [shapes.draw_attributes(i, "train") for i in range(50)]
    assert a == [shapes.draw_attributes(i, "train") for i in range(50)]
    assert a != [shapes.draw_attributes(i, "test") for i in range(50)]
    image, text = shapes.example(3)
    assert image.size == (32, 32) and image.mode == "RGB" and shapes.caption(a[3]) == text


def test_checker_reads_every_attribute_of_real_renders():
    assert shapes.checker_accuracy(300) == {"shape": 1.0, "colour": 1.0, "size": 1.0, "where": 1.0}
    blank = Image.new("RGB", (32, 32), shapes.BACKGROUND)
    assert shapes.check_image(blank).shape is None


def test_parse_caption_reads_every_phrasing():
    for phrasing in range(len(shapes.PHRASINGS)):
        attrs = shapes.ShapeAttributes("triangle", "orange", "small", "bottom", phrasing=phrasing)
        read = shapes.parse_caption(shapes.caption(attrs))
        assert read == {"shape": "triangle", "colour": "orange", "size": "small", "where": "bottom"}
    assert shapes.parse_caption("a thing")["colour"] is None


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_shards_round_trip_and_fail_on_a_missing_entry(tmp_path):
    from make_image_shards import folder_samples, write_shards

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        image, text = shapes.example(i)
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(text)
    paths = write_shards(folder_samples(folder), str(tmp_path / "shards" / "s-%06d.tar"))
    records = read_image_text_shards(paths)
    assert [r["caption"] for r in records] == [shapes.example(i)[1] for i in range(4)]
    cfg = ImageTextDataConfig(source="webdataset", paths=paths, val_fraction=0.25)
    train, val = build_image_text_datasets(cfg)
    assert len(train) + len(val) == 4 and len(val) == 1
    (folder / "img0.txt").unlink()
    with pytest.raises(ValueError, match="img0.png has no caption file"):
        folder_samples(folder)
    _write_shard(tmp_path / "no_caption.tar", [{"__key__": "a", "png": _png(shapes.example(0)[0])}])
    with pytest.raises(ValueError, match="sample 'a' has no caption entry"):
        read_image_text_shards([str(tmp_path / "no_caption.tar")])
    _write_shard(tmp_path / "no_image.tar", [{"__key__": "b", "txt": "a red circle"}])
    with pytest.raises(ValueError, match="sample 'b' has no image entry"):
        read_image_text_shards([str(tmp_path / "no_image.tar")])


def test_hf_image_text_sets_load_from_local_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [shapes.example(i) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": [r[0] for r in rows], "text": [r[1] for r in rows]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    train, val = build_image_text_datasets(
        ImageTextDataConfig(source="hf", hf_name=str(tmp_path / "hf"), val_fraction=0.5)
    )
    assert len(train) == 3 and len(val) == 3 and isinstance(train[0]["image"], Image.Image)
    with pytest.raises(ValueError, match="no column 'caption'"):
        build_image_text_datasets(
            ImageTextDataConfig(source="hf", hf_name=str(tmp_path / "hf"), caption_column="caption")
        )


def test_collator_preprocesses_with_diffusers_and_refuses_long_captions():
    from unimodal.tokenization import train_bpe_tokenizer

    tok = train_bpe_tokenizer([shapes.example(i)[1] for i in range(100)], vocab_size=300)
    collate = ImageTextCollator(32, tok, max_caption_tokens=12)
    records = [{"image": Image.new("RGBA", (40, 20)), "caption": "a red circle"},
               {"image": Image.new("L", (32, 32)), "caption": "a large blue square"}]  # fmt: skip
    batch = collate(records)
    assert batch["images"].shape == (2, 3, 32, 32) and batch["images"].min() >= -1
    assert batch["input_ids"].shape[0] == 2 and batch["valid"][0].sum() < batch["valid"][1].sum() + 1
    with pytest.raises(ValueError, match="more than max_caption_tokens=12"):
        collate([{"image": records[0]["image"], "caption": "a large blue square " * 4}])


def test_image_vae_fits_its_normalisation():
    torch.manual_seed(0)
    vae = ImageVAE.from_config(
        ImageVAEConfig(block_out_channels=[8, 8], norm_num_groups=4, latent_channels=2)
    )
    images = ImageTextCollator(16)([{"image": shapes.example(i)[0]} for i in range(16)])["images"]
    out = vae.loss(images, kl_weight=1e-4)
    assert out.loss.requires_grad and out.psnr > 0
    shift, scale = vae.fit_normalization(images)
    with torch.no_grad():
        latents = vae.encode(images)
    assert abs(float(latents.mean())) < 1e-4 and abs(float(latents.std()) - 1) < 1e-3
    assert vae.autoencoder.config.scaling_factor == scale and vae.autoencoder.config.shift_factor == shift


def test_image_and_multimodal_recipes_train_and_export(tmp_path):
    from prior.quickstart_multimodal import score_multimodal
    from prior.training.multimodal_recipes import train_image_vae, train_multimodal
    from prior.training.recipes import train_text_vae
    from prior.training.run_config import load_run_config

    configs = Path(__file__).resolve().parents[1] / "configs" / "multimodal"
    quick = ["train.max_time_minutes=null", "train.eval_every=2", "train.save_every=2", "train.log_every=1",
             "train.batch_size=4", "train.warmup_steps=1"]  # fmt: skip
    train_text_vae(load_run_config(configs / "text_vae_tiny.yaml", [
        f"train.output_dir={tmp_path / 'tv'}", "train.max_steps=2", "vae.dim=32", "vae.ffn_dim=64",
        "vae.num_heads=2", "tokenizer.vocab_size=300", *quick]))  # fmt: skip
    data = ["image_data.resolution=16", "image_data.num_train=16", "image_data.num_val=4"]
    train_image_vae(load_run_config(configs / "image_vae_tiny.yaml", [
        f"train.output_dir={tmp_path / 'iv'}", "train.max_steps=2", "image_vae.block_out_channels=[8,8]",
        "image_vae.norm_num_groups=4", "image_vae.latent_channels=2", *data, *quick]))  # fmt: skip
    result = train_multimodal(load_run_config(configs / "tiny.yaml", [
        f"train.output_dir={tmp_path / 'mm'}", "train.max_steps=2", f"multimodal.text_vae={tmp_path / 'tv'}",
        f"multimodal.image_vae={tmp_path / 'iv'}", "prior.width=32", "prior.heads=2", "prior.head_dim=16",
        "prior.rope_dim=8", "prior.num_layers=1", "generation.num_inference_steps=2",
        "generation.max_new_tokens=4", *data, *quick]))  # fmt: skip
    assert result.step == 2
    report, grid = score_multimodal(tmp_path / "mm", tmp_path / "iv", num_eval=4, image_size=16)
    assert grid.is_file() and 0 <= report.text_to_image.accuracy["colour"] <= 1
    assert (
        report.text_to_image.checker["colour"] == 1.0 and report.image_to_text.checker["colour+shape"] == 1.0
    )


@pytest.mark.slow
def test_multimodal_two_processes_match_one_process(tmp_path):
    """torchrun (gloo) with 2 x 2 rows == one process with 4 rows: per-sample randomness and per-row loss
    weights make the split invisible."""
    import os
    import subprocess

    from helpers import tiny_multimodal_pipeline
    from safetensors.torch import load_file

    pipe = tiny_multimodal_pipeline()
    pipe.text_vae.save_pretrained(tmp_path / "tv" / "text_vae")
    pipe.tokenizer.save_pretrained(tmp_path / "tv" / "tokenizer")
    pipe.image_vae.save_pretrained(tmp_path / "iv" / "image_vae")
    root = Path(__file__).resolve().parents[1]
    common = [
        str(root / "configs" / "multimodal" / "tiny.yaml"), f"multimodal.text_vae={tmp_path / 'tv'}",
        f"multimodal.image_vae={tmp_path / 'iv'}", "image_data.resolution=16", "image_data.num_train=32",
        "image_data.num_val=4", "prior.width=32", "prior.heads=2", "prior.head_dim=16", "prior.rope_dim=8",
        "prior.num_layers=1", "train.max_steps=3", "train.max_time_minutes=null", "train.ema_decay=null",
        "train.mixed_precision='no'", "train.eval_every=100", "train.save_every=3", "train.warmup_steps=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {"ddp": (2, 2), "single": (1, 4)}
    for name, (procs, batch) in runs.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "prior.cli", "train", *common, f"train.output_dir={tmp_path / name}", f"train.batch_size={batch}"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    weights = {
        name: load_file(
            tmp_path
            / name
            / "checkpoints"
            / "step_0000003"
            / "model"
            / "prior"
            / "diffusion_pytorch_model.safetensors"
        )
        for name in runs
    }
    assert all(torch.allclose(weights["ddp"][k], weights["single"][k], atol=1e-5) for k in weights["single"])
