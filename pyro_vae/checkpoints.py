"""Checkpoint files and the RNG states they carry.

A checkpoint is a ``dict`` of tensors and plain Python values saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``, so
loading one never runs code from the file. Writes go to a temporary file that
is flushed, fsynced and renamed over the old one: a crash at any moment leaves
the old or the new checkpoint, never a broken one.
"""

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

CHECKPOINT_FORMAT = "pyro_vae.checkpoint/1"
# seconds to pause between writing the temporary file and renaming it: a hook for crash tests
_DELAY_ENV = "PYRO_VAE_CHECKPOINT_DELAY"
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


def _replace_atomically(path, write, pause=0.0):
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path``,
    and fsync the directory: a crash at any moment leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if pause:
        time.sleep(pause)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path, payload):
    """Write ``payload`` with ``torch.save`` to ``path`` atomically (see the module docstring)."""
    _replace_atomically(path, lambda f: torch.save(payload, f), pause=float(os.environ.get(_DELAY_ENV) or 0))


def write_text_atomic(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _replace_atomically(path, lambda f: f.write(text.encode("utf-8")))


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


