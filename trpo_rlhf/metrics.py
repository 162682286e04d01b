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
