"""The released scoring rules (docs/released-format.md §8), one hand-written case per rule and edge case."""

import pytest

from prior.eval.scoring import (
    TaskScore,
    common_prefix,
    extract_choice_letter,
    first_word,
    format_markdown_table,
    ground_truth_letter,
    is_match,
    normalize_text,
    preprocess_records,
    score_item,
    score_records,
    score_task,
    similarity,
    split_generation,
    summarize,
)

CHOICES = ["a dog", "a cat", "the red apple", "blue sky"]


# ------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Hello, World!  ", "hello world"),
        ("don't\tstop\n\nnow", "dont stop now"),
        ("! yes", "yes"),  # deleting punctuation must not leave a leading space
        ("snake_case 42%", "snake_case 42"),  # "_" and digits are word characters
        ("Ça va?", "ça va"),
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_similarity_and_threshold():
    assert similarity("", "") == 1.0
    assert similarity("!!", "") == 1.0  # both normalise to empty
    assert similarity("abc", "") == 0.0
    assert similarity("Paris.", "paris") == 1.0
    assert 0.0 < similarity("paris", "parish") < 1.0
    assert is_match("The  Cat!", "the cat")
    assert not is_match("the cats", "the cat")  # default threshold 1.0 = exact normalised match
    assert is_match("the cats", "the cat", threshold=0.9)


# ------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize(
    "text, generation, others",
    [
        ("Paris\nQuestion: next", "Paris", "\nQuestion: next"),
        ("\n\n Paris\nmore", "\n\n Paris", "\nmore"),  # leading newlines have no word before them
        ("!!\n--\nParis.\nmore", "!!\n--\nParis.", "\nmore"),  # punctuation is not a word char
        ("no newline at all", "no newline at all", ""),
        ("\n\n", "\n\n", ""),
        ("", "", ""),
    ],
)
def test_split_generation(text, generation, others):
    assert split_generation(text) == (generation, others)
    assert split_generation(generation) == (generation, "")  # idempotent


def test_common_prefix_and_preprocess_records():
    prompts = ["Example. Q: one\nA:", "Example. Q: two\nA:", "Example. Q: three\nA:"]
    assert common_prefix(prompts) == "Example. Q: "
    records = [
        {"prompt": p, "generate": g, "answer": "x", "id": i}
        for i, (p, g) in enumerate(zip(prompts, ["x\ny", "\nx", "z"]))
    ]
    out = preprocess_records(records)
    assert out.few_shot_prefix == "Example. Q: "
    assert [r["prompt"] for r in out.records] == ["one\nA:", "two\nA:", "three\nA:"]
    assert [r["generation"] for r in out.records] == ["x", "\nx", "z"]
    assert [r["others"] for r in out.records] == ["\ny", "", ""]
    assert all(r["ground_truth"] == "x" and "generate" not in r for r in out.records)
    assert records[0]["generate"] == "x\ny"  # inputs are not modified
    assert common_prefix(["only one"]) == "only one"
    assert common_prefix([]) == ""


def test_preprocess_records_errors():
    with pytest.raises(ValueError, match="need all or none"):
        preprocess_records([{"prompt": "p", "generation": "g", "ground_truth": "t"}, {"generation": "g"}])
    with pytest.raises(ValueError, match="record 0"):
        preprocess_records([{"ground_truth": "t"}])


# -------------------------------------------------------------------------------------- lambada rule


@pytest.mark.parametrize(
    "generation, truth, correct",
    [
        ("drink", "drink", True),
        ("Drink.", "drink", True),  # case and punctuation
        ("drink it slowly", "drink", True),  # only the first word counts
        ('"drink," she said', "drink", True),
        ("  \n drink\nmore text", "drink", True),  # newline cut, then leading whitespace dropped
        ("don't", "don't", True),
        ("drinking", "drink", False),
        ("to drink", "drink", False),
        ("", "drink", False),
        ("...", "drink", False),
    ],
)
def test_lambada_first_word(generation, truth, correct):
    assert score_item("lambada", generation, truth) is correct
    assert score_item("next_word", generation, truth) is correct


def test_first_word():
    assert first_word("  Hello, there") == "hello"
    assert first_word("?!") == ""


# ------------------------------------------------------------------------------- letter extraction


@pytest.mark.parametrize(
    "text, letter",
    [
        ("(B)", "B"),  # rule 1
        ("B.", "B"),
        ("b", "B"),
        ("[c]", "C"),
        ("Answer: C", "C"),  # answer segment -> rule 1
        ("The answer is (D).", "D"),
        ("final answer = a", "A"),
        ("I think option B is right", "B"),  # rule 2, no separator after "option"
        ("choice: (c) because it fits", "C"),
        ("maybe (C)", "C"),  # rule 3: <= 40 chars
        ("Hmm, it is hard to say, but I lean to (A) here", ""),  # rule 3 skipped: > 40 chars
        ("a cat", "B"),  # rule 4: exact normalised choice text
        ("A Cat!", "B"),  # not a single letter (rule 1); rule 4 matches the text of choice B
        ("I would pick the red apple here", "C"),  # rule 6: unique choice contained
        ("a dog and a cat", ""),  # two choices contained: not unique
        ("the red aple", "C"),  # rule 7: ratio 0.96 >= 0.9
        ("blue skies", ""),  # ratio 0.89 < 0.9
        ("", ""),
        ("\n", ""),
        ("answers are hard", ""),  # "answer" must be a word; "s" is not a valid letter
        ("option E", ""),  # E is not among four choices
    ],
)
def test_extract_choice_letter(text, letter):
    assert extract_choice_letter(text, CHOICES) == letter


def test_answer_segment_is_tried_first():
    # full text alone: rule 2 would take the LAST keyed letter ("Option D")
    assert extract_choice_letter("Option D", CHOICES) == "D"
    text = "The answer is: a cat\nOption D sounds silly"
    assert extract_choice_letter(text, CHOICES) == "B"  # the segment "a cat" wins
    # the last "answer ..." line gives the segment
    assert extract_choice_letter("Answer: A\nhmm, no.\nFinal answer: (C)", CHOICES) == "C"


def test_lowercase_article_is_not_a_letter():
    choices = ["red", "green", "blue", "yellow"]
    assert extract_choice_letter("I think the answer is a mystery", choices) == ""
    assert extract_choice_letter("the answer is a", choices) == "A"
    assert extract_choice_letter("The answer is A because red is warm", choices) == "A"


def test_strip_correct_final_answer_prefix():
    # the separator ends the line, so the segment is empty; rule 5 strips the phrase
    assert extract_choice_letter("The correct final answer is\na cat", CHOICES) == "B"


def test_extract_choice_letter_needs_choices():
    with pytest.raises(ValueError, match="non-empty"):
        extract_choice_letter("A", [])


@pytest.mark.parametrize(
    "truth, letter", [("B", "B"), ("(c)", "C"), ("a cat", "B"), ("Blue sky.", "D"), ("zebra", "")]
)
def test_ground_truth_letter(truth, letter):
    assert ground_truth_letter(truth, CHOICES) == letter


@pytest.mark.parametrize(
    "generation, truth, correct",
    [
        ("B", "a cat", True),
        ("a cat", "B", True),
        ("The answer is (B).\nQuestion: next one", "a cat", True),
        ("C", "a cat", False),
        ("", "a cat", False),
        ("I do not know", "a cat", False),
        ("Zebra!", "zebra", True),  # no letters on either side: exact normalised fallback
    ],
)
def test_score_item_choice(generation, truth, correct):
    for task in ("mmlu", "obqa", "race", "siqa", "continuation"):
        assert score_item(task, generation, truth, CHOICES) is correct


@pytest.mark.parametrize(
    "generation, truth, correct",
    [
        ("France.", "France", True),
        (" france\nContext: more", "France", True),
        ("France is", "France", False),
        ("B", "a cat", False),  # no letter rule for exact-match tasks
    ],
)
def test_score_item_exact(generation, truth, correct):
    for task in ("hellaswag", "squad", "story_cloze"):
        assert score_item(task, generation, truth, CHOICES) is correct


def test_score_item_errors():
    with pytest.raises(ValueError, match="unknown task 'lamda'"):
        score_item("lamda", "x", "x")
    with pytest.raises(ValueError, match="needs choices"):
        score_item("mmlu", "A", "a cat")
    with pytest.raises(ValueError, match="ground truth"):
        score_item("squad", "x", "  ")
    with pytest.raises(ValueError, match="generation"):
        score_item("squad", None, "x")


# ----------------------------------------------------------------------------------------- totals


def test_score_task_and_records():
    records = [
        {"prompt": "Q: 1\nA:", "generation": "B\nQ: 2", "ground_truth": "a cat", "choices": CHOICES},
        {"prompt": "Q: 2\nA:", "generation": "blue sky", "ground_truth": "D", "choices": CHOICES},
        {"prompt": "Q: 3\nA:", "generation": "(A)", "ground_truth": "a cat", "choices": CHOICES},
    ]
    scored = score_records("mmlu", records)
    assert [r["correct"] for r in scored.records] == [True, True, False]
    assert scored.few_shot_prefix == "Q: "
    score = score_task("mmlu", records)
    assert score == TaskScore(task="mmlu", correct=2, total=3, accuracy=pytest.approx(200 / 3))
    with pytest.raises(ValueError, match="no records"):
        score_task("mmlu", [])


SPEC_RESULTS = [  # the released checkpoint's reported results (docs/released-format.md §8)
    ("lambada", 508, 1000),
    ("mmlu", 193, 1000),
    ("obqa", 115, 500),
    ("hellaswag", 107, 1000),
    ("race", 196, 1000),
    ("siqa", 289, 1000),
    ("squad", 309, 1000),
    ("story_cloze", 144, 468),
]


def test_summarize_plain_mean_reproduces_spec_average():
    scores = [TaskScore(t, c, n, 100.0 * c / n) for t, c, n in SPEC_RESULTS]
    summary = summarize(scores)
    assert round(summary["average"], 2) == 26.75  # plain mean over tasks, not pooled
    pooled = 100.0 * sum(c for _, c, _ in SPEC_RESULTS) / sum(n for _, _, n in SPEC_RESULTS)
    assert round(pooled, 2) != 26.75
    assert summary["tasks"]["story_cloze"] == {
        "correct": 144,
        "total": 468,
        "accuracy": pytest.approx(30.769, 1e-4),
    }
    table = format_markdown_table(scores)
    assert "| Story Cloze | 30.77 | 144/468 |" in table
    assert "| OBQA | 23.00 | 115/500 |" in table
    assert table.rstrip().endswith("| **Average** | **26.75** | |")
    assert len(table.strip().splitlines()) == 2 + 8 + 1


def test_summarize_errors():
    with pytest.raises(ValueError, match="no task scores"):
        summarize([])
    with pytest.raises(ValueError, match="twice"):
        summarize([TaskScore("mmlu", 1, 2, 50.0), TaskScore("mmlu", 1, 2, 50.0)])
