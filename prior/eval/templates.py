"""The released prompt templates of the generative benchmark, and our few-shot examples.

Design choices
--------------
- **Templates** (``apply_prompt_template``), as in the released ``apply_prompt_template``:
  lambada / next_word / unknown tasks = the raw question; squad = one solved example, a blank line,
  ``Context: {context}\\nQuestion: {question}\\nAnswer:``; obqa, mmlu, siqa = two solved examples then
  ``Question: {q}\\n(A) ...\\nAnswer:``; hellaswag = two examples then ``Context: {q}\\n(A) ...\\nAnswer:``;
  race = ``Read the following article and answer the question.\\n\\n`` + one example, then
  ``Article: {q}\\nOptions:\\n(A) ...\\nAnswer:``; story_cloze = two examples then
  ``Story: {q}\\n(A) c0\\n(B) c1\\nEnd:`` (docs/released-format.md §8). Options are written
  ``(A) text``, one per line; examples and the query are separated by a blank line; a solved example
  ends with ``Answer: <option text>`` (``End: <ending>``): the answers in the examples are option
  TEXT, not letters. The embedded ``continuation`` task uses the hellaswag query format with no
  examples (a small model trained on the embedded corpus has a short context).
- **Few-shot examples**: what is known of the released examples is their count and format (the
  Normans example of squad, 3 options for siqa, 4 for obqa/mmlu), not their text. The examples in
  ``FEW_SHOT_EXAMPLES`` are our own, written in that format; numbers on the released checkpoint may
  differ slightly from the reported ones until the released texts are filled in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prior.eval.scoring import choice_letters


@dataclass(frozen=True)
class FewShotExample:
    """A solved example; ``answer`` is the option text (squad: the answer span)."""

    question: str
    answer: str
    choices: tuple[str, ...] = ()
    context: str | None = None


@dataclass(frozen=True)
class PromptTemplate:
    """``header`` + examples + query, blank-line separated; ``query`` is a format string."""

    query: str  # fields: {question}, {options}, {context}
    header: str = ""
    uses_choices: bool = False
    uses_context: bool = False


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "lambada": PromptTemplate(query="{question}"),
    "next_word": PromptTemplate(query="{question}"),
    "squad": PromptTemplate(query="Context: {context}\nQuestion: {question}\nAnswer:", uses_context=True),
    "obqa": PromptTemplate(query="Question: {question}\n{options}\nAnswer:", uses_choices=True),
    "mmlu": PromptTemplate(query="Question: {question}\n{options}\nAnswer:", uses_choices=True),
    "siqa": PromptTemplate(query="Question: {question}\n{options}\nAnswer:", uses_choices=True),
    "hellaswag": PromptTemplate(query="Context: {question}\n{options}\nAnswer:", uses_choices=True),
    "race": PromptTemplate(
        query="Article: {question}\nOptions:\n{options}\nAnswer:",
        header="Read the following article and answer the question.",
        uses_choices=True,
    ),
    "story_cloze": PromptTemplate(query="Story: {question}\n{options}\nEnd:", uses_choices=True),
    "continuation": PromptTemplate(query="Context: {question}\n{options}\nAnswer:", uses_choices=True),
}

# Our own solved examples in the released format (the released texts are not public).
FEW_SHOT_EXAMPLES: dict[str, tuple[FewShotExample, ...]] = {
    "squad": (
        FewShotExample(
            context=(
                "Normandy is a region in the north of France. It takes its name from the Normans, "
                "descendants of Viking settlers who made their home there in the tenth century and "
                "gradually adopted the local language and religion."
            ),
            question="In what country is Normandy located?",
            answer="France",
        ),
    ),
    "obqa": (
        FewShotExample(
            question="Which of these lets heat pass through it most easily?",
            choices=("a wooden spoon", "a steel pan", "a plastic cup", "a wool sock"),
            answer="a steel pan",
        ),
        FewShotExample(
            question="Plants get the energy they need to make food from",
            choices=("the soil", "sunlight", "the wind", "rainwater"),
            answer="sunlight",
        ),
    ),
    "mmlu": (
        FewShotExample(
            question="What is the value of 7 multiplied by 8?",
            choices=("54", "56", "58", "64"),
            answer="56",
        ),
        FewShotExample(
            question="Which organelle is the main site of cellular respiration in eukaryotic cells?",
            choices=("the nucleus", "the ribosome", "the mitochondrion", "the Golgi apparatus"),
            answer="the mitochondrion",
        ),
    ),
    "siqa": (
        FewShotExample(
            question=(
                "Jordan forgot his lunch at home, so Casey shared her sandwich with him. "
                "How would Jordan feel as a result?"
            ),
            choices=("grateful to Casey", "angry at Casey", "bored"),
            answer="grateful to Casey",
        ),
        FewShotExample(
            question="Riley studied every night for a week before the final exam. Why did Riley do this?",
            choices=("to fail the exam", "to get a good grade", "to skip class"),
            answer="to get a good grade",
        ),
    ),
    "hellaswag": (
        FewShotExample(
            question="A man is standing on a ladder next to a house. He",
            choices=(
                "dives into a swimming pool full of sand.",
                "paints the window frame with a small brush.",
                "eats the ladder slowly.",
                "flies over the roof like a bird.",
            ),
            answer="paints the window frame with a small brush.",
        ),
        FewShotExample(
            question="A woman pours flour into a large bowl. She",
            choices=(
                "throws the bowl out of the window and sings.",
                "puts the flour in the washing machine.",
                "cracks two eggs into the bowl and begins to stir.",
                "reads a newspaper printed on the bowl.",
            ),
            answer="cracks two eggs into the bowl and begins to stir.",
        ),
    ),
    "race": (
        FewShotExample(
            question=(
                "Tom had always wanted a dog, but his parents said he was not old enough to look after "
                "one. On his tenth birthday they finally brought home a small brown puppy. Tom named it "
                "Biscuit and promised to walk it every morning before school.\n"
                "Question: What did Tom get on his tenth birthday?"
            ),
            choices=("a bicycle", "a puppy", "a new school bag", "a birthday cake"),
            answer="a puppy",
        ),
    ),
    "story_cloze": (
        FewShotExample(
            question=(
                "Anna wanted to learn to play the guitar. She bought a cheap guitar from a friend. "
                "Every evening she practised for an hour. After three months she could play her "
                "favourite song."
            ),
            choices=("Anna was proud of her progress.", "Anna had never seen a guitar."),
            answer="Anna was proud of her progress.",
        ),
        FewShotExample(
            question=(
                "Mark's car would not start one cold morning. He called his neighbour for help. "
                "The neighbour brought jumper cables. They connected the cables to the battery."
            ),
            choices=("Mark sold his house the next day.", "The car started and Mark drove to work."),
            answer="The car started and Mark drove to work.",
        ),
    ),
}


def format_options(choices: Sequence[str]) -> str:
    """'(A) first\\n(B) second ...'."""
    return "\n".join(f"({letter}) {c}" for letter, c in zip(choice_letters(choices), choices))


def _render_query(
    template: PromptTemplate, task: str, question: str, choices: Sequence[str] | None, context: str | None
) -> str:
    if template.uses_choices and not choices:
        raise ValueError(f"task {task!r} needs choices, got {choices!r}")
    if template.uses_context and context is None:
        raise ValueError(f"task {task!r} needs a context")
    options = format_options(choices) if template.uses_choices else ""
    return template.query.format(question=question, options=options, context=context)


def apply_prompt_template(
    task: str, question: str, choices: Sequence[str] | None = None, context: str | None = None
) -> str:
    """The prompt the model continues: header, solved examples, then the query (raw for unknown tasks)."""
    template = PROMPT_TEMPLATES.get(task)
    if template is None:
        return question
    parts = [template.header] if template.header else []
    for ex in FEW_SHOT_EXAMPLES.get(task, ()):
        parts.append(_render_query(template, task, ex.question, ex.choices, ex.context) + " " + ex.answer)
    parts.append(_render_query(template, task, question, choices, context))
    return "\n\n".join(parts)
