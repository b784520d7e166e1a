"""Scoring of the generative benchmark: the released ``acc_calc.py`` rules (docs/released-format.md §8).

Every task is scored from free-form generations (32 new tokens); nothing here looks at logits.

Design choices
--------------
- **Preprocessing** (``split_generation``, ``preprocess_records``). A generation is cut at the first
  ``"\\n"`` whose preceding text contains a word character; the cut-off part goes to ``others``
  (``generation + others`` is the original text, so the cut is lossless and idempotent). The
  longest common prefix of all prompts of a task is its ``few_shot_prefix`` and is removed from each
  prompt (a single prompt is its own prefix, as with ``os.path.commonprefix``). Nothing is
  rewritten in place: new records come back.
- **Normalisation** (``normalize_text``): lowercase, strip, delete every character that is neither a
  word character (``\\w``, Unicode) nor whitespace, collapse whitespace runs to one space (which
  also strips what the deletion exposed, e.g. ``"! yes"`` -> ``"yes"``).
- **Similarity** (``similarity``): ``difflib.SequenceMatcher(None, a, b).ratio()`` on normalised
  strings, 1.0 when both are empty. The released threshold is 1.0 for every task, so ``is_match``
  with the default threshold is an exact normalised match.
- **Per-task rules** (``SCORING_RULES``):
  ``first_word`` (lambada and the embedded ``next_word``): the first words of the normalised
  generation and ground truth are equal. ``choice`` (mmlu, obqa, race, siqa and the embedded
  ``continuation``): a letter is extracted from the generation and from the ground truth; correct
  when both are non-empty and equal, or (the fallback) when generation and ground truth match
  exactly after normalisation. ``exact`` (hellaswag, squad, story_cloze): exact normalised match.
- **Letter extraction** (``extract_choice_letter``). Valid letters are ``A..`` one per choice. The
  "answer segment" is the text after the separator on the last line matching ``answer|final
  answer`` + ``is|=|:``; the seven rules are tried on that segment first, then on the full text:
  (1) the string is a single letter, optionally bracketed and/or followed by a period; (2) the
  last ``answer|final answer|option|choice [is|=|:] X`` (separator optional here so that
  ``"Option B"`` counts); (3) if the string has <= 40 characters, the last ``(X)``; (4) exact
  normalised match to a choice; (5) the same after removing a leading "the correct final answer
  is"; (6) exactly one choice contained in the text (whole-word containment on normalised text);
  (7) the best SequenceMatcher ratio against the choices if >= 0.9. Letters are case-insensitive;
  in rule (2) an unbracketed lower-case letter followed by another word is the article/pronoun,
  not a letter ("the answer is a dog" gives no letter from rule 2). The ground-truth letter comes
  from rules (1)-(3) or an exact normalised text match (rule 4).
- **Totals**: accuracy = 100 * correct / total per task; the average is the plain mean of the task
  accuracies (not weighted by item counts), as in the released ``accuracy_summary.csv``.
- Bad input fails loudly with a one-line ValueError (unknown task, missing record field, empty
  ground truth, a choice task without choices).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SIMILARITY_THRESHOLD = 1.0  # released value for every task: exact normalised match
FUZZY_CHOICE_THRESHOLD = 0.9  # rule (7) of the letter extraction
SHORT_TEXT_CHARS = 40  # rule (3): "(X)" only counts in strings this short
CORRECT_FINAL_ANSWER = "the correct final answer is"  # rule (5), already normalised

SCORING_RULES: dict[str, str] = {
    "lambada": "first_word",
    "next_word": "first_word",
    "mmlu": "choice",
    "obqa": "choice",
    "race": "choice",
    "siqa": "choice",
    "continuation": "choice",
    "hellaswag": "exact",
    "squad": "exact",
    "story_cloze": "exact",
}
DISPLAY_NAMES: dict[str, str] = {
    "lambada": "LAMBADA",
    "mmlu": "MMLU",
    "obqa": "OBQA",
    "hellaswag": "HellaSwag",
    "race": "RACE",
    "siqa": "SIQA",
    "squad": "SQuAD",
    "story_cloze": "Story Cloze",
    "next_word": "Next word (embedded)",
    "continuation": "Continuation (embedded)",
}

_WORD_CHAR = re.compile(r"\w")
_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")
# rule (1): "B", "b", "(B)", "[B]", "B.", "(B)."
_SINGLE_LETTER = re.compile(r"^\s*[(\[]?\s*([A-Za-z])\s*[)\]]?\s*\.?\s*$")
# rule (2): "answer is B", "final answer = a", "Answer: (C)", "option D", "choice: [A]"
_KEYED_LETTER = re.compile(
    r"\b(?:final\s+answer|answer|option|choice)\s*(?:is\b\s*[:=]?|[:=])?\s*([(\[])?([A-Za-z])(?(1)[)\]])(?!\w)",
    re.IGNORECASE,
)
_FOLLOWED_BY_WORD = re.compile(r"\s+\w")
# rule (3): "(B)"
_BRACKETED_LETTER = re.compile(r"\(([A-Za-z])\)")
# the answer segment: text after the separator on a line like "The final answer is: ..."
_ANSWER_LINE = re.compile(r"\b(?:final\s+answer|answer)\s*(?:is\b\s*[:=]?|[:=])(.*)$", re.IGNORECASE)


# ------------------------------------------------------------------------------------ text helpers


def normalize_text(text: str) -> str:
    """Lowercase, strip, drop non-word non-space characters, collapse whitespace."""
    text = _NOT_WORD_OR_SPACE.sub("", text.lower().strip())
    return " ".join(text.split())


def similarity(a: str, b: str) -> float:
    """SequenceMatcher ratio of the normalised strings (1.0 when both are empty)."""
    a, b = normalize_text(a), normalize_text(b)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b).ratio()


def is_match(a: str, b: str, threshold: float = SIMILARITY_THRESHOLD) -> bool:
    """``similarity(a, b) >= threshold``; the default 1.0 means exact normalised match."""
    if threshold >= 1.0:  # ratio == 1.0 iff the strings are equal; skip the O(n^2) matcher
        return normalize_text(a) == normalize_text(b)
    return similarity(a, b) >= threshold


def first_word(text: str) -> str:
    """First word of the normalised text ('' if there is none)."""
    words = normalize_text(text).split()
    return words[0] if words else ""


def split_generation(text: str) -> tuple[str, str]:
    """(generation, others): cut at the first "\\n" whose preceding text has a word character."""
    first = _WORD_CHAR.search(text)
    cut = text.find("\n", first.start()) if first else -1
    if cut < 0:
        return text, ""
    return text[:cut], text[cut:]


def common_prefix(prompts: Sequence[str]) -> str:
    """Longest common (character) prefix of all prompts: the few-shot prefix."""
    return os.path.commonprefix(list(prompts)) if prompts else ""


# ------------------------------------------------------------------------------ letter extraction


def choice_letters(choices: Sequence[str]) -> str:
    """'ABCD' for four choices."""
    if not choices:
        raise ValueError("choices must be a non-empty list for letter extraction")
    if len(choices) > 26:
        raise ValueError(f"{len(choices)} choices: at most 26 are supported")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]


def _answer_segment(text: str) -> str | None:
    """Text after "answer is"/"final answer:" on the last line that has one; None if no line does."""
    segment = None
    for line in text.splitlines():
        m = _ANSWER_LINE.search(line)
        if m:
            segment = m.group(1)
    return segment


def _letter_rules(text: str, letters: str) -> str:
    """Rules (1)-(3): the letter written out in the text."""
    m = _SINGLE_LETTER.match(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    found = ""
    for m in _KEYED_LETTER.finditer(text):
        letter, bracketed = m.group(2), m.group(1) is not None
        if letter.upper() not in letters:
            continue
        if letter.islower() and not bracketed and _FOLLOWED_BY_WORD.match(text, m.end()):
            continue  # "the answer is a dog": an article, not a letter
        found = letter.upper()
    if found:
        return found
    if len(text.strip()) <= SHORT_TEXT_CHARS:
        for m in _BRACKETED_LETTER.finditer(text):
            if m.group(1).upper() in letters:
                found = m.group(1).upper()
    return found


def _exact_choice(normalized: str, norm_choices: Sequence[str], letters: str) -> str:
    """Rule (4): the letter of the first choice equal to the normalised text."""
    if normalized:
        for letter, choice in zip(letters, norm_choices):
            if choice == normalized:
                return letter
    return ""


def _text_rules(text: str, choices: Sequence[str], letters: str) -> str:
    """Rules (4)-(7): the choice written out in the text."""
    normalized = normalize_text(text)
    norm_choices = [normalize_text(c) for c in choices]
    letter = _exact_choice(normalized, norm_choices, letters)
    if letter:
        return letter
    if normalized.startswith(CORRECT_FINAL_ANSWER):
        letter = _exact_choice(normalized[len(CORRECT_FINAL_ANSWER) :].strip(), norm_choices, letters)
        if letter:
            return letter
    if not normalized:
        return ""
    padded = f" {normalized} "
    contained = [lt for lt, c in zip(letters, norm_choices) if c and f" {c} " in padded]
    if len(contained) == 1:
        return contained[0]
    best_letter, best_ratio = "", -1.0
    for lt, c in zip(letters, norm_choices):
        ratio = difflib.SequenceMatcher(None, normalized, c).ratio() if c else 0.0
        if ratio > best_ratio:
            best_letter, best_ratio = lt, ratio
    return best_letter if best_ratio >= FUZZY_CHOICE_THRESHOLD else ""


def extract_choice_letter(text: str, choices: Sequence[str]) -> str:
    """The predicted option letter ('A', 'B', ...) of a generation, or '' if none can be read."""
    letters = choice_letters(choices)
    segment = _answer_segment(text)
    candidates = [segment, text] if segment is not None and segment.strip() else [text]
    for candidate in candidates:
        letter = _letter_rules(candidate, letters) or _text_rules(candidate, choices, letters)
        if letter:
            return letter
    return ""


def ground_truth_letter(ground_truth: str, choices: Sequence[str]) -> str:
    """The gold letter: written as a letter (rules 1-3) or the exact text of a choice; '' if neither."""
    letters = choice_letters(choices)
    norm_choices = [normalize_text(c) for c in choices]
    return _letter_rules(ground_truth, letters) or _exact_choice(
        normalize_text(ground_truth), norm_choices, letters
    )


# -------------------------------------------------------------------------------------- scoring


def scoring_rule(task: str) -> str:
    """'first_word', 'choice' or 'exact'."""
    if task not in SCORING_RULES:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(sorted(SCORING_RULES))}")
    return SCORING_RULES[task]


def score_item(
    task: str,
    generation: str,
    ground_truth: str,
    choices: Sequence[str] | None = None,
    cut_newline: bool = True,
) -> bool:
    """Whether one generation is correct under the task's rule (the newline cut is applied first)."""
    rule = scoring_rule(task)
    if not isinstance(generation, str):
        raise ValueError(f"generation must be a str, got {type(generation).__name__}")
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"ground truth must be a non-empty str, got {ground_truth!r}")
    if cut_newline:
        generation = split_generation(generation)[0]
    if rule == "first_word":
        return first_word(generation) == first_word(ground_truth)
    if rule == "exact":
        return is_match(generation, ground_truth)
    if not choices:
        raise ValueError(f"task {task!r} is scored by option letter and needs choices, got {choices!r}")
    predicted = extract_choice_letter(generation, choices)
    gold = ground_truth_letter(ground_truth, choices)
    return (bool(predicted) and predicted == gold) or is_match(generation, ground_truth)


@dataclass
class TaskScore:
    """Accuracy of one task, in percent."""

    task: str
    correct: int
    total: int
    accuracy: float


@dataclass
class PreprocessedTask:
    """Records after the newline cut, with the few-shot prefix removed from their prompts."""

    few_shot_prefix: str
    records: list[dict]


def _field(record: Mapping, names: tuple[str, ...], index: int) -> object:
    for name in names:
        if name in record:
            return record[name]
    raise ValueError(f"record {index} has none of the fields {names}")


def preprocess_records(records: Sequence[Mapping]) -> PreprocessedTask:
    """Cut every generation at the first qualifying newline; move the common prompt prefix out.

    A record needs ``generation`` (or the released name ``generate``) and ``ground_truth`` (or
    ``answer``); ``choices``, ``prompt`` and anything else are carried over. Prompts are either on
    every record or on none.
    """
    with_prompt = sum("prompt" in r for r in records)
    if 0 < with_prompt < len(records):
        raise ValueError(f"{with_prompt} of {len(records)} records have a 'prompt'; need all or none")
    prefix = common_prefix([r["prompt"] for r in records]) if with_prompt else ""
    out = []
    for i, record in enumerate(records):
        generation, others = split_generation(_field(record, ("generation", "generate"), i))
        new = {k: v for k, v in record.items() if k != "generate"}
        new["ground_truth"] = _field(record, ("ground_truth", "answer"), i)
        new["generation"], new["others"] = generation, others
        if with_prompt:
            new["prompt"] = record["prompt"][len(prefix) :]
        out.append(new)
    return PreprocessedTask(few_shot_prefix=prefix, records=out)


def score_records(task: str, records: Sequence[Mapping]) -> PreprocessedTask:
    """Preprocess, then add ``correct`` (bool) to every record."""
    scoring_rule(task)
    prepared = preprocess_records(records)
    for record in prepared.records:
        record["correct"] = score_item(
            task, record["generation"], record["ground_truth"], record.get("choices"), cut_newline=False
        )
    return prepared


def score_task(task: str, records: Sequence[Mapping]) -> TaskScore:
    """Accuracy (percent) of one task's records."""
    if not records:
        raise ValueError(f"no records to score for task {task!r}")
    correct = sum(r["correct"] for r in score_records(task, records).records)
    return TaskScore(task=task, correct=correct, total=len(records), accuracy=100.0 * correct / len(records))


def summarize(scores: Iterable[TaskScore]) -> dict:
    """``{"tasks": {task: {correct, total, accuracy}}, "average": plain mean of the accuracies}``."""
    scores = list(scores)
    if not scores:
        raise ValueError("no task scores to summarize")
    tasks: dict[str, dict] = {}
    for s in scores:
        if s.task in tasks:
            raise ValueError(f"task {s.task!r} appears twice in the scores")
        tasks[s.task] = {"correct": s.correct, "total": s.total, "accuracy": s.accuracy}
    return {"tasks": tasks, "average": sum(s.accuracy for s in scores) / len(scores)}


def format_markdown_table(scores: Iterable[TaskScore]) -> str:
    """The released results table: task | accuracy | correct / total, then the average row."""
    scores = list(scores)
    summary = summarize(scores)
    lines = ["| task | accuracy | correct / total |", "|---|---:|---:|"]
    for s in scores:
        name = DISPLAY_NAMES.get(s.task, s.task)
        lines.append(f"| {name} | {s.accuracy:.2f} | {s.correct}/{s.total} |")
    lines.append(f"| **Average** | **{summary['average']:.2f}** | |")
    return "\n".join(lines) + "\n"
