"""Atomic writes: a file or folder is written under a temporary name beside its target and moved
into place only when complete, so a killed run never leaves a half-written result behind and an
error never destroys what was already there.

The temporary names are made private (0600 files, 0700 folders); before the move a file gets
the mode of the file it replaces, or 0666 less the umask when it is new, and a folder 0777
less the umask, as if it had been created directly.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


class DiskFull(OSError):
    """No space left where a file was being written; the message names the place (nothing was replaced)."""


def _disk_full(error: OSError, target: Path) -> DiskFull:
    usage = shutil.disk_usage(target.parent if target.parent.exists() else Path.cwd())
    return DiskFull(errno.ENOSPC, f"no space left on the device holding {target.parent} (writing {target.name}; "
                    f"{usage.free // 2**20} MiB free); free space or write elsewhere, then run again: nothing "
                    "already written was changed")


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOSPC


def current_umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(error):
            raise _disk_full(error, path) from error
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``directory``; on success it replaces ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(error):
            raise _disk_full(error, directory) from error
        raise


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``tensors`` (contiguous CPU copies) with a string header, atomically."""
    from safetensors.torch import save

    header = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)
    atomic_write_bytes(path, data)
    return Path(path)
