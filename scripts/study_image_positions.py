"""Image token positions: 1-D raster RoPE vs 2-D axial RoPE (FLUX-style), at equal wall clock.

Trains the multimodal prior of ``configs/multimodal/tiny.yaml`` twice from the same Text VAE and
image VAE runs, once with ``prior.rope_axes=1`` (an image token at raster position ``P + r * w + c``)
and once with ``prior.rope_axes=2`` (rows and columns rotate separate channel groups: ``(P + r,
P + c)``; text tokens use their position on both axes), each for ``--minutes``, then scores both
directions on the same held-out shapes. Writes ``results.json``, ``results.md`` and
``accuracy.png`` into ``--output-dir``.

    python scripts/study_image_positions.py --text-vae runs/quickstart_multimodal/text_vae \
        --image-vae runs/quickstart_multimodal/image_vae --minutes 12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prior.quickstart_multimodal import score_multimodal  # noqa: E402
from prior.training.multimodal_recipes import train_multimodal  # noqa: E402
from prior.training.run_config import load_run_config  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "multimodal" / "tiny.yaml"
VARIANTS = {"raster 1-D": 1, "axial 2-D": 2}
KEYS = ("colour", "shape", "colour+shape")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-vae", required=True)
    p.add_argument("--image-vae", required=True)
    p.add_argument("--minutes", type=float, default=12.0, help="training budget per variant")
    p.add_argument("--num-eval", type=int, default=96)
    p.add_argument("--output-dir", default="runs/study_image_positions")
    p.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides for both variants")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    results = {}
    for name, axes in VARIANTS.items():
        run = out / f"rope_axes_{axes}"
        cfg = load_run_config(CONFIG, [
            f"train.output_dir={run}", f"train.max_time_minutes={args.minutes}", "train.resume=latest",
            f"multimodal.text_vae={args.text_vae}", f"multimodal.image_vae={args.image_vae}",
            f"prior.rope_axes={axes}", *args.overrides,
        ])  # fmt: skip
        trained = train_multimodal(cfg)
        report, _ = score_multimodal(run, Path(args.image_vae), args.num_eval, grid_path=run / "t2i_grid.png")
        results[name] = {"rope_axes": axes, "steps": trained.step, "val_loss": trained.val_metrics.get("loss", float("nan")),
                         "val_image_loss": trained.val_metrics.get("image_loss", float("nan")),
                         "text_to_image": report.text_to_image.accuracy,
                         "image_to_text": report.image_to_text.accuracy}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| variant | steps | val loss (image) | t2i colour | t2i shape | t2i both | i2t colour | i2t shape | i2t both |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        cells = [f"{r[d][k]:.3f}" for d in ("text_to_image", "image_to_text") for k in KEYS]
        rows.append(f"| {name} | {r['steps']} | {r['val_loss']:.4f} ({r['val_image_loss']:.4f}) | "
                    + " | ".join(cells) + " |")  # fmt: skip
    (out / "results.md").write_text("\n".join(rows) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"{d} {k}" for d in ("t2i", "i2t") for k in KEYS]
    width = 0.38
    for j, (name, r) in enumerate(results.items()):
        values = [r[d][k] for d in ("text_to_image", "image_to_text") for k in KEYS]
        ax.bar([i + (j - 0.5) * width for i in range(len(values))], values, width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel(f"held-out accuracy (n={args.num_eval})")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
