"""``unimodal eval``: the released 8-task generative benchmark and the offline embedded task set.

Items come from :mod:`prior.eval.tasks` (local jsonl / HF loaders, the embedded tasks; prompts
from :mod:`prior.eval.templates`), the scores from :mod:`prior.eval.scoring` (the released ``acc_calc.py`` rules); this
module generates the answers with a :class:`~prior.pipelines.pipeline_cola_text.ColaTextPipeline`, prints the
per-task table and writes ``results.json`` + ``results.md`` (+ ``eval_config.json``).

Design choices
--------------
* **One switch for the released protocol**: ``released=True`` runs the pipeline with
  ``GenerationConfig.released()`` (docs/released-format.md, "Inference loop"): 32 new tokens, 16 Euler steps on the unshifted grid, CFG 7 (1 for a sample whose prefix is empty in
  the first block), greedy, repetition penalty 1.1 over earlier blocks; the prompt right-padded
  with the pad id to a block multiple and encoded with the pads, the first block's prompt tokens
  trimmed, whole blocks, a sample finished when a block holds EOS or ``<|im_end|>``, texts decoded
  with special tokens and not cut at EOS. Every number can be overridden. ``released=False``
  keeps the numbers but uses our default loop (clean repaint without pads, output cut at EOS and
  at ``max_new_tokens``). The CLI defaults to ``released`` for released checkpoints (a released
  folder, or a pipeline converted from one: it has ``cola_release.json``).
* **Noise per item**, as the released benchmark (``COLA_INFER_PER_SAMPLE_NOISE_SEED=66``): the
  noise of item ``id`` in block ``k`` (1-based) is ``randn(bs, d)`` from a generator on the
  pipeline's device seeded with ``seed + id * 1000 + k * 10_000_000``; an id that is not an integer
  is replaced by ``crc32(str(id))``. So scores do not depend on the batch size or order. (On CUDA
  this is the released recipe; whether the released ``k`` starts at 1 is [inferred] from its stop
  rule. On CPU the generator differs from CUDA's, so the noise does.) ``noise_seed=None`` draws
  the noise of a batch from one generator seeded with ``seed``.
* **Tasks**: ``embedded`` = the embedded tasks (``next_word``, ``continuation``) over the held-out
  split of the embedded corpus (offline); ``released`` = the 8 tasks; or names. A released task is
  read from ``<data_dir>/<task>.jsonl`` when that file exists, else from its public HF dataset
  (``load_task_hf``); ``limit`` keeps the first items (for the embedded tasks: at most ``limit``
  items per task, default 100).
* **Batches matter in the released loop**: a sample that meets EOS keeps receiving blocks while
  others in its batch run (whole blocks, nothing cut at EOS), so its text depends on the batch.
  :func:`released_batches` forms batches like the released runner: ``num_shards`` strided shards
  ``items[rank::num_shards]`` (8 GPUs), each cut into ``batch_size`` chunks (20);
  ``unimodal eval --shards 8 --batch-size 20`` reproduces that grouping on one device. Our loop
  cuts at EOS and ``max_new_tokens``, so there the batching does not change the texts. A tqdm bar
  counts items.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prior.eval.scoring import PreprocessedTask, TaskScore, format_markdown_table, score_records, summarize
from prior.eval.tasks import (
    EMBEDDED_TASKS,
    RELEASED_TASKS,
    EvalItem,
    ResultsFiles,
    embedded_tasks,
    load_task_hf,
    load_task_jsonl,
    write_results,
)
from prior.pipelines.pipeline_cola_text import ColaTextPipeline
from prior.sampling.config import RELEASED_SETTINGS, GenerationConfig

RELEASED_NOISE_SEED = 66  # run_benchmark.sh: COLA_INFER_PER_SAMPLE_NOISE_SEED
DEFAULT_EMBEDDED_ITEMS = 100
TASK_SETS = {"embedded": EMBEDDED_TASKS, "released": RELEASED_TASKS, "all": RELEASED_TASKS}


# --------------------------------------------------------------------------------- generation preset


def generation_config(released: bool = True, **overrides) -> GenerationConfig:
    """The benchmark's generation settings: the released loop with the released numbers
    (``GenerationConfig.released()``), or with ``released=False`` the same numbers in our loop
    (the scheduler's own ``shift``). ``overrides`` replace single fields (None = keep)."""
    base = GenerationConfig.released() if released else GenerationConfig(**RELEASED_SETTINGS)
    return base.replace(**overrides)


def sample_key(item_id: object) -> int:
    """The released per-sample seed key: the id if it is an integer, else ``crc32(str(id))``."""
    text = str(item_id).strip()
    try:
        return int(text)
    except ValueError:
        return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def per_sample_noise(
    keys: Sequence[int], seed: int, device: torch.device | str
) -> Callable[[int, tuple[int, ...]], torch.Tensor]:
    """``noise(block, (B, bs, d))`` for the pipeline: row i from a generator seeded
    ``seed + keys[i] * 1000 + (block + 1) * 10_000_000`` (block is 0-based here, 1-based released)."""

    def draw(block: int, shape: tuple[int, ...]) -> torch.Tensor:
        if shape[0] != len(keys):
            raise ValueError(f"noise for {shape[0]} samples requested, {len(keys)} keys given")
        rows = []
        for key in keys:
            gen = torch.Generator(device=device).manual_seed(seed + key * 1000 + (block + 1) * 10_000_000)
            rows.append(torch.randn(shape[1:], generator=gen, device=device, dtype=torch.float32))
        return torch.stack(rows)

    return draw


def pipeline_device(pipe: ColaTextPipeline) -> torch.device:
    return next(pipe.prior.parameters()).device


def generate_texts(
    pipe: ColaTextPipeline,
    prompts: Sequence[str],
    keys: Sequence[int] | None = None,
    noise_seed: int | None = RELEASED_NOISE_SEED,
    seed: int = 0,
    **call_kwargs,
) -> list[str]:
    """One batch through the pipeline; per-sample noise from ``keys`` unless ``noise_seed`` is None."""
    if noise_seed is not None:
        if keys is None or len(keys) != len(prompts):
            raise ValueError("per-sample noise needs one key per prompt")
        call_kwargs["noise"] = per_sample_noise(list(keys), noise_seed, pipeline_device(pipe))
    else:
        call_kwargs["generator"] = torch.Generator(device=pipeline_device(pipe)).manual_seed(seed)
    return pipe(list(prompts), output_type="text", **call_kwargs).texts


# --------------------------------------------------------------------------------------------- tasks


def parse_task_names(spec: str | Sequence[str]) -> list[str]:
    """'embedded' | 'released' | 'lambada,mmlu,...' (sets may be mixed with names) -> task names."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        expanded = TASK_SETS.get(part, (part,))
        for name in expanded:
            if name not in RELEASED_TASKS and name not in EMBEDDED_TASKS:
                known = ", ".join([*TASK_SETS, *RELEASED_TASKS, *EMBEDDED_TASKS])
                raise ValueError(f"unknown task {name!r}; known: {known}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"no tasks in {spec!r}")
    return names


def load_tasks(
    names: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    embedded_texts: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, list[EvalItem]]:
    """Items per task (see the module docstring for where each task comes from)."""
    tasks: dict[str, list[EvalItem]] = {}
    if any(n in EMBEDDED_TASKS for n in names):
        if embedded_texts is None:
            from unimodal.text_data import embedded_corpus

            embedded_texts = embedded_corpus()[1]
        built = embedded_tasks(embedded_texts, n_items=limit or DEFAULT_EMBEDDED_ITEMS, seed=seed)
    for name in names:
        if name in EMBEDDED_TASKS:
            tasks[name] = built[name]
            continue
        local = Path(data_dir) / f"{name}.jsonl" if data_dir is not None else None
        if local is not None and local.is_file():
            tasks[name] = load_task_jsonl(local, name, limit)
            continue
        try:
            tasks[name] = load_task_hf(name, limit=limit)
        except (ImportError, RuntimeError) as e:
            where = f"no {local} and " if local is not None else "no --data-dir and "
            raise FileNotFoundError(f"task {name!r}: {where}{str(e).splitlines()[0]}") from e
    return tasks


def released_batches(items: Sequence, batch_size: int, num_shards: int = 1) -> list[list]:
    """Batches as the released runner forms them: strided shards ``items[rank::num_shards]`` in rank
    order, each cut into consecutive chunks of ``batch_size``."""
    if batch_size < 1 or num_shards < 1:
        raise ValueError(f"batch_size and num_shards must be >= 1, got {batch_size} and {num_shards}")
    batches = []
    for rank in range(num_shards):
        shard = list(items[rank::num_shards])
        batches += [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    return batches


# ---------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalReport:
    """Scores, scored records and (when written) the results files of one evaluation."""

    scores: list[TaskScore]
    records: dict[str, PreprocessedTask]
    settings: dict
    files: ResultsFiles | None = None
    summary: dict = field(default_factory=dict)

    @property
    def average(self) -> float:
        return self.summary["average"]

    def format(self) -> str:
        return format_markdown_table(self.scores)


def run_generative_eval(
    pipe: ColaTextPipeline,
    tasks: dict[str, list[EvalItem]],
    batch_size: int = 20,
    released: bool = True,
    noise_seed: int | None = RELEASED_NOISE_SEED,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_shards: int = 1,
    run_info: dict | None = None,
    **generation,
) -> EvalReport:
    """Generate an answer for every item, score each task, optionally write the results files.

    ``generation``: overrides of the released settings (:func:`generation_config`);
    ``num_shards``: see :func:`released_batches`; ``run_info``: extra entries for the settings
    (e.g. the checkpoint path), recorded with them in ``report.settings`` and ``eval_config.json``.
    """
    if not tasks:
        raise ValueError("no tasks to evaluate")
    config = generation_config(released=released, **generation)
    pipe.set_progress_bar_config(disable=True)
    total = sum(len(items) for items in tasks.values())
    records: dict[str, PreprocessedTask] = {}
    scores: list[TaskScore] = []
    with tqdm(total=total, desc="eval", unit="item", disable=not progress) as bar:
        for task, items in tasks.items():
            bar.set_postfix_str(task)
            texts: dict[int, str] = {}
            for n, batch in enumerate(released_batches(range(len(items)), batch_size, num_shards)):
                generated = generate_texts(
                    pipe,
                    [items[i].prompt for i in batch],
                    keys=[sample_key(items[i].id) for i in batch],
                    noise_seed=noise_seed,
                    seed=seed + n,
                    generation_config=config,
                )
                texts.update(zip(batch, generated))
                bar.update(len(batch))
            prepared = score_records(task, [it.record(texts[i]) for i, it in enumerate(items)])
            correct = sum(bool(r["correct"]) for r in prepared.records)
            records[task] = prepared
            scores.append(TaskScore(task, correct, len(items), 100.0 * correct / len(items)))
    settings = {
        **(run_info or {}),
        "released": released,
        "generation": config.to_dict(),
        "batch_size": batch_size,
        "num_shards": num_shards,
        "noise_seed": noise_seed,
        "seed": seed,
        "stop_token_ids": pipe.stop_token_ids(),
        "pad_token_id": pipe.tokenizer.pad_token_id,
        "num_items": {task: len(items) for task, items in tasks.items()},
    }
    report = EvalReport(scores=scores, records=records, settings=settings, summary=summarize(scores))
    if out_dir is not None:
        report.files = write_results(out_dir, records, scores)
        (Path(out_dir) / "eval_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return report


def evaluate_checkpoint(
    path: str | os.PathLike,
    tasks: str | Sequence[str] = "embedded",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 20,
    out_dir: str | os.PathLike | None = None,
    released: bool | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    noise_seed: int | None = RELEASED_NOISE_SEED,
    seed: int = 0,
    progress: bool = True,
    num_shards: int = 1,
    **generation,
) -> EvalReport:
    """``unimodal eval``: load a pipeline / run / released folder, load the tasks, evaluate.

    ``released=None`` means: the released protocol for released checkpoints, else our loop.
    """
    from prior.checkpoints.released import load_cola_pipeline

    names = parse_task_names(tasks)
    items = load_tasks(names, data_dir=data_dir, limit=limit, seed=seed)
    pipe = load_cola_pipeline(path, "unimodal eval")  # an AR baseline folder: one ValueError line
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device=device, dtype=dtype)
    if released is None:
        released = getattr(pipe, "release_record", None) is not None
    report = run_generative_eval(
        pipe, items, batch_size=batch_size, released=released, noise_seed=noise_seed, seed=seed,
        out_dir=out_dir, progress=progress, num_shards=num_shards, **generation,
        run_info=dict(checkpoint=str(path), tasks=names, device=str(device)),
    )  # fmt: skip
    return report


__all__ = [
    "DEFAULT_EMBEDDED_ITEMS",
    "RELEASED_NOISE_SEED",
    "EvalReport",
    "evaluate_checkpoint",
    "generate_texts",
    "generation_config",
    "load_tasks",
    "parse_task_names",
    "per_sample_noise",
    "released_batches",
    "run_generative_eval",
    "sample_key",
]
