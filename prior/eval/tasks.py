"""The generative benchmark's data side: items, loaders, the embedded tasks, results files.

Eight released tasks (lambada, squad, obqa, mmlu, siqa, hellaswag, race, story_cloze) plus two
EMBEDDED tasks built from held-out embedded-corpus text so that evaluation runs offline
(``next_word``, ``continuation``). Scoring lives in ``prior.eval.scoring``.

Design choices
--------------
- **Items** (``EvalItem``): ``prompt`` is the fully rendered prompt the model continues;
  ``ground_truth`` is the answer TEXT (for choice tasks, the text of the correct option, so the
  letter rule and the exact-match fallback of ``prior.eval.scoring`` both see option text);
  ``question`` / ``context`` keep the raw fields for the results file.
- **Prompts** are rendered by :func:`prior.eval.templates.apply_prompt_template` (the released
  templates and our few-shot examples).
- **Loaders**: ``load_task_jsonl`` reads local JSON lines (``question``; ``answer`` or
  ``ground_truth``; optional ``choices``, ``context``, ``id``); an answer of a choice task may be the
  option text, its letter (``"B"``, ``"(B)"``) or its 0-based index, and is stored as the option
  text (an answer that is none of these raises). ``load_task_hf`` maps the public HF datasets'
  fields (table ``HF_SOURCES``); ``datasets`` is imported lazily and a missing package or an
  offline/missing dataset raises one clear error. Like the released runner, ``limit`` keeps the
  first items.
- **Embedded tasks** (``embedded_tasks``), deterministic for a given ``val_texts`` and ``seed``:
  documents are split into sentences (within their ``"\\n"``-separated paragraphs, at ``.!?`` +
  whitespace + capital/digit). ``next_word``: a sentence whose last token is a word of >= 2 letters
  (plus trailing punctuation); the prompt is up to ``context_sentences`` preceding sentences of the
  same document plus the sentence without that word (no trailing space), the ground truth is the
  word; scored by the lambada first-word rule. ``continuation``: a sentence with a preceding
  sentence; the prompt context is up to ``context_sentences`` preceding sentences, the options are
  the true sentence and 3 sentences drawn from OTHER documents (distinct after normalisation), the
  true one at a random position; scored by the letter rule. Candidates are enumerated in document
  order and sampled with ``random.Random(seed)``; ``n_items`` is a per-task maximum.
- **Results** (``write_results``): ``results.json`` (summary + per-item records, with the few-shot
  prefix once per task when known) and ``results.md`` (task | accuracy | correct / total, then
  the average row).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from prior.eval.scoring import (
    PreprocessedTask,
    TaskScore,
    choice_letters,
    format_markdown_table,
    normalize_text,
    summarize,
)
from prior.eval.templates import apply_prompt_template
from unimodal.text_data import iter_jsonl

RELEASED_TASKS = ("lambada", "obqa", "hellaswag", "mmlu", "race", "siqa", "squad", "story_cloze")
EMBEDDED_TASKS = ("next_word", "continuation")


@dataclass
class EvalItem:
    """One benchmark item: the rendered prompt and the answer text."""

    id: str
    task: str
    prompt: str  # the fully rendered prompt (template + few-shot examples)
    ground_truth: str  # answer text; for choice tasks the text of the correct option
    choices: list[str] | None
    question: str = ""  # raw question field
    context: str | None = None  # raw context (squad)

    def record(self, generation: str) -> dict:
        """The scorer's input record for this item and one generation."""
        return {
            "id": self.id,
            "task": self.task,
            "prompt": self.prompt,
            "generation": generation,
            "ground_truth": self.ground_truth,
            "choices": self.choices,
        }


# ------------------------------------------------------------------------------------------- items


def _resolve_answer(task: str, answer: object, choices: Sequence[str] | None) -> str:
    """The answer text; for choice tasks an option text, letter or index becomes the option text."""
    if not choices:
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{task}: answer must be a non-empty string, got {answer!r}")
        return answer
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise ValueError(f"{task}: answer index {answer} out of range for {len(choices)} choices")
        return choices[answer]
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{task}: answer must be a non-empty string or an index, got {answer!r}")
    for choice in choices:
        if normalize_text(choice) == normalize_text(answer):
            return choice
    m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\.?\s*", answer)
    letters = choice_letters(choices)
    if m and m.group(1).upper() in letters:
        return choices[letters.index(m.group(1).upper())]
    raise ValueError(f"{task}: answer {answer!r} is neither a choice text nor a letter among {letters}")


def make_item(
    task: str,
    id: str,
    question: str,
    answer: object,
    choices: Sequence[str] | None = None,
    context: str | None = None,
) -> EvalItem:
    """Validate the raw fields and render the prompt."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{task}: question must be a non-empty string, got {question!r}")
    if choices is not None:
        if not isinstance(choices, (list, tuple)) or not all(
            isinstance(c, str) and c.strip() for c in choices
        ):
            raise ValueError(f"{task}: choices must be a list of non-empty strings, got {choices!r}")
        choices = list(choices)
    prompt = apply_prompt_template(task, question, choices, context)
    return EvalItem(
        id=str(id),
        task=task,
        prompt=prompt,
        ground_truth=_resolve_answer(task, answer, choices),
        choices=choices,
        question=question,
        context=context,
    )


def load_task_jsonl(path: str | os.PathLike, task: str, limit: int | None = None) -> list[EvalItem]:
    """Items of one task from a JSON-lines file (the first ``limit`` lines when given)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for all items)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    items: list[EvalItem] = []
    for lineno, row in iter_jsonl(path, "question"):
        if limit is not None and len(items) >= limit:
            break
        answers = [row[k] for k in ("answer", "ground_truth") if k in row]
        if not answers:
            raise ValueError(f"{path}:{lineno}: needs an 'answer' or 'ground_truth' field")
        if len(answers) == 2 and answers[0] != answers[1]:
            raise ValueError(f"{path}:{lineno}: 'answer' and 'ground_truth' disagree")
        item_id = row.get("id", f"{task}-{len(items)}")
        try:
            items.append(
                make_item(task, item_id, row["question"], answers[0], row.get("choices"), row.get("context"))
            )
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from e
    if not items:
        raise ValueError(f"no items in {path}")
    return items


# ------------------------------------------------------------------------------------ HF datasets


# Each converter maps one public row to ``make_item`` keyword arguments (an int answer is an index).


def _lambada(row: Mapping, i: int) -> dict:
    question, _, answer = row["text"].strip().rpartition(" ")  # the target is the last word
    return dict(id=f"lambada-{i}", question=question, answer=answer)


def _obqa(row: Mapping, i: int) -> dict:
    choices = list(row["choices"]["text"])
    answer = list(row["choices"]["label"]).index(row["answerKey"])
    return dict(id=str(row["id"]), question=row["question_stem"], choices=choices, answer=answer)


def _hellaswag(row: Mapping, i: int) -> dict:
    if str(row["label"]).strip() == "":
        raise ValueError(f"hellaswag row {i} has no label (the test split is unlabelled; use validation)")
    return dict(
        id=f"hellaswag-{row.get('ind', i)}",
        question=row["ctx"],
        choices=list(row["endings"]),
        answer=int(row["label"]),
    )


def _mmlu(row: Mapping, i: int) -> dict:
    return dict(
        id=f"mmlu-{row.get('subject', '')}-{i}",
        question=row["question"],
        choices=list(row["choices"]),
        answer=int(row["answer"]),
    )


def _race(row: Mapping, i: int) -> dict:
    return dict(
        id=f"race-{i}",
        question=f"{row['article']}\nQuestion: {row['question']}",
        choices=list(row["options"]),
        answer=row["answer"],
    )


def _siqa(row: Mapping, i: int) -> dict:
    return dict(
        id=f"siqa-{i}",
        question=f"{row['context']} {row['question']}",
        choices=[row["answerA"], row["answerB"], row["answerC"]],
        answer=int(row["label"]) - 1,
    )


def _squad(row: Mapping, i: int) -> dict:
    return dict(
        id=str(row["id"]), question=row["question"], context=row["context"], answer=row["answers"]["text"][0]
    )


def _story_cloze(row: Mapping, i: int) -> dict:
    story = " ".join(row[f"input_sentence_{k}"] for k in range(1, 5))
    return dict(
        id=str(row.get("story_id", f"story_cloze-{i}")),
        question=story,
        choices=[row["sentence_quiz1"], row["sentence_quiz2"]],
        answer=int(row["answer_right_ending"]) - 1,
    )


@dataclass(frozen=True)
class HFSource:
    """Where a released task lives on the hub and how its rows map to item fields."""

    path: str
    name: str | None
    split: str
    convert: Callable[[Mapping, int], dict]


HF_SOURCES: dict[str, HFSource] = {
    "lambada": HFSource("EleutherAI/lambada_openai", "default", "test", _lambada),
    "obqa": HFSource("allenai/openbookqa", "main", "test", _obqa),
    "hellaswag": HFSource("Rowan/hellaswag", None, "validation", _hellaswag),
    "mmlu": HFSource("cais/mmlu", "all", "test", _mmlu),
    "race": HFSource("ehovy/race", "all", "test", _race),
    # siqa / story_cloze are loading-script datasets on the hub: with datasets >= 4 pass e.g.
    # revision="refs/convert/parquet" (siqa) or use a local jsonl file
    "siqa": HFSource("allenai/social_i_qa", None, "validation", _siqa),
    "squad": HFSource("rajpurkar/squad", None, "validation", _squad),
    # needs the manually downloaded files: load_task_hf("story_cloze", data_dir=...)
    "story_cloze": HFSource("LSDSem/story_cloze", "2016", "validation", _story_cloze),
}


def load_task_hf(
    task: str, split: str | None = None, limit: int | None = None, **load_kwargs
) -> list[EvalItem]:
    """Items of a released task from its public HF dataset (``load_kwargs`` go to ``load_dataset``)."""
    if task not in HF_SOURCES:
        raise ValueError(f"no HF source for task {task!r}; known: {', '.join(HF_SOURCES)}")
    source = HF_SOURCES[task]
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for all items)")
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_task_hf needs the `datasets` package: pip install 'unimodal[eval]'") from e
    split = split or source.split
    try:
        rows = datasets.load_dataset(source.path, source.name, split=split, **load_kwargs)
    except Exception as e:  # offline, missing dataset/config, manual download needed, ...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        raise RuntimeError(
            f"could not load {source.path} ({source.name}, {split}) for task {task!r}"
            f"{' with HF_HUB_OFFLINE set' if offline else ''}: {type(e).__name__}: {detail}; "
            "use load_task_jsonl with a local file or the embedded tasks instead"
        ) from e
    items = []
    for i, row in enumerate(itertools.islice(rows, limit)):
        items.append(make_item(task, **source.convert(row, i)))
    if not items:
        raise ValueError(f"{source.path} ({split}) gave no items for task {task!r}")
    return items


# ----------------------------------------------------------------------------------- embedded tasks

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"(\S+)\s*$")
_TARGET_WORD = re.compile(r"([A-Za-z]{2,})[.,;:!?\"')\]]*")


@dataclass(frozen=True)
class _Sentence:
    start: int  # character span in its document
    end: int


def _sentences(text: str) -> list[_Sentence]:
    """Sentence spans of one document (paragraphs are "\\n"-separated)."""
    out, pos = [], 0
    for para in text.split("\n"):
        start = pos
        for m in itertools.chain(_SENTENCE_BREAK.finditer(para), [None]):
            end = m.start() if m else len(para)
            if para[start - pos : end].strip():
                out.append(_Sentence(start, pos + end))
            if m:
                start = pos + m.end()
        pos += len(para) + 1
    return out


def _word_count(text: str, s: _Sentence) -> int:
    return len(text[s.start : s.end].split())


def _context_start(sents: Sequence[_Sentence], i: int, context_sentences: int) -> int:
    return sents[max(0, i - context_sentences)].start


def _sample(rng: random.Random, candidates: list, n_items: int) -> list:
    picked = sorted(rng.sample(range(len(candidates)), min(n_items, len(candidates))))
    return [candidates[k] for k in picked]


def embedded_tasks(
    val_texts: Sequence[str],
    n_items: int = 100,
    seed: int = 0,
    context_sentences: int = 2,
    min_words: int = 5,
    max_words: int = 40,
) -> dict[str, list[EvalItem]]:
    """Offline ``next_word`` (cloze) and 4-way ``continuation`` items from held-out documents."""
    if not val_texts or not all(isinstance(t, str) for t in val_texts):
        raise ValueError("val_texts must be a non-empty list of strings")
    if n_items < 1 or context_sentences < 1 or not 1 <= min_words <= max_words:
        raise ValueError(
            f"bad sizes: n_items={n_items}, context_sentences={context_sentences}, "
            f"min_words={min_words}, max_words={max_words}"
        )
    docs = [_sentences(text) for text in val_texts]
    fits = [
        [min_words <= _word_count(val_texts[d], s) <= max_words for s in sents]
        for d, sents in enumerate(docs)
    ]

    # next_word: the last word of a sentence, after its preceding context
    cloze = []  # (doc, sentence, start of the last word, the word)
    for d, sents in enumerate(docs):
        for i, s in enumerate(sents):
            last = _LAST_WORD.search(val_texts[d], s.start, s.end)
            target = _TARGET_WORD.fullmatch(last.group(1)) if fits[d][i] else None
            if target:
                cloze.append((d, i, last.start(), target.group(1)))
    # continuation: the true next sentence among sentences of other documents
    pool = [
        (d, val_texts[d][s.start : s.end].strip())
        for d, sents in enumerate(docs)
        for i, s in enumerate(sents)
        if fits[d][i]
    ]
    if len({d for d, _ in pool}) < 2:
        raise ValueError(f"continuation needs sentences from >= 2 documents, got {len(val_texts)} texts")
    candidates = [(d, i) for d, sents in enumerate(docs) for i in range(1, len(sents)) if fits[d][i]]
    rng = random.Random(seed)
    next_word = []
    for d, i, word_start, word in _sample(rng, cloze, n_items):
        prompt = val_texts[d][_context_start(docs[d], i, context_sentences) : word_start].rstrip()
        next_word.append(make_item("next_word", f"next_word-{d}-{i}", prompt, word))
    continuation = []
    for d, i in _sample(rng, candidates, n_items):
        sents, text = docs[d], val_texts[d]
        answer = text[sents[i].start : sents[i].end].strip()
        options, seen = [answer], {normalize_text(answer)}
        for _ in range(200):  # rejection sampling, bounded
            other_doc, sentence = pool[rng.randrange(len(pool))]
            if other_doc != d and normalize_text(sentence) not in seen:
                options.append(sentence)
                seen.add(normalize_text(sentence))
                if len(options) == 4:
                    break
        if len(options) < 4:
            continue
        options = options[1:]
        options.insert(rng.randrange(4), answer)
        prompt = text[_context_start(sents, i, context_sentences) : sents[i - 1].end].strip()
        continuation.append(make_item("continuation", f"continuation-{d}-{i}", prompt, answer, options))
    if not next_word or not continuation:
        raise ValueError(
            f"could not build embedded tasks from {len(val_texts)} texts "
            f"({len(next_word)} next_word, {len(continuation)} continuation items)"
        )
    return {"next_word": next_word, "continuation": continuation}


# ------------------------------------------------------------------------------------------ results


@dataclass
class ResultsFiles:
    """Paths written by ``write_results``."""

    json: Path
    markdown: Path


def _jsonable(record: object) -> dict:
    return asdict(record) if is_dataclass(record) else dict(record)


def write_results(
    out_dir: str | os.PathLike,
    per_task_records: Mapping[str, PreprocessedTask | Sequence[Mapping]],
    scores: Iterable[TaskScore],
) -> ResultsFiles:
    """``results.json`` (summary + per-item records per task) and ``results.md`` (the table)."""
    scores = list(scores)
    summary = summarize(scores)
    if set(per_task_records) != set(summary["tasks"]):
        raise ValueError(
            f"records for tasks {sorted(per_task_records)} but scores for {sorted(summary['tasks'])}"
        )
    tasks = {}
    for task, records in per_task_records.items():
        if isinstance(records, PreprocessedTask):
            tasks[task] = {"few_shot_prefix": records.few_shot_prefix, "records": records.records}
        else:
            tasks[task] = {"records": [_jsonable(r) for r in records]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ResultsFiles(json=out / "results.json", markdown=out / "results.md")
    files.json.write_text(
        json.dumps({"summary": summary, "tasks": tasks}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    files.markdown.write_text(format_markdown_table(scores), encoding="utf-8")
    return files
