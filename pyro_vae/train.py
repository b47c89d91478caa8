"""The SVI loop, and runs built from a configuration with a run directory.

Two levels of convenience, both on top of ``vae.model`` and ``vae.guide``:

* :func:`fit`: SVI on tensors for any :class:`~pyro_vae.VAE` (a user's own
  networks too), with a tqdm bar and optional per-epoch callback;
* :func:`train`: builds data and VAE from a :class:`RunConfig`, runs
  :func:`fit`, and keeps a run directory::

      DIR/config.json      the RunConfig, as JSON
      DIR/metrics.jsonl    one line per epoch: epoch, train_loss (nats per
                           image, the negative ELBO averaged over the epoch's
                           minibatches), test_elbo (nats per image, one
                           sample of z per image), seconds (training time)
      DIR/checkpoint.pt    module and optimizer state, epoch, step, RNG
                           states, config and history (written atomically)
      DIR/samples.png, reconstructions.png, curves.png   (see plots.py)
"""

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO

from . import data as data_
from . import likelihoods, nets, plots
from .errors import InputError
from .evaluate import elbo_terms
from .svi import NonFiniteLoss, TorchOptimSVI
from .vae import VAE

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "jit": JitTrace_ELBO}
BINARIZE = ("dynamic", "fixed", "none")
CHECKPOINT_FORMAT = "pyro_vae.checkpoint/1"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is left as it was."""


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run made by :func:`train` (saved as ``config.json``).

    ``binarize``: ``"dynamic"`` redraws Bernoulli(x) for every training batch
    (a new binarisation each epoch) and binarises the test set once with a
    fixed seed; ``"fixed"`` binarises both once; ``"none"`` keeps grey values.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    arch: str = "mlp"
    latent_dim: int = 50
    hidden: int = 400
    likelihood: str = "bernoulli"
    gaussian_scale: float = 1.0
    binarize: str = "dynamic"
    elbo: str = "trace"
    num_particles: int = 1
    beta: float = 1.0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"

    # settings that change the model or its data; a resume must not change them
    MODEL_KEYS = ("dataset", "arch", "latent_dim", "hidden", "likelihood", "gaussian_scale", "binarize")

    def validate(self):
        """Raise :class:`InputError` naming the first bad setting."""
        if self.dataset not in data_.DATASETS:
            raise InputError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(data_.DATASETS)}")
        if self.arch not in nets.ARCHS:
            raise InputError(f"unknown arch {self.arch!r}; choose one of: {', '.join(nets.ARCHS)}")
        if self.likelihood not in likelihoods.LIKELIHOODS:
            raise InputError(f"unknown likelihood {self.likelihood!r}; choose one of: "
                             f"{', '.join(likelihoods.LIKELIHOODS)}")
        if self.elbo not in ELBOS:
            raise InputError(f"unknown elbo {self.elbo!r}; choose one of: {', '.join(ELBOS)}")
        if self.binarize not in BINARIZE:
            raise InputError(f"unknown binarize {self.binarize!r}; choose one of: {', '.join(BINARIZE)}")
        for key in ("latent_dim", "hidden", "epochs", "batch_size", "num_particles"):
            if int(getattr(self, key)) < 1:
                raise InputError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise InputError(f"beta must be a number > 0, got {self.beta}")
        resolve_device(self.device)
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def resolve_device(name):
    """``torch.device(name)``, refusing CUDA where no GPU exists."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"unknown device {name!r}; use cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but PyTorch sees no CUDA GPU here "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}; use cpu or cuda")
    return device


def build_vae(config, x_shape):
    """The :class:`VAE` that ``config`` (a :class:`RunConfig`) describes, for data of ``x_shape``."""
    likelihood = (likelihoods.Gaussian(config.gaussian_scale) if config.likelihood == "gaussian"
                  else likelihoods.build(config.likelihood))
    encoder, decoder = nets.build(config.arch, x_shape, config.latent_dim,
                                  out_channels=likelihood.channels, hidden=config.hidden)
    return VAE(encoder, decoder, [config.latent_dim], likelihood=likelihood, beta=config.beta)


def make_elbo(name, num_particles=1):
    """A Pyro ELBO by name (``trace``, ``meanfield``, ``jit``); particles are vectorised."""
    if name not in ELBOS:
        raise InputError(f"unknown elbo {name!r}; choose one of: {', '.join(ELBOS)}")
    kwargs = dict(num_particles=num_particles, vectorize_particles=num_particles > 1,
                  max_plate_nesting=1)  # the "data" plate
    if name == "jit":
        kwargs["ignore_jit_warnings"] = True
    return ELBOS[name](**kwargs)


# --------------------------------------------------------------------- fit
def rng_state(generator):
    """Every RNG state a run depends on, as tensors and plain Python values."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def fit(vae, x_train, x_test=None, epochs=10, batch_size=256, lr=1e-3, elbo="trace", num_particles=1,
        seed=0, dynamic_binarize=False, progress=True, log=print, on_epoch=None, state=None):
    """Train ``vae`` by SVI on ``vae.model`` and ``vae.guide`` with Adam
    (:class:`~pyro_vae.svi.TorchOptimSVI`: ``pyro.infer.SVI``'s step with one
    torch optimizer).

    Args:
        vae: a :class:`VAE`, already on the data's device.
        x_train: training data ``(N, *x_shape)`` on that device.
        x_test: optional test data ``(M, *x_shape)``; its ELBO per data point
            (one draw of z each) is measured after every epoch.
        epochs: the epoch to stop after (counting any resumed ones).
        batch_size, lr: minibatch size and Adam learning rate.
        elbo: ``"trace"``, ``"meanfield"`` (analytic KL) or ``"jit"``.
        num_particles: particles per data point (vectorised when > 1).
        seed: seeds torch, Python, NumPy and the data generator.
        dynamic_binarize: redraw Bernoulli(x) for every batch.
        progress: show a tqdm bar with the loss per data point.
        log: called with a one-line summary after each epoch (``None``: silent).
        on_epoch: ``on_epoch(record, state)`` called after each epoch with the
            metrics dict and a checkpointable state dict.
        state: a state dict from an earlier ``on_epoch`` (or a checkpoint) to
            resume from.

    Returns:
        list of per-epoch metric dicts (``epoch``, ``train_loss``,
        ``test_elbo``, ``seconds``), resumed epochs included.

    Raises:
        TrainingDiverged: the loss was not finite.
    """
    from tqdm.auto import tqdm

    vae.check_data(x_train)
    if x_test is not None:
        vae.check_data(x_test)
    device = x_train.device
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    batches = data_.Batches(x_train, batch_size, generator, dynamic_binarize=dynamic_binarize)
    svi = TorchOptimSVI(vae.model, vae.guide, make_elbo(elbo, num_particles), lr)
    history, step, start = [], 0, 0
    if state is not None:
        vae.load_state_dict(state["model"])
        svi.load_state_dict(state["optim"])
        history, step, start = list(state["history"]), int(state["step"]), int(state["epoch"])
        set_rng_state(state["rng"], generator)
    n = x_train.shape[0]
    for epoch in range(start + 1, epochs + 1):
        vae.train()
        started = time.perf_counter()
        total = 0.0
        with pyro.validation_enabled(False), tqdm(batches, desc=f"epoch {epoch}/{epochs}", unit="batch",
                                                   disable=not progress, leave=False) as bar:
            for i, xb in enumerate(bar):
                step += 1
                try:
                    loss = svi.step(xb)
                except NonFiniteLoss as err:
                    raise TrainingDiverged(
                        f"the loss became {err.args[0]} at epoch {epoch}, step {step}; no update was applied "
                        "and the last checkpoint is unchanged. Lower the learning rate or check the data") from None
                total += loss
                if i % 10 == 0:
                    bar.set_postfix(loss_per_image=f"{loss / xb.shape[0]:.2f}")
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "train_loss": total / n, "seconds": seconds}
        if x_test is not None:
            vae.eval()
            record["test_elbo"] = float(elbo_terms(vae, x_test, num_samples=1)["elbo"].mean())
        history.append(record)
        if log is not None:
            log(f"epoch {epoch}: train loss {record['train_loss']:.2f} nats/image"
                       + (f", test ELBO {record['test_elbo']:.2f}" if "test_elbo" in record else "")
                       + f" ({seconds:.1f} s)")
        if on_epoch is not None:
            on_epoch(record, {"model": vae.state_dict(), "optim": svi.state_dict(), "epoch": epoch,
                              "step": step, "history": history, "rng": rng_state(generator)})
    return history


# -------------------------------------------------------------------- runs
def save_checkpoint(path, payload):
    """Write ``payload`` with ``torch.save`` to a temporary file, fsync it, rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``torch.load(weights_only=True)``; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}; train a run there first")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise InputError(f"{path} is not a readable pyro_vae checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a pyro_vae checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return payload


def load_data(config, device):
    """``(x_train, x_test)`` for a :class:`RunConfig`, binarised as it says, on ``device``."""
    x_train, _, x_test, _ = data_.load_images(config.dataset, config.data_dir)
    if config.binarize != "none":
        g = torch.Generator().manual_seed(config.seed + 1)
        x_test = data_.binarize(x_test, g)
        if config.binarize == "fixed":
            x_train = data_.binarize(x_train, g)
    return x_train.to(device), x_test.to(device)


def load_run(out_dir, device=None):
    """The trained :class:`VAE` and :class:`RunConfig` stored in a run directory."""
    payload = load_checkpoint(Path(out_dir) / "checkpoint.pt")
    config = RunConfig.from_dict(payload["config"])
    if device is not None:
        config.device = device
    device = resolve_device(config.device)
    vae = build_vae(config, tuple(payload["x_shape"]))
    vae.load_state_dict(payload["model"])
    return vae.to(device), config


def train(config, out_dir, resume=False, overwrite=False, progress=True, pictures=True):
    """Run :func:`fit` for a :class:`RunConfig` and keep the run directory ``out_dir``.

    Args:
        config: a :class:`RunConfig` (or dict of its fields).
        out_dir: the run directory (created if needed).
        resume: continue the run in ``out_dir`` up to ``config.epochs``.
        overwrite: replace another run's files in ``out_dir``.
        pictures: write ``samples.png``, ``reconstructions.png`` and
            ``curves.png`` at the end.

    Returns:
        ``(vae, history)``.

    Raises:
        InputError: bad settings, an occupied ``out_dir`` without ``resume`` or
            ``overwrite``, or a resume whose model settings differ from the run's.
    """
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    config.validate()
    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    state = None
    if resume and overwrite:
        raise InputError("choose one of resume and overwrite, not both")
    if resume:
        payload = load_checkpoint(ckpt_path)
        saved = RunConfig.from_dict(payload["config"])
        differing = [f"{k}: run has {getattr(saved, k)!r}, asked {getattr(config, k)!r}"
                     for k in RunConfig.MODEL_KEYS if getattr(saved, k) != getattr(config, k)]
        if differing:
            raise InputError(f"cannot resume {out}: the model settings differ ({'; '.join(differing)}); "
                             "resume with the run's settings or train into a new directory")
        state = payload
    elif ckpt_path.exists() and not overwrite:
        raise InputError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    device = resolve_device(config.device)
    x_train, x_test = load_data(config, device)
    if config.batch_size > x_train.shape[0]:
        raise InputError(f"batch size {config.batch_size} is larger than the data ({x_train.shape[0]} points)")
    pyro.set_rng_seed(config.seed)  # the initial weights depend on the seed alone
    vae = build_vae(config, tuple(x_train.shape[1:])).to(device)
    vae.check_data(x_train)  # fail before any file is written
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        for stale in ("metrics.jsonl", "eval.json"):
            (out / stale).unlink(missing_ok=True)
    _write_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    def on_epoch(record, fit_state):
        _write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in fit_state["history"]))
        save_checkpoint(ckpt_path, {"format": CHECKPOINT_FORMAT, "config": config.to_dict(),
                                    "x_shape": list(x_train.shape[1:]), **fit_state})

    history = fit(vae, x_train, x_test, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                  elbo=config.elbo, num_particles=config.num_particles, seed=config.seed,
                  dynamic_binarize=config.binarize == "dynamic", progress=progress, on_epoch=on_epoch,
                  state=state)
    if pictures:
        plots.save_samples(vae, out / "samples.png")
        plots.save_reconstructions(vae, x_test, out / "reconstructions.png")
        plots.save_curves(out / "metrics.jsonl", out / "curves.png")
    return vae, history
