"""One writer per output folder: a lock file naming its owner (pid, host, command, start time).

``with output_lock(folder, "train"):`` creates ``folder/.dreamguide.lock`` with ``O_EXCL`` and
removes it on exit. Processes of one distributed launch (``accelerate launch``, ``torchrun``: the
``RANK`` variable) each take their own rank's lock, so a launch's shards share a folder while a
second launch on it stops. A second process that finds the lock of a live owner stops with a message
naming that owner and what to do, instead of mixing its outputs with the first's. A lock left by a
killed process (its pid no longer runs on this host) is taken over with a warning; a lock of
another host is honoured (its pid cannot be checked from here). Holding the lock, the process
removes the hidden temporary files a killed write left in the folder.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".dreamguide.lock"


def lock_file_name() -> str:
    """This process's lock file name: :data:`LOCK_FILE`, or one per rank above 0 of a distributed launch."""
    rank = os.environ.get("RANK", "0")
    return LOCK_FILE if rank in ("", "0") else f".dreamguide-rank{rank}.lock"


class OutputLocked(RuntimeError):
    """Another live process writes to the same output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # torn or unreadable: written by a process killed mid-write


def _describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"])) if "time" in owner else "?"
    return (f"dreamguide {owner.get('command', '?')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, "
            f"since {since})")


def check_output_path(folder: Path, what: str) -> None:
    """``folder`` is, or can be made as, a folder this process can write ``what`` into; else a ValueError
    naming the path and the problem (a file, a path below a file, no write permission)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is below {existing}, which is a file"
        raise ValueError(f"the output folder {folder} {where}; give a folder for {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {folder}: {existing} is not writable; give a folder you can write "
                         f"{what} to")


def remove_leftovers(folder: Path) -> list[str]:
    """Delete the hidden temporary files and folders (``.<name>.<random>.tmp``, :mod:`dreamguide.atomic`)
    that a killed write left directly in ``folder``; only safe while holding the folder's lock."""
    import shutil

    removed = []
    for path in folder.glob(".*.tmp"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return sorted(removed)


@contextmanager
def output_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold ``folder``'s lock for the duration of the block; a folder the lock created is removed again
    when the block wrote nothing into it."""
    folder = Path(folder)
    check_output_path(folder, f"{command}'s outputs")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_file_name()
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "time": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            stale = owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"])
            if not owner or stale:
                warnings.warn(f"{path}: taking over the lock of {_describe(owner)}, which no longer runs", stacklevel=3)
                path.unlink(missing_ok=True)
                continue
            raise OutputLocked(
                f"{folder} is being written by {_describe(owner)}; wait for it to finish, or write to another "
                f"folder. If that process is gone (another machine, a crash), delete {path}"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(me) + "\n")
        break
    else:  # pragma: no cover - two takeovers raced
        raise OutputLocked(f"{folder}: could not take the lock {path}; try again")
    removed = remove_leftovers(folder)
    if removed:
        warnings.warn(f"{folder}: removed {len(removed)} unfinished temporary file(s) of a killed run "
                      f"(e.g. {removed[0]})", stacklevel=3)
    try:
        yield path
    finally:
        if _owner(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a run that failed before writing anything leaves no empty folder behind
