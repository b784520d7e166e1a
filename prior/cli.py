"""The ``unimodal`` command line.

    unimodal quickstart                       tiny Stage 1 + Stage 2 on the embedded corpus, then samples
    unimodal train CONFIG [key=value ...]     train from a YAML run config (task: vae | cola)
    unimodal eval-vae CHECKPOINT              held-out reconstruction + robustness curve of a Text VAE
    unimodal sample CHECKPOINT --prompt ...   generate text with a Cola pipeline
    unimodal convert SRC DST                  released Cola DLM checkpoint -> pipeline folder
    unimodal eval CHECKPOINT [--tasks ...]    generative benchmark (released 8 tasks / embedded set)

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
    from prior.training.recipes import TRAINERS
    from prior.training.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    result = TRAINERS[cfg.task](cfg)
    print(result.format() if hasattr(result, "format") else result)


def cmd_eval_vae(args: argparse.Namespace) -> None:
    from prior.checkpoints.run_folders import resolve_export
    from prior.eval.vae import evaluate_text_vae
    from prior.training.run_config import RunConfig, load_run_config
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


def load_pipeline(path: str | Path):
    """A ColaTextPipeline from a pipeline folder, a Stage-2 run folder (its newest checkpoint) or a
    released-layout folder (``cola_dit/``, ``cola_vae/``, ``tokenizer.json``)."""
    from prior.checkpoints.released import load_pipeline as load

    return load(path)


def _generate_kwargs(args: argparse.Namespace) -> dict:
    if getattr(args, "released", False):  # the released protocol; flags given explicitly override it
        from prior.eval.generative import generation_kwargs

        return generation_kwargs(released=True, max_new_tokens=args.max_new_tokens)
    return dict(
        max_new_tokens=args.max_new_tokens,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        first_block=args.first_block,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    pipe = load_pipeline(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    if args.stream:
        for chunk in pipe.stream(args.prompt, generator=generator, **_generate_kwargs(args)):
            print(
                chunk.texts[0] if len(args.prompt) == 1 else chunk.texts,
                end="" if len(args.prompt) == 1 else "\n",
            )
            sys.stdout.flush()
        print()
        return
    out = pipe(args.prompt, generator=generator, **_generate_kwargs(args))
    for prompt, text in zip(args.prompt, out.texts):
        print(f"{prompt}\u2502{text}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from prior.checkpoints.run_folders import resolve_export
    from prior.eval.vae import evaluate_text_vae
    from prior.training.recipes import train_cola, train_text_vae
    from prior.training.run_config import load_run_config
    from unimodal.text_data import build_text_datasets
    from unimodal.tokenization import load_tokenizer

    configs = Path(__file__).resolve().parents[1] / "configs" / "text"
    if not configs.is_dir():
        raise FileNotFoundError(
            f"config folder not found: {configs} (quickstart runs from a source checkout)"
        )
    out = Path(args.output_dir)
    common = ["train.resume=latest"]  # re-running the quickstart continues (or just reports)
    vae_budget = f"train.max_time_minutes={args.vae_minutes}"
    vae_cfg = load_run_config(
        configs / "vae_tiny.yaml", [f"train.output_dir={out / 'vae'}", vae_budget, *common, *args.vae]
    )
    print("== Stage 1: Text VAE ==")
    train_text_vae(vae_cfg)
    vae_export = resolve_export(out / "vae", "text_vae")
    _, val_ds = build_text_datasets(vae_cfg.data, load_tokenizer(vae_export / "tokenizer"))
    from unimodal.text_vae import TextVAE

    vae = TextVAE.from_pretrained(vae_export / "text_vae")
    print(evaluate_text_vae(vae, val_ds, max_batches=args.eval_batches, progress=False).format())

    print("== Stage 2: block-causal prior (flow matching) ==")
    cola_cfg = load_run_config(
        configs / "cola_tiny.yaml",
        [
            f"stage1={out / 'vae'}",
            f"train.output_dir={out / 'cola'}",
            f"train.max_time_minutes={args.prior_minutes}",
            *common,
            *args.cola,
        ],
    )
    train_cola(cola_cfg)

    print("== Samples ==")
    s = cola_cfg.sampler
    print(_samples_report(out / "cola", cola_cfg, args.num_prompts, args.show, _sampler_kwargs(s)))


def _sampler_kwargs(s) -> dict:
    """Pipeline keyword arguments from a SamplerConfig (the run's ``sampler:`` section)."""
    names = ("num_inference_steps", "guidance_scale", "first_block", "temperature", "top_k", "top_p")
    return {
        "new_tokens": s.max_new_tokens,
        "repetition_penalty": s.repetition_penalty,
        **{n: getattr(s, n) for n in names},
    }


def _samples_report(checkpoint, cfg, num_prompts: int, show: int, kwargs: dict) -> str:
    from prior.eval.samples import generation_report
    from unimodal.text_data import load_documents

    pipe = load_pipeline(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    train_texts, val_texts = load_documents(cfg.data)
    return generation_report(pipe, train_texts, val_texts, num_prompts=num_prompts, **kwargs).format(
        show=show
    )


def cmd_eval_samples(args: argparse.Namespace) -> None:
    from prior.training.run_config import RunConfig, load_run_config

    run_yaml = args.config or _find_run_config(Path(args.checkpoint))
    cfg = load_run_config(run_yaml) if run_yaml else RunConfig()
    kwargs = _generate_kwargs(args)
    kwargs["new_tokens"] = kwargs.pop("max_new_tokens")
    print(_samples_report(args.checkpoint, cfg, args.num_prompts, args.show, kwargs))


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=16, help="Euler steps per block (num_inference_steps)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--first-block", default="clean_repaint")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from prior.checkpoints.released import convert_released

    dtype = {"float32": None, "bfloat16": torch.bfloat16}[args.dtype]
    out = convert_released(
        args.src, args.dst, tokenizer=args.tokenizer, eos_token_id=args.eos_id, pad_token_id=args.pad_id,
        dtype=dtype, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"converted {args.src} -> {out} (load it with ColaTextPipeline.from_pretrained)")


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from prior.eval.generative import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint, tasks=args.tasks, data_dir=args.data_dir, limit=args.limit,
        batch_size=args.batch_size, out_dir=args.out, released=args.released, device=args.device,
        dtype={"float32": None, "bfloat16": torch.bfloat16}[args.dtype],
        noise_seed=None if args.noise_seed < 0 else args.noise_seed, seed=args.seed, num_shards=args.shards,
        max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty,
    )  # fmt: skip
    mode = "released protocol" if report.settings["released"] else "our sampling loop"
    print(f"{args.checkpoint}: {sum(report.settings['num_items'].values())} items, {mode}")
    print(report.format(), end="")
    if report.files is not None:
        print(f"results: {report.files.json} and {report.files.markdown}")


def _add_convert_and_eval_parsers(sub) -> None:
    p = sub.add_parser("convert", help="released Cola DLM checkpoint folder -> ColaTextPipeline folder")
    p.add_argument("src", help="released layout: cola_dit/, cola_vae/, tokenizer.json (here or its parent)")
    p.add_argument("dst", help="output pipeline folder (must be empty or absent)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the one found")
    p.add_argument("--eos-id", type=int, default=None, help="EOS id when the tokenizer has no <|endoftext|>")
    p.add_argument("--pad-id", type=int, default=None, help="PAD id when the tokenizer has no <|pad|>")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="saved weights' dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="generative benchmark: the 8 released tasks or the embedded task set")
    p.add_argument("checkpoint", help="pipeline folder, Stage-2 run folder or released checkpoint folder")
    p.add_argument("--tasks", default="embedded", help="embedded | released | comma-separated task names")
    p.add_argument("--data-dir", default=None, help="folder of <task>.jsonl files (else HF datasets)")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (embedded: N items)")
    p.add_argument("--batch-size", type=int, default=20, help="items per batch (released: 20 per GPU)")
    p.add_argument("--shards", type=int, default=1, help="batch like N strided shards (released: 8 GPUs)")
    p.add_argument("--out", default=None, help="write results.json, results.md, eval_config.json here")
    p.add_argument(
        "--released", action=argparse.BooleanOptionalAction, default=None,
        help="released generation loop (default: on for released / converted checkpoints)",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="Euler steps per block")
    p.add_argument("--guidance-scale", type=float, default=7.0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--noise-seed", type=int, default=66, help="per-item noise seed (released: 66); -1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.set_defaults(func=cmd_eval)


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

    p = sub.add_parser("sample", help="generate text with a Cola pipeline")
    p.add_argument("checkpoint", help="pipeline folder or Stage-2 run folder")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch; '' = unconditional")
    p.add_argument("--stream", action="store_true", help="print text block by block")
    p.add_argument(
        "--released", action="store_true", help="the released inference protocol (prior.eval.generative)"
    )
    _add_generation_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "eval-samples", help="samples of a Cola pipeline on held-out prompts + quality figures"
    )
    p.add_argument("checkpoint", help="pipeline folder or Stage-2 run folder")
    p.add_argument("--config", default=None, help="run YAML for the data section (default: the run's own)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--show", type=int, default=6, help="samples to print")
    _add_generation_flags(p)
    p.set_defaults(func=cmd_eval_samples)

    p = sub.add_parser("quickstart", help="tiny Stage 1 + Stage 2 on the embedded corpus, then samples")
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument("--vae-minutes", type=float, default=3.0, help="Stage-1 wall-clock budget")
    p.add_argument("--prior-minutes", type=float, default=9.5, help="Stage-2 wall-clock budget")
    p.add_argument("--vae", action="append", default=[], metavar="KEY=VALUE", help="Stage-1 config override")
    p.add_argument("--cola", action="append", default=[], metavar="KEY=VALUE", help="Stage-2 config override")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--show", type=int, default=6, help="samples to print")
    p.add_argument("--eval-batches", type=int, default=None, help="VAE evaluation batches (default: all)")
    p.set_defaults(func=cmd_quickstart)
    _add_convert_and_eval_parsers(sub)
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
