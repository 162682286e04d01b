"""recipes/benchmark.py: one JSON line with the documented keys, from a real run on the tiny model."""

import json
import sys
from pathlib import Path

import pytest
import torch

from trpo_rlhf.profiling import PeakMemory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import benchmark  # noqa: E402

KEYS = ("trpo_update_s", "ppo_update_s", "trpo_peak_mb", "ppo_peak_mb", "fvp_s", "fwd_bwd_s", "cg_iters", "device")


def run_benchmark(argv: list[str], capsys) -> tuple[str, str]:
    """`recipes/benchmark.py` with `argv`, in this process (its `main`, as the script runs it): (stdout, stderr)."""
    assert benchmark.main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.mark.slow
def test_benchmark_prints_one_json_line_with_the_documented_keys(tmp_path, capsys):
    output = tmp_path / "bench.jsonl"
    stdout, stderr = run_benchmark(
        [
            "--model",
            "tiny",
            "--batch_size",
            "4",
            "--max_new_tokens",
            "4",
            "--repeats",
            "2",
            "--cg_iters",
            "3",
            "--gradient_checkpointing",  # through every pass, Fisher products and all
            "--output",
            str(output),
        ],
        capsys,
    )
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert output.read_text().strip() == lines[0]
    assert row["gradient_checkpointing"] is True
    for key in KEYS:
        assert key in row, key
    assert (
        row["device"] == torch.cuda.get_device_name() if torch.cuda.is_available() else row["device"].startswith("cpu")
    )
    assert 1 <= row["cg_iters"] <= 3
    for key in ("trpo_update_s", "ppo_update_s", "fvp_s", "fwd_bwd_s", "bwd_s", "fvp_rebuild_s"):
        assert row[key] > 0, key
    assert row["bwd_s"] < row["fwd_bwd_s"]
    # The phases are parts of the update they were measured in.
    assert row["trpo_cg_s"] + row["trpo_gradient_s"] < row["trpo_update_s"]
    assert row["update_time_ratio"] == pytest.approx(row["trpo_update_s"] / row["ppo_update_s"], rel=1e-2)
    assert "repeat 2/2" in stderr


@pytest.mark.slow
def test_whole_step_times_each_trainer_and_its_phases(tmp_path, capsys):
    output = tmp_path / "steps.jsonl"
    stdout, stderr = run_benchmark(
        [
            "--model",
            "tiny",
            "--whole_step",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--batch_size",
            "4",
            "--max_new_tokens",
            "4",
            "--cg_iters",
            "2",
            "--output",
            str(output),
        ],
        capsys,
    )
    row = json.loads(stdout.strip().splitlines()[-1])
    assert output.read_text().strip() == stdout.strip().splitlines()[-1]
    for algorithm in ("trpo", "ppo", "trl_ppo"):  # the trl-ppo extra is part of the test setup
        assert row[f"{algorithm}_step_s"] > 0, algorithm
    for algorithm in ("trpo", "ppo"):
        phases = [row[f"{algorithm}_{phase}_s"] for phase in ("generate", "rollout_forward", "policy_update")]
        phases.append(row[f"{algorithm}_value_update_s"])
        assert all(p > 0 for p in phases), algorithm
        # The phases are parts of the step they were timed in.
        assert sum(phases) < row[f"{algorithm}_step_s"], algorithm
        # The ratio pairs the algorithms within each round, then takes the median over rounds.
        ratios = [ours / trl for ours, trl in zip(row[f"{algorithm}_step_s_rounds"], row["trl_ppo_step_s_rounds"])]
        assert row[f"{algorithm}_step_over_trl_ppo_rounds"] == pytest.approx(ratios, rel=1e-3)
        assert row[f"{algorithm}_step_over_trl_ppo"] == pytest.approx(sum(ratios) / 2, rel=1e-3)
    for algorithm in ("trpo", "ppo", "trl_ppo"):
        assert len(row[f"{algorithm}_step_s_rounds"]) == 2, algorithm
        assert row[f"{algorithm}_step_s"] == pytest.approx(sum(row[f"{algorithm}_step_s_rounds"]) / 2, rel=1e-3)
    assert "round 1/2: trpo ppo trl_ppo" in stderr
    assert "round 2/2: trl_ppo ppo trpo" in stderr
    assert row["steps"] == 1 and row["rounds"] == 2 and row["cg_iters"] == 2
    # The untimed warm-up step's generation, one a round, where compile_generation pays its compilation.
    assert len(row["trpo_warm_up_generate_s"]) == 2 and all(s > 0 for s in row["trpo_warm_up_generate_s"])
    assert row["compile_generation"] is False


def test_rounds_alternate_the_order_of_the_algorithms():
    assert benchmark.round_orders(["trpo", "ppo", "trl_ppo"], 3) == [
        ["trpo", "ppo", "trl_ppo"],
        ["trl_ppo", "ppo", "trpo"],
        ["trpo", "ppo", "trl_ppo"],
    ]
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--whole_step", "--rounds", "0"])


def test_peak_memory_sees_a_short_lived_allocation():
    # Allocated and freed inside the block: only a sampler running during the block can see it.
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(256, 2**20, dtype=torch.uint8)  # 256 MiB, touched
        del block
    assert 200 < memory.peak_mb < 400, memory.peak_mb


def test_peak_memory_is_the_growth_not_the_total():
    held = torch.ones(128, 2**20, dtype=torch.uint8)  # allocated before: not part of the block's peak
    with PeakMemory(torch.device("cpu")) as memory:
        small = torch.ones(8, 2**20, dtype=torch.uint8)
    assert memory.peak_mb < 64, memory.peak_mb
    del held, small


@pytest.mark.slow
def test_whole_step_times_group_advantages_against_trls_grpo(capsys):
    argv = ["--model", "tiny", "--whole_step", "--steps", "1", "--rounds", "1", "--batch_size", "4"]
    argv += ["--max_new_tokens", "4", "--cg_iters", "2", "--algorithms", "trpo", "ppo", "trl_grpo"]
    argv += ["--num_generations", "2", "--advantage_estimator", "grpo"]
    stdout, _ = run_benchmark(argv, capsys)
    row = json.loads(stdout.strip().splitlines()[-1])
    for algorithm in ("trpo", "ppo"):
        assert row[f"{algorithm}_policy_update_s"] > 0 and f"{algorithm}_value_update_s" not in row  # no critic
        assert row[f"{algorithm}_step_over_trl_grpo"] == pytest.approx(
            row[f"{algorithm}_step_s"] / row["trl_grpo_step_s"], rel=1e-2
        )
    with pytest.raises(SystemExit) as refused:
        benchmark.main(argv[:-4] + ["--num_generations", "1"])
    assert refused.value.code == 2 and "pass --num_generations 2 or more" in capsys.readouterr().err
