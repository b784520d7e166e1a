"""Chat data for supervised fine-tuning: rendering with a chat template, loss masks, synthetic tasks.

Design choices
--------------
* **One rendering, piecewise.** A conversation is a list of ``{"role", "content"}`` messages
  (roles ``system``, ``user``, ``assistant``; anything else is a ValueError naming it). Each
  message renders as ``<|im_start|>{role}\\n`` + ``{content}<|im_end|>\\n`` (ChatML, the released
  model's special tokens; :data:`DEFAULT_CHAT_TEMPLATE` is the same rule as a Jinja template, set
  on tokenizers that have none). The two pieces of every message are tokenized separately (no
  special tokens added), so the ids of a prefix never depend on what follows, and the loss mask is
  exact: **the content and closing ``<|im_end|>\\n`` of assistant turns are targets**, every other
  token is context. Tokenizers without ``<|im_start|>`` / ``<|im_end|>`` tokens spell the markers
  out in ordinary tokens (the same for training and inference).
* **A prompt for generation** is every message, then ``<|im_start|>assistant\\n``
  (:func:`render_prompt`); the reply is the text before the first ``<|im_end|>``.
* **Synthetic tasks** (:func:`synthetic_chat`, the embedded offline set): ``copy`` ("Repeat: red
  cat" -> "red cat"), ``count`` ("How many words: a b c" -> "3"), ``add`` ("What is 3 + 4?" ->
  "7") and ``spell`` ("Spell: cat" -> "c a t"), each with an answer a program checks
  (:func:`check_answer`: exact match after stripping). Example ``i`` of a split comes from
  ``default_rng((seed, split, i))``, as the image set's examples do.
* **Sources** (:class:`ChatDataConfig`): ``synthetic``, ``jsonl`` (one conversation per line under
  ``messages_field``) or ``hf`` (a ``datasets`` set with a ``messages`` column, e.g. a
  smoltalk-style set). Conversations are right-padded to ``seq_len``; a longer one is an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TASKS = ("copy", "count", "add", "spell")
WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "book",
    "fish",
    "bird",
    "star",
    "hand",
    "door",
    "road",
    "ship",
    "king",
    "time",
    "word",
    "name",
    "list",
    "file",
    "line",
    "code",
    "data",
    "text",
    "type",
    "open",
    "read",
    "call",
    "test",
]
CHAT_SOURCES = ("synthetic", "jsonl", "hf")
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class ChatDataConfig:
    """Where conversations come from (YAML ``chat:`` section)."""

    source: str = "synthetic"  # synthetic | jsonl | hf
    paths: list[str] | None = None  # jsonl files
    hf_name: str | None = None
    hf_split: str = "train"
    messages_field: str = "messages"
    seq_len: int = 48  # conversations are padded to this many tokens (longer ones are an error)
    num_train: int = 20000  # synthetic: training conversations
    num_val: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in CHAT_SOURCES:
            raise ValueError(f"chat.source={self.source!r} is not one of {', '.join(CHAT_SOURCES)}")
        if self.source == "jsonl" and not self.paths:
            raise ValueError("chat.paths is empty for chat.source='jsonl'")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("chat.hf_name is required for chat.source='hf'")
        if self.seq_len < 4:
            raise ValueError(f"chat.seq_len={self.seq_len} must be >= 4")


# ----------------------------------------------------------------------------- rendering


def _check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {ROLES}")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and its loss mask (True on assistant content + end marker)."""
    _check_messages(messages)
    ids, mask = [], []
    for m in messages:
        head, body = _ids(tokenizer, f"{IM_START}{m['role']}\n"), _ids(tokenizer, f"{m['content']}{IM_END}\n")
        ids += head + body
        mask += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    return ids, mask


def render_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids of ``messages`` followed by the assistant header: what the model continues."""
    _check_messages(messages)
    ids = render_chat(tokenizer, messages)[0]
    return ids + _ids(tokenizer, f"{IM_START}assistant\n")


def reply_text(generated: str) -> str:
    """The assistant reply in generated text: everything before the first end marker, stripped."""
    return generated.split(IM_END)[0].split(IM_START)[0].strip()


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template :data:`DEFAULT_CHAT_TEMPLATE` (the same rendering)."""
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


# ----------------------------------------------------------------------------- synthetic tasks


def synthetic_chat(index: int, split: str = "train", seed: int = 0) -> tuple[list[dict], str, str]:
    """(messages ending with the assistant answer, task name, answer) of example ``index``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLITS)}")
    rng = np.random.default_rng((seed, SPLITS[split], index))
    task = TASKS[int(rng.integers(len(TASKS)))]
    pick = lambda k: [WORDS[int(j)] for j in rng.integers(len(WORDS), size=k)]  # noqa: E731
    if task == "copy":
        words = " ".join(pick(int(rng.integers(1, 4))))
        question, answer = f"Repeat: {words}", words
    elif task == "count":
        k = int(rng.integers(1, 6))
        question, answer = f"How many words: {' '.join(pick(k))}", str(k)
    elif task == "add":
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        question, answer = f"What is {a} + {b}?", str(a + b)
    else:
        word = pick(1)[0]
        question, answer = f"Spell: {word}", " ".join(word)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages, task, answer


def check_answer(reply: str, answer: str) -> bool:
    return reply.strip() == answer.strip()


CHANCE = {"copy": 0.0, "count": 1 / 5, "add": 1 / 19, "spell": 0.0}  # uniform guess over the answer set


# ----------------------------------------------------------------------------- datasets


def _read_conversations(cfg: ChatDataConfig) -> list[list[dict]]:
    if cfg.source == "jsonl":
        out = []
        for path in cfg.paths or []:
            for n, line in enumerate(Path(path).read_text().splitlines()):
                if line.strip():
                    try:
                        out.append(json.loads(line)[cfg.messages_field])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{n + 1}: no {cfg.messages_field!r} list ({e})") from e
        return out
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - the eval extra
        raise ImportError("chat.source='hf' needs `pip install datasets`") from e
    path = Path(cfg.hf_name).expanduser()
    if path.is_dir() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(path.suffix)
        if builder is None:
            raise ValueError(f"chat.hf_name={cfg.hf_name!r}: a data file must be .json, .jsonl or .parquet")
        ds = datasets.load_dataset(builder, data_files=str(path), split=cfg.hf_split)
    else:
        ds = datasets.load_dataset(cfg.hf_name, split=cfg.hf_split)
    if cfg.messages_field not in ds.column_names:
        raise ValueError(
            f"HF dataset {cfg.hf_name!r} has no column {cfg.messages_field!r} (columns: {ds.column_names})"
        )
    return [row[cfg.messages_field] for row in ds]


class ChatDataset(Dataset):
    """Conversations as fixed-length rows: ``input_ids``, ``valid``, ``loss_mask`` (each (seq_len,))."""

    def __init__(self, conversations: Sequence[Sequence[dict]], tokenizer, seq_len: int) -> None:
        self.rows = []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for i, messages in enumerate(conversations):
            ids, mask = render_chat(tokenizer, messages)
            if len(ids) > seq_len:
                raise ValueError(f"conversation {i} is {len(ids)} tokens, more than chat.seq_len={seq_len}")
            n = len(ids)
            self.rows.append(
                (
                    ids + [pad] * (seq_len - n),
                    [True] * n + [False] * (seq_len - n),
                    mask + [False] * (seq_len - n),
                )
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, valid, mask = self.rows[i]
        return {"input_ids": torch.tensor(ids), "valid": torch.tensor(valid), "loss_mask": torch.tensor(mask)}


def build_chat_datasets(cfg: ChatDataConfig, tokenizer) -> tuple[ChatDataset, ChatDataset]:
    """(train, validation) chat datasets for ``cfg``."""
    if cfg.source == "synthetic":
        train = [synthetic_chat(i, "train", cfg.seed)[0] for i in range(cfg.num_train)]
        val = [synthetic_chat(i, "val", cfg.seed)[0] for i in range(cfg.num_val)]
    else:
        convs = _read_conversations(cfg)
        if not convs:
            raise ValueError(f"no conversations found in {cfg.paths or cfg.hf_name}")
        every = max(2, len(convs) // max(cfg.num_val, 1))
        train = [c for i, c in enumerate(convs) if i % every]
        val = [c for i, c in enumerate(convs) if i % every == 0]
    return ChatDataset(train, tokenizer, cfg.seq_len), ChatDataset(val, tokenizer, cfg.seq_len)


__all__ = [
    "CHANCE",
    "ChatDataConfig",
    "ChatDataset",
    "DEFAULT_CHAT_TEMPLATE",
    "TASKS",
    "build_chat_datasets",
    "check_answer",
    "ensure_chat_template",
    "render_chat",
    "render_prompt",
    "reply_text",
    "synthetic_chat",
]
