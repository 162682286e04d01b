"""The comparison recipe with tiny settings writes results.json, compare.png and compare.md."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trpo_rlhf.experiments.comparison import ALGORITHMS, summarize_runs

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = {
    "final_reward_mean",
    "final_reward_std",
    "kl_ref_final",
    "kl_exceed_fraction",
    "seconds_per_step",
    "policy_update_seconds_per_step",
    "peak_memory_mb",
    "seeds",
    "steps",
}


@pytest.mark.slow
def test_comparison_runs_all_algorithms_with_tiny_settings(tmp_path):
    out = tmp_path / "compare"
    command = [
        sys.executable,
        str(ROOT / "recipes" / "compare_trpo_ppo.py"),
        "--task",
        "toy",
        "--steps",
        "2",
        "--seeds",
        "2",
        "--batch_size",
        "4",
        "--max_new_tokens",
        "4",
        "--ppo_epochs",
        "1",
        "--cg_iters",
        "2",
        "--save_steps",
        "1",
        "--output_dir",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(ALGORITHMS) <= set(results)
    for algorithm in ALGORITHMS:
        assert RESULT_KEYS <= set(results[algorithm]), algorithm
        assert results[algorithm]["seeds"] == 2 and results[algorithm]["steps"] == 2
        assert 0 <= results[algorithm]["kl_exceed_fraction"] <= 1
    assert results["trl_ppo"]["policy_update_seconds_per_step"] is None  # TRL does not time it apart
    assert results["trpo"]["policy_update_seconds_per_step"] > 0
    assert results["settings"]["task"] == "toy" and results["settings"]["cg_iters"] == 2
    trpo_rows = [json.loads(line) for line in (out / "trpo" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert (
        json.loads((out / "trpo" / "seed-0" / "trainer_config.json").read_text())["cg_iters"] == 2
    )  # --cg_iters reached TRPO
    assert all(row["trpo/fvp_count"] <= 2 for row in trpo_rows)
    assert (out / "compare.png").stat().st_size > 10_000
    table = (out / "compare.md").read_text()
    assert table in result.stdout and "| TRPO (ours) |" in table and "| PPO (TRL 1.12) |" in table
    for algorithm in ALGORITHMS:
        for seed in (0, 1):
            assert len((out / algorithm / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()) == 2

    # --reuse_finished: runs only what is missing (here one deleted TRPO seed), keeps the rest.
    kept = (out / "ppo" / "seed-1" / "metrics.jsonl").read_text()
    (out / "trpo" / "seed-0" / "metrics.jsonl").unlink()
    again = subprocess.run(
        command + ["--reuse_finished", "--algorithms", "trpo", "ppo"], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.count("reusing the finished run") == 3
    assert "TRPO (ours) seed 0: 2 steps" in again.stdout
    assert (out / "ppo" / "seed-1" / "metrics.jsonl").read_text() == kept
    assert set(json.loads((out / "results.json").read_text())) == {"trpo", "ppo", "settings"}

    # --resume_from_checkpoint: a run stopped after step 1 continues from checkpoint-1 to the same rows.
    run = out / "ppo" / "seed-0"
    finished = (run / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(run / "checkpoint-2")
    (run / "metrics.jsonl").write_text(finished[0] + "\n")
    resumed = subprocess.run(
        command + ["--reuse_finished", "--resume_from_checkpoint", "--algorithms", "ppo"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming from {run / 'checkpoint-1'}" in resumed.stdout

    def without_timings(lines):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "memory/"))} for line in lines]

    assert without_timings((run / "metrics.jsonl").read_text().splitlines()) == without_timings(finished)


def test_summary_uses_the_last_tenth_of_steps_and_counts_kl_excess():
    def rows(rewards, kls):
        return [
            {
                "step": i + 1,
                "reward/mean": r,
                "kl/ref": 1.0,
                "ppo/kl": k,
                "time/step": 2.0,
                "memory/peak_mb": 10.0 * (i + 1),
            }
            for i, (r, k) in enumerate(zip(rewards, kls))
        ]

    runs = {"ppo": [rows([0.0] * 9 + [1.0], [0.0] * 10), rows([0.0] * 9 + [3.0], [0.5] * 10)]}
    summary = summarize_runs(runs, kl_target=0.1)["ppo"]
    assert summary["final_reward_mean"] == 2.0  # last 10 % of 10 steps = the last step
    assert abs(summary["final_reward_std"] - 2**0.5) < 1e-12
    assert summary["kl_exceed_fraction"] == 0.5
    assert summary["peak_memory_mb"] == 100.0 and summary["policy_update_seconds_per_step"] is None
