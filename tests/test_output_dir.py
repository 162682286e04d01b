"""Nothing a user owns is lost: output_dir ownership and its lock, a final save that survives a kill,
checkpoints that belong to their run and name their corruption, and inputs that cannot train."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_checkpoints import assert_same_tensors, forget_file_record, make, read_rows, tensors, without_timings

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.checkpointing import CorruptCheckpointError, list_checkpoints
from trpo_rlhf.experiments.toy import WORDS, WordScoreReward, build_tiny_lm, build_word_tokenizer
from trpo_rlhf.rewards import RewardError
from trpo_rlhf.run_directory import LOCK_FILE, MARKER_FILE, WRITE_PROBE_PREFIX, OutputDirInUse, RunDirectory

TESTS = Path(__file__).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def user_folder(root: Path) -> dict[Path, str]:
    """A folder of the user's own, as in the issue: a README, a tokenizer.json and a value/ tree."""
    files = {
        root / "README.md": "# my project\n",
        root / "tokenizer.json": '{"mine": true}\n',
        root / "value" / "mydata" / "important.csv": "a,b\n1,2\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def tiny_trpo(output_dir: Path, tokenizer, model=None, train_dataset=("good movie", "bad film"), **settings):
    """A TRPOTrainer as `make` builds it, with its own model and prompts."""
    config = make("trpo", tokenizer, output_dir, **settings).config
    model = model if model is not None else build_tiny_lm(tokenizer)
    return TRPOTrainer(config, model, tokenizer, WordScoreReward(), train_dataset)


def assert_untouched(files: dict[Path, str]) -> None:
    assert {path: path.read_text() for path in files} == files


def test_another_processs_writability_probe_is_not_a_foreign_file(tmp_path):
    """Under `accelerate launch` every process probes output_dir for writing, and one may list the
    folder while another's probe is in it: that probe is bookkeeping, not the user's file."""
    folder = RunDirectory(tmp_path / "run")
    folder.path.mkdir()
    (folder.path / f"{WRITE_PROBE_PREFIX}12345").write_text("")
    folder.check_ours()
    (folder.path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files that no trpo_rlhf run wrote \(notes.txt;"):
        folder.check_ours()


# ------------------------------------------------------------------ ownership
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_the_users_is_refused_before_anything_is_written(overwrite, tmp_path, word_tokenizer):
    files = user_folder(tmp_path / "project")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "project").rglob("*"))
    with pytest.raises(FileExistsError, match=r"project' holds files that no trpo_rlhf run wrote \(README.md"):
        make("trpo", word_tokenizer, tmp_path / "project", overwrite_output_dir=overwrite)
    assert_untouched(files)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "project").rglob("*")) == before  # not even a lock


def test_the_working_directory_home_and_the_empty_path_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(ValueError, match=r"output_dir='' is the working directory"):
        TRPOConfig(output_dir="")
    with pytest.raises(ValueError, match=r"output_dir='\.' is the working directory"):
        TRPOConfig(output_dir=".")
    with pytest.raises(ValueError, match=r"is your home folder"):
        TRPOConfig(output_dir="~")
    with pytest.raises(ValueError, match=r"is the root"):
        TRPOConfig(output_dir="/")
    assert TRPOConfig(output_dir="runs/x").output_dir == "runs/x"


def test_overwrite_deletes_only_what_the_previous_run_wrote(tmp_path, word_tokenizer):
    run = tmp_path / "run"
    make("trpo", word_tokenizer, run, max_steps=2, save_steps=1).train()
    written = set(RunDirectory(run).read_marker()["entries"])
    assert {
        "metrics.jsonl",
        "checkpoint-1",
        "checkpoint-2",
        "adapter_model.safetensors",
        "value",
        "README.md",
    } <= written
    notes = run / "notes.txt"  # the user's, added to the run's folder later
    notes.write_text("keep me")
    make("trpo", word_tokenizer, run, max_steps=1, overwrite_output_dir=True).train()
    assert notes.read_text() == "keep me"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]
    assert [row["step"] for row in read_rows(run / "metrics.jsonl")] == [1]


def test_an_overwrite_that_fails_at_step_two_leaves_nothing_of_the_old_run(tmp_path, word_tokenizer):
    run = tmp_path / "run"
    make("trpo", word_tokenizer, run, max_steps=3).train()
    assert (run / "adapter_model.safetensors").exists()
    score, calls = WordScoreReward(), []

    def fails_on_the_second_batch(prompts, completions):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("reward server down")
        return score(prompts, completions)

    failing = make(
        "trpo", word_tokenizer, run, max_steps=3, overwrite_output_dir=True, reward_fn=fails_on_the_second_batch
    )
    with pytest.raises(RewardError, match="reward server down"):
        failing.train()
    # The old run's final adapter, value head and checkpoints are gone; the new run's step 1 is saved.
    assert not (run / "adapter_model.safetensors").exists() and not (run / "value").exists()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]
    assert [row["step"] for row in read_rows(run / "metrics.jsonl")] == [1]


# ------------------------------------------------------------------ one writer
def test_a_second_writer_in_the_same_process_is_refused_naming_the_holder(tmp_path, word_tokenizer):
    run = tmp_path / "run"
    trainer = make("trpo", word_tokenizer, run, max_steps=1)
    with RunDirectory(run).locked():
        with pytest.raises(OutputDirInUse, match=rf"run' is in use by another run \(pid {os.getpid()} on "):
            trainer.train()
    assert not (run / "metrics.jsonl").exists()
    trainer.train()  # the lock went with its holder
    assert len(read_rows(run / "metrics.jsonl")) == 1


@pytest.mark.slow
def test_a_second_run_and_a_resume_fail_at_once_while_a_run_is_live(tmp_path, word_tokenizer):
    """A run in another process holds output_dir: a new run and a resume from this one stop at once,
    naming its pid, and its metrics hold each step once."""
    run = tmp_path / "run"
    worker = [sys.executable, str(TESTS / "resume_worker.py"), str(run), "4", "0.6"]
    live = subprocess.Popen(worker, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint-1").exists():  # the run holds the lock, and has a checkpoint to resume
        assert live.poll() is None and time.monotonic() < deadline, live.communicate()[1][-3000:]
        time.sleep(0.05)
    for resume in (None, True):
        started = time.monotonic()
        with pytest.raises(OutputDirInUse, match=rf"run' is in use by another run \(pid {live.pid} on "):
            make("trpo", word_tokenizer, run, max_steps=4, save_steps=1).train(resume_from_checkpoint=resume)
        assert time.monotonic() - started < 5
    assert live.poll() is None  # still running: the refusals came before its end
    assert live.wait(timeout=300) == 0, live.communicate()[1][-3000:]
    assert [row["step"] for row in read_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == live.pid  # stale now, and harmless
    make("trpo", word_tokenizer, run, max_steps=4, save_steps=1).train(resume_from_checkpoint=True)


# ------------------------------------------------------------------ the final save survives
def run_final_save_worker(output_dir: Path, point: str) -> subprocess.Popen:
    command = [sys.executable, str(TESTS / "final_save_worker.py"), str(output_dir), point]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_kill_during_the_final_save_at_the_default_settings_is_finished_by_a_resume(tmp_path, word_tokenizer):
    """save_steps=0: SIGKILL while the final checkpoint (the run's first) is written, and after none
    and all but one of the final files replaced output_dir's. Each resumes to the uninterrupted
    run's files, tensors and metrics: a publish point from the final checkpoint, the kill during
    the first checkpoint from step 0 (the state was only in memory; issue 42: it used to be refused
    by both a resume and a new run). A new run into that folder names the one way on."""
    points = ["checkpoint", "publish-0", "publish-last"]
    processes = {"straight": run_final_save_worker(tmp_path / "straight", "none")}
    processes |= {point: run_final_save_worker(tmp_path / point, point) for point in points}
    for point, process in processes.items():
        code = process.wait(timeout=300)
        expected = 0 if point == "straight" else -signal.SIGKILL
        assert code == expected, (point, process.communicate()[1][-3000:])
    straight = tmp_path / "straight"
    lost = tmp_path / "checkpoint"
    assert [row["step"] for row in read_rows(lost / "metrics.jsonl")] == [1, 2]
    assert list_checkpoints(lost) == [] and (lost / ".checkpoint-2.tmp").exists()
    with pytest.raises(FileExistsError, match=r"stopped before its first checkpoint was complete .*--resume_from_che"):
        make("trpo", word_tokenizer, lost, max_steps=2).train()
    resumed = {point: run_final_save_worker(tmp_path / point, "resume") for point in points}
    for point, process in resumed.items():
        assert process.wait(timeout=300) == 0, (point, process.communicate()[1][-3000:])
        run = tmp_path / point
        assert json.loads((run / "final_digest.json").read_text()) == json.loads(
            (straight / "final_digest.json").read_text()
        ), point
        assert without_timings(read_rows(run / "metrics.jsonl")) == without_timings(
            read_rows(straight / "metrics.jsonl")
        )
        for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_config.json", "value"):
            assert (run / name).exists(), (point, name)
        assert not (run / ".final.tmp").exists() and not (run / ".checkpoint-2.tmp").exists()
    assert "starts again from step 0" in resumed["checkpoint"].communicate()[1]


def test_an_output_dir_that_stops_being_writable_fails_at_that_step(tmp_path, word_tokenizer):
    run = tmp_path / "run"
    freeze, thaw = folder_freezer(run)
    score, calls = WordScoreReward(), []

    def reward_that_freezes_the_folder_at_step_two(prompts, completions):
        calls.append(1)
        if len(calls) == 2:
            freeze()
        return score(prompts, completions)

    trainer = make("trpo", word_tokenizer, run, max_steps=4, reward_fn=reward_that_freezes_the_folder_at_step_two)
    try:
        with pytest.raises(PermissionError, match=r"run' is not writable"):
            trainer.train()
        assert trainer.global_step == 2 and len(calls) == 2  # noticed at step 2's write, not after step 4
    finally:
        thaw()
    assert [row["step"] for row in read_rows(run / "metrics.jsonl")] == [1]


def folder_freezer(folder: Path):
    """Functions that make `folder` unwritable and writable again: chattr +i as root (whom
    permissions do not stop), chmod otherwise."""
    if os.geteuid() != 0:
        return (lambda: folder.chmod(0o555)), (lambda: folder.chmod(0o755))
    if shutil.which("chattr") is None:
        pytest.skip("root without chattr: no way to make a folder unwritable to this process")
    probe = folder.with_name("probe")
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (no CAP_LINUX_IMMUTABLE or no support in this file system)")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    return (
        lambda: subprocess.run(["chattr", "+i", str(folder)], check=True),
        lambda: subprocess.run(["chattr", "-i", str(folder)], check=True),
    )


# ------------------------------------------------------------------ a checkpoint belongs to its run
def test_resuming_from_another_runs_checkpoint_is_an_error_unless_asked_for(tmp_path, word_tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    make("trpo", word_tokenizer, a, max_steps=4, save_steps=1).train()
    make("trpo", word_tokenizer, b, max_steps=2, save_steps=1, seed=1).train()
    a_rows, a_adapter = read_rows(a / "metrics.jsonl"), (a / "adapter_model.safetensors").read_bytes()
    resumed = make("trpo", word_tokenizer, a, max_steps=4)
    with pytest.raises(
        ValueError,
        match=rf"b/checkpoint-1 is a checkpoint of run {RunDirectory(b).run_id()}, and output_dir .*a holds run {RunDirectory(a).run_id()}.*--ignore_checkpoint_mismatch",
    ):
        resumed.train(resume_from_checkpoint=b / "checkpoint-1")
    assert read_rows(a / "metrics.jsonl") == a_rows and (a / "adapter_model.safetensors").read_bytes() == a_adapter
    into_new = make("trpo", word_tokenizer, tmp_path / "c", max_steps=2, ignore_checkpoint_mismatch=True)
    with pytest.warns(UserWarning, match=r"is a checkpoint of run .* holds no run yet.*Resuming anyway"):
        history = into_new.train(resume_from_checkpoint=b / "checkpoint-1")
    assert [row["step"] for row in history] == [2]


def test_resuming_with_another_base_model_or_tokenizer_is_an_error(tmp_path, word_tokenizer):
    run = tmp_path / "run"
    make("trpo", word_tokenizer, run, max_steps=1, save_steps=1).train()
    other_weights = tiny_trpo(run, word_tokenizer, model=build_tiny_lm(word_tokenizer, seed=7), max_steps=2)
    with pytest.raises(ValueError, match=r"saved with another base model than this trainer's \(weights_probe differ\)"):
        other_weights.train(resume_from_checkpoint=True)
    shuffled = build_word_tokenizer(list(reversed(WORDS)))
    with pytest.raises(
        ValueError, match=r"saved with another tokenizer than this trainer's \(vocabulary_sha256 differ\)"
    ):
        make("trpo", shuffled, run, max_steps=2).train(resume_from_checkpoint=True)
    # The same weights in bfloat16 are the same base model: only the changed setting is named.
    with pytest.warns(UserWarning, match=r"changed settings \['model_dtype'\]"):
        history = make("trpo", word_tokenizer, run, max_steps=2, model_dtype="bfloat16").train(
            resume_from_checkpoint=True
        )
    assert [row["step"] for row in history] == [2]


# ------------------------------------------------------------------ corruption is named and survivable
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "name",
    ["optimizer.pt", "trainer_state.json", "rng_state_0.pth", "adapter_model.safetensors", "value/value_head.pt"],
)
def test_a_truncated_file_is_named_and_the_newest_intact_checkpoint_resumes(name, tmp_path, word_tokenizer):
    straight = make("trpo", word_tokenizer, tmp_path / "straight", max_steps=3)
    straight.train()
    run = tmp_path / "run"
    make("trpo", word_tokenizer, run, max_steps=2, save_steps=1).train()
    broken = run / "checkpoint-2"
    target = broken / name
    if not target.exists():  # the critic's files depend on the critic's kind
        target = next(p for p in sorted((broken / "value").rglob("*")) if p.is_file())
    truncate(target)
    trainer = make("trpo", word_tokenizer, run, max_steps=3)
    with pytest.raises(
        CorruptCheckpointError, match=rf"Checkpoint .*checkpoint-2 is corrupt: {target.relative_to(broken)}"
    ):
        trainer.train(resume_from_checkpoint=broken)
    with pytest.warns(
        UserWarning,
        match=r"Resuming from .*checkpoint-1, the newest intact checkpoint\. Checkpoint .*checkpoint-2 is corrupt",
    ):
        history = trainer.train(resume_from_checkpoint=True)
    assert [row["step"] for row in history] == [2, 3]  # step 2 again, from step 1's state: the same run
    assert_same_tensors(tensors(straight), tensors(trainer))


def test_an_unreadable_file_of_a_checkpoint_without_hashes_is_named(tmp_path, word_tokenizer):
    run = tmp_path / "run"
    make("trpo", word_tokenizer, run, max_steps=1, save_steps=1).train()
    forget_file_record(run / "checkpoint-1")  # as saved before the sizes and hashes were recorded
    truncate(run / "checkpoint-1" / "optimizer.pt", keep=0.3)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint-1 is corrupt: optimizer.pt cannot be read"):
        make("trpo", word_tokenizer, run, max_steps=2).train(resume_from_checkpoint=True)


def test_a_partial_last_metrics_line_is_dropped_with_a_warning(tmp_path, word_tokenizer):
    straight = make("trpo", word_tokenizer, tmp_path / "straight", max_steps=3)
    straight.train()
    run = tmp_path / "run"
    make("trpo", word_tokenizer, run, max_steps=2, save_steps=2).train()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')  # what a kill during an append leaves
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropping its last line, cut short"):
        make("trpo", word_tokenizer, run, max_steps=3).train(resume_from_checkpoint=True)
    assert without_timings(read_rows(run / "metrics.jsonl")) == without_timings(
        read_rows(tmp_path / "straight" / "metrics.jsonl")
    )


def test_a_metrics_line_without_a_step_is_named_on_resume(tmp_path, word_tokenizer):
    trained = tmp_path / "trained"
    make("trpo", word_tokenizer, trained, max_steps=2, save_steps=2).train()
    for number, row in enumerate(["{}", "[3]", '{"step": "3"}']):
        run = tmp_path / f"run{number}"
        shutil.copytree(trained, run)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(row + "\n" + '{"step": 3}\n')
        with pytest.raises(ValueError, match=r"metrics.jsonl: line 3 of 4 \(.*\) is not a step's metrics \(no int"):
            make("trpo", word_tokenizer, run, max_steps=3).train(resume_from_checkpoint=True)


def test_a_saved_config_of_the_other_algorithm_or_not_an_object_is_named(tmp_path):
    from trpo_rlhf import PPOConfig

    PPOConfig(output_dir="runs/x").save(tmp_path / "ppo.json")
    TRPOConfig(output_dir="runs/x").save(tmp_path / "trpo.json")
    with pytest.raises(
        ValueError, match=r"ppo.json sets \['clip_range', 'learning_rate', .*a PPOConfig's: load it with PPOC"
    ):
        TRPOConfig.load(tmp_path / "ppo.json")
    with pytest.raises(ValueError, match=r"trpo.json sets \['accept_ratio', .*the file is a TRPOConfig's"):
        PPOConfig.load(tmp_path / "trpo.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list.json holds a JSON list, not a saved config"):
        TRPOConfig.load(tmp_path / "list.json")
    (tmp_path / "other.json").write_text('{"max_kl": 0.01, "no_such_setting": 1}')
    with pytest.raises(ValueError, match=r"sets \['no_such_setting'\].*not one of this release's configs"):
        TRPOConfig.load(tmp_path / "other.json")
    assert TRPOConfig.load(tmp_path / "trpo.json") == TRPOConfig(output_dir="runs/x")


def test_a_reward_model_path_that_does_not_exist_is_named_as_such():
    from trpo_rlhf.rewards import build_reward_fn

    with pytest.raises(FileNotFoundError, match=r"The reward model path '/nonexistent/model' does not exist \(no such"):
        build_reward_fn("/nonexistent/model")


# ------------------------------------------------------------------ inputs that train nothing
def test_a_mapping_of_columns_is_a_dataset(tmp_path, word_tokenizer):
    prompts = ["good movie", "bad film", "the plot"]
    assert tiny_trpo(tmp_path / "run", word_tokenizer, train_dataset={"prompt": prompts}).prompts == prompts
    with pytest.raises(ValueError, match=r"no 'prompt' column \(it has \['text'\]\)"):
        tiny_trpo(tmp_path / "run", word_tokenizer, train_dataset={"text": prompts})


def test_prompts_of_unknown_tokens_only_are_refused(tmp_path, word_tokenizer):
    with pytest.raises(ValueError, match=r"Prompt 1 \('Zorp blix'\) tokenizes to unknown tokens only \('\[UNK\]'"):
        tiny_trpo(tmp_path / "run", word_tokenizer, train_dataset=["good movie", "Zorp blix"])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_kl": 10.0}, r"max_kl=10.0 must be in \(0, 1.0\]"),
        ({"temperature": 1e-4}, r"temperature=0.0001 must be >= 0.01"),
        ({"seed": -1}, r"seed=-1 must be in \[0, 2\*\*32\)"),
        ({"seed": 2**32}, r"seed=4294967296 must be in \[0, 2\*\*32\)"),
        ({"reward_timeout": 0.0}, r"reward_timeout=0.0 must be > 0 seconds"),
    ],
)
def test_settings_that_cannot_train_are_refused_before_a_folder_exists(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        TRPOConfig(output_dir=str(tmp_path / "run"), **settings)
    assert not (tmp_path / "run").exists()


def test_a_critic_that_never_trains_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match=r"value_epochs=0: the critic never trains"):
        TRPOConfig(output_dir=str(tmp_path / "run"), value_epochs=0)


def test_a_hung_reward_stops_the_run_at_its_timeout_naming_the_batch(tmp_path, word_tokenizer):
    score, calls = WordScoreReward(), []

    def hangs_on_the_second_batch(prompts, completions):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(30)
        return score(prompts, completions)

    trainer = make("trpo", word_tokenizer, tmp_path / "run", reward_fn=hangs_on_the_second_batch, reward_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"no scores for batch 1 within reward_timeout=1 s"):
        trainer.train()
    assert time.monotonic() - started < 20
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]


def test_a_finite_reward_beyond_float32_is_named_as_such(tmp_path, word_tokenizer):
    trainer = make("trpo", word_tokenizer, tmp_path / "run", reward_fn=lambda p, c: [1e39] + [0.0] * (len(c) - 1))
    with pytest.raises(RewardError, match=r"returned 1e\+39 for completion 0 on batch 0: finite, but beyond float32's"):
        trainer.train()


def test_the_marker_records_everything_a_run_writes(tmp_path, word_tokenizer):
    run = tmp_path / "run"
    make("trpo", word_tokenizer, run, max_steps=1, report_to=["tensorboard"]).train()
    marker = RunDirectory(run).read_marker()
    top_level = {p.name for p in run.iterdir()} - {MARKER_FILE, LOCK_FILE}
    assert "run" in top_level  # TensorBoard's folder, output_dir/<run name>
    assert top_level <= set(marker["entries"]) and marker["global_step"] == 1


# ------------------------------------------------------------------ a crafted run folder
def crafted_run(tmp_path: Path, word_tokenizer, entry) -> tuple[Path, dict[Path, str]]:
    """A finished run whose marker someone edited to list `entry` (issue 42: a run folder sent to a
    user), beside a victim folder and file of the user's."""
    run = tmp_path / "run"
    tiny_trpo(run, word_tokenizer, max_steps=1).train()
    victims = {tmp_path / "victim" / "thesis.tex": "years of work\n", tmp_path / "notes.txt": "mine\n"}
    for path, text in victims.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    marker = json.loads((run / MARKER_FILE).read_text())
    marker["entries"].append(entry if entry != "ABSOLUTE" else str(tmp_path / "notes.txt"))
    (run / MARKER_FILE).write_text(json.dumps(marker))
    return run, victims


@pytest.mark.parametrize("entry", ["../victim", "ABSOLUTE"])
def test_a_crafted_marker_entry_refuses_the_overwrite_and_deletes_nothing(entry, tmp_path, word_tokenizer):
    run, victims = crafted_run(tmp_path, word_tokenizer, entry)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match=r"lists the entry .*which is not a plain name inside .*Nothing was deleted"):
        tiny_trpo(run, word_tokenizer, max_steps=1, overwrite_output_dir=True).train()
    assert_untouched(victims)
    assert sorted(p.name for p in run.iterdir()) == before  # the run's own files too: it refused before deleting
    with pytest.raises(ValueError, match="not a plain name"):  # and a resume reads the same marker
        tiny_trpo(run, word_tokenizer, max_steps=2).train(resume_from_checkpoint=True)


@pytest.mark.parametrize("entry", ["sub/../../victim", "..", ".", "", 7, "a\\..\\b", None, "/etc"])
def test_every_kind_of_crafted_entry_is_refused_when_the_marker_is_read(entry, tmp_path):
    folder = RunDirectory(tmp_path / "run")
    with folder.locked():
        folder.claim(overwrite=False)
        folder.record("metrics.jsonl")
    marker = json.loads(folder.marker_path.read_text())
    marker["entries"].append(entry)
    folder.marker_path.write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=r"lists the entry .*which is not a plain name inside"):
        folder.remove_owned()
    with pytest.raises(ValueError, match=r"lists the entry"):
        folder.claim(overwrite=True)


def test_a_recorded_entry_that_is_a_link_out_of_the_folder_is_neither_deleted_through_nor_written(
    tmp_path, word_tokenizer
):
    run, victims = crafted_run(tmp_path, word_tokenizer, "data")
    (run / "data").symlink_to(tmp_path / "victim", target_is_directory=True)
    with pytest.raises(ValueError, match=r"run/data is a symbolic link \(to .*victim\), and a run writes none"):
        tiny_trpo(run, word_tokenizer, max_steps=1, overwrite_output_dir=True).train()
    # A link put where the run will write its metrics (not recorded): the run writes nothing through it.
    (run / "data").unlink()
    marker = json.loads((run / MARKER_FILE).read_text())
    marker["entries"] = [e for e in marker["entries"] if e not in ("data", "metrics.jsonl")]
    (run / MARKER_FILE).write_text(json.dumps(marker))
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"metrics.jsonl is a symbolic link"):
        tiny_trpo(run, word_tokenizer, max_steps=1, overwrite_output_dir=True).train()
    assert_untouched(victims)


@pytest.mark.parametrize("bookkeeping", [LOCK_FILE, f"{MARKER_FILE}.tmp"])
def test_the_lock_and_the_staged_marker_are_never_written_through_a_link(bookkeeping, tmp_path, word_tokenizer):
    run = tmp_path / "run"
    tiny_trpo(run, word_tokenizer, max_steps=1).train()
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=...\n")
    (run / bookkeeping).unlink(missing_ok=True)
    (run / bookkeeping).symlink_to(victim)
    trainer = tiny_trpo(run, word_tokenizer, max_steps=1, overwrite_output_dir=True)
    if bookkeeping == LOCK_FILE:
        with pytest.raises(FileExistsError, match=r"\.trpo_rlhf\.lock is a symbolic link"):
            trainer.train()
    else:  # the link is replaced by the run's own file
        trainer.train()
        assert not (run / bookkeeping).is_symlink()
    assert victim.read_text() == "export PATH=...\n"


def test_a_marker_that_is_not_a_json_object_is_named(tmp_path):
    folder = RunDirectory(tmp_path / "run")
    folder.path.mkdir()
    folder.marker_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"is not a trpo_rlhf run marker \(it holds a JSON list, not an object\)"):
        folder.read_marker()


# ------------------------------------------------------------------ a full disk (issue 42)
def in_small_tmpfs(mount: Path, *command: str) -> subprocess.CompletedProcess:
    """`command`, with a tmpfs of 4 MB mounted on `mount` in a mount namespace of its own (unshare:
    no root needed where user namespaces are on; as root without them, a plain mount)."""
    mount.mkdir()
    script = 'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"'
    for launcher in (["unshare", "-Urm"], ["unshare", "-m"]):
        if shutil.which(launcher[0]) is None:
            break
        if subprocess.run([*launcher, "true"], capture_output=True).returncode == 0:
            return subprocess.run(
                [*launcher, "sh", "-c", script, str(mount), *command],
                env=ENV,
                capture_output=True,
                text=True,
                timeout=300,
            )
    pytest.skip("no mount namespace can be made here (unshare is missing or refused): a full disk cannot be made")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint", "final"])
def test_a_full_disk_names_the_file_the_checkpoint_and_the_cause_and_leaves_no_staging_folder(point, tmp_path):
    mount = tmp_path / "tmpfs"
    done = in_small_tmpfs(mount, sys.executable, str(TESTS / "disk_full_worker.py"), str(mount), point)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if point == "checkpoint":
        assert report["error"].startswith("Saving checkpoint-1 failed writing ")
        assert "/run/.checkpoint-1.tmp/" in report["error"]  # the file being written
        assert "Nothing of it was kept; no step is saved yet." in report["error"]
        assert report["entries"] == [".trpo_rlhf.lock", MARKER_FILE, "metrics.jsonl"]  # no staging folder
    else:
        assert report["error"].startswith(f"Saving the model files into {tmp_path / 'tmpfs' / 'run'} failed writing ")
        assert "The final state is in checkpoint-2: make room, then finish the run" in report["error"]
        assert report["entries"] == [".trpo_rlhf.lock", MARKER_FILE, "checkpoint-2", "metrics.jsonl"]
        assert {"adapter_model.safetensors", "value", "trainer_config.json"} <= set(report["after_resume"])
        assert ".final.tmp" not in report["after_resume"]
    assert re.search(r": no space left on device: \d+ (bytes|kB) free in .*tmpfs", report["error"])
