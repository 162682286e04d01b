"""The comparison recipe with tiny settings writes results.json, compare.png and compare.md."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from trpo_rlhf.experiments.comparison import (
    best_variants,
    common_kl,
    envelope_table,
    frontier_auc,
    frontier_curve,
    frontier_envelope,
    markdown_table,
    reward_at_kl,
    summarize_runs,
)
from trpo_rlhf.run_directory import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import compare_trpo_ppo  # noqa: E402
from compare_trpo_ppo import DEFAULT_ALGORITHMS, Variant, parse_variant  # noqa: E402

RESULT_KEYS = {
    "final_reward_mean",
    "final_reward_std",
    "kl_ref_final",
    "kl_exceed_fraction",
    "held_out_kl",
    "seconds_per_step",
    "policy_update_seconds_per_step",
    "peak_memory_mb",
    "seeds",
    "steps",
    "algorithm",
    "mean_reward",
    "reward_at_kl",
    "frontier_auc",
    "frontier_kl",
}


def run_comparison(argv: list[str], capsys) -> str:
    """`recipes/compare_trpo_ppo.py` with `argv`: its main process in this one (its runs are worker
    processes, as always); returns what it printed, after asserting it succeeded."""
    code = compare_trpo_ppo.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.out[-2000:] + captured.err[-2000:]
    return captured.out


@pytest.mark.slow
def test_comparison_runs_all_algorithms_with_tiny_settings(tmp_path, capsys):
    out = tmp_path / "compare"
    command = [
        "--task",
        "toy",
        "--steps",
        "2",
        "--seeds",
        "1",
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
        "--held_out_kl_prompts",
        "2",
        "--output_dir",
        str(out),
    ]
    variant = ["--variant", "trpo_cg1:--cg_iters 1", "--parallel", "2"]
    stdout = run_comparison(command + variant, capsys)
    results = json.loads((out / "results.json").read_text())
    assert set(DEFAULT_ALGORITHMS) | {"trpo_cg1", "best", "envelope", "settings"} == set(results)
    # The variant is a TRPO run whose own flag overrides the shared --cg_iters 2.
    assert results["trpo_cg1"]["algorithm"] == "trpo" and RESULT_KEYS <= set(results["trpo_cg1"])
    assert json.loads((out / "trpo_cg1" / "seed-0" / "trainer_config.json").read_text())["cg_iters"] == 1
    assert results["best"]["trpo"] in ("trpo", "trpo_cg1") and results["best"]["ppo"] == "ppo"
    assert set(results["trpo"]["reward_at_kl"]) == {"2", "4", "6"}
    # One range for all; a KL of 0 up to float32 rounding where a run ends next to the reference (the
    # reference's forward and the policy's with LoRA's B = 0 round differently).
    assert results["trpo"]["frontier_kl"] == results["ppo"]["frontier_kl"] >= -1e-6
    for algorithm in DEFAULT_ALGORITHMS:
        assert RESULT_KEYS <= set(results[algorithm]), algorithm
        assert results[algorithm]["seeds"] == 1 and results[algorithm]["steps"] == 2
        assert 0 <= results[algorithm]["kl_exceed_fraction"] <= 1
    assert results["trl_ppo"]["policy_update_seconds_per_step"] is None  # TRL does not time it apart
    # Our updates' KL on prompts outside their batch; TRL's updates run inside its own loop.
    for variant in ("trpo", "trpo_cg1", "ppo"):
        held_out = results[variant]["held_out_kl"]
        assert 0 < held_out["median"] <= held_out["max"], variant
    assert results["trl_ppo"]["held_out_kl"] is None
    assert results["trpo"]["policy_update_seconds_per_step"] > 0
    assert results["settings"]["task"] == "toy" and results["settings"]["cg_iters"] == 2
    trpo_rows = [json.loads(line) for line in (out / "trpo" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert (
        json.loads((out / "trpo" / "seed-0" / "trainer_config.json").read_text())["cg_iters"] == 2
    )  # --cg_iters reached TRPO
    assert all(row["trpo/fvp_count"] <= 2 for row in trpo_rows)
    assert (out / "compare.png").stat().st_size > 10_000
    table = (out / "compare.md").read_text()
    assert table in stdout and "| PPO (TRL 1.12) |" in table and "TRPO (ours) [trpo_cg1]" in table
    assert "**TRPO (ours)" in table and "(best)" in table  # two TRPO variants: the better one is marked
    assert "update KL on held-out prompts" in table
    # Each algorithm at its best at every point: the envelope over its variants.
    assert set(results["envelope"]) == set(DEFAULT_ALGORITHMS)
    best_mean = max(results[v]["mean_reward"] for v in ("trpo", "trpo_cg1"))
    assert results["envelope"]["trpo"]["mean_reward"]["mean"] == best_mean
    assert "| at its best" in table and f"{best_mean:.3f} (" in table
    for algorithm in DEFAULT_ALGORITHMS:
        assert len((out / algorithm / "seed-0" / "metrics.jsonl").read_text().splitlines()) == 2

    # --reuse_finished: runs only what is missing (here one deleted TRPO run), keeps the rest.
    kept = (out / "ppo" / "seed-0" / "metrics.jsonl").read_text()
    (out / "trpo" / "seed-0" / "metrics.jsonl").unlink()
    again = run_comparison(command + ["--reuse_finished", "--algorithms", "trpo", "ppo"], capsys)
    assert again.count("reusing the finished run") == 1
    assert "TRPO (ours) seed 0: 2 steps" in again
    assert (out / "ppo" / "seed-0" / "metrics.jsonl").read_text() == kept
    assert set(json.loads((out / "results.json").read_text())) == {"trpo", "ppo", "best", "envelope", "settings"}

    # --resume_from_checkpoint: a run stopped after step 1 continues from checkpoint-1 to the same rows.
    run = out / "ppo" / "seed-0"
    finished = (run / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(run / "checkpoint-2")
    (run / "metrics.jsonl").write_text(finished[0] + "\n")
    resumed = run_comparison(command + ["--reuse_finished", "--resume_from_checkpoint", "--algorithms", "ppo"], capsys)
    assert f"resuming from {run / 'checkpoint-1'}" in resumed

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


def frontier_rows(kls, rewards):
    return [{"kl/ref": k, "reward/mean": r} for k, r in zip(kls, rewards)]


def test_reward_at_kl_averages_the_five_steps_around_the_first_crossing():
    rows = frontier_rows([0, 1, 2, 3, 4.5, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8])
    assert reward_at_kl(rows, 4.0) == 4.0  # first kl >= 4 at index 4: rewards 2..6
    assert reward_at_kl(rows, 0.5) == 1.5  # index 1: rewards 0..3 (the window is cut at the start)
    assert reward_at_kl(rows, 9.0) is None


def test_frontier_auc_is_the_mean_reward_over_kl_by_trapezoids():
    # With window 1 the curve is the rows themselves: reward = kl on [0, 4], so the mean is 2.
    rows = frontier_rows([0.0, 1.0, 2.0, 4.0, 6.0], [0.0, 1.0, 2.0, 4.0, 6.0])
    kl, reward = frontier_curve(rows, window=1)
    assert kl == [0.0, 1.0, 2.0, 4.0, 6.0]
    # The default 5-step running mean (kl 0, 0.5, 1, 1.75, 2.6): reward still equals kl along the
    # curve, so the mean reward over KL in [0, 2] is 1, the end point interpolated at 2.
    assert frontier_auc(rows, 2.0) == pytest.approx(1.0)
    assert frontier_auc(rows, 3.0) is None  # the smoothed curve stops at 2.6
    # A KL that drops is held at its running maximum, so the curve stays a function of KL.
    dips = frontier_curve(frontier_rows([0.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]), window=1)[0]
    assert dips == [0.0, 2.0, 2.0, 3.0]
    assert common_kl({"a": [rows], "b": [frontier_rows([0.0, 1.0], [0.0, 0.0])]}) == pytest.approx(0.5)


def test_the_frontier_is_read_at_the_kls_asked_for(capsys):
    """--frontier_nats sets where reward_at_kl and frontier_auc_to_kl read each seed, and the tables
    show those KLs; a KL that is not positive is refused before anything runs."""
    rows = [
        {**r, "time/step": 1.0, "memory/peak_mb": 1.0}
        for r in frontier_rows([0.0, 1.0, 2.0, 4.0, 6.0], [0.0, 1.0, 2.0, 4.0, 6.0])
    ]
    results = summarize_runs({"trpo": [rows, rows]}, kl_target=0.1, frontier_nats=[0.5, 1.0, 2.0])
    at, to = results["trpo"]["reward_at_kl"], results["trpo"]["frontier_auc_to_kl"]
    assert set(at) == set(to) == {"0.5", "1", "2"}
    assert at["2"]["mean"] == reward_at_kl(rows, 2.0) and to["2"]["mean"] == pytest.approx(1.0)
    assert to["0.5"]["mean"] == pytest.approx(frontier_auc(rows, 0.5))
    assert (
        "reward @ 0.5 nats | reward @ 1 nat | reward @ 2 nats | mean reward, 0–0.5 nats | mean reward, 0–1 nat |"
        in (markdown_table(results, kl_target=0.1))
    )
    assert "| reward @ 0.5 nats | reward @ 1 nat | reward @ 2 nats | mean reward |" in envelope_table(
        frontier_envelope(results)
    )
    assert compare_trpo_ppo.parse_args(["--frontier_nats", "0.5", "1"]).frontier_nats == [0.5, 1.0]
    with pytest.raises(SystemExit):
        compare_trpo_ppo.parse_args(["--frontier_nats", "0.5", "0"])
    assert "each KL must be > 0 nats" in capsys.readouterr().err


def test_best_variants_pick_the_largest_frontier_auc_per_algorithm():
    results = {
        "ppo_lr1e-3": {"algorithm": "ppo", "frontier_auc": {"mean": 0.4}},
        "ppo_lr3e-3": {"algorithm": "ppo", "frontier_auc": {"mean": 0.3}},
        "ppo_lr1e-2": {"algorithm": "ppo", "frontier_auc": None},  # a seed fell short of the common KL
        "trpo": {"algorithm": "trpo", "frontier_auc": {"mean": 0.1}},
    }
    assert best_variants(results) == {"ppo": "ppo_lr1e-3", "trpo": "trpo"}


def test_the_envelope_takes_each_point_from_the_variant_best_there():
    def result(algorithm, mean_reward, at_2, at_4):
        spread = {"2": {"mean": at_2}, "4": None if at_4 is None else {"mean": at_4}, "6": None}
        return {"algorithm": algorithm, "mean_reward": mean_reward, "reward_at_kl": spread}

    results = {
        "ppo_lr1e-3": result("ppo", 0.30, 0.40, 0.50),
        "ppo_lr3e-3": result("ppo", 0.45, 0.20, 0.30),
        "ppo_lr3e-4": result("ppo", 0.10, 0.45, None),  # a seed never reaches 4 nats
        "trpo": result("trpo", 0.35, 0.35, 0.55),
    }
    envelope = frontier_envelope(results)
    assert envelope["ppo"]["reward_at_kl"] == {
        "2": {"mean": 0.45, "variant": "ppo_lr3e-4"},
        "4": {"mean": 0.50, "variant": "ppo_lr1e-3"},
        "6": None,
    }
    assert envelope["ppo"]["mean_reward"] == {"mean": 0.45, "variant": "ppo_lr3e-3"}
    assert envelope["trpo"]["reward_at_kl"]["4"] == {"mean": 0.55, "variant": "trpo"}
    table = envelope_table(envelope)
    assert "| PPO (ours) | 0.450 (ppo_lr3e-4) | 0.500 (ppo_lr1e-3) | – | 0.450 (ppo_lr3e-3) |" in table


def test_variants_parse_and_bad_ones_fail_before_anything_runs(capsys):
    assert parse_variant("trpo_cg1:--cg_iters 1") == Variant("trpo_cg1", "trpo", ["--cg_iters", "1"])
    assert parse_variant("ppo_e8:ppo --ppo_epochs 8") == Variant("ppo_e8", "ppo", ["--ppo_epochs", "8"])
    args = compare_trpo_ppo.parse_args(["--algorithms", "trpo", "ppo", "--learning_rates", "3e-4", "1e-3"])
    assert [v.name for v in args.variants] == ["trpo", "ppo_lr3e-4", "ppo_lr1e-3"]
    assert args.variants[1].flags == ["--learning_rate", "0.0003"]
    assert compare_trpo_ppo.parse_worker_flags(["--cg_iters", "1", "--cg_damping", "0.01"]) is not None
    solver = compare_trpo_ppo.parse_args(["--cg_iters", "1", "--fisher_chunks", "1"])
    worker = compare_trpo_ppo.parse_args(compare_trpo_ppo.worker_command(solver, "trpo", 0, Path("run"))[2:])
    assert (worker.cg_iters, worker.fisher_chunks) == (1, 1)
    assert compare_trpo_ppo.parse_args([]).fisher_chunks is None  # unset: TRPOConfig's default
    for bad, message in [
        (["--variant", "nocolon"], "expected NAME:FLAGS"),
        (["--variant", "x:--no_such_flag 1"], "--no_such_flag is not a setting a variant may change"),
        (["--variant", "x:--critic_layers two"], "variant 'x': '--critic_layers two': argument --critic_layers"),
        (["--variant", "trpo:--cg_iters 1"], "variant names must differ"),
        (["--variant", "envelope:--cg_iters 1"], "'envelope' is a key of results.json"),
        (["--variant", "..:--cg_iters 1"], "the name '..' is a folder of --output_dir"),
        (["--variant", "a/b:--cg_iters 1"], "takes letters, digits and _ - . + only"),
        (["--output_dir", ""], "output_dir='' is the working directory"),
    ]:
        with pytest.raises(SystemExit):
            compare_trpo_ppo.parse_args(bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        # issue 42: a worker with --overwrite_output_dir inside another run's folder, outside the lock
        ("--output_dir OTHER", "--output_dir is the comparison's own"),
        ("--output_dir=OTHER", "--output_dir is the comparison's own"),
        ("--out OTHER", "--out is not a setting a variant may change"),  # no abbreviation gets through
        ("--seed 5", "--seed is the comparison's own"),  # every "seed" one run
        ("--worker ppo", "--worker is the comparison's own"),  # labelled trpo
        ("ppo --overwrite_output_dir", "--overwrite_output_dir is the comparison's own"),
        ("--resume_from_checkpoint", "--resume_from_checkpoint is the comparison's own"),
        ("--task exact", "--task is not a setting a variant may change"),
        ("-s 5", "-s is not a setting a variant may change"),
    ],
)
def test_a_variant_cannot_set_what_the_comparison_owns(flags, message, tmp_path, capsys):
    other = tmp_path / "other"
    with pytest.raises(SystemExit):
        compare_trpo_ppo.parse_args(["--output_dir", str(tmp_path / "cmp"), "--variant", f"x:{flags}"])
    assert message in capsys.readouterr().err
    assert not other.exists() and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    "command, message",
    [
        (["--variant", "b0:--batch_size 0"], "variant 'b0' (trpo --batch_size 0): batch_size=0 must be >= 1"),
        (["--variant", "neg:--max_kl -1"], "variant 'neg' (trpo --max_kl -1): max_kl=-1.0"),
        (
            ["--batch_size", "8", "--variant", "g3:ppo --num_generations 3"],
            "variant 'g3' (ppo --num_generations 3): num_generations=3 must be >= 1 and divide batch_size=8",
        ),
        (["--learning_rates", "-1"], "variant 'ppo_lr-1e0' (ppo --learning_rate -1.0): learning_rate=-1.0 must be > 0"),
        (["--task", "toy", "--model_name_or_path", "/does/not/exist"], "the toy task would ignore it"),
        (
            ["--task", "exact", "--dataset", "x.txt"],
            "the exact task would ignore it (it reads --reward_model and --exact_member)",
        ),
        (["--task", "exact", "--reward_model", "golden"], "the exact task's rewards are ('dense', 'sparse')"),
    ],
)
def test_a_bad_worker_value_fails_before_any_worker_starts_naming_its_variant(command, message, capsys):
    with pytest.raises(SystemExit):
        compare_trpo_ppo.parse_args(command)
    assert message in capsys.readouterr().err


def test_every_variants_config_is_built_as_its_worker_builds_it(tmp_path):
    args = compare_trpo_ppo.parse_args(["--variant", "x:ppo --ppo_epochs 2 --lora_r 4", "--output_dir", str(tmp_path)])
    variant = args.variants[-1]
    worker = compare_trpo_ppo.parse_worker_flags(
        compare_trpo_ppo.worker_command(args, variant.algorithm, 3, tmp_path / "x" / "seed-3")[2:] + variant.flags,
        whole=True,
    )
    config = compare_trpo_ppo.worker_config(worker)
    assert type(config).__name__ == "PPOConfig"
    assert (config.ppo_epochs, config.lora_r, config.seed, config.output_dir) == (
        2,
        4,
        3,
        str(tmp_path / "x" / "seed-3"),
    )
    assert config.overwrite_output_dir  # the comparison chose to (re)run this folder


def test_a_used_foreign_or_locked_output_dir_is_refused_before_anything_runs(tmp_path, capsys):
    command = ["--algorithms", "trpo", "--steps", "1", "--seeds", "1", "--output_dir"]
    used = RunDirectory(tmp_path / "used")
    with used.locked():
        used.claim(overwrite=False)
        used.record("results.json")
    (used.path / "results.json").write_text("{}")
    assert compare_trpo_ppo.main(command + [str(used.path)]) == 2
    assert "holds a previous run (results.json). Complete it with --reuse_finished" in capsys.readouterr().err
    assert (used.path / "results.json").read_text() == "{}" and not (used.path / "trpo").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert compare_trpo_ppo.main(command + [str(mine), "--overwrite_output_dir"]) == 2
    assert "holds files that no trpo_rlhf run wrote (notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    busy = RunDirectory(tmp_path / "busy")
    with busy.locked():
        assert compare_trpo_ppo.main(command + [str(busy.path)]) == 2
    assert f"is in use by another run (pid {os.getpid()} on" in capsys.readouterr().err
    assert not (busy.path / "trpo").exists()


def test_critic_flags_reach_every_worker_of_trpo_and_our_ppo(tmp_path):
    args = compare_trpo_ppo.parse_args(
        ["--critic_layers", "1", "--value_epochs", "2", "--critic_lora_target_modules", "q_proj", "up_proj"]
    )
    command = compare_trpo_ppo.worker_command(args, "trpo", 0, tmp_path)
    assert command[command.index("--critic_layers") + 1] == "1"
    assert command[command.index("--value_epochs") + 1] == "2"
    position = command.index("--critic_lora_target_modules")
    assert command[position + 1 : position + 3] == ["q_proj", "up_proj"]
    assert compare_trpo_ppo.parse_args(command[2:]).critic_lora_target_modules == ["q_proj", "up_proj"]
    assert "--value_minibatch_size" not in command  # unset: the config's default
    assert compare_trpo_ppo.parse_worker_flags(["--critic_layers", "2", "--value_minibatch_size", "16"]) is not None
    with pytest.raises(ValueError, match="argument --critic_layers: invalid int value: 'two'"):
        compare_trpo_ppo.parse_worker_flags(["--critic_layers", "two"])


@pytest.mark.parametrize("algorithm", ["trpo", "ppo", "trl_ppo"])
def test_the_adapters_rank_alpha_and_modules_reach_every_algorithms_worker_config(tmp_path, monkeypatch, algorithm):
    args = compare_trpo_ppo.parse_args(["--lora_r", "2", "--lora_alpha", "4", "--lora_target_modules", "v_proj"])
    command = compare_trpo_ppo.worker_command(args, algorithm, 0, tmp_path)
    worker_args = compare_trpo_ppo.parse_args(command[2:])
    assert (worker_args.lora_r, worker_args.lora_alpha, worker_args.lora_target_modules) == (2, 4, ["v_proj"])
    unset = compare_trpo_ppo.worker_command(compare_trpo_ppo.parse_args([]), algorithm, 0, tmp_path)
    assert "--lora_r" not in unset and "--lora_target_modules" not in unset

    built = {}

    class Capture:
        def __init__(self, config, *rest, **arguments):
            built["config"] = config

        def train(self, **kwargs):
            pass

    import trpo_rlhf
    from trpo_rlhf.experiments import trl_adapter

    monkeypatch.setattr(trpo_rlhf, "TRPOTrainer", Capture)
    monkeypatch.setattr(trpo_rlhf, "PPOTrainer", Capture)
    monkeypatch.setattr(trl_adapter, "build_trl_ppo_for_task", lambda task, config, **options: Capture(config))
    compare_trpo_ppo.run_worker(worker_args, tmp_path / "run")
    assert (built["config"].lora_r, built["config"].lora_alpha, built["config"].lora_target_modules) == (
        2,
        4,
        ["v_proj"],
    )


def test_switches_reach_every_worker():
    def worker(switches):
        command = compare_trpo_ppo.worker_command(compare_trpo_ppo.parse_args(switches), "ppo", 1, Path("run"))
        return compare_trpo_ppo.parse_args(command[2:])

    assert worker(["--bf16", "--held_out_kl_prompts", "8"]).bf16
    assert worker(["--bf16", "--held_out_kl_prompts", "8"]).held_out_kl_prompts == 8
    assert worker(["--compile_generation"]).compile_generation
    assert "--compile_generation" not in compare_trpo_ppo.worker_command(
        compare_trpo_ppo.parse_args([]), "ppo", 1, Path("run")
    )
    # compile_generation with bf16 needs a bfloat16 base, which no comparison flag sets: refused at once.
    with pytest.raises(SystemExit):
        compare_trpo_ppo.parse_args(["--bf16", "--compile_generation"])


def test_the_binary_sentiment_task_thresholds_vader():
    from trpo_rlhf.experiments import build_task

    task = build_task("sentiment_binary", seed=0, model="embedded")
    assert task.model == "embedded" and len(task.prompts) >= 300
    scores = task.reward_model(["", "", ""], [" a truly wonderful, lovely film", " it was a film", " awful and boring"])
    assert scores == [1.0, 0.0, 0.0]
    assert "VaderReward >= 0.5" in task.describe()
    with pytest.raises(ValueError, match="thresholds VADER"):
        build_task("sentiment_binary", reward_model="lvwerra/distilbert-imdb")


@pytest.mark.slow
def test_the_exact_task_scores_each_variant_against_the_optimal_frontier(tmp_path, capsys):
    out = tmp_path / "exact"
    command = ["--task", "exact", "--reward_model", "sparse", "--algorithms", "trpo", "trl_grpo", "--steps", "2"]
    command += ["--seeds", "2", "--batch_size", "8", "--num_generations", "4", "--advantage_estimator", "grpo"]
    run_comparison(command + ["--learning_rate", "3e-3", "--parallel", "2", "--output_dir", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    assert (
        set(results["exact"]["optimum"]) == {"0.25", "0.5", "1.0", "2.0"} == set(results["trpo"]["frontier_efficiency"])
    )
    # TRL's GRPO at the same completions per step and per prompt, scored on the same exact frontier
    assert set(results["trl_grpo"]["frontier_efficiency"]) == set(results["exact"]["optimum"])
    assert json.loads((out / "trpo" / "seed-0" / "trainer_config.json").read_text())["num_generations"] == 4
    grpo_rows = [json.loads(line) for line in (out / "trl_grpo" / "seed-1" / "metrics.jsonl").read_text().splitlines()]
    # (a sparse reward may leave a group all zero, an update of zero: the KL may stay 0)
    assert len(grpo_rows) == 2 and all(row["exact/kl_ref"] >= 0 and row["kl/ref"] >= -1e-6 for row in grpo_rows)
    assert (
        0
        < results["exact"]["reference_reward"]
        < results["exact"]["optimum"]["0.25"]
        < results["exact"]["optimum"]["2.0"]
    )
    for cell in results["trpo"]["frontier_efficiency"].values():
        assert cell["seeds"] == 2 and cell["se"] >= 0 and 0 <= cell["mean"] <= 1 + 1e-9
    rows = [json.loads(line) for line in (out / "trpo" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["exact/kl_ref"] > 0 for row in rows)
    assert "efficiency @ 0.25 nats" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 10_000


def test_each_worker_knows_how_many_runs_share_the_cores(tmp_path):
    # A worker divides the CPU's cores by --parallel (each run taking all of them oversubscribes).
    command = compare_trpo_ppo.worker_command(compare_trpo_ppo.parse_args(["--parallel", "3"]), "ppo", 0, tmp_path)
    assert compare_trpo_ppo.parse_args(command[2:]).parallel == 3


def test_runs_side_by_side_each_take_their_share_of_the_cores(monkeypatch):
    from trpo_rlhf.experiments.recipe import use_all_cpu_cores

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cores, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()
    try:
        assert use_all_cpu_cores(runs_at_once=cores) == 1
        assert use_all_cpu_cores(runs_at_once=2 * cores) == 1
    finally:
        torch.set_num_threads(threads)
