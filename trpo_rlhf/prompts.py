"""Prompt sources: the movie-review openings shipped in `data/`, local files, `datasets` objects.

>>> from trpo_rlhf.prompts import default_prompts
>>> len(default_prompts()) >= 300
True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

DEFAULT_PROMPT_FILE = "movie_review_openings.txt"


def read_prompt_file(path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. Trailing
    whitespace is stripped, so the model chooses the next word boundary itself."""
    lines = (path if hasattr(path, "read_text") else Path(path)).read_text(encoding="utf-8").splitlines()
    return [line.rstrip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


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
                f"{source}[{i}] is a {type(prompt).__name__}, {prompt!r}{hint}; every prompt must be a string."
            )


def prompts_from_dataset(dataset, column: str = "prompt") -> list[str]:
    """The `column` of a `datasets.Dataset` as a list of strings."""
    if column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no '{column}' column (it has {dataset.column_names}); "
            f"rename the prompt column, e.g. dataset.rename_column('text', '{column}')."
        )
    prompts = list(dataset[column])
    check_prompt_strings(prompts, f"the dataset's '{column}' column")
    return prompts


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
        dataset = load_dataset("json" if path.suffix != ".csv" else "csv", data_files=str(path), split="train")
    else:
        dataset = load_dataset(source, split="train")
    if "prompt" in dataset.column_names:
        return prompts_from_dataset(dataset)
    if "text" in dataset.column_names:
        return review_openings(dataset["text"], seed=seed)
    raise ValueError(
        f"Dataset {source!r} has neither a 'prompt' nor a 'text' column (columns: {dataset.column_names})."
    )
