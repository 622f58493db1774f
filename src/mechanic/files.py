"""Atomic file writes (a temporary file next to the target, moved over it only when writing succeeded) and
locks on directories that two processes may write at once (a run directory, a model cache entry).

Temporary names are `.{name}.partial-XXXX` (files) and `.{name}.partial-XXXX` directories, so that the
holder of a directory's lock can remove what a killed writer left (`remove_partials`)."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL = ".partial-"          # in every temporary name made here: `.{target name}.partial-XXXX`
LOCK = ".mechanic.lock"        # the lock file of a run directory


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class BusyError(RuntimeError):
    """A directory another live mechanic process holds the lock of."""


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only file system); the previous file is untouched."""

    def __str__(self) -> str:
        return self.args[1] if len(self.args) > 1 else super().__str__()


def disk_message(e: OSError, path) -> str:
    return (f"Could not write {path}: {e.strerror or e} (errno {e.errno}). Nothing was replaced: the previous "
            "file, if any, is intact and no partial file is left. Free some space (or choose another output "
            "directory) and run the command again; finished stages of a recipe run are reused.")


def partial_name(path: Path) -> str:
    """The prefix of a temporary file or directory next to `path`."""
    return f".{path.name}{PARTIAL}"


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path in the target's directory; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=partial_name(path), suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; a normal file gets the user's default mode
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in DISK_ERRNOS and not isinstance(e, WriteError):
            raise WriteError(e.errno, disk_message(e, path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


@contextmanager
def locked(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` for the block (fcntl.flock).

    The operating system drops the lock when its holder exits or is killed, so a stale lock never blocks
    anyone: nothing to clean up by hand. wait=False refuses at once with a BusyError naming the holder's
    pid; wait=True waits for the holder to finish (used for caches: the second process then reuses).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BusyError(f"{what} is in use by another mechanic process (pid {holder}); wait for it to finish, "
                            "or write somewhere else. The lock is released as soon as that process ends, "
                            "however it ends.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def remove_partials(root: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and directories that killed writers left under `root` (call it only while
    holding root's lock, so no live writer owns them). Returns what was removed."""
    gone = []
    for p in sorted(Path(root).rglob(f".*{PARTIAL}*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def locks_run_dir(fn):
    """Decorate `run(recipe, out, ...)`: one process at a time writes into `out` (a second one gets a clear
    BusyError), and what a killed run left half written there is removed before the run starts."""
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out_dir = Path(sig.bind(*args, **kwargs).arguments["out"])
        out_dir.mkdir(parents=True, exist_ok=True)
        with locked(out_dir / LOCK, f"The run directory {out_dir}"):
            remove_partials(out_dir)
            return fn(*args, **kwargs)
    return wrapper
