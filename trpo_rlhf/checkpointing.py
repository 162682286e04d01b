"""Checkpoint files, random states and interruptions: the pieces that let a run stop anywhere and
resume exactly.

A checkpoint folder is complete or absent: it is written into a hidden staging folder beside its
target, every file is flushed to disk, and only then is the folder renamed into place
(`atomic_directory`). `StopRequest` turns SIGTERM and SIGINT into a request the training loop
honours at the next step boundary.

    >>> from pathlib import Path
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "checkpoint-2") as staging:
    ...     _ = (staging / "state.json").write_text("{}")
    >>> latest_checkpoint(root).name
    'checkpoint-2'
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_SUFFIX = ".tmp"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


# --------------------------------------------------------------------------------------------
# Folders on disk
# --------------------------------------------------------------------------------------------
def staging_path(target: Path) -> Path:
    """The hidden folder a checkpoint is written into before it is renamed to `target`."""
    return target.with_name(f".{target.name}{STAGING_SUFFIX}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (and `root` itself) to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def prepare_staging(target: Path) -> Path:
    """An empty staging folder for `target` (a leftover of a killed save is removed first)."""
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_staging(target: Path) -> None:
    """Flush the staging folder of `target` and rename it to `target`, replacing an older
    `target`. The rename is atomic, so a reader sees the old folder, the new one, or none."""
    staging = staging_path(target)
    fsync_tree(staging)
    if target.exists():
        # A re-save of the same step: move the old copy aside first (rename cannot replace a
        # non-empty folder), then drop it.
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)
    _fsync(target.parent)


@contextlib.contextmanager
def atomic_directory(target: Path, prepared: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes `target`, on any error it is removed.
    `prepared`: `prepare_staging(target)` already ran (other processes may have written into it)."""
    target = Path(target)
    staging = staging_path(target) if prepared else prepare_staging(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_staging(target)


def publish_entries(staging: Path, target: Path, last: str) -> None:
    """Flush `staging` and move each of its entries into the existing folder `target` (each move
    atomic; the entry named `last` moves last, so its presence marks a complete set), then remove
    `staging`. For a target that also holds other files, such as the final save into output_dir."""
    fsync_tree(staging)
    entries = sorted(staging.iterdir(), key=lambda p: p.name == last)
    for entry in entries:
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    staging.rmdir()
    _fsync(target)


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders of `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (None keeps all); returns the deleted ones."""
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    stale = checkpoints[: max(0, len(checkpoints) - keep)]
    for path in stale:
        shutil.rmtree(path)
    return stale


def remove_stale_staging(output_dir: Path) -> None:
    """Remove staging folders that a killed process left behind."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for path in output_dir.glob(f".{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Random states
# --------------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Python's, NumPy's, torch's CPU and every CUDA device's random state."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype("uint32"),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state):
    # A state read back from disk may hold lists where random.setstate wants tuples.
    version, internal, gauss = state
    return version, tuple(internal), gauss


# --------------------------------------------------------------------------------------------
# Interruptions
# --------------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) ask the run to stop after the step in
    progress; a second signal interrupts at once (`KeyboardInterrupt`).

        >>> stop = StopRequest()
        >>> with stop.installed():
        ...     pass
        >>> stop.signum is None
        True
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise KeyboardInterrupt(f"{name} received twice: stopping at once")
        self.signum = signum
        print(
            f"\n{name} received: the run stops after the step in progress and saves a checkpoint "
            f"(send it again to stop at once).",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Install the handlers for the duration (only the main thread may install them; elsewhere
        the signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGTERM/SIGINT after saving `checkpoint`, from which
    `train(resume_from_checkpoint=...)` continues exactly."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(
            f"{signal.Signals(signum).name}: stopped after step {checkpoint_step(checkpoint)}, saved in {checkpoint}"
        )
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal."""
        return 128 + self.signum
