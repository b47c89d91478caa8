"""A run directory's guard: the output location checked before any work, and one writer at a time.

:func:`prepare` turns every way an ``--out`` can be unusable (empty, a file, under a file, a dangling
link, not writable) into one :class:`~pyro_vae.errors.InputError` line before any data are loaded.
:class:`RunLock` is an exclusive ``fcntl.flock`` on ``DIR/.lock``, held by ``train`` for the whole run
and by ``evaluate`` and ``sample`` while they write; a second writer is refused with the holder's pid.
The lock is on the directory itself; ``DIR/.lock`` only names the holder while it runs.
"""

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from .errors import InputError

LOCK_NAME = ".lock"


def _cause(err):
    if err.errno == errno.ENOSPC:
        return "the disk is full"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (or a read-only file system)"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    return err.strerror or str(err)


def describe_os_error(err):
    """One line for an ``OSError``: the path and the cause (disk full, permission, not a directory, ...)."""
    where = err.filename or ""
    return f"{where}: {_cause(err)}" if where else _cause(err)


def prepare(out):
    """Make ``out`` a writable run directory, or raise :class:`InputError` saying why it cannot be.

    Returns:
        ``True`` if this call created it (so a run that fails before writing can remove it again).
    """
    if str(out).strip() == "":
        raise InputError("--out is empty; name the run directory, e.g. --out runs/first")
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise InputError(f"--out {out} is a link to {os.readlink(out)}, which does not exist; point it at a "
                         "directory or choose another --out")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory; choose another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the run directory {out}: {_cause(err)}; choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"the run directory {out} is not writable: {_cause(OSError(errno.EACCES, ''))}; "
                         "choose another --out")
    return created


def remove_if_unused(out):
    """Remove a run directory that this process created and that holds nothing but its lock file."""
    out = Path(out)
    try:
        if {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            (out / LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()
    except OSError:
        pass


class RunLock:
    """``with RunLock(out): ...`` holds an exclusive lock on the run directory ``out``.

    The lock is ``fcntl.flock`` on the directory itself, so the kernel drops it when the process ends
    however it ends; while it is held, ``DIR/.lock`` names the holder's pid (and is removed on release:
    a refused command leaves the directory as it found it).

    Raises:
        InputError: another process holds it (the message names its pid).
    """

    def __init__(self, out):
        self.dir = Path(out)
        self.fd = None

    def __enter__(self):
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise InputError(f"cannot lock the run directory {self.dir}: {_cause(err)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = (self.dir / LOCK_NAME).read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise InputError(f"{self.dir} is in use by another pyro-vae process (pid {holder}); wait for it to "
                             "finish, or choose another --out") from None
        self.fd = fd
        try:  # a note of the holder, not data: no fsync, but never through a planted link
            note = os.open(self.dir / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(note, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as err:
            self.__exit__()
            raise InputError(f"cannot write in the run directory {self.dir}: {_cause(err)}; choose another "
                             "--out") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                (self.dir / LOCK_NAME).unlink()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        return False
