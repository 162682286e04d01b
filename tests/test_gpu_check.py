"""recipes/gpu_check.sh in its tiny mode: every part runs and the summary records each one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("suite", "update", "whole_step", "memory_8b", "exact")


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_and_writes_one_folder(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, GPU_CHECK_TINY="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["bash", str(ROOT / "recipes" / "gpu_check.sh"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["parts"]) == list(PARTS)
    failed = {
        name: (out / f"{name}.log").read_text()[-2000:] for name, part in summary["parts"].items() if part["exit"]
    }
    assert not failed, failed
    assert summary["device"] == "cpu" or summary["device"].startswith(("NVIDIA", "Tesla"))
    for name in ("update", "whole_step", "memory_8b"):
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["device"], name
    results = json.loads((out / "exact" / "results.json").read_text())
    assert {"trpo", "ppo"} <= set(results) and "frontier_efficiency" in results["trpo"]
