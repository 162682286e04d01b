"""`output_dir` as one run's own folder, so that a run never touches what a user owns.

A run writes into a folder that is empty or already one of ours: the folder's `MARKER_FILE` holds
the run's id and the name of every entry the run wrote (recorded before the entry is written), so
`overwrite_output_dir` deletes exactly those and nothing else. While a run writes, it holds an
exclusive OS lock on `LOCK_FILE` (`flock`), which the kernel releases when the process ends, so a
second writer fails at once and a killed run leaves nothing to clean up.

    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = RunDirectory(Path(tempfile.mkdtemp()) / "run")
    >>> with folder.locked():
    ...     run_id = folder.claim(overwrite=False)
    ...     folder.record("metrics.jsonl")
    >>> folder.read_marker()["entries"]
    ['metrics.jsonl']
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

MARKER_FILE = ".trpo_rlhf_run.json"
LOCK_FILE = ".trpo_rlhf.lock"
# Written here but never listed in the marker: the marker (and its staged copy) and the lock.
_BOOKKEEPING = (MARKER_FILE, LOCK_FILE, f"{MARKER_FILE}.tmp")
# A process's writability probe (`check_writable`), there for an instant: under `accelerate launch`
# one process may list the folder while another's probe is in it.
WRITE_PROBE_PREFIX = ".trpo_rlhf_write_probe."
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the system has no such flag (Windows)


class OutputDirInUse(RuntimeError):
    """Another live process holds the folder's lock."""


def check_output_dir_path(output_dir: str, flag: str = "output_dir") -> Path:
    """`output_dir` as a `Path`, refused where a run's files would land among the user's own: the
    empty string (silently the working directory), the working directory, the home folder or the
    root, and an existing file.

        >>> check_output_dir_path("")
        Traceback (most recent call last):
        ...
        ValueError: output_dir='' is the working directory: pass a folder of the run's own, e.g. output_dir='runs/trpo'.
    """
    if not str(output_dir).strip():
        raise ValueError(
            f"{flag}={str(output_dir)!r} is the working directory: pass a folder of the run's own, e.g. {flag}='runs/trpo'."
        )
    path = Path(output_dir).expanduser()
    resolved = path.resolve()
    for name, shared in (("the working directory", Path.cwd()), ("your home folder", Path.home()), ("the root", None)):
        if (shared is None and resolved == Path(resolved.anchor)) or (
            shared is not None and resolved == shared.resolve()
        ):
            raise ValueError(
                f"{flag}={str(output_dir)!r} is {name} ({resolved}): a run writes metrics, checkpoints and model "
                f"files there. Pass a folder of the run's own, e.g. {flag}='{Path(output_dir) / 'runs' / 'trpo'}'."
            )
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{flag}={str(output_dir)!r} is a file; pass a folder for metrics, checkpoints and the adapter."
        )
    return path


def _write_json_atomically(path: Path, data: dict) -> None:
    staged = path.with_name(f"{path.name}.tmp")
    # A new file, never through a link put in its place: the link goes, what it points to stays.
    staged.unlink(missing_ok=True)
    with os.fdopen(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644), "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)


class RunDirectory:
    """The folder a run writes into: its marker (`claim`, `record`, `remove_owned`) and its lock
    (`locked`). Only the main process of a multi-process run uses one."""

    def __init__(
        self,
        path: str | os.PathLike,
        flag: str = "output_dir",
        continue_hint: str = "Continue it with --resume_from_checkpoint (train(resume_from_checkpoint=True))",
    ):
        self.path = Path(path)
        self.flag, self.continue_hint = flag, continue_hint
        self._marker: dict | None = None

    # ------------------------------------------------------------------ what the folder holds
    @property
    def marker_path(self) -> Path:
        return self.path / MARKER_FILE

    def read_marker(self) -> dict | None:
        """The marker's contents, or None where the folder has none (not one of ours, or new). Its
        entries are checked (`check_entry`): a marker that names anything but the folder's own
        plain entries is refused, so that no overwrite or resume reaches outside the folder."""
        if not self.marker_path.exists():
            return None
        try:
            marker = json.loads(self.marker_path.read_text())
            if not isinstance(marker, dict):
                raise ValueError(f"it holds a JSON {type(marker).__name__}, not an object")
            if not isinstance(marker.get("run_id"), str) or not isinstance(marker.get("entries"), list):
                raise ValueError("no run_id and entries")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{self.marker_path} is not a trpo_rlhf run marker ({exc}). It is written atomically, so it was edited by "
                f"hand: restore it, or pick another --{self.flag}."
            ) from exc
        for name in marker["entries"]:
            self.check_entry(name)
        return marker

    def check_entry(self, name: object) -> None:
        """Raise `ValueError` unless `name` is an entry a run may write, delete or read back: a
        plain name directly inside the folder (no separator, no `..`, not absolute) that is not a
        symbolic link (a run writes none, so one there was put by someone else and may point out)."""
        plain = (
            isinstance(name, str)
            and name not in ("", ".", "..")
            and not any(c in name for c in ("/", "\\", "\0"))
            and not Path(name).is_absolute()
        )
        if not plain:
            raise ValueError(
                f"{self.marker_path} lists the entry {name!r}, which is not a plain name inside {self.path}: a run records "
                "only the files and folders it writes there, so the marker was crafted or edited. Nothing was deleted. "
                f"Remove that entry from the marker, or pick another --{self.flag}."
            )
        path = self.path / name
        if path.is_symlink():
            raise ValueError(
                f"{path} is a symbolic link (to {os.readlink(path)}), and a run writes none: it was put there by someone "
                "else and may point outside the run's folder, so the run neither deletes nor writes through it. "
                f"Remove the link, or pick another --{self.flag}."
            )

    def run_id(self) -> str | None:
        marker = self.read_marker()
        return None if marker is None else marker["run_id"]

    def foreign_entries(self) -> list[str]:
        """The folder's entries when it is not one of ours (no marker), bookkeeping aside; [] for a
        folder with a marker, an empty one or none."""
        if not self.path.is_dir() or self.marker_path.exists():
            return []
        return sorted(
            p.name
            for p in self.path.iterdir()
            if p.name not in _BOOKKEEPING and not p.name.startswith(WRITE_PROBE_PREFIX)
        )

    def check_writable(self) -> None:
        """Create the folder if need be and write and delete a probe file in it; `PermissionError`
        where that fails."""
        probe = self.path / f"{WRITE_PROBE_PREFIX}{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(
                f"{self.flag}={str(self.path)!r} is not writable ({exc.strerror or exc}); pass a folder you can write "
                f"to with --{self.flag}."
            ) from exc

    def check_ours(self) -> None:
        """Raise `FileExistsError` where the folder holds entries that no run of this toolkit wrote."""
        foreign = self.foreign_entries()
        legacy = [name for name in foreign if re.fullmatch(r"checkpoint-\d+", name)]
        if foreign:
            shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise FileExistsError(
                f"{self.flag} {str(self.path)!r} holds files that no trpo_rlhf run wrote ({shown}; it has no "
                f"{MARKER_FILE}). A run writes only into an empty folder or one of its own, and never deletes or "
                f"replaces anything else: pick another --{self.flag} (e.g. {self.path / 'run'}), or move those files out."
                + (
                    " A run saved before run markers existed continues in a new folder from one of its checkpoints: "
                    f"--{self.flag} NEW --resume_from_checkpoint {self.path / legacy[0]}."
                    if legacy
                    else ""
                )
            )

    def previous_entries(self) -> list[str]:
        """The entries a previous run recorded that are still there."""
        marker = self.read_marker()
        if marker is None:
            return []
        return [name for name in marker["entries"] if self._exists(name)]

    # ------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDirectory]:
        """Hold the folder's exclusive lock for the duration; `OutputDirInUse` names the holder when a
        live process has it. The lock file stays (removing it would let two processes lock two files)."""
        self.check_ours()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            # Never through a link: the lock file is truncated and rewritten below.
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as exc:
            if not (self.path / LOCK_FILE).is_symlink():
                raise
            raise FileExistsError(
                f"{self.path / LOCK_FILE} is a symbolic link (to {os.readlink(self.path / LOCK_FILE)}), and a run writes "
                f"none: it was put there by someone else. Remove it, or pick another --{self.flag}."
            ) from exc
        try:
            _lock_exclusively(fd)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "{}"
            os.close(fd)
            try:
                who = json.loads(holder)
                holder = f"pid {who.get('pid')} on {who.get('host')}, since {who.get('since')}"
            except ValueError:
                pass
            raise OutputDirInUse(
                f"{self.flag} {str(self.path)!r} is in use by another run ({holder}): one run writes into a folder at a "
                f"time. Wait for it to finish or stop it (a resume continues from its checkpoints), or pick another "
                f"--{self.flag}."
            ) from None
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
        try:
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # ------------------------------------------------------------------ the marker
    def check_claimable(self, overwrite: bool) -> None:
        """Raise `FileExistsError` where a previous run's files are still there and `overwrite` is off."""
        previous = self.previous_entries()
        if previous and not overwrite:
            shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
            raise FileExistsError(
                f"{self.flag} {str(self.path)!r} holds a previous run ({shown}). {self.continue_hint}, start over in it "
                f"with --overwrite_output_dir (deleting only the files that run wrote), or pick another --{self.flag}."
            )

    def claim(self, overwrite: bool) -> str:
        """Make the folder this run's (under the lock): a previous run's recorded entries are an
        error, or with `overwrite` are deleted (only they); returns the new run's id."""
        self.check_claimable(overwrite)
        self.remove_owned()
        self._marker = _new_marker()
        self._write_marker()
        return self._marker["run_id"]

    def adopt(self) -> str:
        """Continue the folder's run (a resume, under the lock): its marker is kept, or written anew
        for a folder that had none; returns the run's id."""
        self._marker = self.read_marker() or _new_marker()
        self._write_marker()
        return self._marker["run_id"]

    def record(self, *names: str, **progress) -> None:
        """Note entries this run is about to write (top-level names in the folder) and, in
        `progress`, how far it got; the marker is rewritten atomically, so a folder that stopped
        being writable fails here, at the write that first needs it."""
        if self._marker is None:
            raise RuntimeError(f"{self.path}: record() before claim() or adopt().")
        new = [name for name in names if name not in self._marker["entries"]]
        for name in new:
            self.check_entry(name)
        if new or any(self._marker.get(k) != v for k, v in progress.items()):
            # Entries that are gone (a rotated checkpoint, a published staging folder) leave the list,
            # so it stays the size of the folder. Each entry is recorded in the call just before it is
            # created, so only this call's names can be still to come.
            kept = [name for name in self._marker["entries"] if name in names or self._exists(name)]
            self._marker["entries"] = kept + new
            self._marker.update(progress)
            self._write_marker()

    def _exists(self, name: str) -> bool:
        path = self.path / name
        return path.exists() or path.is_symlink()

    def remove_owned(self) -> None:
        """Delete every entry the folder's run recorded (a folder it recorded is its own, whole)."""
        marker = self.read_marker()  # every entry checked: a plain name inside the folder, no link
        for name in [] if marker is None else marker["entries"]:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _write_marker(self) -> None:
        try:
            _write_json_atomically(self.marker_path, self._marker)
        except OSError as exc:
            from .checkpointing import cause_in_words

            # PermissionError for a folder that refuses writes, as every other refusal; OSError else.
            error = PermissionError if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else OSError
            raise error(
                f"{self.flag} {str(self.path)!r} is not writable ({cause_in_words(exc, self.path)}): the run cannot "
                f"record or save anything there. Make room or make it writable, or pick another --{self.flag}."
            ) from exc


def _new_marker() -> dict:
    return {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "entries": []}


def _lock_exclusively(fd: int) -> None:
    """An exclusive, non-blocking `flock` (BlockingIOError when held); on a system without `fcntl`
    the folder is not locked."""
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt's locks are per byte range and not released on a crash alike
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
