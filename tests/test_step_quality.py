"""recipes/step_quality.py: every variant probed on the run's own batches, the run left as it was."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from step_quality import ProbingTRPOTrainer, variants  # noqa: E402

from trpo_rlhf import TRPOConfig, TRPOTrainer  # noqa: E402
from trpo_rlhf.experiments import task_for_model  # noqa: E402


def test_variants_start_with_the_runs_own_and_change_one_field_at_a_time():
    assert variants([3, 10], [0.5], run_cg_iters=10) == [
        {"cg_iters": 10, "fvp_subsample": 1.0},
        {"cg_iters": 3, "fvp_subsample": 1.0},
        {"cg_iters": 10, "fvp_subsample": 0.5},
    ]
    assert variants([3], [0.5])[0] == {"cg_iters": TRPOConfig.cg_iters, "fvp_subsample": 1.0}


def test_probing_leaves_the_training_run_bitwise_as_an_unprobed_run():
    def run(trainer_class, **extra):
        task = task_for_model("tiny", seed=0)
        config = TRPOConfig(output_dir=tempfile.mkdtemp(), seed=0, batch_size=4, max_new_tokens=4, max_steps=2)
        trainer = trainer_class(config, task.model, task.tokenizer, task.reward_model, task.prompts, **extra)
        return [trainer.step() for _ in range(2)]

    probes = []
    probed = run(ProbingTRPOTrainer, probe_steps={1, 2}, probe_variants=variants([3], [0.5]), record=probes.append)
    plain = run(TRPOTrainer)
    assert len(probes) == 6 and {p["step"] for p in probes} == {1, 2}
    for a, b in zip(probed, plain):
        for key in ("reward/mean", "trpo/kl", "trpo/surrogate_gain", "trpo/step_norm", "value/loss"):
            assert a[key] == b[key], key
    # The default variant is the run's own update on the same batch.
    default_probe = next(
        p for p in probes if p["step"] == 1 and p["cg_iters"] == TRPOConfig.cg_iters and p["fvp_subsample"] == 1.0
    )
    assert default_probe["trpo/surrogate_gain"] == pytest.approx(plain[0]["trpo/surrogate_gain"], rel=1e-6)


@pytest.mark.slow
def test_step_quality_writes_probes_and_summary(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "step_quality.py"),
            "--model",
            "tiny",
            "--batch_size",
            "4",
            "--max_new_tokens",
            "4",
            "--probe_steps",
            "1",
            "2",
            "--run_cg_iters",
            "10",
            "--cg_iters",
            "1",
            "3",
            "--fvp_subsample",
            "0.5",
            "--output",
            str(tmp_path),
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4
    for row in rows:
        assert row["update_s"] > 0 and row["trpo/fvp_count"] <= row["cg_iters"]
        if row["trpo/accepted"]:
            assert row["trpo/kl"] <= TRPOConfig.kl_tolerance * TRPOConfig.max_kl
    summary = (tmp_path / "summary.md").read_text()
    assert "| 10 | 1.0 |" in summary and summary.count("\n| ") == 4 + 1  # header + 4 variants
    own_row = next(line for line in summary.splitlines() if line.startswith("| 10 | 1.0 |"))
    assert own_row.split("|")[5].strip() == "1.00"  # the run's own update's gain relative to itself
    assert "the run at cg_iters 10" in summary
