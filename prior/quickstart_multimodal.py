"""``unimodal quickstart --multimodal``: the whole image-text path on the embedded shapes, then both scores.

1. a token-local Text VAE on the captions (``configs/multimodal/text_vae_tiny.yaml``);
2. the image VAE, a diffusers ``AutoencoderKL`` (``configs/multimodal/image_vae_tiny.yaml``);
3. the text+image MMDiT prior on mixed layouts (``configs/multimodal/tiny.yaml``);
4. on held-out shapes: image VAE PSNR, text->image attribute accuracy, image->text caption accuracy
   (each next to chance and the checker's accuracy on real data), ``report.json`` and the PNG grid
   ``t2i_grid.png`` (prompts as labels) in the output folder.

Every stage resumes (``train.resume=latest``): re-running continues, or only re-scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from prior.checkpoints.run_folders import resolve_pipeline_folder
from prior.eval.multimodal import (
    MultimodalReport,
    image_vae_psnr,
    save_grid,
    score_image_to_text,
    score_text_to_image,
)
from prior.pipelines.pipeline_cola_multimodal import ColaImageToTextPipeline, ColaTextToImagePipeline
from prior.training.multimodal_recipes import load_image_vae, train_image_vae, train_multimodal
from prior.training.recipes import train_text_vae
from prior.training.run_config import load_run_config


def run_multimodal_quickstart(
    configs: Path,
    out: Path,
    text_minutes: float = 2.0,
    image_minutes: float = 4.0,
    prior_minutes: float = 18.0,
    num_eval: int = 96,
    overrides: dict[str, list[str]] | None = None,
) -> MultimodalReport:
    """Train the three stages into ``out`` (budgets in minutes) and score both directions."""
    overrides = overrides or {}
    common = ["train.resume=latest"]
    print("== 1. Text VAE on the captions ==")
    text_cfg = load_run_config(
        configs / "text_vae_tiny.yaml",
        [f"train.output_dir={out / 'text_vae'}", f"train.max_time_minutes={text_minutes}", *common,
         *overrides.get("text_vae", [])],
    )  # fmt: skip
    train_text_vae(text_cfg)
    print("== 2. image VAE (diffusers AutoencoderKL) ==")
    image_cfg = load_run_config(
        configs / "image_vae_tiny.yaml",
        [f"train.output_dir={out / 'image_vae'}", f"train.max_time_minutes={image_minutes}", *common,
         *overrides.get("image_vae", [])],
    )  # fmt: skip
    train_image_vae(image_cfg)
    print("== 3. text+image block-causal MMDiT prior ==")
    prior_cfg = load_run_config(
        configs / "tiny.yaml",
        [f"train.output_dir={out / 'prior'}", f"train.max_time_minutes={prior_minutes}",
         f"multimodal.text_vae={out / 'text_vae'}", f"multimodal.image_vae={out / 'image_vae'}", *common,
         *overrides.get("prior", [])],
    )  # fmt: skip
    train_multimodal(prior_cfg)
    print("== 4. held-out scores ==")
    report, grid = score_multimodal(
        out / "prior", out / "image_vae", num_eval, prior_cfg.image_data.resolution
    )
    print(report.format())
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    print(f"text->image grid: {grid}\nreport: {out / 'report.json'}")
    return report


def score_multimodal(
    prior_run: Path,
    image_vae_run: Path,
    num_eval: int = 96,
    image_size: int = 32,
    grid_path: Path | None = None,
) -> tuple[MultimodalReport, Path]:
    """Score a multimodal run's newest export in both directions; write the text->image grid."""
    folder = resolve_pipeline_folder(prior_run)
    t2i = ColaTextToImagePipeline.from_pretrained(folder)
    i2t = ColaImageToTextPipeline.from_pretrained(folder)
    for pipe in (t2i, i2t):
        pipe.set_progress_bar_config(disable=True)
    psnr = image_vae_psnr(load_image_vae(image_vae_run), image_size=image_size)
    t2i_score, images, prompts = score_text_to_image(t2i, num_eval, image_size=image_size)
    i2t_score = score_image_to_text(i2t, num_eval, image_size=image_size)
    grid = save_grid(images[:32], prompts[:32], grid_path or Path(prior_run).parent / "t2i_grid.png")
    return MultimodalReport(psnr, t2i_score, i2t_score), grid


__all__ = ["run_multimodal_quickstart", "score_multimodal"]
