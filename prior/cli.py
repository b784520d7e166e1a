"""The ``unimodal`` command line.

    unimodal serve CHECKPOINT                 OpenAI-compatible HTTP server (batched concurrent requests)
    unimodal chat CHECKPOINT                  multi-turn chat (chat template, streamed block by block, /reset)
    unimodal quickstart [--baseline ar]       tiny Stage 1 + Stage 2 on the embedded corpus, then samples
    unimodal train CONFIG [key=value ...]     train from a YAML run config (task: vae | cola | ar)
    unimodal eval-vae CHECKPOINT              held-out reconstruction + robustness curve of a Text VAE
    unimodal sample CHECKPOINT --prompt ...   generate text with a Cola (or AR baseline) pipeline
    unimodal convert SRC DST                  released Cola DLM checkpoint -> pipeline folder
    unimodal eval CHECKPOINT [--tasks ...]    generative benchmark (released 8 tasks / embedded set)

CHECKPOINT is a run folder (its newest checkpoint is used) or an export folder holding
``text_vae/`` and ``tokenizer/``. Errors are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from unimodal.config import ConfigError


def _find_run_config(path: Path) -> Path | None:
    for candidate in (path, *path.parents[:3]):
        if (candidate / "config.yaml").is_file():
            return candidate / "config.yaml"
    return None


def cmd_train(args: argparse.Namespace) -> None:
    from prior.training.multimodal_recipes import MULTIMODAL_TRAINERS
    from prior.training.recipes import TRAINERS
    from prior.training.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    print({**TRAINERS, **MULTIMODAL_TRAINERS}[cfg.task](cfg).format())


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
    released-layout folder (``cola_dit/``, ``cola_vae/``, ``tokenizer.json``); an ARTextPipeline
    from an AR baseline run or export (``task: ar``)."""
    from prior.checkpoints.released import load_pipeline as load

    return load(path)


# ----------------------------------------------------------------------------- generation flags

_FLAG_ALIASES = {"num_inference_steps": ("--steps",)}
_FLAG_HELP = {
    "num_inference_steps": "Euler steps per block",
    "guidance_scale": "CFG weight (1 = off)",
    "temperature": "0 = greedy",
    "shift": "time shift of the grid (default: the scheduler's)",
    "stop_token_ids": "ids that end a sample (default: EOS, <|im_end|>)",
    "autocast": "bfloat16: the prior's matmuls in bf16, weights fp32 (default off: README 'Speed')",
}


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`GenerationConfig` field (``--max-new-tokens``, ``--stop-token-ids 1 2``,
    ``--whole-blocks/--no-whole-blocks``, ...). Unset flags leave the base config's value."""
    from prior.sampling.config import FIRST_BLOCK_STRATEGIES, STOP_RULES, GenerationConfig

    group = parser.add_argument_group(
        "generation settings (GenerationConfig fields; default: the checkpoint's)"
    )
    hints = typing.get_type_hints(GenerationConfig)
    choices = {"first_block": FIRST_BLOCK_STRATEGIES, "stop_rule": STOP_RULES}
    for f in dataclasses.fields(GenerationConfig):
        names = ("--" + f.name.replace("_", "-"), *_FLAG_ALIASES.get(f.name, ()))
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        kind, help_text = kinds[0], _FLAG_HELP.get(f.name)
        if kind is bool:
            group.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif typing.get_origin(kind) is list:
            group.add_argument(*names, dest=f.name, type=int, nargs="+", default=None, help=help_text)
        else:
            group.add_argument(
                *names, dest=f.name, type=kind, choices=choices.get(f.name), default=None, help=help_text
            )


def generation_overrides(args: argparse.Namespace) -> dict:
    """The generation fields given on the command line."""
    from prior.sampling.config import GenerationConfig

    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _generation_config(pipe, args: argparse.Namespace):
    """The pipeline's generation config (the released preset with ``--released``) + the flags."""
    from prior.sampling.config import GenerationConfig

    base = GenerationConfig.released() if getattr(args, "released", False) else pipe.generation_config
    return base.replace(**generation_overrides(args))


DTYPES = ("float32", "bfloat16")


def add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="weights of every model (bfloat16: AMX/avx512-bf16 on CPUs that have it; 94-98%% token agreement "
        "with fp32 on the paper recipe, 88-90%% on the quickstart's, README 'Speed'; --autocast bfloat16 "
        "keeps the weights fp32 and runs the prior's matmuls in bf16)",
    )  # fmt: skip


def _to_dtype(pipe, args: argparse.Namespace):
    import torch

    return pipe if args.dtype == "float32" else pipe.to(getattr(torch, args.dtype))


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    pipe = _to_dtype(load_pipeline(args.checkpoint), args)
    config = _generation_config(pipe, args)
    generator = torch.Generator().manual_seed(args.seed)
    if args.stream:
        for chunk in pipe.stream(args.prompt, config, generator=generator):
            print(
                chunk.texts[0] if len(args.prompt) == 1 else chunk.texts,
                end="" if len(args.prompt) == 1 else "\n",
            )
            sys.stdout.flush()
        print()
        return
    out = pipe(args.prompt, config, generator=generator)
    for prompt, text in zip(args.prompt, out.texts):
        print(f"{prompt}\u2502{text}")


def cmd_chat(args: argparse.Namespace) -> None:
    from prior.checkpoints.released import load_cola_pipeline
    from prior.pipelines.chat import ChatSession

    pipe = load_cola_pipeline(args.checkpoint, purpose="unimodal chat")
    pipe.set_progress_bar_config(disable=True)
    session = ChatSession(pipe, _generation_config(pipe, args), seed=args.seed, system=args.system)
    print("chat: /reset clears the conversation, /exit quits", flush=True)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        if not line.strip():
            continue
        print("assistant> ", end="", flush=True)
        for piece in session.stream_reply(line):
            print(piece, end="", flush=True)
        print(flush=True)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from prior.checkpoints.released import load_cola_pipeline
    from prior.serving.server import ServeConfig, create_app

    pipe = _to_dtype(load_cola_pipeline(args.checkpoint, purpose="unimodal serve"), args)
    pipe.set_progress_bar_config(disable=True)
    pipe.generation_config = _generation_config(pipe, args)
    cfg = ServeConfig(
        args.model_name, args.api_key, not args.no_batching, args.batch_window_ms, args.max_batch
    )
    uvicorn.run(create_app(pipe, cfg), host=args.host, port=args.port, log_level="warning")


# Quickstart recipes: config overrides applied before the user's --vae / --cola ones.
QUICKSTART_RECIPES = {
    "paper": {"vae": [], "cola": []},  # the configs as written: the paper's configuration at toy scale
    "categorical": {  # the measured winner at toy scale, an extension (README "Quality at toy scale")
        "vae": ["vae.encoder_context=token"],  # one latent per token id
        "cola": [
            "prior.prediction=categorical",  # token cross-entropy; velocity from the clean estimate
            "prior.block_size=1",  # one latent per block: the largest lever (README "Levers at equal wall clock")
            "generation.noise_scale=0.5",
        ],
    },
}
DEFAULT_RECIPE = "categorical"
QUICKSTART_DIR = "runs/quickstart"


def cmd_quickstart(args: argparse.Namespace) -> None:
    from prior.checkpoints.run_folders import resolve_export
    from prior.eval.vae import evaluate_text_vae
    from prior.training.recipes import train_cola, train_text_vae
    from prior.training.run_config import load_run_config
    from unimodal.text_data import build_text_datasets
    from unimodal.tokenization import load_tokenizer

    if args.multimodal:
        from prior.quickstart_multimodal import run_multimodal_quickstart

        configs = Path(__file__).resolve().parents[1] / "configs" / "multimodal"
        if not configs.is_dir():
            raise FileNotFoundError(
                f"config folder not found: {configs} (quickstart runs from a source checkout)"
            )
        out = Path(args.output_dir if args.output_dir != QUICKSTART_DIR else "runs/quickstart_multimodal")
        run_multimodal_quickstart(
            configs, out, args.mm_text_minutes, args.mm_image_minutes, args.mm_prior_minutes, args.mm_eval,
            {"text_vae": args.vae, "image_vae": args.image_vae, "prior": args.cola},
        )  # fmt: skip
        return
    configs = Path(__file__).resolve().parents[1] / "configs" / "text"
    if not configs.is_dir():
        raise FileNotFoundError(
            f"config folder not found: {configs} (quickstart runs from a source checkout)"
        )
    out = Path(args.output_dir)
    recipe = QUICKSTART_RECIPES[args.recipe]
    print(
        f"recipe {args.recipe}: Stage 1 {recipe['vae'] or 'as configured'}, Stage 2 {recipe['cola'] or 'as configured'}"
    )
    common = ["train.resume=latest"]  # re-running the quickstart continues (or just reports)
    vae_budget = f"train.max_time_minutes={args.vae_minutes}"
    vae_cfg = load_run_config(
        configs / "vae_tiny.yaml",
        [f"train.output_dir={out / 'vae'}", vae_budget, *common, *recipe["vae"], *args.vae],
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
            *recipe["cola"],
            *args.cola,
        ],
    )
    train_cola(cola_cfg)

    print("== Samples ==")
    print(_samples_report(out / "cola", cola_cfg, args.num_prompts, args.show))
    if args.baseline == "ar":
        _quickstart_ar(args, configs, out, common)


def _quickstart_ar(args: argparse.Namespace, configs: Path, out: Path, common: list[str]) -> None:
    """The matched AR baseline from the same Stage-1 run (its tokenizer), with the prior's budget."""
    from prior.training.recipes import train_ar
    from prior.training.run_config import load_run_config

    print("== AR baseline (same tokens, data, trainer and budget) ==")
    ar_cfg = load_run_config(
        configs / "ar_tiny.yaml",
        [
            f"stage1={out / 'vae'}",
            f"train.output_dir={out / 'ar'}",
            f"train.max_time_minutes={args.prior_minutes}",
            *common,
            *args.ar,
        ],
    )
    train_ar(ar_cfg)
    print("== AR baseline samples ==")
    print(_samples_report(out / "ar", ar_cfg, args.num_prompts, args.show))


def _samples_report(
    checkpoint, cfg, num_prompts: int, show: int, args: argparse.Namespace | None = None, out_json=None
) -> str:
    """Samples of held-out prompts with the checkpoint's generation config (+ the flags in ``args``);
    ``out_json``: also write the figures there."""
    from prior.eval.samples import generation_report
    from unimodal.text_data import load_documents

    pipe = load_pipeline(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.generation_config if args is None else _generation_config(pipe, args)
    train_texts, val_texts = load_documents(cfg.data)
    report = generation_report(
        pipe, train_texts, val_texts, num_prompts=num_prompts, generation_config=config
    )
    if out_json is not None:
        import json

        Path(out_json).write_text(
            json.dumps({"checkpoint": str(checkpoint), **report.as_dict()}, indent=2) + "\n"
        )
    return report.format(show=show)


def cmd_eval_samples(args: argparse.Namespace) -> None:
    from prior.training.run_config import RunConfig, load_run_config

    run_yaml = args.config or _find_run_config(Path(args.checkpoint))
    cfg = load_run_config(run_yaml) if run_yaml else RunConfig()
    print(_samples_report(args.checkpoint, cfg, args.num_prompts, args.show, args, args.out))


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
        **generation_overrides(args),
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
    add_generation_flags(p)  # default: the released numbers (GenerationConfig.released())
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

    p = sub.add_parser(
        "chat", help="a multi-turn terminal chat with a Cola pipeline (streamed block by block)"
    )
    p.add_argument("checkpoint", help="a Cola run folder, pipeline folder or released folder")
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--released", action="store_true", help="start from the released preset")
    add_generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server that batches concurrent requests")
    p.add_argument("checkpoint", help="a Cola run folder, pipeline folder or released folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="cola", help="the model id clients ask for")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--no-batching", action="store_true", help="serve one request at a time")
    p.add_argument("--batch-window-ms", type=float, default=20.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--released", action="store_true", help="start from the released preset")
    add_dtype_flag(p)
    add_generation_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("sample", help="generate text with a Cola (or AR baseline) pipeline")
    p.add_argument("checkpoint", help="pipeline folder, Stage-2 run folder or AR baseline run folder")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch; '' = unconditional")
    p.add_argument("--stream", action="store_true", help="print text block by block")
    p.add_argument(
        "--released", action="store_true", help="start from the released preset (GenerationConfig.released())"
    )
    p.add_argument("--seed", type=int, default=0)
    add_dtype_flag(p)
    add_generation_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "eval-samples",
        help="samples of a Cola (or AR baseline) pipeline on held-out prompts + quality figures",
    )
    p.add_argument("checkpoint", help="pipeline folder, Stage-2 run folder or AR baseline run folder")
    p.add_argument("--config", default=None, help="run YAML for the data section (default: the run's own)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--show", type=int, default=6, help="samples to print")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--released", action="store_true", help="start from the released preset (GenerationConfig.released())"
    )
    add_generation_flags(p)
    p.set_defaults(func=cmd_eval_samples)

    p = sub.add_parser("quickstart", help="tiny Stage 1 + Stage 2 on the embedded corpus, then samples")
    p.add_argument("--output-dir", default=QUICKSTART_DIR)
    p.add_argument(
        "--multimodal", action="store_true",
        help="the image-text path instead: Text VAE on captions, image VAE (AutoencoderKL), text+image prior "
        "on the embedded shapes; prints both directions' accuracy and writes the PNG grid "
        "(default output runs/quickstart_multimodal; --vae/--image-vae/--cola override its three configs)",
    )  # fmt: skip
    p.add_argument("--mm-text-minutes", type=float, default=2.0, help="--multimodal: Text VAE budget")
    p.add_argument("--mm-image-minutes", type=float, default=4.0, help="--multimodal: image VAE budget")
    p.add_argument("--mm-prior-minutes", type=float, default=18.0, help="--multimodal: prior budget")
    p.add_argument("--mm-eval", type=int, default=96, help="--multimodal: held-out examples per direction")
    p.add_argument(
        "--image-vae",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--multimodal: image VAE override",
    )
    p.add_argument(
        "--recipe", choices=sorted(QUICKSTART_RECIPES), default=DEFAULT_RECIPE,
        help="paper: the configs as written (the paper's configuration); categorical: the extension "
        "(token-local latents + categorical prior head, see README 'Quality at toy scale')",
    )  # fmt: skip
    p.add_argument("--vae-minutes", type=float, default=3.0, help="Stage-1 wall-clock budget")
    p.add_argument("--prior-minutes", type=float, default=9.5, help="Stage-2 wall-clock budget")
    p.add_argument("--vae", action="append", default=[], metavar="KEY=VALUE", help="Stage-1 config override")
    p.add_argument("--cola", action="append", default=[], metavar="KEY=VALUE", help="Stage-2 config override")
    p.add_argument(
        "--baseline", choices=["none", "ar"], default="none",
        help="ar: then train the matched autoregressive baseline (configs/text/ar_tiny.yaml) from the same "
        "Stage-1 run for --prior-minutes and print its samples with the same report (extra time: "
        "--prior-minutes plus about a minute)",
    )  # fmt: skip
    p.add_argument(
        "--ar", action="append", default=[], metavar="KEY=VALUE", help="AR baseline config override"
    )
    p.add_argument("--num-prompts", type=int, default=32)
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
