"""Checkpoint files and the RNG states they carry.

A checkpoint is a ``dict`` of tensors and plain Python values saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``, so
loading one never runs code from the file. Writes go to a temporary file that
is flushed, fsynced and renamed over the old one: a crash at any moment leaves
the old or the new checkpoint, never a broken one.
"""

import contextlib
import io
import json
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

CHECKPOINT_FORMAT = "pyro_vae.checkpoint/1"
# seconds to pause between writing the temporary file and renaming it: a hook for crash tests
_DELAY_ENV = "PYRO_VAE_CHECKPOINT_DELAY"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's umask, for the files written by replace
_NOT_A_RUN_FIX = ("point to a run directory made by pyro-vae train, or train there with --overwrite to "
                  "replace the file")


def rng_state():
    """The global RNG states (torch, CUDA, Python, NumPy), as tensors and plain Python values."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM back until the block is done: a file being replaced is finished or abandoned
    whole, and the signal is raised right after (to the handlers that were in place). Python runs signal
    handlers in the main thread, so there a recording handler stands in for the block's duration."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in caught:
            signal.raise_signal(signum)


def _replace_atomically(path, data, pause=0.0):
    """Write the bytes ``data`` to a new temporary file beside ``path`` (a unique name, created with
    ``O_EXCL``: never an existing file or link), fsync it, rename it over ``path`` (which replaces a link
    named ``path``, never writes through it), and fsync the directory. A crash at any moment leaves the
    old file or the new one; an error (a full disk, no permission) removes the temporary file and is
    raised as an ``OSError`` naming ``path``. SIGINT/SIGTERM wait until the file is in place."""
    path = Path(path)
    with _signals_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # the mode open() would give, not mkstemp's 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if pause:
                time.sleep(pause)
            os.replace(tmp, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(err, OSError):
                raise OSError(err.errno, f"{err.strerror} (while writing {path})", str(path)) from err
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(path, payload):
    """Write ``payload`` with ``torch.save`` to ``path`` atomically (see :func:`_replace_atomically`)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory first: a full disk is then a plain OSError, never a torch error
    _replace_atomically(path, buffer.getvalue(), pause=float(os.environ.get(_DELAY_ENV) or 0))


def write_text_atomic(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _replace_atomically(path, text.encode("utf-8"))


def read_records(path):
    """The records of a JSON-lines file such as a run's ``metrics.jsonl``: a list of dicts, one per non-empty
    line (the file :class:`~pyro_vae.train.RunDirectory` writes atomically, one epoch a line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_bytes_atomic(path, data):
    """Write ``data`` to ``path`` atomically (pictures, any file the project writes)."""
    _replace_atomically(path, bytes(data))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``torch.load(weights_only=True)``; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}; train a run there first")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise InputError(f"{path} is not a readable pyro_vae checkpoint ({type(err).__name__}); " + _NOT_A_RUN_FIX) \
            from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a pyro_vae checkpoint (format {CHECKPOINT_FORMAT} expected); "
                         + _NOT_A_RUN_FIX)
    return payload


