"""The arithmetic task: chat prompts such as "What is 3 + 5? Reply with the number only." (the
100 sums of two digits in `data/arithmetic_chat.jsonl`, a conversational dataset with an `answer`
column), scored by two reward functions in TRL's form that read that column: a checkable reward.

    >>> correct_answer([[{"role": "assistant", "content": "8"}], "3 + 5 = 8", "It is 9."], answer=["8", "8", "8"])
    [1.0, 1.0, 0.0]
    >>> number_only(["8", " 12 ", "8."])
    [1.0, 1.0, 0.0]
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..prompts import data_dir, read_text_file

ARITHMETIC_FILE = "arithmetic_chat.jsonl"
# The answer matters most; replying with the number alone is what the prompt asks for.
REWARD_WEIGHTS = [1.0, 0.5]
_INTEGER = re.compile(r"-?\d+")


def completion_text(completion) -> str:
    """A completion's text: the string itself, or the content of a conversational completion's message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct_answer(completions, answer, **kwargs) -> list[float]:
    """1.0 where the last integer in the completion is the `answer` column's ("3 + 5 = 8" answers
    8), else 0.0."""
    found = [_INTEGER.findall(completion_text(c)) for c in completions]
    return [float(bool(numbers) and numbers[-1] == str(a).strip()) for numbers, a in zip(found, answer)]


def number_only(completions, **kwargs) -> list[float]:
    """1.0 where the completion is an integer and nothing else (surrounding whitespace aside)."""
    return [float(_INTEGER.fullmatch(completion_text(c).strip()) is not None) for c in completions]


def load_arithmetic(path: str | Path | None = None) -> dict[str, list]:
    """The columns of a JSON-lines file of {"prompt": [messages], "answer": str} rows (default:
    the shipped `data/arithmetic_chat.jsonl`)."""
    source = Path(path) if path is not None else data_dir() / ARITHMETIC_FILE
    rows = []
    for number, line in enumerate(read_text_file(source, "dataset file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{source}: line {number} is not JSON ({exc}): {line[:60]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{source}: line {number} is a JSON {type(row).__name__}, not a row (an object).")
        rows.append(row)
    missing = [i for i, row in enumerate(rows) if not {"prompt", "answer"} <= set(row)]
    if missing:
        raise ValueError(
            f"{source}: row {missing[0]} has columns {sorted(rows[missing[0]])}; the arithmetic task needs 'prompt' "
            "(a list of chat messages) and 'answer'."
        )
    return {name: [row[name] for row in rows] for name in rows[0]}
