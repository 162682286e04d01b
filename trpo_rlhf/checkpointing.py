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
import errno
import hashlib
import json
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
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CorruptCheckpointError(ValueError):
    """A file of a checkpoint is missing, truncated or altered since it was saved."""

    def __init__(self, checkpoint: Path, file: str, why: str):
        super().__init__(
            f"Checkpoint {checkpoint} is corrupt: {file} {why}. Resume from another checkpoint "
            "(resume_from_checkpoint=True takes the newest intact one)."
        )
        self.checkpoint, self.file = checkpoint, file


class WriteError(OSError):
    """A save could not write one of its files; the message names the file, what was being saved
    and the cause in words (`naming_write_failures`)."""


# Below this much free space a failed write is taken for a full disk: torch.save reports one as
# "unexpected pos", with no errno (its partial file still holds the space it took).
NEARLY_FULL_BYTES = 1 << 20


def format_bytes(count: int) -> str:
    """`count` bytes in words.

    >>> format_bytes(20_480), format_bytes(3 * 1024**3)
    ('20 kB', '3.0 GB')
    """
    for unit, size in (("GB", 1024**3), ("MB", 1024**2)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count // 1024} kB" if count >= 1024 else f"{count} bytes"


def cause_in_words(error: BaseException, folder: Path) -> str:
    """Why a write into `folder` failed, in words: "no space left on device: 20 kB free in ...",
    a quota, a size limit, a permission, or else the error's own text."""
    chain, link = [], error
    while link is not None and len(chain) < 8:
        chain.append(link)
        link = link.__cause__ or link.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path(folder.anchor or "."))
    free = shutil.disk_usage(existing).free
    if errno.ENOSPC in codes or "No space left on device" in text or "os error 28" in text or free < NEARLY_FULL_BYTES:
        return f"no space left on device: {format_bytes(free)} free in {existing}"
    if errno.EDQUOT in codes or "quota" in text.lower():
        return f"disk quota exceeded in {existing}"
    if errno.EFBIG in codes:
        return "file too large: beyond this process's file size limit (ulimit -f) or the file system's"
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        return f"not writable ({next(e.strerror for e in chain if getattr(e, 'strerror', None))})"
    return f"{type(error).__name__}: {error}"


def _newest_file(folder: Path) -> Path | None:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


@contextlib.contextmanager
def naming_write_failures(what: str, folder: Path, staging: Path | None = None, then: str = "") -> Iterator[None]:
    """Turn a failed write in the block into a `WriteError` that names the file (the error's, or
    the newest in `staging`), `what` was being saved, the cause (`cause_in_words`) and `then`, what
    to do next; `staging`, the block's staging folder, is removed, so that none outlives it.

        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with naming_write_failures("the notes", folder):
        ...     raise OSError(errno.EFBIG, "File too large", str(folder / "notes.txt"))
        Traceback (most recent call last):
        ...
        trpo_rlhf.checkpointing.WriteError: Saving the notes failed writing .../notes.txt: file too large: ...
    """
    try:
        yield
    except Exception as exc:
        # torch.save fails with a RuntimeError, safetensors with its own error (an Exception)
        written = isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"
        if isinstance(exc, WriteError) or not written:
            raise
        cause = cause_in_words(exc, Path(folder))  # before the staging folder goes: its partial file filled the disk
        file = getattr(exc, "filename", None) or (staging and _newest_file(staging)) or folder
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise WriteError(f"Saving {what} failed writing {file}: {cause}.{' ' + then if then else ''}") from exc


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


def retired_path(target: Path) -> Path:
    """Where `publish_staging` moves an older `target` while the new one takes its place."""
    return target.with_name(f".{target.name}.old")


def checkpoint_entries(target: Path) -> tuple[str, ...]:
    """The names a checkpoint's save creates in its parent folder: the checkpoint, its staging
    folder and the older copy's place."""
    return target.name, staging_path(target).name, retired_path(target).name


def publish_staging(target: Path) -> None:
    """Flush the staging folder of `target` and rename it to `target`, replacing an older
    `target`. The rename is atomic, so a reader sees the old folder, the new one, or none."""
    staging = staging_path(target)
    fsync_tree(staging)
    if target.exists():
        # A re-save of the same step: move the old copy aside first (rename cannot replace a
        # non-empty folder), then drop it.
        retired = retired_path(target)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(folder: Path, exclude: tuple[str, ...] = (TRAINER_STATE_FILE,)) -> dict[str, dict]:
    """Size and SHA-256 of every file under `folder` (paths relative to it), for `verify_checkpoint`.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.txt").write_text("abc")
    >>> file_manifest(folder)["a.txt"]["size"]
    3
    """
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in exclude:
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def read_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer_state.json; `CorruptCheckpointError` when it is missing or unreadable."""
    path = Path(checkpoint) / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(checkpoint, TRAINER_STATE_FILE, "is missing") from None
    except (ValueError, OSError) as exc:
        raise CorruptCheckpointError(checkpoint, TRAINER_STATE_FILE, f"cannot be read ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CorruptCheckpointError(checkpoint, TRAINER_STATE_FILE, "holds no global_step")
    return state


def verify_checkpoint(checkpoint: Path) -> dict:
    """Check every file against the sizes and hashes its trainer_state.json recorded at save, and
    return that state; `CorruptCheckpointError` names the first file that differs. A checkpoint
    saved before the record existed is checked for its trainer state alone."""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    for name, expected in state.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            raise CorruptCheckpointError(checkpoint, name, "is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CorruptCheckpointError(checkpoint, name, f"is {size} bytes, {expected['size']} were saved")
        if _sha256(path) != expected["sha256"]:
            raise CorruptCheckpointError(checkpoint, name, "differs from the saved file (its SHA-256 changed)")
    return state


def load_checkpoint_file(checkpoint: Path, name: str):
    """`torch.load` of one of a checkpoint's files (tensors and plain containers only), an
    unreadable one reported as a `CorruptCheckpointError` naming it."""
    try:
        return torch.load(Path(checkpoint) / name, weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpointError(checkpoint, name, "is missing") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CorruptCheckpointError(checkpoint, name, f"cannot be read ({type(exc).__name__}: {exc})") from None


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders of `output_dir`, oldest step first (a symbolic
    link is none: a run writes no links, and rotation would delete through one)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and not p.is_symlink() and checkpoint_step(p) is not None]
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
