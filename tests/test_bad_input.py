"""Bad input, everywhere a user can reach: the Python API, the data loaders, the command line.

``CASES`` is the table: one row per bad input. Every row gets the same checks:

* API rows: the call raises :class:`pyro_vae.InputError`;
  CLI rows (``pyro-vae ...`` as a subprocess): exit status 2, one ``error:``
  line on stderr, nothing on stdout, no ``Traceback`` anywhere;
* the message names the problem (``problem``, a regex) and the fix (``fix``, a regex);
* every folder or file the case set up (a data directory, another run) has the
  same entries, bytes and mtimes afterwards, and every fresh ``--out`` is
  still absent.

The CLI rows start all at once in one module fixture (each pays for importing
torch and Pyro) and are collected one by one.
"""

import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, InputError, RunConfig, data, fit, likelihoods, nets
from pyro_vae.data import IDX_FILES
from pyro_vae.train import train

from conftest import make_idx_dir

CLI = [sys.executable, "-m", "pyro_vae.cli"]
X_SHAPE = (1, 28, 28)
GARBAGE = b"\x00this is neither a checkpoint nor an IDX file\xff" * 40


# --------------------------------------------------------------- workspace
def snapshot(path):
    """Every entry under ``path`` (or ``path`` itself, if a file): files as (bytes, mtime_ns), folders as None."""
    path = Path(path)
    if path.is_file():
        return {".": (path.read_bytes(), path.stat().st_mtime_ns)}
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(path.rglob("*"))}


class Workspace:
    """The folders one case works on; remembers what must be left as it was."""

    def __init__(self, root, trained_run, monkeypatch=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._trained_run = trained_run  # callable: the path of a finished run, made on first use
        self.monkeypatch = monkeypatch
        self.kept = {}
        self.absent = []

    def keep(self, path):
        """``path`` must have the same entries, bytes and mtimes after the case."""
        self.kept[Path(path)] = snapshot(path)
        return str(path)

    def fresh(self, name="out"):
        """A path that does not exist, and must still not exist after the case."""
        path = self.root / name
        assert not path.exists()
        self.absent.append(path)
        return str(path)

    def counts(self, rows, name="counts.npz"):
        """A count file (``numpy.savez(..., counts=rows)``) that must be left as it was."""
        import numpy as np

        path = self.root / name
        np.savez(path, counts=np.asarray(rows, dtype=float))
        return self.keep(path)

    def idx(self, name="idx", edit=None, **kw):
        """A Fashion-MNIST-format folder (``conftest.make_idx_dir``), after ``edit(folder)``."""
        path = make_idx_dir(self.root / name, **kw)
        if edit is not None:
            edit(path)
        return self.keep(path)

    def folder(self, name, files=()):
        """A folder holding ``files`` ({name: bytes})."""
        path = self.root / name
        path.mkdir()
        for file_name, content in dict(files).items():
            (path / file_name).write_bytes(content)
        return self.keep(path)

    def run(self, name="run"):
        """A copy (mtimes included) of another finished run: checkpoint, metrics, config, pictures."""
        path = self.root / name
        shutil.copytree(self._trained_run(), path)
        return self.keep(path)

    def check_untouched(self):
        for path, before in self.kept.items():
            after = snapshot(path)
            changed = sorted(k for k in set(before) | set(after) if before.get(k, "gone") != after.get(k, "gone"))
            assert not changed, f"{path} changed: {changed}"
        for path in self.absent:
            assert not path.exists(), f"{path} was created"


# ---------------------------------------------------------------- helpers
def _vae(likelihood=None):
    encoder, decoder = nets.build("mlp", X_SHAPE, 4, hidden=16)
    return VAE(encoder, decoder, [4], likelihood=likelihood)


def _x(n=16):
    return torch.rand(n, *X_SHAPE, generator=torch.Generator().manual_seed(0))


def _with(x, value, index=(3, 0, 5, 5)):
    x = x.clone()
    x[index] = value
    return x


def _fit(x, x_test=None, **kw):
    return fit(_vae(), x, x_test, **{"epochs": 1, "batch_size": 8, "progress": False, "log": None, **kw})


def _svi_step(x):
    vae = _vae()
    SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO()).step(x)


def _load(ws, data_dir):
    """``load_images`` with only the user's folder to look in: no Debian package, no download."""
    ws.monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(ws.root / "no-debian"))
    return data.load_images("fashion-mnist", data_dir, download=False)


def _truncate_gz(folder):
    for path in Path(folder).glob("*.gz"):
        content = path.read_bytes()
        path.write_bytes(content[:len(content) // 2])


def _drop_test_labels(folder):
    (Path(folder) / (IDX_FILES[3] + ".gz")).unlink()


def _torch_file(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _train(ws, *args):
    """``pyro-vae train`` into a fresh --out on the small synthetic data, plus ``args``."""
    return ["train", "--out", ws.fresh(), "--data-dir", ws.idx(), "--no-progress", *args]


NOT_GZIP = {name + ".gz": b"not gzip, not IDX" * 20 for name in IDX_FILES}
NOT_IDX = {name: GARBAGE for name in IDX_FILES}
FOREIGN_CHECKPOINT = {"checkpoint.pt": _torch_file({"weights": torch.zeros(3), "epoch": 7})}
GARBAGE_CHECKPOINT = {"checkpoint.pt": GARBAGE}

# ------------------------------------------------------------------ table
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    run: Callable  # API: run(workspace) raises InputError; CLI: run(workspace) -> argv after "pyro-vae"
    problem: str   # regex: the message names the problem
    fix: str       # regex: the message names the fix
    cli: bool = False
    needs_no_gpu: bool = False


def api(id, run, problem, fix, **kw):
    return Case("api-" + id, run, problem, fix, **kw)


def cli(id, argv, problem, fix, **kw):
    return Case("cli-" + id, argv, problem, fix, cli=True, **kw)


NAN, INF = float("nan"), float("inf")

CASES = [
    # ---- data handed to fit / SVI
    api("nan-data", lambda ws: _fit(_with(_x(), NAN)),
        r"data holds NaN or infinite values", r"clean or drop them"),
    api("inf-test-data", lambda ws: _fit(_x(), _with(_x(8), -INF)),
        r"data holds NaN or infinite values", r"clean or drop them"),
    api("nan-data-plain-svi", lambda ws: _svi_step(_with(_x(8), NAN)),
        r"data holds NaN or infinite values", r"clean or drop them"),
    api("flat-data-for-image-networks", lambda ws: _fit(_x().reshape(16, 784)),
        r"data has shape \(16, 784\) but the networks expect \(batch, 1, 28, 28\)", r"reshape the data"),
    api("uint8-data", lambda ws: _fit((_x() * 255).to(torch.uint8)),
        r"floating-point tensor, got dtype torch\.uint8", r"use x\.float\(\)"),
    api("float64-data-float32-vae", lambda ws: _fit(_x().double()),
        r"data has dtype torch\.float64 but the VAE's parameters are torch\.float32",
        r"use x\.to\(torch\.float32\) or vae\.to\(torch\.float64\)"),
    api("numpy-data", lambda ws: _fit(_x().numpy()),
        r"data must be a torch\.Tensor, got ndarray", r"torch\.as_tensor\(x, dtype=torch\.float32\)"),
    api("empty-tensor", lambda ws: _fit(_x()[:0]),
        r"data is empty \(0 data points\)", r"pass at least one data point"),
    api("bernoulli-data-outside-0-1", lambda ws: _fit(_x() * 2 - 0.5),
        r"Bernoulli likelihood needs data in \[0, 1\]; got values in \[-0\.\d+, 1\.\d+\]",
        r"Rescale the data or choose likelihood 'gaussian'"),
    api("batch-size-larger-than-data", lambda ws: _fit(_x(16), batch_size=17),
        r"batch size 17 is larger than the data \(16 points\)", r"choose a smaller batch size"),
    api("batch-size-0", lambda ws: _fit(_x(16), batch_size=0),
        r"batch size must be positive, got 0", r"use a batch size of 1 or more \(at most the 16 data points\)"),
    api("unknown-elbo", lambda ws: _fit(_x(), elbo="renyi"),
        r"unknown elbo 'renyi'", r"choose one of: trace, meanfield, jit"),
    api("fit-epochs-0", lambda ws: _fit(_x(), epochs=0),
        r"epochs must be a positive integer, got 0", r"use epochs=1 or more"),
    api("fit-negative-lr", lambda ws: _fit(_x(), lr=-1e-3),
        r"lr must be a positive number, got -0\.001", r"use e\.g\. lr=1e-3"),
    api("fit-0-particles", lambda ws: _fit(_x(), num_particles=0),
        r"num_particles must be a positive integer, got 0", r"use num_particles=1 or more"),
    # ---- building the model
    api("gaussian-scale-0", lambda ws: likelihoods.Gaussian(scale=0.0),
        r"Gaussian likelihood's scale must be a positive number, got 0\.0", r"e\.g\. Gaussian\(scale=1\.0\)"),
    api("gaussian-scale-negative", lambda ws: likelihoods.Gaussian(scale=-0.5),
        r"Gaussian likelihood's scale must be a positive number, got -0\.5", r"e\.g\. Gaussian\(scale=1\.0\)"),
    api("vae-latent-dims-0", lambda ws: VAE(nets.MLPEncoder(X_SHAPE), nets.MLPDecoder(4, X_SHAPE), [0]),
        r"latent_dims must be a non-empty list of positive sizes, got \[0\]", r"pass e\.g\. latent_dims=\[50\]"),
    api("decoder-latent-dim-0", lambda ws: nets.build("mlp", X_SHAPE, 0),
        r"latent_dim must be a positive integer, got 0", r"use a latent_dim of 1 or more"),
    api("hidden-width-0", lambda ws: nets.MLPEncoder(X_SHAPE, hidden=(0,)),
        r"hidden width must be a positive integer, got 0", r"use a hidden width of 1 or more"),
    api("hidden-width-negative", lambda ws: nets.MLPDecoder(4, X_SHAPE, hidden=(-5,)),
        r"hidden width must be a positive integer, got -5", r"use a hidden width of 1 or more"),
    api("no-hidden-layer", lambda ws: nets.MLPEncoder(X_SHAPE, hidden=()),
        r"MLPEncoder needs at least one hidden layer", r"pass e\.g\. hidden=\(400,\)"),
    api("x-shape-0", lambda ws: nets.MLPEncoder((0, 28, 28)),
        r"x_shape must be a non-empty tuple of positive sizes, got \(0, 28, 28\)", r"e\.g\. \(1, 28, 28\)"),
    api("conv-image-not-multiple-of-4", lambda ws: nets.ConvEncoder((1, 30, 30)),
        r"ConvEncoder needs images of shape \(C, H, W\) with H and W multiples of 4, got \(1, 30, 30\)",
        r"use MLPEncoder for other shapes"),
    api("beta-0", lambda ws: VAE(nets.MLPEncoder(X_SHAPE), nets.MLPDecoder(4, X_SHAPE), [4], beta=0.0),
        r"beta must be a number > 0", r"pass e\.g\. beta=1\.0"),
    api("unknown-guide", lambda ws: VAE(*nets.build("mlp", X_SHAPE, 4, hidden=16), [4], guide="sideways"),
        r"unknown guide 'sideways'", r"choose one of: bottom-up, top-down"),
    api("chain-wrong-number-of-transitions",
        lambda ws: VAE(*nets.build("mlp", X_SHAPE, 4, hidden=16), [3, 4], transitions=[]),
        r"transitions must hold 1 module \(one per level below z0, len\(latent_dims\) - 1\), got 0",
        r"pass one module per level below z0, or transitions=None"),
    api("unknown-arch", lambda ws: nets.build("resnet", X_SHAPE, 4),
        r"unknown arch 'resnet'", r"choose one of: mlp, conv"),
    api("unknown-likelihood", lambda ws: likelihoods.from_name("gamma"),
        r"unknown likelihood 'gamma'", r"choose one of: bernoulli, cbernoulli, gaussian\[:fixed\|learned\|pixel\]"),
    # ---- data loaders
    api("unknown-dataset", lambda ws: data.load_images("cifar10", download=False),
        r"unknown dataset 'cifar10'", r"choose one of: fashion-mnist, mnist"),
    api("dataset-missing", lambda ws: _load(ws, None),
        r"could not find the fashion-mnist data set\. Tried:\n  - \S*no-debian: no train-images",
        r"sudo apt-get install dataset-fashion-mnist"),
    api("data-dir-missing", lambda ws: _load(ws, ws.fresh("no_such_data")),
        r"data directory \S*no_such_data does not exist", r"pass a directory holding the four \*-ubyte\(\.gz\) files"),
    api("data-dir-is-a-file", lambda ws: _load(ws, Path(ws.folder("files", {"notes.txt": b"hi"})) / "notes.txt"),
        r"data directory \S*notes\.txt is not a directory", r"pass a directory holding the four"),
    api("data-dir-incomplete", lambda ws: _load(ws, ws.idx("incomplete", edit=_drop_test_labels, n_train=8, n_test=4)),
        r"\S*incomplete: no t10k-labels-idx1-ubyte \(\.gz or unpacked\)",
        r"--data-dir DIR holding the four \*-ubyte\(\.gz\) files"),
    api("data-files-not-gzip", lambda ws: _load(ws, ws.folder("not_gzip", NOT_GZIP)),
        r"could not unpack fashion-mnist files in \S*not_gzip: BadGzipFile", r"replace the broken files"),
    api("data-files-truncated", lambda ws: _load(ws, ws.idx("truncated", edit=_truncate_gz, n_train=8, n_test=4)),
        r"could not unpack fashion-mnist files in \S*truncated: EOFError", r"replace the broken files"),
    api("data-files-not-idx", lambda ws: _load(ws, ws.folder("not_idx", NOT_IDX)),
        r"could not read fashion-mnist files in \S*not_idx", r"replace the broken files"),
    api("data-files-empty", lambda ws: _load(ws, ws.idx("empty", n_train=0, n_test=0)),
        r"fashion-mnist files in \S*empty hold no images \(train-images-idx3-ubyte, t10k-images-idx3-ubyte: 0",
        r"replace the broken files"),
    # ---- run directories
    api("train-resume-and-overwrite",
        lambda ws: train(RunConfig(data_dir=ws.idx(), epochs=2), ws.run(), resume=True, overwrite=True,
                         progress=False),
        r"resume and overwrite, not both", r"choose one of resume and overwrite"),

    # ---- the command line
    cli("unknown-dataset", lambda ws: ["train", "--out", ws.fresh(), "--dataset", "cifar10"],
        r"unknown dataset 'cifar10'", r"choose one of: fashion-mnist, mnist"),
    cli("unknown-arch", lambda ws: _train(ws, "--arch", "resnet"),
        r"unknown arch 'resnet'", r"choose one of: mlp, conv"),
    cli("unknown-likelihood", lambda ws: _train(ws, "--likelihood", "gamma"),
        r"unknown likelihood 'gamma'", r"choose one of: bernoulli, cbernoulli, gaussian\[:fixed\|learned\|pixel\]"),
    cli("unknown-elbo", lambda ws: _train(ws, "--elbo", "renyi"),
        r"unknown elbo 'renyi'", r"choose one of: trace, meanfield, jit"),
    cli("unknown-binarize", lambda ws: _train(ws, "--binarize", "sometimes"),
        r"unknown binarize 'sometimes'", r"choose one of: dynamic, fixed, none"),
    cli("unknown-device", lambda ws: _train(ws, "--device", "tpu"),
        r"unknown device 'tpu'", r"use cpu or cuda"),
    cli("cuda-without-gpu", lambda ws: _train(ws, "--device", "cuda"),
        r"--device cuda was asked for, but PyTorch sees no CUDA GPU here \(torch\.cuda\.is_available\(\) is False\)",
        r"use --device cpu", needs_no_gpu=True),
    cli("latent-dim-0", lambda ws: _train(ws, "--latent-dim", "0"),
        r"latent_dims must be a non-empty list of positive integers \(top level first\), got \[0\]", r"use e\.g\. --latent-dims 16,32,64"),
    cli("latent-dims-not-integers", lambda ws: _train(ws, "--latent-dims", "4,x"),  # argparse's own error
        r"argument --latent-dims/--latent-dim: expected comma-separated integers .*got '4,x'",
        r"such as 16,32,64"),
    cli("latent-dims-level-0", lambda ws: _train(ws, "--latent-dims", "4,0"),
        r"latent_dims must be a non-empty list of positive integers \(top level first\), got \[4, 0\]",
        r"use e\.g\. --latent-dims 16,32,64"),
    cli("unknown-guide", lambda ws: _train(ws, "--guide", "sideways"),
        r"unknown guide 'sideways'", r"choose one of: bottom-up, top-down"),
    cli("unknown-prior", lambda ws: _train(ws, "--prior", "gamma"),
        r"unknown prior 'gamma'", r"choose one of: standard, learned, mog:K, vamp:K, flow:K"),
    cli("vamp-prior-with-bottom-up-chain", lambda ws: _train(ws, "--prior", "vamp:3", "--latent-dims", "3,4"),
        r"VampPrior needs q\(z0 \| x\) in closed form", r"use --guide top-down or another --prior"),
    cli("counts-without-data-file", lambda ws: ["train", "--out", ws.fresh(), "--dataset", "counts",
                                                "--binarize", "none", "--no-progress"],
        r"--dataset counts needs the count matrix", r"pass --data-file PATH \(\.npz, \.csv"),
    cli("counts-binarised", lambda ws: ["train", "--out", ws.fresh(), "--dataset", "counts", "--data-file",
                                        ws.counts([[1, 2], [3, 4]]), "--no-progress"],
        r"count data are not binarised, but binarize is 'dynamic'", r"pass --binarize none with --dataset counts"),
    cli("counts-conv", lambda ws: ["train", "--out", ws.fresh(), "--dataset", "counts", "--data-file",
                                   ws.counts([[1, 2], [3, 4]]), "--binarize", "none", "--arch", "conv", "--no-progress"],
        r"--dataset counts holds vectors, which the conv networks cannot read", r"use --arch mlp"),
    cli("data-file-with-images", lambda ws: _train(ws, "--data-file", ws.counts([[1, 2], [3, 4]])),
        r"--data-file and --transpose are for --dataset counts", r"images are found with --data-dir"),
    cli("negative-counts", lambda ws: ["train", "--out", ws.fresh(), "--dataset", "counts", "--data-file",
                                       ws.counts([[1, 2], [3, -4]]), "--binarize", "none", "--likelihood", "nb",
                                       "--no-progress"],
        r"counts\.npz is not a count matrix: the value at row 1, column 1 is -4\.0 \(negative; 1 such values\)",
        r"counts are integers >= 0"),
    cli("unknown-posterior", lambda ws: _train(ws, "--posterior", "iaf:0"),
        r"unknown posterior 'iaf:0'", r"choose one of: gaussian, iaf:K \(K a positive integer\)"),
    cli("vamp-prior-with-iaf-posterior", lambda ws: _train(ws, "--prior", "vamp:3", "--posterior", "iaf:2"),
        r"VampPrior is a mixture of Gaussian posteriors", r"use --posterior gaussian or another --prior"),
    cli("negative-free-bits", lambda ws: _train(ws, "--free-bits", "-1"),
        r"free_bits must be a number of nats >= 0 \(0: off\), got -1\.0", r"use e\.g\. --free-bits 0\.5"),
    cli("negative-kl-warmup", lambda ws: _train(ws, "--kl-warmup", "-3"),
        r"kl_warmup must be a number of steps >= 0 \(0: off\), got -3", r"use e\.g\. --kl-warmup \d+"),
    cli("meanfield-with-bottom-up-chain", lambda ws: _train(ws, "--elbo", "meanfield", "--latent-dims", "4,8"),
        r"TraceMeanField_ELBO is not valid with the bottom-up guide of a multilevel chain",
        r"Trace_ELBO \(--elbo trace\).*--guide top-down"),
    cli("jit-with-kl-warmup", lambda ws: _train(ws, "--elbo", "jit", "--kl-warmup", "10"),
        r"--elbo jit compiles the loss once, so it cannot follow a KL warm-up", r"use --elbo trace or meanfield"),
    cli("hidden-negative", lambda ws: _train(ws, "--hidden", "-5"),
        r"hidden must be a positive integer, got -5", r"use --hidden 1 or more"),
    cli("epochs-0", lambda ws: _train(ws, "--epochs", "0"),
        r"epochs must be a positive integer, got 0", r"use --epochs 1 or more"),
    cli("batch-size-0", lambda ws: _train(ws, "--batch-size", "0"),
        r"batch_size must be a positive integer, got 0", r"use --batch-size 1 or more"),
    cli("negative-lr", lambda ws: _train(ws, "--lr=-0.001"),
        r"lr must be a positive number, got -0\.001", r"use e\.g\. --lr 1e-3"),
    cli("batch-size-larger-than-data", lambda ws: _train(ws, "--batch-size", "100000"),
        r"batch size 100000 is larger than the data \(512 points\)", r"use --batch-size 512 or less"),
    cli("gaussian-scale-0",
        lambda ws: _train(ws, "--likelihood", "gaussian", "--binarize", "none", "--gaussian-scale", "0"),
        r"Gaussian likelihood's scale must be a positive number, got 0\.0", r"--gaussian-scale 1\.0"),
    cli("data-dir-missing", lambda ws: ["train", "--out", ws.fresh(), "--data-dir", ws.fresh("no_such_data")],
        r"data directory \S*no_such_data does not exist", r"pass a directory holding the four \*-ubyte\(\.gz\) files"),
    cli("data-files-not-gzip",
        lambda ws: ["train", "--out", ws.fresh(), "--data-dir", ws.folder("bad_data", NOT_GZIP), "--no-progress"],
        r"could not unpack fashion-mnist files in \S*bad_data", r"replace the broken files"),
    cli("data-files-empty",
        lambda ws: ["train", "--out", ws.fresh(), "--data-dir", ws.idx("empty", n_train=0, n_test=0), "--no-progress"],
        r"fashion-mnist files in \S*empty hold no images", r"replace the broken files"),
    cli("resume-empty-dir",
        lambda ws: ["train", "--out", ws.folder("empty"), "--resume", "--data-dir", ws.idx(), "--no-progress"],
        r"no checkpoint at \S*empty/checkpoint\.pt", r"train a run there first"),
    cli("resume-foreign-torch-file",
        lambda ws: ["train", "--out", ws.folder("foreign", FOREIGN_CHECKPOINT), "--resume", "--no-progress"],
        r"\S*foreign/checkpoint\.pt is not a pyro_vae checkpoint", r"train there with --overwrite"),
    cli("resume-garbage-checkpoint",
        lambda ws: ["train", "--out", ws.folder("garbage", GARBAGE_CHECKPOINT), "--resume", "--no-progress"],
        r"\S*garbage/checkpoint\.pt is not a readable pyro_vae checkpoint", r"train there with --overwrite"),
    cli("evaluate-no-run", lambda ws: ["evaluate", ws.folder("notes", {"notes.txt": b"not a run"}), "--no-progress"],
        r"no checkpoint at \S*notes/checkpoint\.pt", r"train a run there first"),
    cli("evaluate-garbage-checkpoint",
        lambda ws: ["evaluate", ws.folder("garbage", GARBAGE_CHECKPOINT), "--no-progress"],
        r"\S*garbage/checkpoint\.pt is not a readable pyro_vae checkpoint",
        r"point to a run directory made by pyro-vae train"),
    cli("occupied-out",
        lambda ws: ["train", "--out", ws.run(), "--data-dir", ws.idx(), "--epochs", "1", "--no-progress"],
        r"already holds a run \(checkpoint\.pt\)", r"pass --resume to continue it, --overwrite to replace it"),
    cli("resume-and-overwrite", lambda ws: ["train", "--out", ws.run(), "--resume", "--overwrite", "--no-progress"],
        r"--resume and --overwrite exclude each other",
        r"pass --resume to continue the run in --out, or --overwrite to replace it"),
]


def _params():
    for case in CASES:
        yield pytest.param(case, id=case.id)


def test_the_table():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert len(CASES) >= 24
    assert sum(case.cli for case in CASES) >= 10 and sum(not case.cli for case in CASES) >= 10


# --------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished one-epoch run made in-process: what another run's --out holds."""
    base = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYRO_VAE_CACHE", str(base / "cache"))
        config = RunConfig(data_dir=str(make_idx_dir(base / "idx", n_train=64, n_test=16)), epochs=1,
                           latent_dims=[3], hidden=16, batch_size=32)
        train(config, base / "run", progress=False)
    return base / "run"


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory):
    """Every CLI case started at once as ``pyro-vae ARGV``; ``{id: (workspace, Popen)}``."""
    base = tmp_path_factory.mktemp("cli")
    runs = {}
    for case in CASES:
        if not case.cli or (case.needs_no_gpu and torch.cuda.is_available()):
            continue
        ws = Workspace(base / case.id, lambda: request.getfixturevalue("trained_run"))
        argv = [str(a) for a in case.run(ws)]
        env = dict(os.environ, PYRO_VAE_CACHE=str(base / "cache" / case.id), PYTHONWARNINGS="ignore",
                   OMP_NUM_THREADS="1")  # two dozen processes at once: no thread oversubscription
        runs[case.id] = ws, subprocess.Popen(CLI + argv, env=env, text=True, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)
    yield runs
    for _, proc in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# ------------------------------------------------------------------ test
@pytest.mark.parametrize("case", _params())
def test_bad_input(case, request, tmp_path, monkeypatch):
    if case.needs_no_gpu and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    if case.cli:
        ws, proc = request.getfixturevalue("cli_runs")[case.id]
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"exit status {proc.returncode}; stderr:\n{stderr}"
        assert "Traceback" not in stderr + stdout, stderr
        assert stdout == "", stdout
        assert stderr.count("error:") == 1, stderr
        message = stderr
    else:
        ws = Workspace(tmp_path / "ws", lambda: request.getfixturevalue("trained_run"), monkeypatch)
        with pytest.raises(InputError) as info:
            case.run(ws)
        message = str(info.value)
    assert re.search(case.problem, message), f"the problem ({case.problem!r}) is not named:\n{message}"
    ws.check_untouched()
    assert re.search(case.fix, message), f"the fix ({case.fix!r}) is not named:\n{message}"
