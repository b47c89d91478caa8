import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pyro
import pyro.infer
import pyro.optim
import pytest
import torch

from pyro_vae.data import DEBIAN_FASHION_MNIST, IDX_FILES

HAS_DEBIAN_FASHION_MNIST = all(
    (Path(DEBIAN_FASHION_MNIST) / (f + ".gz")).is_file() for f in IDX_FILES)
needs_fashion_mnist = pytest.mark.skipif(
    not HAS_DEBIAN_FASHION_MNIST,
    reason="Debian's dataset-fashion-mnist is not installed (make test installs it where apt can)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_pyro(tmp_path, monkeypatch):
    """Every test starts with an empty param store, fixed seeds and its own data cache."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    monkeypatch.setenv("PYRO_VAE_CACHE", str(tmp_path / "cache"))
    yield
    pyro.clear_param_store()


def write_idx(path, array, gz=True):
    """Write a uint8 IDX file (the MNIST format): magic, dims, bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def synthetic_images(n, seed=0):
    """``n`` 28x28 uint8 images of bright rectangles on dark ground, and labels."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    for i in range(n):
        r0, c0 = rng.integers(2, 12, size=2)
        r1, c1 = r0 + rng.integers(6, 14), c0 + rng.integers(6, 14)
        images[i, r0:r1, c0:c1] = rng.integers(150, 256)
    return images, labels


def make_idx_dir(path, n_train=512, n_test=128, gz=True):
    """A directory laid out like Debian's dataset-fashion-mnist, with small synthetic data."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = synthetic_images(n_train, seed=1)
    x_te, y_te = synthetic_images(n_test, seed=2)
    suffix = ".gz" if gz else ""
    for name, arr in zip(IDX_FILES, (x_tr, y_tr, x_te, y_te)):
        write_idx(path / (name + suffix), arr, gz=gz)
    return path


@pytest.fixture
def idx_dir(tmp_path):
    """A small Fashion-MNIST-format directory (512 train, 128 test images, gzipped)."""
    return make_idx_dir(tmp_path / "idx")


@pytest.fixture
def images():
    """128 synthetic grey images ``(128, 1, 28, 28)`` in [0, 1]."""
    x, _ = synthetic_images(128, seed=3)
    return torch.from_numpy(x).float().div(255).unsqueeze(1)


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running the command line in a subprocess with its own cache."""
    env = dict(os.environ)
    env["PYRO_VAE_CACHE"] = str(tmp_path / "cache")
    env["PYTHONWARNINGS"] = "ignore"
    return env


ELBOS = {"trace": lambda: pyro.infer.Trace_ELBO(),
         "meanfield": lambda: pyro.infer.TraceMeanField_ELBO(),
         "jit": lambda: pyro.infer.JitTrace_ELBO(ignore_jit_warnings=True),
         "vectorized": lambda: pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)}


def check_svi_lowers_the_loss(vae, elbo, x, steps=40):
    """40 Adam steps of ``pyro.infer.SVI`` with the ELBO named ``elbo`` (see ``ELBOS``): every loss is
    finite and the mean of the last 5 is more than 5% below the mean of the first 5."""
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), loss=ELBOS[elbo]())
    losses = [svi.step(x) for _ in range(steps)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert torch.isfinite(torch.tensor(losses)).all()
    assert last < first - 0.05 * abs(first), (first, last)
