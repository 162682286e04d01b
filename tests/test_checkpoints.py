"""Resume, atomic checkpoints, interruptions and the output_dir rules."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from trpo_rlhf import PPOConfig, PPOTrainer, TrainingInterrupted, TRPOConfig, TRPOTrainer
from trpo_rlhf.checkpointing import (
    StopRequest,
    WriteError,
    latest_checkpoint,
    list_checkpoints,
    staging_path,
    verify_checkpoint,
)
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward, build_tiny_lm
from trpo_rlhf.metrics import json_safe
from trpo_rlhf.run_directory import RunDirectory

WORKER = Path(__file__).with_name("resume_worker.py")
ALGORITHMS = {"trpo": (TRPOTrainer, TRPOConfig, {}), "ppo": (PPOTrainer, PPOConfig, {"learning_rate": 1e-3})}


def make(algorithm, tokenizer, output_dir, reward_fn=None, **overrides):
    trainer_class, config_class, extra = ALGORITHMS[algorithm]
    settings = (
        dict(
            output_dir=str(output_dir),
            max_steps=4,
            batch_size=8,
            max_new_tokens=6,
            seed=0,
            value_epochs=1,
            value_minibatch_size=4,
            lora_target_modules=["q_proj", "v_proj", "lm_head"],
            lora_dropout=0.1,
        )
        | extra
        | overrides
    )
    return trainer_class(
        config=config_class(**settings),
        model=build_tiny_lm(tokenizer),
        tokenizer=tokenizer,
        reward_fn=reward_fn or WordScoreReward(),
        train_dataset=TOY_PROMPTS,
    )


def without_timings(rows):
    """The rows' values but timings, a NaN (e.g. the CG residual of a one-iteration step) as the
    null metrics.jsonl writes, so that equal rows compare equal."""
    return [json_safe({k: v for k, v in row.items() if not k.startswith(("time/", "memory/"))}) for row in rows]


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def forget_file_record(checkpoint):
    """Make `checkpoint` one saved before trainer_state.json recorded its files' sizes and hashes."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["files"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def tensors(trainer):
    return {name: t.detach().clone() for name, t in trainer.actor_critic.trainable_tensors().items()}


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different[:3]


def state_leaves(state):
    """Every tensor and number of an optimizer's state dict, in a fixed order."""
    if isinstance(state, (torch.Tensor, float)):
        yield state
    elif isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from state_leaves(state[key])
    elif isinstance(state, (list, tuple)):
        for item in state:
            yield from state_leaves(item)


@pytest.mark.parametrize(
    "algorithm, settings",
    [
        ("trpo", {}),
        ("ppo", {}),
        ("trpo", {"critic_layers": 1}),
        ("trpo", {"cg_iters": 1}),
        ("trpo", {"held_out_kl_prompts": 4}),
    ],
)
def test_two_steps_and_a_resume_equal_four_straight_steps_bitwise(algorithm, settings, tmp_path, word_tokenizer):
    straight = make(algorithm, word_tokenizer, tmp_path / "straight", **settings)
    straight_history = straight.train()

    first = make(algorithm, word_tokenizer, tmp_path / "split", max_steps=2, save_steps=2, **settings)
    first.train()
    checkpoint = tmp_path / "split" / "checkpoint-2"
    for name in (
        "trainer_state.json",
        "optimizer.pt",
        "rng_state_0.pth",
        "adapter_model.safetensors",
        "trainer_config.json",
    ):
        assert (checkpoint / name).exists(), name
    # A fresh trainer (as in a new process), resumed from the latest checkpoint.
    resumed = make(algorithm, word_tokenizer, tmp_path / "split", **settings)
    resumed_history = resumed.train(resume_from_checkpoint=True)

    assert [row["step"] for row in resumed_history] == [3, 4]
    assert without_timings(straight_history[2:]) == without_timings(resumed_history)
    assert without_timings(read_rows(tmp_path / "straight" / "metrics.jsonl")) == without_timings(
        read_rows(tmp_path / "split" / "metrics.jsonl")
    )
    assert_same_tensors(tensors(straight), tensors(resumed))
    assert straight.optimizers().keys() == resumed.optimizers().keys()
    for name, optimizer in straight.optimizers().items():
        saved = list(state_leaves(optimizer.state_dict()))
        loaded = list(state_leaves(resumed.optimizers()[name].state_dict()))
        assert saved and len(saved) == len(loaded), name
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(saved, loaded)), name


@pytest.mark.parametrize("setting", [{"held_out_kl_prompts": 4}, {"gradient_checkpointing": True}])
def test_a_resume_may_start_a_measurement_or_checkpointing_without_a_warning(setting, tmp_path, word_tokenizer):
    make("trpo", word_tokenizer, tmp_path / "run", max_steps=2, save_steps=2).train()
    resumed = make("trpo", word_tokenizer, tmp_path / "run", max_steps=3, **setting)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = resumed.train(resume_from_checkpoint=True)
    assert not [w for w in caught if "changed settings" in str(w.message)]
    assert history[0]["step"] == 3
    if "held_out_kl_prompts" in setting:
        assert history[0]["policy/kl_held_out"] > 0


def test_a_checkpoint_without_the_cosine_state_resumes_with_it_starting_empty(tmp_path, word_tokenizer):
    """A run saved before the update cosine existed resumes with the cosine empty, so the first
    resumed step logs none, as the first step of a run does; a checkpoint without state the
    settings need (the critic's Adam) is refused, naming it."""
    make("trpo", word_tokenizer, tmp_path / "run", max_steps=2, save_steps=2).train()
    optimizer_file = tmp_path / "run" / "checkpoint-2" / "optimizer.pt"
    saved = torch.load(optimizer_file, weights_only=True)
    del saved["policy_update_cosine"]
    torch.save(saved, optimizer_file)
    forget_file_record(tmp_path / "run" / "checkpoint-2")

    resumed = make("trpo", word_tokenizer, tmp_path / "run", max_steps=3)
    resumed.policy_update_cosine.last_change = torch.ones(1)  # would leak into step 3 if not emptied
    history = resumed.train(resume_from_checkpoint=True)
    assert [row["step"] for row in history] == [3]
    assert "policy/update_cosine" not in history[0]

    del saved["value"]
    torch.save(saved, optimizer_file)  # the checkpoint records no file hashes any more (above)
    fresh = make("trpo", word_tokenizer, tmp_path / "fresh", max_steps=3)
    with pytest.raises(ValueError, match="no 'value' state"):
        fresh.load_checkpoint(tmp_path / "run" / "checkpoint-2")


def test_a_checkpoint_with_a_removed_setting_resumes_at_its_old_default_and_is_refused_otherwise(
    tmp_path, word_tokenizer
):
    """A checkpoint of an earlier release holds settings this one removed (`REMOVED_SETTINGS`): at
    their old defaults it resumes with a warning naming them, and its config loads; at another
    value it is refused, naming the setting, before any state is loaded."""
    make("trpo", word_tokenizer, tmp_path / "run", max_steps=2, save_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    config_file = checkpoint / "trainer_config.json"
    saved = json.loads(config_file.read_text())

    config_file.write_text(json.dumps(saved | {"momentum": 0.5, "kl_penalty": "reward"}))
    forget_file_record(checkpoint)
    with pytest.warns(UserWarning, match=r"\['kl_penalty', 'momentum'\], settings this release removed"):
        assert TRPOConfig.load(config_file) == TRPOConfig(**saved)
    resumed = make("trpo", word_tokenizer, tmp_path / "run", max_steps=3)
    with pytest.warns(UserWarning, match="settings this release removed"):
        history = resumed.train(resume_from_checkpoint=True)
    assert [row["step"] for row in history] == [3]

    config_file.write_text(json.dumps(saved | {"momentum": 0.8}))
    fresh = make("trpo", word_tokenizer, tmp_path / "fresh", max_steps=3)
    before = [t.clone() for t in fresh.actor_critic.trainable_tensors().values()]
    with pytest.raises(ValueError, match=r"saved with \{'momentum': 0.8\}: settings this release removed"):
        fresh.load_checkpoint(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.actor_critic.trainable_tensors().values()))
    with pytest.raises(ValueError, match="momentum"):
        TRPOConfig.load(config_file)


def test_resume_rejects_a_missing_or_foreign_checkpoint(tmp_path, word_tokenizer):
    trainer = make("trpo", word_tokenizer, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint-<step> folder"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(FileNotFoundError, match=r"is not a resumable checkpoint \(missing trainer_state.json"):
        trainer.train(resume_from_checkpoint=tmp_path)
    make("ppo", word_tokenizer, tmp_path / "ppo", max_steps=1, save_steps=1).train()
    with pytest.raises(ValueError, match="written by PPOTrainer; resume it with that trainer, not TRPOTrainer"):
        trainer.train(resume_from_checkpoint=tmp_path / "ppo" / "checkpoint-1")


def test_a_new_run_never_mixes_with_a_previous_one(tmp_path, word_tokenizer):
    make("trpo", word_tokenizer, tmp_path / "run", max_steps=2, save_steps=1).train()
    again = make("trpo", word_tokenizer, tmp_path / "run", max_steps=1)
    with pytest.raises(
        FileExistsError, match=r"holds a previous run \(metrics.jsonl.*--resume_from_checkpoint.*--overwrite_output_dir"
    ):
        again.train()
    assert len(read_rows(tmp_path / "run" / "metrics.jsonl")) == 2  # untouched
    previous_run = RunDirectory(tmp_path / "run").run_id()
    make("trpo", word_tokenizer, tmp_path / "run", max_steps=1, overwrite_output_dir=True).train()
    assert [row["step"] for row in read_rows(tmp_path / "run" / "metrics.jsonl")] == [1]
    # The previous run's checkpoints are gone; the new run's final state is its own checkpoint.
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    new_run = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())["run_id"]
    assert new_run == RunDirectory(tmp_path / "run").run_id() != previous_run


def test_save_total_limit_keeps_the_newest(tmp_path, word_tokenizer):
    make("trpo", word_tokenizer, tmp_path / "run", max_steps=4, save_steps=1, save_total_limit=2).train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-3", "checkpoint-4"]


def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path, word_tokenizer, monkeypatch):
    trainer = make("trpo", word_tokenizer, tmp_path / "run", max_steps=1)
    trainer.train()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    trainer.step()  # step 2, not saved yet
    monkeypatch.setattr(trainer.tokenizer, "save_pretrained", disk_full)
    with pytest.raises(
        WriteError, match=r"Saving checkpoint-2 failed writing .*/run/\.checkpoint-2\.tmp/.*: no space left"
    ):
        trainer.save_checkpoint()
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    assert not staging_path(tmp_path / "run" / "checkpoint-2").exists()
    assert verify_checkpoint(tmp_path / "run" / "checkpoint-1")["global_step"] == 1


def test_an_interrupt_in_the_middle_of_a_step_saves_the_last_completed_step(tmp_path, word_tokenizer):
    """Ctrl-C pressed twice during step 3's critic update, after its policy update: the checkpoint
    is step 2's state (policy and critic), and resuming it equals an uninterrupted run."""
    straight = make("trpo", word_tokenizer, tmp_path / "straight")
    straight.train()

    trainer = make("trpo", word_tokenizer, tmp_path / "run")
    value_update = trainer.value_update

    def interrupted_value_update(batch):
        if trainer.global_step == 2:
            raise KeyboardInterrupt
        return value_update(batch)

    trainer.value_update = interrupted_value_update
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-2"
    assert len(read_rows(tmp_path / "run" / "metrics.jsonl")) == 2
    resumed = make("trpo", word_tokenizer, tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    assert_same_tensors(tensors(straight), tensors(resumed))


def test_sigint_stops_after_the_step_in_progress(tmp_path, word_tokenizer):
    calls = []
    score = WordScoreReward()

    def reward(prompts, completions):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while step 2 is being scored
        return score(prompts, completions)

    trainer = make("trpo", word_tokenizer, tmp_path / "run", reward_fn=reward)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    assert stop.value.signum == signal.SIGINT and stop.value.exit_code == 130
    assert stop.value.checkpoint == tmp_path / "run" / "checkpoint-2"
    assert json.loads((stop.value.checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert [row["step"] for row in read_rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert signal.getsignal(signal.SIGINT) == handler_before  # the caller's handler is back


def test_a_second_signal_interrupts_at_once():
    stop = StopRequest()
    with stop.installed():
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt, match="SIGTERM received twice"):
            signal.raise_signal(signal.SIGTERM)


def run_worker(output_dir, max_steps, sleep_seconds, *extra):
    command = [sys.executable, str(WORKER), str(output_dir), str(max_steps), str(sleep_seconds), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_and_terminated_runs_resume_to_the_uninterrupted_result(tmp_path):
    """SIGKILL in the middle of a run, then SIGTERM in the resumed one, then a last resume: the
    final tensors and every metric equal those of a run that was never interrupted."""
    straight = run_worker(tmp_path / "straight", 6, 0.0)  # beside the interrupted runs: it shares nothing with them

    run = tmp_path / "run"
    killed = run_worker(run, 6, 0.3)
    wait_for(run / "checkpoint-2", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert [p.name for p in list_checkpoints(run)][-1] in ("checkpoint-2", "checkpoint-3")

    terminated = run_worker(run, 6, 0.3, "latest")
    wait_for(run / "checkpoint-4", terminated)
    terminated.send_signal(signal.SIGTERM)
    assert terminated.wait(timeout=120) == 128 + signal.SIGTERM, terminated.communicate()[1][-3000:]
    last = latest_checkpoint(run)
    steps_done = json.loads((last / "trainer_state.json").read_text())["global_step"]
    assert steps_done == int(last.name.split("-")[1]) == len(read_rows(run / "metrics.jsonl"))

    finished = run_worker(run, 6, 0.0, "latest")
    assert finished.wait(timeout=300) == 0, finished.communicate()[1][-3000:]
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-3000:]
    assert json.loads((run / "final_digest.json").read_text()) == json.loads(
        (tmp_path / "straight" / "final_digest.json").read_text()
    )
    assert without_timings(read_rows(run / "metrics.jsonl")) == without_timings(
        read_rows(tmp_path / "straight" / "metrics.jsonl")
    )
