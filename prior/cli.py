"""The ``unimodal`` command line.

    unimodal train CONFIG [key=value ...]     train Stage 1 (task: vae) from a YAML run config
    unimodal eval-vae CHECKPOINT              held-out reconstruction + robustness curve of a Text VAE

CHECKPOINT is a run folder (its newest checkpoint is used) or an export folder holding
``text_vae/`` and ``tokenizer/``. Errors are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unimodal.config import ConfigError


def _find_run_config(path: Path) -> Path | None:
    for candidate in (path, *path.parents[:3]):
        if (candidate / "config.yaml").is_file():
            return candidate / "config.yaml"
    return None


def cmd_train(args: argparse.Namespace) -> None:
    from prior.recipes import train_text_vae
    from prior.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    result = {"vae": train_text_vae}[cfg.task](cfg)
    print(result.format() if hasattr(result, "format") else result)


def cmd_eval_vae(args: argparse.Namespace) -> None:
    from prior.evaluation import evaluate_text_vae
    from prior.recipes import resolve_export
    from prior.run_config import RunConfig, load_run_config
    from unimodal.text_data import build_text_datasets
    from unimodal.text_vae import TextVAE
    from unimodal.tokenization import load_tokenizer

    export = resolve_export(args.checkpoint, "text_vae")
    run_yaml = args.config or _find_run_config(export)
    cfg = load_run_config(run_yaml, args.overrides) if run_yaml else RunConfig()
    vae = TextVAE.from_pretrained(export / "text_vae")
    tokenizer = load_tokenizer(export / "tokenizer")
    _, val_ds = build_text_datasets(cfg.data, tokenizer)
    print(f"evaluating {export} on {len(val_ds)} held-out rows of {cfg.data.seq_len} tokens")
    result = evaluate_text_vae(vae, val_ds, batch_size=args.batch_size, max_batches=args.max_batches)
    print(result.format())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimodal", description="Cola DLM: continuous latent diffusion LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML run config")
    p.add_argument("config", help="YAML run config, e.g. configs/text/vae_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval-vae", help="held-out reconstruction accuracy and robustness of a Text VAE")
    p.add_argument("checkpoint", help="run folder or export folder (text_vae/ + tokenizer/)")
    p.add_argument("--config", default=None, help="run YAML for the data section (default: the run's own)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the data section")
    p.set_defaults(func=cmd_eval_vae)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
