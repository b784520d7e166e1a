"""Eval items: templates on the sample files, loaders, the embedded task set, results files."""

import json
import sys
import types
from pathlib import Path

import pytest

from prior.eval.scoring import normalize_text, score_records, score_task
from prior.eval.tasks import (
    EMBEDDED_TASKS,
    HF_SOURCES,
    RELEASED_TASKS,
    embedded_tasks,
    load_task_hf,
    load_task_jsonl,
    make_item,
    write_results,
)
from prior.eval.templates import FEW_SHOT_EXAMPLES, PROMPT_TEMPLATES, apply_prompt_template

DATA = Path(__file__).parent / "data" / "eval_tasks"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _load(task):
    return load_task_jsonl(DATA / f"{task}.jsonl", task)


# -------------------------------------------------------------------------------------- templates


def test_few_shot_examples_match_the_released_format():
    counts = {"squad": 1, "obqa": 2, "mmlu": 2, "siqa": 2, "hellaswag": 2, "race": 1, "story_cloze": 2}
    options = {"obqa": 4, "mmlu": 4, "siqa": 3, "hellaswag": 4, "race": 4, "story_cloze": 2}
    assert {t: len(FEW_SHOT_EXAMPLES[t]) for t in counts} == counts
    for task, n in options.items():
        for ex in FEW_SHOT_EXAMPLES[task]:
            assert len(ex.choices) == n
            assert ex.answer in ex.choices  # solved with the option TEXT, not the letter
    assert FEW_SHOT_EXAMPLES["squad"][0].answer == "France"
    assert "Normans" in FEW_SHOT_EXAMPLES["squad"][0].context


def test_lambada_and_unknown_tasks_use_the_raw_question():
    (item,) = _load("lambada")[:1]
    assert item.prompt == item.question
    assert apply_prompt_template("my_task", "raw text?", ["x"]) == "raw text?"
    assert apply_prompt_template("next_word", "The cat sat on the") == "The cat sat on the"


def test_mmlu_prompt_exactly():
    item = _load("mmlu")[0]
    expected = (
        "Question: What is the value of 7 multiplied by 8?\n(A) 54\n(B) 56\n(C) 58\n(D) 64\nAnswer: 56\n\n"
        "Question: Which organelle is the main site of cellular respiration in eukaryotic cells?\n"
        "(A) the nucleus\n(B) the ribosome\n(C) the mitochondrion\n(D) the Golgi apparatus\n"
        "Answer: the mitochondrion\n\n"
        "Question: What is the chemical symbol for sodium?\n(A) S\n(B) So\n(C) Na\n(D) Sd\nAnswer:"
    )
    assert item.prompt == expected
    assert item.ground_truth == "Na"  # answer index 2


@pytest.mark.parametrize(
    "task, start, end",
    [
        ("squad", "Context: Normandy is", "Context: {context}\nQuestion: {question}\nAnswer:"),
        ("obqa", "Question: Which of these", "Question: {question}\n{options}\nAnswer:"),
        ("siqa", "Question: Jordan forgot", "Question: {question}\n{options}\nAnswer:"),
        ("hellaswag", "Context: A man is standing", "Context: {question}\n{options}\nAnswer:"),
        (
            "race",
            "Read the following article and answer the question.\n\nArticle: Tom",
            "Article: {question}\nOptions:\n{options}\nAnswer:",
        ),
        ("story_cloze", "Story: Anna wanted", "Story: {question}\n{options}\nEnd:"),
    ],
)
def test_templates_on_sample_files(task, start, end):
    items = _load(task)
    assert len(items) == 2
    for item in items:
        assert item.task == task
        assert item.prompt.startswith(start)
        options = "\n".join(f"({'ABCD'[k]}) {c}" for k, c in enumerate(item.choices or []))
        query = end.format(question=item.question, options=options, context=item.context)
        assert item.prompt.endswith("\n\n" + query)
        n_blocks = len(FEW_SHOT_EXAMPLES[task]) + 1 + (task == "race")  # race has a header block
        assert len(item.prompt.split("\n\n")) == n_blocks
        if item.choices:
            assert item.ground_truth in item.choices
            assert f"(A) {item.choices[0]}\n" in item.prompt


def test_answers_given_as_letter_index_or_text_become_option_text():
    assert [i.ground_truth for i in _load("obqa")] == ["nectar", "frozen"]  # text, "C"
    assert [i.ground_truth for i in _load("mmlu")] == ["Na", "six"]  # 2, "(B)"
    assert _load("hellaswag")[1].ground_truth == "sweeps the onions into a hot pan."  # "A"
    assert _load("story_cloze")[1].ground_truth == "Lucy was happy with her garden."  # 1
    assert _load("squad")[1].ground_truth == "Tanzania"  # "ground_truth" field
    assert [i.id for i in _load("siqa")] == ["siqa-0", "siqa-1"]  # default id for the second line


def test_sample_files_score_perfectly_with_their_answers():
    for task in RELEASED_TASKS:
        items = _load(task)
        records = [item.record(item.ground_truth + "\nQuestion: what next?") for item in items]
        assert score_task(task, records).accuracy == 100.0
        letters = [
            item.record("ABCD"[item.choices.index(item.ground_truth)]) for item in items if item.choices
        ]
        if task in ("obqa", "mmlu", "race", "siqa"):
            assert score_task(task, letters).accuracy == 100.0


def test_common_prefix_of_loaded_prompts_is_the_few_shot_block():
    prepared = score_records("obqa", [i.record(i.ground_truth) for i in _load("obqa")])
    assert prepared.few_shot_prefix.startswith("Question: Which of these lets heat")
    # the prefix is character-level: both sample questions start with "W"
    assert prepared.few_shot_prefix.endswith("Answer: sunlight\n\nQuestion: W")
    assert [r["prompt"] for r in prepared.records][0].startswith("hat do bees")
    assert all(r["correct"] for r in prepared.records)


# ---------------------------------------------------------------------------------------- loaders


def test_item_validation_errors():
    with pytest.raises(ValueError, match="needs choices"):
        make_item("mmlu", "x", "question?", "A")
    with pytest.raises(ValueError, match="needs a context"):
        make_item("squad", "x", "question?", "France")
    with pytest.raises(ValueError, match="neither a choice text nor a letter"):
        make_item("obqa", "x", "question?", "E", ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="out of range"):
        make_item("obqa", "x", "question?", 4, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="non-empty string"):
        make_item("lambada", "x", "the cat sat on the", "")
    with pytest.raises(ValueError, match="question"):
        make_item("lambada", "x", " ", "mat")
    assert make_item("obqa", "x", "q?", "The B.", ["the a", "the b"]).ground_truth == "the b"


def test_load_task_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task_jsonl(tmp_path / "nope.jsonl", "mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_task_jsonl(bad, "lambada")
    bad.write_text('{"question": "q?", "choices": ["x", "y"], "answer": "z"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: obqa: answer 'z'"):
        load_task_jsonl(bad, "obqa")
    bad.write_text('{"question": "q", "answer": "a", "ground_truth": "b"}\n')
    with pytest.raises(ValueError, match="disagree"):
        load_task_jsonl(bad, "lambada")
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="'answer' or 'ground_truth'"):
        load_task_jsonl(bad, "lambada")
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no items"):
        load_task_jsonl(bad, "lambada")
    assert len(load_task_jsonl(DATA / "mmlu.jsonl", "mmlu", limit=1)) == 1


HF_ROWS = {
    "lambada": {"text": "He opened the door and stepped into the"},
    "obqa": {
        "id": "7-980",
        "question_stem": "The sun is responsible for",
        "choices": {
            "text": ["puppies learning", "plants sprouting", "stars", "rocks"],
            "label": list("ABCD"),
        },
        "answerKey": "B",
    },
    "hellaswag": {"ind": 4, "ctx": "A man sits. He", "endings": ["a", "b", "c", "stands up."], "label": "3"},
    "mmlu": {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
    "race": {"article": "Text.", "question": "Why?", "options": ["w", "x", "y", "z"], "answer": "C"},
    "siqa": {
        "context": "Kai ate.",
        "question": "Why?",
        "answerA": "hungry",
        "answerB": "b",
        "answerC": "c",
        "label": "1",
    },
    "squad": {
        "id": "s1",
        "context": "Paris is in France.",
        "question": "Where is Paris?",
        "answers": {"text": ["France", "in France"], "answer_start": [12, 9]},
    },
    "story_cloze": {
        "story_id": "st1",
        **{f"input_sentence_{k}": f"S{k}." for k in range(1, 5)},
        "sentence_quiz1": "Bad.",
        "sentence_quiz2": "Good.",
        "answer_right_ending": 2,
    },
}


def test_load_task_hf_maps_public_fields(monkeypatch):
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        task = next(t for t, s in HF_SOURCES.items() if s.path == path)
        return [HF_ROWS[task]] * 3

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    expected = {
        "lambada": "the",
        "obqa": "plants sprouting",
        "hellaswag": "stands up.",
        "mmlu": "4",
        "race": "y",
        "siqa": "hungry",
        "squad": "France",
        "story_cloze": "Good.",
    }
    assert set(HF_SOURCES) == set(RELEASED_TASKS)
    for task in RELEASED_TASKS:
        items = load_task_hf(task, limit=2)
        assert len(items) == 2 and items[0].ground_truth == expected[task], task
        assert items[0].task == task and items[0].prompt.endswith(("Answer:", "End:", "stepped into"))
    assert calls[0] == ("EleutherAI/lambada_openai", "default", "test")
    assert load_task_hf("race", limit=1)[0].question == "Text.\nQuestion: Why?"
    assert load_task_hf("squad", split="train", limit=1)[0].context == "Paris is in France."
    assert calls[-1] == ("rajpurkar/squad", None, "train")


def test_load_task_hf_errors(monkeypatch):
    with pytest.raises(ValueError, match="no HF source for task 'next_word'"):
        load_task_hf("next_word")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nlong traceback text")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(
        RuntimeError, match=r"cais/mmlu .*HF_HUB_OFFLINE set: ConnectionError: Couldn't reach"
    ):
        load_task_hf("mmlu")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load_task_hf("mmlu")


# --------------------------------------------------------------------------------- embedded tasks

VAL_TEXTS = [
    "The parser reads the source file line by line. Each line is split into tokens. Tokens are grouped "
    "into statements by the grammar.\nA statement ends at a newline. Blank lines are ignored entirely.",
    "A dictionary maps hashable keys to arbitrary values. Looking up a missing key raises an error. The "
    "get method returns a default value instead.",
    "Threads share the memory of their process. A lock protects shared data from concurrent writers. "
    "Always release the lock when the work is done.",
    "The garbage collector frees objects that are no longer reachable. Reference cycles are found by a "
    "separate pass over the container objects.",
    "Short one.",
]


def test_embedded_tasks_are_deterministic_and_well_formed():
    tasks = embedded_tasks(VAL_TEXTS, n_items=50, seed=3)
    assert tuple(tasks) == EMBEDDED_TASKS
    assert tasks == embedded_tasks(list(VAL_TEXTS), n_items=50, seed=3)
    next_word, continuation = tasks["next_word"], tasks["continuation"]
    assert len(next_word) == 13  # every sentence of >= 5 words ending in a word: 5 + 3 + 3 + 2
    assert len(continuation) == 9  # every such sentence with a predecessor in its document
    for item in next_word:
        assert item.prompt == item.question and item.choices is None
        assert item.ground_truth.isalpha()
        assert any(f"{item.prompt} {item.ground_truth}" in t for t in VAL_TEXTS)
        assert not item.prompt.endswith(" ")
    for item in continuation:
        doc = VAL_TEXTS[int(item.id.split("-")[1])]
        assert len(item.choices) == 4 and len({normalize_text(c) for c in item.choices}) == 4
        assert item.ground_truth in item.choices
        assert [c in doc for c in item.choices].count(True) == 1  # distractors come from other documents
        assert doc.index(item.ground_truth) > 0 and item.question in doc
        assert item.prompt.startswith("Context: ") and item.prompt.endswith("\nAnswer:")
    assert len({i.id for i in next_word + continuation}) == 22


def test_embedded_tasks_sampling_and_scoring():
    small = embedded_tasks(VAL_TEXTS, n_items=3, seed=0)
    assert [len(v) for v in small.values()] == [3, 3]
    assert small == embedded_tasks(VAL_TEXTS, n_items=3, seed=0)
    assert small != embedded_tasks(VAL_TEXTS, n_items=3, seed=1)
    for task, items in embedded_tasks(VAL_TEXTS, n_items=50).items():
        assert score_task(task, [i.record(i.ground_truth) for i in items]).accuracy == 100.0
        assert score_task(task, [i.record("zzz") for i in items]).accuracy == 0.0
    positions = {
        i.choices.index(i.ground_truth) for i in embedded_tasks(VAL_TEXTS, n_items=50)["continuation"]
    }
    assert len(positions) > 1  # the true option is not always in the same slot


def test_embedded_tasks_errors():
    with pytest.raises(ValueError, match=">= 2 documents"):
        embedded_tasks(VAL_TEXTS[:1])
    with pytest.raises(ValueError, match="non-empty list"):
        embedded_tasks([])
    with pytest.raises(ValueError, match="n_items=0"):
        embedded_tasks(VAL_TEXTS, n_items=0)


# ---------------------------------------------------------------------------------------- results


def test_write_results(tmp_path):
    per_task, scores = {}, []
    for task in ("mmlu", "squad"):
        records = [i.record(i.ground_truth) for i in _load(task)]
        per_task[task] = score_records(task, records) if task == "mmlu" else records
        scores.append(score_task(task, records))
    files = write_results(tmp_path / "out", per_task, scores)
    data = json.loads(files.json.read_text())
    assert data["summary"]["average"] == 100.0
    assert data["tasks"]["mmlu"]["few_shot_prefix"].startswith("Question: What is the value")
    assert [r["correct"] for r in data["tasks"]["mmlu"]["records"]] == [True, True]
    assert data["tasks"]["squad"]["records"][0]["ground_truth"] == "London"
    assert "| **Average** | **100.00** | |" in files.markdown.read_text()
    with pytest.raises(ValueError, match="records for tasks"):
        write_results(tmp_path, {"mmlu": per_task["mmlu"]}, scores)


def test_every_template_renders():
    for task, template in PROMPT_TEMPLATES.items():
        choices = ["one", "two", "three", "four"] if template.uses_choices else None
        context = "Some context." if template.uses_context else None
        prompt = apply_prompt_template(task, "What?", choices, context)
        assert "What?" in prompt and "{" not in prompt
