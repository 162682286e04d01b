"""Prompt sources: the data shipped in `data/`, local files, `datasets` objects; conversational
prompts (lists of chat messages, TRL's format) and their chat template.

>>> from trpo_rlhf.prompts import default_prompts
>>> len(default_prompts()) >= 300
True
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

DEFAULT_PROMPT_FILE = "movie_review_openings.txt"


# The roles chat templates know (TRL's conversational format; "developer" is the newer "system").
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def read_text_file(path, what: str = "file") -> str:
    """A UTF-8 text file's contents; `ValueError` naming the file and the first byte that is not
    UTF-8 (a Latin-1 or binary file), instead of a bare UnicodeDecodeError."""
    path = path if hasattr(path, "read_bytes") else Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"The {what} {path} is not UTF-8 text: byte {exc.start} (line {line}) is {data[exc.start : exc.start + 1]!r}. "
            "Save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def read_prompt_file(path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. Trailing
    whitespace is stripped, so the model chooses the next word boundary itself."""
    lines = read_text_file(path, "prompt file").splitlines()
    return [line.rstrip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def check_text(text: str, source: str) -> None:
    """Raise a ValueError where `text` cannot be written as UTF-8 (a lone surrogate, e.g. from a
    decode with errors='surrogateescape'), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{source} holds {text[exc.start : exc.end]!r} at character {exc.start}, a lone surrogate that is not "
            "text: no tokenizer can read it. Decode the source as UTF-8 (errors='replace' keeps the rest)."
        ) from None


def data_dir():
    """The `trpo_rlhf.data` package of an installed wheel, else the repository's `data/` folder
    (a source checkout, where `data/` lies beside `trpo_rlhf/`)."""
    try:
        return resources.files("trpo_rlhf.data")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "data"


def default_prompts() -> list[str]:
    """The openings of movie reviews written for this project (`data/movie_review_openings.txt`)."""
    return read_prompt_file(data_dir() / DEFAULT_PROMPT_FILE)


def check_prompt_strings(prompts: Sequence, source: str) -> None:
    """Raise a TypeError naming the first prompt that is not a string (a None, a number or a whole
    row would otherwise be str()-ed into a prompt such as 'None')."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            hint = " (a row: pass [row['prompt'] for row in rows])" if isinstance(prompt, dict) else ""
            raise TypeError(
                f"{source}[{i}] is a {type(prompt).__name__}, {prompt!r}{hint}; every prompt must be a string "
                "(or, in a conversational dataset, every one a list of chat messages)."
            )
        check_text(prompt, f"{source}[{i}]")


def is_conversational(prompt) -> bool:
    """Whether a prompt is a list of chat messages (TRL's conversational format), not a string."""
    return isinstance(prompt, (list, tuple))


def check_messages(messages, source: str) -> None:
    """Raise a ValueError naming the first malformed message: a conversational prompt is a non-empty
    list of ``{"role": str, "content": str}`` whose last message is not the assistant's (the
    completion is the assistant's next message)."""
    example = '[{"role": "user", "content": "What is 2 + 3?"}]'
    if not messages:
        raise ValueError(f"{source} is an empty list of messages; a conversational prompt is e.g. {example}.")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(
                f"{source}[{j}] is {message!r}: each message must be a dict with a 'role' and a 'content', e.g. {example}."
            )
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise ValueError(
                f"{source}[{j}] has role {message['role']!r} and content of type {type(message['content']).__name__}: "
                "both must be strings."
            )
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"{source}[{j}] has the role {message['role']!r}, which chat templates do not know: each role is one "
                f"of {CHAT_ROLES}."
            )
        check_text(message["content"], f"{source}[{j}]['content']")
    if messages[-1]["role"] == "assistant":
        raise ValueError(
            f"{source} ends with an assistant message: the completion is the assistant's next message, so the "
            "prompt must end with the user's (or the system's) turn."
        )


def chat_prompt_text(tokenizer, messages: list[dict], source: str = "a prompt") -> str:
    """The text the model reads for a conversational prompt: the tokenizer's chat template with the
    generation prompt, `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=False)`; tokenized without added special tokens it gives the template's own ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{source} is a list of chat messages, but the tokenizer has no chat template. Use an instruct model's "
            "tokenizer (the embedded SmolLM2-135M-Instruct has one), set tokenizer.chat_template, or pass plain string "
            "prompts."
        )
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2's TemplateError (raise_exception in the template), or one of its own
        raise ValueError(
            f"{source}: the tokenizer's chat template refused its messages ({type(exc).__name__}: {exc}). Change those "
            "messages to the roles and order that template takes."
        ) from exc


def prompt_columns(train_dataset) -> tuple[list, dict[str, list]]:
    """(the prompts, the other columns by name) of a list of prompts, a `datasets.Dataset` or a
    dict of columns; each prompt a string or a list of chat messages, one kind throughout."""
    if isinstance(train_dataset, dict) or hasattr(train_dataset, "column_names"):
        names = list(train_dataset.column_names if hasattr(train_dataset, "column_names") else train_dataset)
        if "prompt" not in names:
            raise ValueError(
                f"The dataset has no 'prompt' column (it has {names}); rename the prompt column, e.g. "
                "dataset.rename_column('text', 'prompt')."
            )
        prompts = list(train_dataset["prompt"])
        columns = {name: list(train_dataset[name]) for name in names if name != "prompt"}
        source = "the dataset's 'prompt' column"
    elif isinstance(train_dataset, (str, bytes)) or not isinstance(train_dataset, Iterable):
        raise TypeError(
            f"train_dataset must be a list of prompts, a dict of columns or a datasets.Dataset, not a "
            f"{type(train_dataset).__name__} ({str(train_dataset)[:40]!r}); load a file with "
            "trpo_rlhf.prompts.load_prompts(path)."
        )
    else:
        prompts, columns, source = list(train_dataset), {}, "train_dataset"
    uneven = {name: len(values) for name, values in columns.items() if len(values) != len(prompts)}
    if uneven:
        raise ValueError(f"train_dataset's columns {uneven} are not as long as its {len(prompts)} prompts.")
    if prompts and is_conversational(prompts[0]):
        for i, prompt in enumerate(prompts):
            if not is_conversational(prompt):
                raise TypeError(
                    f"{source}[{i}] is a {type(prompt).__name__} among conversational prompts: pass every prompt as "
                    "a list of messages, or every one as a string."
                )
            check_messages(list(prompt), f"{source}[{i}]")
        prompts = [[dict(m) for m in prompt] for prompt in prompts]
    else:
        check_prompt_strings(prompts, source)
    return prompts, columns


def review_openings(texts: Sequence[str], min_words: int = 2, max_words: int = 8, seed: int = 0) -> list[str]:
    """The first 2..8 words of each review, the prompt format of TRL's classic IMDB sentiment task
    (it drew the prompt length per sample the same way). HTML line breaks count as spaces."""
    rng = random.Random(seed)
    openings = []
    for text in texts:
        words = text.replace("<br />", " ").split()
        if len(words) >= min_words:
            openings.append(" ".join(words[: rng.randint(min_words, min(max_words, len(words)))]))
    return openings


def load_prompts(source: str | None, seed: int = 0) -> list[str]:
    """Prompts from a local .txt (one per line), .json/.jsonl/.csv (a 'prompt' or 'text' column),
    or a hub dataset id (its 'text' column cut into review openings). None: the shipped file."""
    if source is None:
        return default_prompts()
    path = Path(source)
    if path.suffix == ".txt" and path.exists():
        return read_prompt_file(path)
    from datasets import load_dataset

    if path.exists() and path.suffix in {".json", ".jsonl", ".csv"}:
        read_text_file(path, "dataset file")  # a file that is not UTF-8 named here, not deep in datasets
        dataset = load_dataset("json" if path.suffix != ".csv" else "csv", data_files=str(path), split="train")
    else:
        dataset = load_dataset(source, split="train")
    if "prompt" in dataset.column_names:
        return prompt_columns(dataset)[0]
    if "text" in dataset.column_names:
        return review_openings(dataset["text"], seed=seed)
    raise ValueError(
        f"Dataset {source!r} has neither a 'prompt' nor a 'text' column (columns: {dataset.column_names})."
    )
