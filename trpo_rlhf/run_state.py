"""A run's state on disk: `CheckpointedRun`, the part of `engine.RLTrainer` that trains to
`max_steps` with interruptions handled, owns and locks `output_dir`, writes atomic checkpoints,
resumes from them bitwise, and saves the final model files (docs/checkpoints.md).

    >>> trainer.train(resume_from_checkpoint=True)     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpointing import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_FILE,
    CorruptCheckpointError,
    StopRequest,
    TrainingInterrupted,
    atomic_directory,
    capture_rng_state,
    checkpoint_entries,
    file_manifest,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_file,
    naming_write_failures,
    prepare_staging,
    publish_entries,
    read_trainer_state,
    remove_stale_staging,
    restore_rng_state,
    rotate_checkpoints,
    staging_path,
    verify_checkpoint,
)
from .config import without_removed_settings
from .loading import (
    fingerprint_differences,
)
from .metrics import UpdateCosine, append_jsonl

METRICS_FILE = "metrics.jsonl"
OPTIMIZER_FILE = "optimizer.pt"
FINAL_STAGING = ".final.tmp"
# Settings a resumed run may change without changing what its steps compute.
RESUME_MAY_CHANGE = {
    "output_dir",
    "max_steps",
    "save_steps",
    "save_total_limit",
    "overwrite_output_dir",
    "max_nonfinite_steps",
    "held_out_kl_prompts",  # sampled on a random stream of its own: a measurement, not part of the run
    "gradient_checkpointing",  # recomputes the same activations: memory, not part of the run
    "reward_timeout",
    "ignore_checkpoint_mismatch",
}


@dataclasses.dataclass
class TrainingState:
    """Everything the next step depends on, at a step boundary. `tensors` (the trainable tensors)
    is None for a state read from a checkpoint, whose adapters are loaded from their own files."""

    global_step: int
    kl_coef: float
    nonfinite_streak: int
    prompt_order: list[int]
    prompt_generator: torch.Tensor
    minibatch_generator: torch.Tensor
    rng: dict
    optimizers: dict[str, dict]
    tensors: dict[str, torch.Tensor] | None = None


class CheckpointedRun:
    """Training to `max_steps`, checkpoints and resume for `engine.RLTrainer`, whose state (config,
    accelerator, actor-critic, optimizers, generators, step counters) these methods read and write."""

    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Run up to `config.max_steps` iterations with a progress bar, then save to `output_dir`.

        `resume_from_checkpoint`: None starts a new run (an `output_dir` holding a previous run is an
        error unless `overwrite_output_dir`, which deletes only the files that run wrote); True
        resumes from the newest intact `output_dir/checkpoint-<step>`; a path resumes from that
        checkpoint. A resumed run continues exactly as if it had never stopped, appending to
        metrics.jsonl. The run holds `output_dir`'s lock throughout: a second run into it fails at once.

        SIGTERM or SIGINT ends the run after the step in progress, saving `checkpoint-<step>` and
        raising `TrainingInterrupted`. Any other failure (a reward error, a second Ctrl-C) saves
        the last completed step's state, rolled back from a half-finished step, before the
        exception propagates. The final state is saved as a checkpoint before the final files
        replace those in `output_dir`, so a run killed during that save is finished by a resume.

            >>> trainer.train(resume_from_checkpoint=True)     # doctest: +SKIP
        """
        resuming = resume_from_checkpoint is not None and resume_from_checkpoint is not False
        with self._output_dir_locked():
            checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
            self._take_output_dir(checkpoint, resuming)
            if checkpoint is not None:
                self._load_checkpoint(checkpoint)
            return self._train_steps()

    def _train_steps(self) -> list[dict[str, float]]:
        self._completed_state = self.capture_state()
        history = []
        stop = StopRequest()
        bar = tqdm(
            total=self.config.max_steps,
            initial=self.global_step,
            desc=self.progress_name,
            disable=not self.is_main_process,
            dynamic_ncols=True,
        )
        try:
            with stop.installed():
                while self.global_step < self.config.max_steps:
                    stats = self.step()
                    history.append(stats)
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{stats['reward/mean']:.3f}",
                        kl_ref=f"{stats['kl/ref']:.3f}",
                        **self._progress_fields(stats),
                    )
                    saved = None
                    if self.config.save_steps and self.global_step % self.config.save_steps == 0:
                        saved = self.save_checkpoint()
                    # Checked after the periodic save, so a signal that arrives during it stops the run here.
                    if self.any_process(stop.requested):
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, saved or self.save_checkpoint())
                if self._saved_step != self.global_step:
                    # The final save replaces output_dir's files one by one: with the final state in a
                    # checkpoint first, a run killed during it loses nothing and a resume finishes it.
                    self.save_checkpoint()
                self.save_pretrained(self.output_dir)
        except TrainingInterrupted:
            raise
        except BaseException:
            # No barrier here: the other processes may be blocked in a collective of the failed step.
            if self.global_step > 0 and self.is_main_process:
                try:
                    self._emergency_checkpoint()
                except Exception as save_error:  # the original failure is the one to report
                    print(
                        f"The checkpoint after the failure could not be written either: {save_error!r}", file=sys.stderr
                    )
            raise
        finally:
            bar.close()
            self.trackers.finish()
        return history

    def optimizers(self) -> dict[str, torch.optim.Optimizer | UpdateCosine]:
        """The optimizers whose state a checkpoint keeps, by name (and the diagnostics' state)."""
        critic = {"value": self.value_optimizer} if self.value_optimizer is not None else {}
        return {**critic, "policy_update_cosine": self.policy_update_cosine}

    def capture_state(self) -> TrainingState:
        """A copy of everything the next step depends on (see `TrainingState`)."""
        return TrainingState(
            global_step=self.global_step,
            kl_coef=self.kl_ctl.value,
            nonfinite_streak=self.nonfinite_streak,
            prompt_order=list(self._prompt_order),
            prompt_generator=self.prompt_generator.get_state(),
            minibatch_generator=self.minibatch_generator.get_state(),
            rng=capture_rng_state(),
            optimizers={name: copy.deepcopy(opt.state_dict()) for name, opt in self.optimizers().items()},
            tensors={name: t.detach().clone() for name, t in self.actor_critic.trainable_tensors().items()},
        )

    def restore_state(self, state: TrainingState, rng: bool = True) -> None:
        """Put the trainer back into `state`, bitwise; `rng=False` restores only the parameters
        and optimizers (a rejected step moves on to the next batch)."""
        if state.tensors is not None:
            with torch.no_grad():
                for name, tensor in self.actor_critic.trainable_tensors().items():
                    tensor.copy_(state.tensors[name])
        for name, optimizer in self.optimizers().items():
            # State whose empty value means "nothing yet" (a `reset` method: the cosine's last change)
            # starts empty when a checkpoint lacks it, saved before the cosine was logged; any other
            # missing state is an error.
            if name not in state.optimizers:
                if not hasattr(optimizer, "reset"):
                    raise ValueError(
                        f"The checkpoint holds no {name!r} state, which these settings need: it was saved with other "
                        f"settings. Resume with those of its trainer_config.json (it holds: {sorted(state.optimizers)})."
                    )
                optimizer.reset()
                continue
            # A deep copy: load_state_dict keeps the given tensors, and Adam updates them in place.
            optimizer.load_state_dict(copy.deepcopy(state.optimizers[name]))
        if not rng:
            return
        self.global_step = state.global_step
        self.kl_ctl.value = state.kl_coef
        self.nonfinite_streak = state.nonfinite_streak
        self._prompt_order = list(state.prompt_order)
        self.prompt_generator.set_state(state.prompt_generator)
        self.minibatch_generator.set_state(state.minibatch_generator)
        restore_rng_state(state.rng)

    @contextlib.contextmanager
    def _output_dir_locked(self) -> Iterator[None]:
        """Hold output_dir's lock (the main process takes it) for the duration."""
        with contextlib.ExitStack() as stack:
            self._on_main_process(lambda: stack.enter_context(self.run_directory.locked()))
            yield

    def _on_main_process(self, action) -> None:
        """Run `action` on the main process; when it fails there, every process raises, so none
        waits in a collective for the others."""
        error = None
        if self.is_main_process:
            try:
                action()
            except (OSError, RuntimeError, ValueError) as exc:  # in use, foreign, used, not writable
                error = exc
        if self.any_process(error is not None):
            raise error or RuntimeError(f"output_dir {self.output_dir}: the main process failed on it (see its error).")

    def resolve_checkpoint(self, resume_from_checkpoint: bool | str | os.PathLike | None) -> Path | None:
        """The checkpoint to resume from (None for a new run), after checking, before any compute and
        without writing anything: output_dir holds nothing foreign; a new run does not mix with a
        previous one; the checkpoint is intact (True: the newest intact one, corrupt ones skipped with
        a warning) and of this output_dir's run."""
        self.run_directory.check_ours()
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            if not self.config.overwrite_output_dir and self._stopped_before_its_first_checkpoint():
                raise FileExistsError(
                    f"output_dir {self.output_dir} holds a run that stopped before its first checkpoint was complete "
                    f"(its files: {', '.join(self.run_directory.previous_entries())}): continue it with "
                    "--resume_from_checkpoint (train(resume_from_checkpoint=True)), which starts it again from step 0 "
                    "in the same folder, or start over with --overwrite_output_dir."
                )
            self.run_directory.check_claimable(self.config.overwrite_output_dir)
            return None
        if resume_from_checkpoint is True:
            if self._stopped_before_its_first_checkpoint():
                warnings.warn(
                    f"{self.output_dir} holds a run that stopped before its first checkpoint was complete: it starts "
                    "again from step 0 (the same seed gives the same steps), its metrics.jsonl emptied.",
                    stacklevel=3,
                )
                return None
            path = self._newest_intact_checkpoint()
        else:
            path = Path(resume_from_checkpoint)
            missing = [
                name
                for name in (TRAINER_STATE_FILE, OPTIMIZER_FILE, "adapter_model.safetensors")
                if not (path / name).exists()
            ]
            if missing:
                raise FileNotFoundError(
                    f"{path} is not a resumable checkpoint (missing {', '.join(missing)}): pass a checkpoint-<step> folder "
                    "written by train(), or True for the latest one in output_dir."
                )
            verify_checkpoint(path)
        saved = read_trainer_state(path)
        self._check_checkpoint_trainer(path, saved)
        saved_run, this_run = saved.get("run_id"), self.run_directory.run_id()
        if saved_run is not None and saved_run != this_run:
            holds = "holds no run yet" if this_run is None else f"holds run {this_run}"
            self._checkpoint_mismatch(
                f"{path} is a checkpoint of run {saved_run}, and output_dir {self.output_dir} {holds}: resuming would "
                "continue another run's steps among this folder's files."
            )
        return path

    def _stopped_before_its_first_checkpoint(self) -> bool:
        """Whether output_dir holds a run of this toolkit that wrote files but no complete
        checkpoint (killed during its first save): a finished run always has one, since its final
        state is a checkpoint before its final files are written."""
        return bool(self.run_directory.previous_entries()) and not list_checkpoints(self.output_dir)

    def _newest_intact_checkpoint(self) -> Path:
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True, but {self.output_dir} holds no checkpoint-<step> folder. Start a new run "
                "without it, or pass the path of a checkpoint (runs save them every --save_steps steps and when interrupted)."
            )
        corrupt = []
        for path in reversed(checkpoints):
            try:
                verify_checkpoint(path)
            except CorruptCheckpointError as exc:
                corrupt.append(str(exc))
                continue
            if corrupt:
                warnings.warn(f"Resuming from {path}, the newest intact checkpoint. {' '.join(corrupt)}", stacklevel=3)
            return path
        raise CorruptCheckpointError(checkpoints[-1], "every checkpoint", "is corrupt: " + " ".join(corrupt))

    def _checkpoint_mismatch(self, message: str) -> None:
        if self.config.ignore_checkpoint_mismatch:
            warnings.warn(f"{message} Resuming anyway (ignore_checkpoint_mismatch=True).", stacklevel=3)
            return
        raise ValueError(
            f"{message} Resume from a checkpoint of this run, or pass --ignore_checkpoint_mismatch "
            "(ignore_checkpoint_mismatch=True) to resume it deliberately."
        )

    def _take_output_dir(self, checkpoint: Path | None, resuming: bool) -> None:
        """A new run claims output_dir (a previous run's recorded files deleted with
        overwrite_output_dir, and only those); a resume continues the folder's run, from step 0
        where it has no checkpoint."""

        def take() -> None:
            if not resuming:
                self.run_id = self.run_directory.claim(self.config.overwrite_output_dir)
                return
            self.run_id = self.run_directory.adopt()
            remove_stale_staging(self.output_dir)
            if checkpoint is None:
                self._truncate_metrics(0)

        self._on_main_process(take)
        self._output_dir_taken = True
        self.wait_for_everyone()

    def _record(self, *names: str, **progress) -> None:
        """Note in output_dir's marker the entries about to be written (main process)."""
        if self.run_id is not None:
            self.run_directory.record(*names, **progress)

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-<step>` atomically (all processes call it): the model files
        of `save_pretrained` plus the optimizers, random states, prompt order, KL coefficient and
        step counter, so that `train(resume_from_checkpoint=path)` continues exactly."""
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{self.global_step}"
        state = self.capture_state()
        self.wait_for_everyone()
        with self._naming_write_failures(path):
            if self.is_main_process:
                self._record(*checkpoint_entries(path))
                prepare_staging(path)
            self.wait_for_everyone()
            self._write_rng_state(staging_path(path), state)
            self.wait_for_everyone()
            if self.is_main_process:
                self._write_checkpoint(path, state)
                rotate_checkpoints(self.output_dir, self.config.save_total_limit)
        self.wait_for_everyone()
        self._saved_step = self.global_step
        return path

    def _emergency_checkpoint(self) -> None:
        """After a failure: roll back to the last completed step and save it, unless saved already.
        Only this process's random state is written (the others may be stuck in a collective)."""
        state = self._completed_state
        if state is None or state.global_step == 0:
            return
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if not path.exists():
            self.restore_state(state)
            with self._naming_write_failures(path):
                self._record(*checkpoint_entries(path))
                prepare_staging(path)
                self._write_rng_state(staging_path(path), state)
                self._write_checkpoint(path, state)
        print(
            f"Training stopped after step {state.global_step}; its state is saved in {path} "
            f"(resume with --resume_from_checkpoint {path}).",
            file=sys.stderr,
        )

    def _naming_write_failures(self, checkpoint: Path):
        """A failed write of `checkpoint` as a `WriteError` naming the file and the cause, its
        staging folder removed."""
        kept = latest_checkpoint(self.output_dir)
        return naming_write_failures(
            checkpoint.name,
            self.output_dir,
            staging_path(checkpoint),
            then=f"Nothing of it was kept; {'the newest complete checkpoint is ' + kept.name if kept else 'no step is saved yet'}. "
            f"Make room (or pick another --output_dir), then continue with --resume_from_checkpoint.",
        )

    def _write_rng_state(self, folder: Path, state: TrainingState) -> None:
        torch.save(
            {
                "rng": state.rng,
                "prompt_generator": state.prompt_generator,
                "minibatch_generator": state.minibatch_generator,
            },
            folder / f"rng_state_{self.accelerator.process_index}.pth",
        )

    def _write_checkpoint(self, path: Path, state: TrainingState) -> None:
        """Everything but the random states (written by each process into the prepared staging
        folder first), then publish: the checkpoint is complete or absent. trainer_state.json records
        the run, the base model's and tokenizer's fingerprints and every other file's size and hash."""
        trainer_state = {
            "trainer": type(self).__name__,
            "global_step": state.global_step,
            "kl_coef": state.kl_coef,
            "nonfinite_streak": state.nonfinite_streak,
            "prompt_order": state.prompt_order,
            "num_processes": self.accelerator.num_processes,
            "run_id": self.run_id,
            **self.fingerprints,
        }
        # Named inside the staging folder's lifetime: the newest file in it is the one that failed.
        with atomic_directory(path, prepared=True) as staging, self._naming_write_failures(path):
            self._write_model_files(staging)
            torch.save(state.optimizers, staging / OPTIMIZER_FILE)
            trainer_state["files"] = file_manifest(staging)
            (staging / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state) + "\n")

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore the state saved by `save_checkpoint` (called by `train(resume_from_checkpoint=...)`),
        after checking every file against the sizes and hashes recorded at save."""
        verify_checkpoint(Path(path))
        self._load_checkpoint(Path(path))

    def _check_checkpoint_trainer(self, path: Path, saved: dict) -> None:
        if saved.get("trainer") != type(self).__name__:
            raise ValueError(
                f"{path} was written by {saved.get('trainer')}; resume it with that trainer, not {type(self).__name__}."
            )

    def _load_checkpoint(self, path: Path) -> None:
        saved = read_trainer_state(path)
        self._check_checkpoint_trainer(path, saved)
        for key, what in (("base_model", "base model"), ("tokenizer", "tokenizer")):
            differ = fingerprint_differences(saved[key], self.fingerprints[key]) if key in saved else []
            if differ:
                self._checkpoint_mismatch(
                    f"{path} was saved with another {what} than this trainer's ({', '.join(differ)} differ): its "
                    "adapters and KL reference would not mean what they meant."
                )
        self._warn_on_config_change(path)
        rank = self.accelerator.process_index
        rng_file = path / f"rng_state_{rank}.pth"
        if rng_file.exists():
            random_state = load_checkpoint_file(path, rng_file.name)
        else:
            random_state = {
                "rng": capture_rng_state(),
                "prompt_generator": self.prompt_generator.get_state(),
                "minibatch_generator": self.minibatch_generator.get_state(),
            }
        if not rng_file.exists() or saved["num_processes"] != self.accelerator.num_processes:
            why = (
                "holds no random state for"
                if not rng_file.exists()
                else "was saved by a different number of processes than"
            )
            warnings.warn(
                f"{path} ({saved['num_processes']} process(es)) {why} process {rank} of {self.accelerator.num_processes}: "
                "the resumed run continues, but not bitwise as the original would have.",
                stacklevel=2,
            )
        self.actor_critic.load_policy_adapter(path)
        self.actor_critic.load_value_function(path)
        self.restore_state(
            TrainingState(
                global_step=saved["global_step"],
                kl_coef=saved["kl_coef"],
                nonfinite_streak=saved["nonfinite_streak"],
                prompt_order=saved["prompt_order"],
                prompt_generator=random_state["prompt_generator"],
                minibatch_generator=random_state["minibatch_generator"],
                rng=random_state["rng"],
                optimizers=load_checkpoint_file(path, OPTIMIZER_FILE),
            )
        )
        self._saved_step = self.global_step
        if self.is_main_process:
            self._truncate_metrics(self.global_step)
        self.wait_for_everyone()

    def _warn_on_config_change(self, path: Path) -> None:
        config_file = path / "trainer_config.json"
        if not config_file.exists():
            return
        saved = without_removed_settings(json.loads(config_file.read_text()), str(config_file))
        current = json.loads(json.dumps(self.config.to_dict()))
        # A setting newer than the checkpoint ran at its default there.
        defaults = json.loads(json.dumps(type(self.config)(output_dir=self.config.output_dir).to_dict()))
        changed = [k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k, defaults[k]) != current[k]]
        if changed:
            warnings.warn(
                f"Resuming {path} with changed settings {changed}: the run continues with the new values, so it "
                "differs from the one that was interrupted.",
                stacklevel=2,
            )

    def _truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps <= `step` (a killed run may have logged steps after its last
        checkpoint); the resumed run appends from step + 1. A partial last line, what a kill during
        an append leaves, is dropped with a warning."""
        metrics = self.output_dir / METRICS_FILE
        if not metrics.exists():
            return
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError:
                if number < len(lines):
                    raise ValueError(
                        f"{metrics}: line {number} of {len(lines)} is not JSON ({line[:60]!r}); only a last line can be "
                        "cut short by a kill. Repair or remove that line, then resume."
                    ) from None
                warnings.warn(f"{metrics}: dropping its last line, cut short ({line[:60]!r}).", stacklevel=3)
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(
                    f"{metrics}: line {number} of {len(lines)} ({line[:60]!r}) is not a step's metrics (no integer "
                    "'step'): the file was edited. Repair or remove that line, then resume."
                )
            if row["step"] <= step:
                kept.append(line)
        staged = metrics.with_name(f".{METRICS_FILE}.tmp")
        self._record(staged.name)
        staged.write_text("".join(line + "\n" for line in kept))
        os.replace(staged, metrics)

    def save_pretrained(self, path: str | Path) -> None:
        """The policy adapter (loadable with `PeftModel.from_pretrained(base, path)`), the critic
        (`path/value`, see `load_value_function`), the tokenizer and the config. The files are
        written into a staging folder and flushed before they replace those in `path`."""
        path = Path(path)
        into_output_dir = path.resolve() == self.output_dir.resolve()
        self.wait_for_everyone()
        if self.is_main_process:
            staging = path / FINAL_STAGING
            if into_output_dir:
                self._record(staging.name)
            then = (
                f"The final state is in {CHECKPOINT_PREFIX}{self._saved_step}: make room, then finish the run with "
                "--resume_from_checkpoint."
                if into_output_dir and self._saved_step == self.global_step
                else "Make room, or save to another folder."
            )
            with naming_write_failures(f"the model files into {path}", path, staging, then=then):
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                self._write_model_files(staging)
                if into_output_dir:
                    self._record(*sorted(entry.name for entry in staging.iterdir()))
                publish_entries(staging, path, last="trainer_config.json")
        self.wait_for_everyone()

    def _write_model_files(self, folder: Path) -> None:
        self.actor_critic.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.config.save(folder / "trainer_config.json")

    def load_value_function(self, path: str | Path) -> None:
        """Restore the critic saved by `save_pretrained(path)`."""
        self.actor_critic.load_value_function(path)

    def _log(self, stats: dict[str, float]) -> None:
        if not self.is_main_process:
            return
        # TensorBoard logs into output_dir/<run name>, from the trackers' first log on (right after this).
        trackers = [Path(self.trackers.run_name).parts[0]] if self.trackers.enabled else []
        self._record(
            METRICS_FILE, *trackers, global_step=stats["step"]
        )  # fails here if output_dir is no longer writable
        with naming_write_failures(f"step {stats['step']}'s metrics", self.output_dir):
            append_jsonl(self.output_dir / METRICS_FILE, stats)
