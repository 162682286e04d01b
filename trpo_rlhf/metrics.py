"""metrics.jsonl and the other JSON-lines files the toolkit writes: one strict JSON object per line,
non-finite floats written as null and read back as NaN.

    >>> import tempfile, math, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> append_jsonl(path, {"step": 1, "loss": float("nan")})
    >>> math.isnan(read_metrics(path)[0]["loss"])
    True
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def json_safe(row: dict) -> dict:
    """NaN and infinities become None (JSON null), so the file stays strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append `row` as one line of strict JSON."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, JSON nulls (non-finite values when logged) read back as NaN."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{k: math.nan if v is None else v for k, v in row.items()} for row in rows]


class UpdateCosine:
    """The cosine between consecutive changes of a flat parameter vector: near 0 the changes are a
    random walk, below 0 they undo each other. It keeps the last change between updates, so a
    trainer checkpoints it with its optimizers (`state_dict` / `load_state_dict`).

        >>> cosine = UpdateCosine()
        >>> cosine(torch.tensor([1.0, 0.0])) is None, cosine(torch.tensor([-1.0, 0.0]))
        (True, -1.0)
    """

    def __init__(self):
        self.last_change: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the last change: the next update logs no cosine."""
        self.last_change = None

    def __call__(self, change: torch.Tensor) -> float | None:
        previous, self.last_change = self.last_change, change.detach().clone()
        if previous is None:
            return None
        return torch.nn.functional.cosine_similarity(change, previous, dim=0).item()

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"last_change": self.last_change}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        saved = state["last_change"]
        self.last_change = None if saved is None else saved.detach().clone()
