"""The sentiment recipe end to end on the embedded default, and its argument parsing."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser

from trpo_rlhf import PPOConfig, TRPOConfig
from trpo_rlhf.experiments.recipe import ScriptArguments
from trpo_rlhf.experiments.tasks import resolve_sentiment_task
from trpo_rlhf.loading import hub_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import ppo_gpt2_sentiment  # noqa: E402
import trpo_gpt2_sentiment  # noqa: E402
import trpo_smollm2_arithmetic  # noqa: E402

# A two-step run's settings: two completions of 6 tokens a step, one value epoch, two samples shown.
TINY_RUN = ["--batch_size", "2", "--max_new_tokens", "6", "--value_epochs", "1", "--num_samples_to_show", "2"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,flags",
    [
        ("trpo_gpt2_sentiment.py", ["--cg_iters", "2", "--fisher_chunks", "1"]),
        ("ppo_gpt2_sentiment.py", ["--ppo_epochs", "2", "--learning_rate", "1e-4"]),
    ],
)
def test_recipe_runs_two_steps_on_the_embedded_default(tmp_path, capsys, recipe, flags):
    out = tmp_path / "sentiment"
    argv = ["--max_steps", "2", *TINY_RUN, "--save_steps", "1", "--output_dir", str(out), *flags]
    if recipe.startswith("trpo"):  # the script through accelerate's launcher, as the README runs it
        accelerate = Path(sys.executable).with_name("accelerate")
        script = str(ROOT / "recipes" / recipe)
        launch = [str(accelerate), "launch", "--num_processes", "1"] if accelerate.exists() else [sys.executable]
        result = subprocess.run(
            [*launch, script, *argv],
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        stdout = result.stdout
    else:  # the same body in this process
        stdout = run_in_process(ppo_gpt2_sentiment, argv, capsys)
    assert "policy=embedded, reward=vader" in stdout and "because HF_HUB_OFFLINE is set" in stdout
    assert "| prompt | before | reward | after | reward |" in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    if recipe.startswith("trpo"):
        assert all(r["trpo/kl"] <= TRPOConfig.kl_tolerance * TRPOConfig.max_kl for r in rows)
    else:
        # (equal scores on a 2-completion batch give zero advantages, hence a zero update: KL may be 0)
        assert all(r["ppo/kl"] >= 0 and r["ppo/epochs_run"] == 2 and 0 <= r["ppo/clipfrac"] <= 1 for r in rows)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_config.json",
        "samples.md",
        "training_curves.png",
    ):
        assert (out / name).exists(), name
    assert (out / "value" / "value_head.safetensors").exists()
    if not recipe.startswith("trpo"):
        return
    # A second run into the same folder stops before any compute and names both ways out (the recipe's
    # own function, in this process) ...
    with pytest.raises(FileExistsError) as refused:
        run_in_process(trpo_gpt2_sentiment, ["--max_steps", "3", "--output_dir", str(out)], capsys)
    assert "--resume_from_checkpoint" in str(refused.value) and "--overwrite_output_dir" in str(refused.value)
    assert "| prompt | before |" not in capsys.readouterr().out
    # ... and --resume_from_checkpoint continues it from its newest checkpoint, appending to its metrics.
    resume = ["--max_steps", "3", *TINY_RUN, "--output_dir", str(out), *flags, "--resume_from_checkpoint", "latest"]
    assert f"Resuming from {out / 'checkpoint-2'}" in run_in_process(trpo_gpt2_sentiment, resume, capsys)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def run_in_process(recipe, argv: list[str], capsys) -> str:
    """A recipe's `main(argv)` in this process; returns what it printed. The recipe gives itself
    every core (`use_all_cpu_cores`): this process's other tests keep the threads they had."""
    threads = torch.get_num_threads()
    try:
        recipe.main(argv)
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


@pytest.mark.parametrize("config_class", [TRPOConfig, PPOConfig])
def test_every_config_field_is_a_flag(config_class):
    parser = HfArgumentParser((ScriptArguments, config_class))
    args, config = parser.parse_args_into_dataclasses(
        args=[
            "--model_name_or_path",
            "embedded",
            "--reward_model",
            "vader",
            "--max_new_tokens",
            "7",
            "--lora_target_modules",
            "q_proj",
            "k_proj",
            "--target_kl_ref",
            "6",
            "--whiten_advantages",
            "false",
        ]
    )
    assert (args.model_name_or_path, args.reward_model) == ("embedded", "vader")
    assert (config.max_new_tokens, config.lora_target_modules) == (7, ["q_proj", "k_proj"])
    assert config.target_kl_ref == 6.0 and config.whiten_advantages is False
    help_text = parser.format_help()
    for f in dataclasses.fields(config_class):
        assert f"--{f.name}" in help_text, f.name


def test_trpo_flags_reach_the_config():
    _, config = HfArgumentParser((ScriptArguments, TRPOConfig)).parse_args_into_dataclasses(
        args=["--max_kl", "0.005", "--cg_iters", "7", "--backtrack_coef", "0.5"]
    )
    assert (config.max_kl, config.cg_iters, config.backtrack_coef) == (0.005, 7, 0.5)


def test_explicit_embedded_task_skips_the_probe():
    task = resolve_sentiment_task("embedded", "vader", str(ROOT / "data" / "movie_review_openings.txt"))
    assert (task.model, task.reward_model) == ("embedded", "vader")
    assert len(task.prompts) >= 300 and "were given" in task.reason


def test_hub_probe_gives_up_on_a_silent_server(monkeypatch):
    """A server that accepts connections and never answers: the probe must not wait for it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        start = time.monotonic()
        online, why = hub_available(timeout=1.0, endpoint=f"http://127.0.0.1:{port}")
        assert not online and "127.0.0.1" in why
        assert time.monotonic() - start < 3.0
    finally:
        server.close()


def test_hub_probe_reports_refused_connection(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    online, why = hub_available(timeout=2.0, endpoint=f"http://127.0.0.1:{port}")
    assert not online and "unreachable" in why


def test_offline_environment_variable_short_circuits(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_available() == (False, "HF_HUB_OFFLINE is set")
    task = resolve_sentiment_task(None, None, None)
    assert (task.model, task.reward_model, task.dataset) == ("embedded", "vader", None)
    assert "HF_HUB_OFFLINE" in task.reason


def test_hub_reachable_chooses_the_classic_task(monkeypatch):
    import trpo_rlhf.experiments.tasks as tasks

    monkeypatch.setattr(tasks, "hub_available", lambda timeout: (True, "hub reachable"))
    task = resolve_sentiment_task(None, None, str(ROOT / "data" / "movie_review_openings.txt"))
    assert (task.model, task.reward_model) == ("lvwerra/gpt2-imdb", "lvwerra/distilbert-imdb")
    assert "classic TRL IMDB task" in task.reason


def test_a_lone_cpu_process_uses_every_core(monkeypatch):
    import torch

    from trpo_rlhf.experiments.recipe import use_all_cpu_cores

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the rule is for CPU-only machines
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what `accelerate launch` leaves a CPU-only process with
        assert use_all_cpu_cores() == len(os.sched_getaffinity(0))
        monkeypatch.setenv("WORLD_SIZE", "2")
        torch.set_num_threads(1)
        assert use_all_cpu_cores() == 1  # several processes share the cores: leave them alone
    finally:
        torch.set_num_threads(before)


def test_resume_flag_values():
    from trpo_rlhf.experiments.recipe import parse_resume

    assert parse_resume(None) is None and parse_resume("false") is None
    assert parse_resume("latest") is True and parse_resume("True") is True
    assert parse_resume("runs/x/checkpoint-4") == "runs/x/checkpoint-4"


def test_trl_recipe_refuses_to_resume():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from trl_ppo_gpt2_sentiment import main
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    with pytest.raises(SystemExit, match="TRL 1.12's PPOTrainer cannot resume"):
        main(["--resume_from_checkpoint", "latest", "--model_name_or_path", "embedded", "--reward_model", "vader"])


@pytest.mark.slow
def test_the_arithmetic_recipe_trains_on_chat_prompts_with_trl_style_rewards(tmp_path, capsys):
    out = tmp_path / "arithmetic"
    argv = ["--max_steps", "2", "--batch_size", "4", "--num_generations", "2", "--max_new_tokens", "4"]
    argv += ["--cg_iters", "2", "--fisher_chunks", "1", "--num_samples_to_show", "2", "--output_dir", str(out)]
    stdout = run_in_process(trpo_smollm2_arithmetic, argv, capsys)
    assert "reward=1 x correct_answer + 0.5 x number_only" in stdout
    assert "| prompt | before | reward | after | reward |" in stdout and "| What is " in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # the weighted sum of the two functions, each logged on its own; no critic
        assert row["reward/mean"] == pytest.approx(row["reward/correct_answer"] + 0.5 * row["reward/number_only"])
        assert not any(key.startswith("value/") for key in row)
    assert json.loads((out / "trainer_config.json").read_text())["advantage_estimator"] == "grpo"
    for name in ("adapter_model.safetensors", "samples.md", "training_curves.png"):
        assert (out / name).exists(), name
    assert not (out / "value").exists()
