"""Bad input, everywhere a user can reach: the Python API, the data loaders, the command line.

``CASES`` is the table: one row per bad input. Every row gets the same checks:

* API rows: the call raises :class:`pyro_vae.InputError`;
  CLI rows (``pyro-vae ...``, ``cli.main`` as the entry point calls it): exit status 2, one ``error:``
  line on stderr, nothing on stdout, no ``Traceback`` anywhere;
* the message names the problem (``problem``, a regex) and the fix (``fix``, a regex);
* every folder or file the case set up (a data directory, another run) has the
  same entries, bytes and mtimes afterwards, and every fresh ``--out`` is
  still absent.

The CLI rows run in this process (a subprocess each paid for importing torch
and Pyro: 60 of them took minutes on two cores); ``tests/test_cli.py`` and
``tests/test_crash.py`` run the real entry point as a subprocess.
"""

import dataclasses
import io
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, InputError, RunConfig, callbacks, data, fit, likelihoods, nets
from pyro_vae.data import IDX_FILES
from pyro_vae.train import train

from conftest import make_idx_dir

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

    def edited_run(self, edit, name="run"):
        """A copy of the finished run whose checkpoint.pt was changed by ``edit(payload)``."""
        path = self.root / name
        shutil.copytree(self._trained_run(), path)
        payload = torch.load(path / "checkpoint.pt", weights_only=True)
        edit(payload)
        torch.save(payload, path / "checkpoint.pt")
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


def _set(key, value, inside=None):
    """An edit of a checkpoint payload: ``payload[inside][key] = value`` (``value`` None: delete it)."""
    def edit(payload):
        target = payload[inside] if inside else payload
        if value is None:
            del target[key]
        else:
            target[key] = value
    return edit


def _wrong_shape(payload):
    name = next(iter(payload["model"]))
    payload["model"][name] = torch.zeros(3, 3, 3)


def _nan_weights(payload):
    for value in payload["model"].values():
        value.fill_(float("nan"))


def _small_test_images(folder):
    from conftest import synthetic_images, write_idx

    x, y = synthetic_images(8)
    write_idx(Path(folder) / (IDX_FILES[2] + ".gz"), x[:, :20, :20])


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
        r"unknown device 'tpu'", r"use auto, cpu or cuda"),
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
                                        ws.counts([[1, 2], [3, 4]]), "--binarize", "dynamic", "--no-progress"],
        r"count data are not binarised, but binarize is 'dynamic'", r"pass --binarize none with --dataset counts"),
    cli("counts-conv", lambda ws: ["train", "--out", ws.fresh(), "--dataset", "counts", "--data-file",
                                   ws.counts([[1, 2], [3, 4]]), "--binarize", "none", "--arch", "conv", "--no-progress"],
        r"--dataset counts holds vectors, which the conv networks cannot read", r"use --arch mlp"),
    cli("counts-gated-conv", lambda ws: ["train", "--out", ws.fresh(), "--dataset", "counts", "--data-file",
                                         ws.counts([[1, 2], [3, 4]]), "--binarize", "none", "--arch", "gated-conv",
                                         "--no-progress"],
        r"--dataset counts holds vectors, which the gated-conv networks cannot read", r"use --arch mlp"),
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
    cli("evaluate-mixture-zero", lambda ws: ["evaluate", ws.run(), "--mixture", "0", "--no-progress"],
        r"--mixture must be a positive number of draws, got 0", r"use e\.g\. --mixture 256"),
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
    # ---- issue 14, 1: a source the user named is the only source
    cli("data-dir-incomplete-no-fallback",
        lambda ws: ["train", "--out", ws.fresh(), "--data-dir", ws.idx("partial", edit=_drop_test_labels), "--no-progress"],
        r"\S*partial: no t10k-labels-idx1-ubyte .*only place looked in", r"--data-dir DIR holding the four"),
    cli("evaluate-data-gone",
        lambda ws: ["evaluate", ws.edited_run(_set("data_dir", ws.folder("gone"), "config")), "--no-progress"],
        r"\S*gone: no train-images-idx3-ubyte", r"--data-dir DIR holding the four"),
    cli("evaluate-data-dir-etc",
        lambda ws: ["evaluate", ws.edited_run(_set("data_dir", "../../../../etc", "config")), "--no-progress"],
        r"etc: no train-images-idx3-ubyte", r"--data-dir DIR holding the four"),
    cli("resume-other-data-dir",
        lambda ws: ["train", "--out", ws.run(), "--resume", "--data-dir", ws.idx("other"), "--no-progress"],
        r"data_dir: run has '\S*', asked '\S*other'", r"resume with the run's settings"),
    # ---- 3: the output location, checked before any data are loaded
    cli("out-empty", lambda ws: ["train", "--out", "", "--data-dir", ws.fresh("no_data"), "--no-progress"],
        r"--out is empty", r"name the run directory"),
    cli("out-is-a-file",
        lambda ws: ["train", "--out", ws.folder("f", {"file": b"x"}) + "/file", "--data-dir", ws.fresh("no_data")],
        r"--out \S*/file is a file, not a directory", r"choose another --out"),
    cli("out-under-a-file",
        lambda ws: ["train", "--out", ws.folder("f", {"file": b"x"}) + "/file/run", "--data-dir", ws.fresh("no_data")],
        r"cannot create the run directory \S*file/run: a part of the path is a file", r"choose another --out"),
    cli("sample-out-missing-dir", lambda ws: ["sample", ws.run(), "--out", ws.fresh("nodir") + "/s.png"],
        r"the directory \S*nodir does not exist", r"create it or choose another --out"),
    cli("sample-out-unknown-format", lambda ws: ["sample", ws.run(), "--out", ws.fresh("s.gif")],
        r"cannot tell the picture format of \S*s\.gif", r"name it \.png, \.jpg or \.jpeg"),
    cli("sample-temperature-negative", lambda ws: ["sample", ws.run(), "--temperature", "-1"],
        r"--temperature takes finite numbers >= 0, got '-1'", r"use e\.g\. --temperature 0\.8"),
    cli("sample-temperature-nan", lambda ws: ["sample", ws.run(), "--temperature", "0.5,nan"],
        r"--temperature takes finite numbers >= 0, got 'nan'", r"--temperature 0,0\.5,0\.8,1"),
    cli("sample-keep-levels-without-image", lambda ws: ["sample", ws.run(), "--keep-levels", "1"],
        r"--keep-levels K goes with --from-image INDEX", r"pass both, e\.g\. --from-image 0 --keep-levels 1"),
    cli("sample-from-image-past-the-test-set", lambda ws: ["sample", ws.run(), "--from-image", "16"],
        r"--from-image 16 is outside the test set's 0\.\.15", r"use an index from 0 to 15"),
    cli("sample-keep-levels-too-many", lambda ws: ["sample", ws.run(), "--from-image", "0", "--keep-levels", "2"],
        r"--keep-levels must be in 0\.\.1 for this run's 1 level \(z0\), got 2", r"use e\.g\. --keep-levels 1"),
    api("sample-temperature-negative", lambda ws: _vae().sample(4, temperature=-1),
        r"temperature must be a finite number >= 0, got -1", r"use e\.g\. temperature=0\.8"),
    api("sample-temperature-undefined-for-the-prior",
        lambda ws: VAE(*nets.build("mlp", X_SHAPE, 4, hidden=16), [4], prior=__import__("pyro").distributions.Uniform(
            -torch.ones(4), torch.ones(4)).to_event(1)).sample(2, temperature=0.5),
        r"temperature is not defined for the prior p\(z0\), a Uniform", r"use temperature=1 with this one"),
    # ---- pyro-vae explore (the trained run: one level z0, 16 test images)
    cli("explore-level-outside", lambda ws: ["explore", ws.run(), "--traverse", "1"],
        r"level 1 is outside 0\.\.0 \(the run's levels z0\.\.z0\)", r"use a level from 0 to 0"),
    cli("explore-interpolate-level-outside", lambda ws: ["explore", ws.run(), "--interpolate", "0,1", "--level", "-1"],
        r"level -1 is outside 0\.\.0", r"use a level from 0 to 0"),
    cli("explore-image-outside", lambda ws: ["explore", ws.run(), "--traverse", "0", "--image", "16"],
        r"image 16 is outside the test set's 0\.\.15", r"use an index from 0 to 15"),
    cli("explore-interpolate-image-outside", lambda ws: ["explore", ws.run(), "--interpolate", "0,99"],
        r"image 99 is outside the test set's 0\.\.15", r"use an index from 0 to 15"),
    cli("explore-unknown-mode", lambda ws: ["explore", ws.run(), "--interpolate", "0,1", "--mode", "curvy"],
        r"unknown mode 'curvy'", r"choose one of: linear, spherical, both"),
    cli("explore-interpolate-not-a-pair", lambda ws: ["explore", ws.run(), "--interpolate", "3"],
        r"--interpolate takes two test-image indices I,J, got '3'", r"use e\.g\. --interpolate 0,1"),
    cli("explore-nothing-to-draw", lambda ws: ["explore", ws.run()],
        r"nothing to draw", r"pass --traverse LEVEL and/or --interpolate I,J"),
    cli("explore-out-missing", lambda ws: ["explore", ws.run(), "--traverse", "0", "--out", ws.fresh("nodir")],
        r"cannot write into \S*nodir: it is not a directory", r"create it or choose another --out"),
    # ---- 4: a checkpoint is validated before it is used
    cli("checkpoint-without-model", lambda ws: ["evaluate", ws.edited_run(_set("model", None)), "--no-progress"],
        r"\S*checkpoint\.pt lacks 'model'", r"train again with --overwrite"),
    cli("checkpoint-without-x-shape", lambda ws: ["evaluate", ws.edited_run(_set("x_shape", None)), "--no-progress"],
        r"\S*checkpoint\.pt lacks 'x_shape'", r"train again with --overwrite"),
    cli("checkpoint-hidden-abc",
        lambda ws: ["evaluate", ws.edited_run(_set("hidden", "abc", "config")), "--no-progress"],
        r"\S*checkpoint\.pt holds a configuration that is not valid: hidden must be a positive integer, got 'abc'",
        r"use --hidden 1 or more"),
    cli("checkpoint-weights-wrong-shape", lambda ws: ["evaluate", ws.edited_run(_wrong_shape), "--no-progress"],
        r"\S*checkpoint\.pt holds weights that do not fit the model", r"train again with --overwrite"),
    # ---- 5: settings validated the same way everywhere
    cli("seed-negative", lambda ws: _train(ws, "--seed", "-1"),
        r"seed must be an integer in \[0, 2\*\*32\), got -1", r"use e\.g\. --seed 0"),
    cli("seed-2-70", lambda ws: _train(ws, "--seed", str(2 ** 70)),
        r"seed must be an integer in \[0, 2\*\*32\), got \d+", r"use e\.g\. --seed 0"),
    cli("sample-seed-negative", lambda ws: ["sample", ws.run(), "--seed", "-1"],
        r"seed must be an integer in \[0, 2\*\*32\), got -1", r"use e\.g\. --seed 0"),
    cli("evaluate-seed-2-70", lambda ws: ["evaluate", ws.run(), "--seed", str(2 ** 70), "--no-progress"],
        r"seed must be an integer in \[0, 2\*\*32\), got \d+", r"use e\.g\. --seed 0"),
    cli("hidden-2-40", lambda ws: _train(ws, "--hidden", str(2 ** 40)),
        r"needs about [\d,]+ GiB for the weights and Adam's state alone", r"use a smaller --hidden"),
    cli("latent-dims-2-40", lambda ws: _train(ws, "--latent-dims", str(2 ** 40)),
        r"needs about [\d,]+ GiB", r"use a smaller --hidden or --latent-dims"),
    cli("free-bits-1e300", lambda ws: _train(ws, "--free-bits", "1e300"),
        r"free_bits 1e\+300 nats per level is beyond any KL", r"--free-bits 0\.5"),
    cli("kl-balance-without-warmup", lambda ws: _train(ws, "--kl-balance"),
        r"KL balancing acts during the KL warm-up only", r"--kl-warmup 10000 or --kl-warmup-epochs 10"),
    cli("kl-balance-with-free-bits", lambda ws: _train(ws, "--kl-balance", "--kl-warmup", "10", "--free-bits", "1"),
        r"KL balancing and free bits are two objectives", r"--free-bits 0"),
    cli("resume-mid-epoch-other-batch-size",
        lambda ws: ["train", "--out", ws.edited_run(_set("batch", 1)), "--resume", "--batch-size", "16", "--no-progress"],
        r"batch_size: run has 32, asked 16 \(the run stopped inside an epoch", r"resume with the run's settings"),
    cli("test-images-of-another-shape",
        lambda ws: ["train", "--out", ws.fresh(), "--data-dir", ws.idx("odd", edit=_small_test_images), "--no-progress"],
        r"the test data have shape \(1, 20, 20\) per point but the training data \(1, 28, 28\)",
        r"give both sets in one shape"),
    cli("beta-on-images-with-0-and-1", lambda ws: _train(ws, "--likelihood", "beta", "--binarize", "none"),
        r"Beta likelihood needs data in \(0, 1\)", r"--squeeze 1e-3 on the command line"),
    cli("squeeze-too-large", lambda ws: _train(ws, "--squeeze", "0.7"),
        r"squeeze must be a number in \[0, 0\.5\)", r"--squeeze 1e-3"),
    # ---- issue 20, 7: the training aids' settings
    cli("ema-1.5", lambda ws: _train(ws, "--ema", "1.5"),
        r"ema \(the weight average's decay\) must be a number in \[0, 1\) \(0: off\), got 1\.5", r"use e\.g\. --ema 0\.999"),
    cli("ema-negative", lambda ws: _train(ws, "--ema", "-1"),
        r"ema \(the weight average's decay\) must be a number in \[0, 1\) \(0: off\), got -1\.0", r"--ema 0\.999"),
    cli("ema-nan", lambda ws: _train(ws, "--ema", "nan"),
        r"ema \(the weight average's decay\) must be a number in \[0, 1\).*got nan", r"--ema 0\.999"),
    cli("ema-not-a-number", lambda ws: _train(ws, "--ema", "slow"),  # argparse's own error
        r"argument --ema: expected a number such as 0\.999, got 'slow'", r"such as 0\.999"),
    cli("skip-grad-norm-negative", lambda ws: _train(ws, "--skip-grad-norm", "-2"),
        r"skip_grad_norm \(skip updates whose gradient norm exceeds it\) must be a number >= 0 \(0: off\), got -2\.0",
        r"use e\.g\. --skip-grad-norm 40000"),
    cli("skip-grad-norm-not-a-number", lambda ws: _train(ws, "--skip-grad-norm", "big"),  # argparse's own error
        r"argument --skip-grad-norm: expected a number such as 40000, got 'big'", r"such as 40000"),
    api("weight-average-decay-1", lambda ws: callbacks.WeightAverage(1.0),
        r"ema \(the weight average's decay\) must be a number in \[0, 1\) \(0: off\), got 1\.0",
        r"use e\.g\. callbacks\.WeightAverage\(0\.999\)"),
    api("gradient-skip-negative", lambda ws: callbacks.GradientSkip(-2),
        r"skip_grad_norm .* must be a number >= 0 \(0: off\), got -2", r"use e\.g\. callbacks\.GradientSkip\(40000\)"),
    api("fit-negative-grad-clip", lambda ws: _fit(_x(), grad_clip=-1.0),
        r"grad_clip must be a number >= 0 \(0: no clipping\), got -1\.0", r"grad_clip=1\.0"),
    api("fit-fractional-epochs", lambda ws: _fit(_x(), epochs=2.5),
        r"epochs must be a positive integer, got 2\.5", r"use epochs=1 or more"),
    api("fit-fractional-batch-size", lambda ws: _fit(_x(), batch_size=8.5),
        r"batch size must be a whole number, got 8\.5", r"a batch size of 64"),
    api("fit-negative-checkpoint-every", lambda ws: _fit(_x(), checkpoint_every=-1),
        r"checkpoint_every must be an integer >= 0 \(0: at epoch ends only\), got -1", r"checkpoint_every=500"),
    api("elbo-terms-0-samples", lambda ws: __import__("pyro_vae").evaluate.elbo_terms(_vae(), _x(4), num_samples=0),
        r"num_samples must be a positive integer, got 0", r"num_samples=10"),
    api("config-lr-string", lambda ws: RunConfig(lr="0.001").validate(),
        r"lr must be a positive number, got '0\.001'", r"--lr 1e-3"),
    api("config-seed-none", lambda ws: RunConfig(seed=None).validate(),
        r"seed must be an integer in \[0, 2\*\*32\), got None", r"--seed 0"),
    api("config-hidden-wide", lambda ws: RunConfig(hidden="wide").validate(),
        r"hidden must be a positive integer, got 'wide'", r"--hidden 1 or more"),
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


def run_cli(argv):
    """``pyro-vae ARGV`` in this process (as the entry point runs it, without paying for a new interpreter
    and a torch import per case): ``(status, stdout, stderr)``."""
    import contextlib
    import warnings

    from pyro_vae import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as PYTHONWARNINGS=ignore did for the subprocesses
        try:
            status = cli.main(argv)
        except SystemExit as exit_:  # argparse's own errors
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ test
@pytest.mark.parametrize("case", _params())
def test_bad_input(case, request, tmp_path, monkeypatch):
    if case.needs_no_gpu and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    if case.cli:
        ws = Workspace(tmp_path / "ws", lambda: request.getfixturevalue("trained_run"), monkeypatch)
        status, stdout, stderr = run_cli([str(a) for a in case.run(ws)])
        assert status == 2, f"exit status {status}; stderr:\n{stderr}"
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


# ---------------------------------------------- issue 14: the mechanisms behind each class
def _small(idx, **kw):
    return RunConfig(data_dir=str(idx), epochs=1, latent_dims=[3], hidden=16, batch_size=32, **kw)


def test_one_writer_a_second_is_refused_naming_the_holder(tmp_path, capsys):
    from pyro_vae import cli
    from pyro_vae.rundir import RunLock

    idx = make_idx_dir(tmp_path / "idx", n_train=64, n_test=16)
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        for argv in (["train", "--out", str(out), "--data-dir", str(idx), "--no-progress"],
                     ["train", "--out", str(out), "--data-dir", str(idx), "--overwrite", "--no-progress"]):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert f"in use by another pyro-vae process (pid {os.getpid()})" in err and err.count("\n") == 1
    assert not (out / ".lock").exists()  # released: the directory is as it was
    assert cli.main(["train", "--out", str(out), "--data-dir", str(idx), "--epochs", "1", "--hidden", "16", "--batch-size", "32",
                     "--no-progress"]) == 0


def test_files_are_replaced_never_written_through_a_planted_link(tmp_path):
    from pyro_vae import cli

    idx = make_idx_dir(tmp_path / "idx", n_train=64, n_test=16)
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "samples.png", "curves.png", "eval.json"):
        (out / name).symlink_to(victim)
    assert cli.main(["train", "--out", str(out), "--data-dir", str(idx), "--epochs", "1", "--hidden", "16", "--batch-size", "32",
                     "--overwrite", "--no-progress"]) == 0
    assert cli.main(["evaluate", str(out), "--iw-samples", "2", "--no-progress"]) == 0
    assert victim.read_text() == "precious"
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "samples.png", "curves.png", "eval.json"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert not list(out.glob("*.tmp"))


def test_a_full_disk_is_one_line_and_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch, capsys):
    import errno

    import pyro_vae.checkpoints as checkpoints
    from pyro_vae import cli

    idx = make_idx_dir(tmp_path / "idx", n_train=64, n_test=16)
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--data-dir", str(idx), "--epochs", "1", "--hidden", "16", "--batch-size", "32",
                     "--no-progress"]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()  # the first run's own messages (model.png not written, where graphviz is missing)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", full)
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(r"pyro-vae: error: \S*run/\S+: the disk is full", err), err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_dangling_link_as_out_is_refused(tmp_path, capsys):
    from pyro_vae import cli

    link = tmp_path / "run"
    link.symlink_to(tmp_path / "nowhere")
    assert cli.main(["train", "--out", str(link), "--data-dir", str(tmp_path / "no_data")]) == 2
    assert "is a link to" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_nan_weights_give_null_in_strict_json_and_a_warning(tmp_path, capsys):
    import json

    from pyro_vae import cli

    idx = make_idx_dir(tmp_path / "idx", n_train=64, n_test=16)
    out = tmp_path / "run"
    train(_small(idx), out, progress=False, pictures=False)
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    _nan_weights(payload)
    torch.save(payload, out / "checkpoint.pt")
    assert cli.main(["evaluate", str(out), "--iw-samples", "2", "--no-progress"]) == 0
    text = (out / "eval.json").read_text()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    summary = json.loads(text, parse_constant=refuse)
    assert summary["iw_log_likelihood"] is None and "iw_log_likelihood" in summary["not_finite"]
    assert "came out NaN or infinite" in capsys.readouterr().err


def test_a_loss_that_explodes_but_stays_finite_stops_the_run():
    from types import SimpleNamespace

    from pyro_vae.callbacks import DivergenceGuard
    from pyro_vae.loop import TrainingDiverged

    guard = DivergenceGuard(factor=100, patience=3, reference_steps=2)
    loop = SimpleNamespace(step=0)
    batch = torch.zeros(10, 1)
    for loss in (5000.0, 3000.0, 2000.0, 1e6, 2000.0, 1e6, 1e6):  # reference 400 nats a point: limit 40 000
        loop.step += 1
        guard.on_step_end(loop, batch, loss)
    assert guard.streak == 2
    with pytest.raises(TrainingDiverged, match=r"the loss exploded: 1e\+05 nats per data point at step 8, over "
                                               r"100x the first 2 steps' 400 for 3 steps in a row"):
        loop.step += 1
        guard.on_step_end(loop, batch, 1e6)


def test_lr_100_stops_with_a_message_and_the_last_checkpoint_kept(tmp_path, capsys):
    from pyro_vae import cli

    idx = make_idx_dir(tmp_path / "idx", n_train=512, n_test=16)
    out = tmp_path / "run"
    status = cli.main(["train", "--out", str(out), "--data-dir", str(idx), "--epochs", "3", "--hidden", "16",
                       "--batch-size", "16", "--lr", "100", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "training stopped" in err and "Traceback" not in err, err


def test_elbo_terms_draw_in_chunks_with_the_same_estimate():
    """An exact guide gives ELBO = log p(x) for every draw: chunked or not, the same numbers."""
    from test_evaluate import linear_gaussian_vae

    from pyro_vae import evaluate

    vae, marginal = linear_gaussian_vae(exact_guide=True)
    x = marginal.sample((16,))
    chunked = evaluate.elbo_terms(vae, x, num_samples=50, max_rows=64)  # 4 draws of 16 points at a time
    assert torch.allclose(chunked["elbo"], marginal.log_prob(x), atol=1e-6)


def test_squeeze_lets_the_beta_likelihood_train_from_the_command_line(tmp_path):
    import json
    import math

    from pyro_vae import cli

    idx = make_idx_dir(tmp_path / "idx", n_train=64, n_test=16)
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--data-dir", str(idx), "--epochs", "1", "--hidden", "16", "--batch-size", "32",
                     "--likelihood", "beta", "--binarize", "none", "--squeeze", "1e-3", "--no-progress"]) == 0
    assert cli.main(["evaluate", str(out), "--iw-samples", "2", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["squeeze"] == 1e-3
    assert summary["squeeze_log_jacobian"] == pytest.approx(784 * math.log(1 - 2e-3))


def test_a_signal_during_a_file_replacement_waits_until_the_file_is_whole(tmp_path, monkeypatch):
    import signal
    import threading

    from pyro_vae import checkpoints

    path = tmp_path / "checkpoint.pt"
    seen = []

    def handler(signum, frame):
        seen.append(path.exists() and torch.load(path, weights_only=True)["x"].numel())

    old = signal.signal(signal.SIGINT, handler)
    try:
        monkeypatch.setenv("PYRO_VAE_CHECKPOINT_DELAY", "0.3")
        threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # arrives mid-write
        checkpoints.save_checkpoint(path, {"x": torch.zeros(1000)})
    finally:
        signal.signal(signal.SIGINT, old)
    assert seen == [1000]  # delivered after the replace, with the new file whole


def test_resume_of_a_checkpoint_without_a_config_is_one_line(tmp_path, capsys):
    from pyro_vae import cli
    from pyro_vae.checkpoints import CHECKPOINT_FORMAT, save_checkpoint

    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out / "checkpoint.pt", {"format": CHECKPOINT_FORMAT, "model": {}})
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds no run configuration" in err and "Traceback" not in err


def test_files_get_the_mode_open_would_give_and_overwrite_leaves_no_old_checkpoint(tmp_path):
    import stat

    from pyro_vae.checkpoints import write_text_atomic

    write_text_atomic(tmp_path / "a.json", "{}")
    old = os.umask(0o022)
    os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~old
    idx = make_idx_dir(tmp_path / "idx", n_train=64, n_test=16)
    out = tmp_path / "run"
    train(_small(idx, keep_best=True), out, progress=False, pictures=False)
    assert (out / "best.pt").exists()

    class Stop(Exception):
        pass

    from pyro_vae.callbacks import Callback

    class Crash(Callback):
        def on_step_start(self, loop, batch):
            raise Stop

    with pytest.raises(Stop):  # a new run that dies before its first checkpoint
        train(_small(idx, seed=5), out, overwrite=True, progress=False, pictures=False, callbacks=[Crash()])
    assert not (out / "checkpoint.pt").exists() and not (out / "best.pt").exists()
