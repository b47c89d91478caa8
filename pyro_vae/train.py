"""The SVI loop, and runs built from a configuration with a run directory.

Two levels of convenience, both on top of ``vae.model`` and ``vae.guide``:

* :func:`fit`: SVI on tensors for any :class:`~pyro_vae.VAE` (a user's own
  networks too), with a tqdm bar and optional per-epoch callback;
* :func:`train`: builds data and VAE from a :class:`RunConfig`, runs
  :func:`fit`, and keeps a run directory::

      DIR/config.json      the RunConfig, as JSON
      DIR/metrics.jsonl    one line per epoch: epoch, train_loss (nats per
                           image, the loss trained on averaged over the
                           epoch's minibatches: the negative ELBO unless
                           warm-up or free bits change it), test_elbo and
                           test_kl_z0, test_kl_z1, ... (nats per image, one
                           sample of z per image), kl_weight (the warm-up's
                           weight at the epoch's last step), seconds
      DIR/checkpoint.pt    module and optimizer state, epoch, step (which is
                           also the KL warm-up's position), RNG states,
                           config and history (written atomically)
      DIR/best.pt          with keep_best: the checkpoint of the best test ELBO
      DIR/samples.png, reconstructions.png, levels.png, curves.png   (see plots.py)

Checkpoints are written at the end of every epoch, every ``checkpoint_every``
steps, and when SIGINT/SIGTERM stops training; resuming from any of them
continues bitwise as if the run had never stopped (on the CPU).
"""

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO

from . import data as data_
from . import likelihoods, nets, plots, posteriors, priors
from .errors import InputError
from .evaluate import elbo_terms
from .checkpoints import (CHECKPOINT_FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                          write_text_atomic)
from .svi import NonFiniteStep, TorchOptimSVI
from .chain import MEANFIELD_BOTTOM_UP
from .objectives import FreeBitsELBO, KLWarmup
from .vae import GUIDES, VAE

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "jit": JitTrace_ELBO}
BINARIZE = ("dynamic", "fixed", "none")


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient; the last checkpoint is left as it was."""


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run made by :func:`train` (saved as ``config.json``).

    ``grad_clip`` 0 means no clipping; ``checkpoint_every`` 0 means a checkpoint
    at the end of every epoch only; ``keep_best`` also keeps ``best.pt``, the
    checkpoint of the epoch with the best test ELBO.

    ``prior`` is a :func:`pyro_vae.priors.from_name` name (``standard``,
    ``learned``, ``mog:K``, ``vamp:K``, ``flow:K``); ``posterior`` a
    :func:`pyro_vae.posteriors.from_name` name (``gaussian``, ``iaf:K``), the
    guide's family at every level.
    ``latent_dims`` are the chain's level sizes, top (z0) to bottom; ``guide``
    is ``"bottom-up"`` or ``"top-down"``; ``kl_warmup`` is the number of steps
    of :class:`~pyro_vae.objectives.KLWarmup` (0: off); ``free_bits`` the KL
    floor per level in nats (0: off, the plain ELBO).

    ``dataset`` ``"counts"`` trains on the count matrix in ``data_file``
    (:func:`pyro_vae.data.load_counts`; ``transpose`` for genes x cells
    files), the last 10% of a seeded shuffle of its rows held out as the
    test set; it needs ``binarize="none"`` and the MLP.

    ``binarize``: ``"dynamic"`` redraws Bernoulli(x) for every training batch
    (a new binarisation each epoch) and binarises the test set once with a
    fixed seed; ``"fixed"`` binarises both once; ``"none"`` keeps grey values.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    data_file: str | None = None
    transpose: bool = False
    arch: str = "mlp"
    latent_dims: list = dataclasses.field(default_factory=lambda: [50])
    guide: str = "bottom-up"
    prior: str = "standard"
    posterior: str = "gaussian"
    hidden: int = 400
    likelihood: str = "bernoulli"
    gaussian_scale: float = 1.0
    binarize: str = "dynamic"
    elbo: str = "trace"
    num_particles: int = 1
    beta: float = 1.0
    kl_warmup: int = 0
    free_bits: float = 0.0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    grad_clip: float = 0.0
    max_bad_steps: int = 10
    checkpoint_every: int = 0
    keep_best: bool = False

    # settings that change the model or its data; a resume must not change them
    MODEL_KEYS = ("dataset", "data_file", "transpose", "arch", "latent_dims", "guide", "prior", "posterior",
                  "hidden", "likelihood", "gaussian_scale", "binarize")

    def validate(self):
        """Raise :class:`InputError` naming the first bad setting."""
        if self.dataset not in DATASETS:
            raise InputError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.dataset == "counts":
            if not self.data_file:
                raise InputError("--dataset counts needs the count matrix: pass --data-file PATH "
                                 f"({', '.join(data_.COUNT_FORMATS)})")
            if self.binarize != "none":
                raise InputError(f"count data are not binarised, but binarize is {self.binarize!r}; "
                                 "pass --binarize none with --dataset counts")
            if self.arch != "mlp":
                raise InputError("--dataset counts holds vectors, which the conv networks cannot read; use --arch mlp")
        elif self.data_file or self.transpose:
            raise InputError("--data-file and --transpose are for --dataset counts; images are found with "
                             "--data-dir")
        if self.arch not in nets.ARCHS:
            raise InputError(f"unknown arch {self.arch!r}; choose one of: {', '.join(nets.ARCHS)}")
        likelihoods.from_name(self.likelihood, self.gaussian_scale)
        if self.elbo not in ELBOS:
            raise InputError(f"unknown elbo {self.elbo!r}; choose one of: {', '.join(ELBOS)}")
        if self.binarize not in BINARIZE:
            raise InputError(f"unknown binarize {self.binarize!r}; choose one of: {', '.join(BINARIZE)}")
        dims = self.latent_dims
        if not (isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and d >= 1 for d in dims)):
            raise InputError(f"latent_dims must be a non-empty list of positive integers (top level first), "
                             f"got {dims!r}; use e.g. --latent-dims 16,32,64")
        self.latent_dims = list(dims)
        priors.from_name(self.prior)
        if self.prior.startswith("vamp") and self.guide == "bottom-up" and len(dims) > 1:
            raise InputError("the VampPrior needs q(z0 | x) in closed form, which the bottom-up guide of a chain "
                             "does not have; use --guide top-down or another --prior")
        posteriors.from_name(self.posterior)
        if self.prior.startswith("vamp") and self.posterior != "gaussian":
            raise InputError("the VampPrior is a mixture of Gaussian posteriors q(z0 | u_k), but an IAF posterior "
                             "makes q(z0 | x) a flow; use --posterior gaussian or another --prior")
        if self.guide not in GUIDES:
            raise InputError(f"unknown guide {self.guide!r}; choose one of: {', '.join(GUIDES)}")
        if self.elbo == "meanfield" and self.guide == "bottom-up" and len(dims) > 1:
            raise InputError(MEANFIELD_BOTTOM_UP)
        if self.elbo == "jit" and (self.kl_warmup or self.free_bits):
            raise InputError("--elbo jit compiles the loss once, so it cannot follow a KL warm-up or use free "
                             "bits; use --elbo trace or meanfield")
        if not (math.isfinite(self.free_bits) and self.free_bits >= 0):
            raise InputError(f"free_bits must be a number of nats >= 0 (0: off), got {self.free_bits}; "
                             "use e.g. --free-bits 0.5")
        if int(self.kl_warmup) < 0:
            raise InputError(f"kl_warmup must be a number of steps >= 0 (0: off), got {self.kl_warmup}; "
                             "use e.g. --kl-warmup 10000, or 0 for no warm-up")
        for key in ("hidden", "epochs", "batch_size", "num_particles", "max_bad_steps"):
            if int(getattr(self, key)) < 1:
                raise InputError(f"{key} must be a positive integer, got {getattr(self, key)}; "
                                 f"use --{key.replace('_', '-')} 1 or more")
        if int(self.checkpoint_every) < 0:
            raise InputError(f"checkpoint_every must be >= 0 (0: at epoch ends only), got {self.checkpoint_every}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise InputError(f"grad_clip must be a number >= 0 (0: no clipping), got {self.grad_clip}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a positive number, got {self.lr}; use e.g. --lr 1e-3")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise InputError(f"beta must be a number > 0, got {self.beta}")
        resolve_device(self.device)
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if "latent_dim" in d and "latent_dims" not in d:  # runs written before multilevel chains
            d["latent_dims"] = [d.pop("latent_dim")]
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
    likelihood = likelihoods.from_name(config.likelihood, config.gaussian_scale)
    encoder, decoder = nets.build(config.arch, x_shape, config.latent_dims[-1],
                                  out_channels=likelihood.channels, hidden=config.hidden)
    return VAE(encoder, decoder, config.latent_dims, likelihood=likelihood, beta=config.beta,
               prior=priors.from_name(config.prior), posterior=posteriors.from_name(config.posterior),
               guide=config.guide, hidden=config.hidden)


def make_elbo(name, num_particles=1, free_bits=0.0):
    """A Pyro ELBO by name (``trace``, ``meanfield``, ``jit``); particles are vectorised.

    With ``free_bits > 0``: a :class:`~pyro_vae.objectives.FreeBitsELBO`
    (analytic KL per level for ``meanfield``; ``jit`` is refused).
    """
    if name not in ELBOS:
        raise InputError(f"unknown elbo {name!r}; choose one of: {', '.join(ELBOS)}")
    kwargs = dict(num_particles=num_particles, vectorize_particles=num_particles > 1,
                  max_plate_nesting=1)  # the "data" plate
    if free_bits:
        if name == "jit":
            raise InputError("free bits cannot be combined with the jit ELBO; use elbo='trace' or 'meanfield'")
        return FreeBitsELBO(free_bits, analytic_kl=name == "meanfield", **kwargs)
    if name == "jit":
        kwargs["ignore_jit_warnings"] = True
    return ELBOS[name](**kwargs)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :func:`fit` between two steps.

    ``state`` is the resumable state at that point (already handed to
    ``checkpoint``, if one was given); ``signal`` the signal's number.
    """

    def __init__(self, message, state, signum):
        super().__init__(message)
        self.state, self.signal = state, signum


@contextlib.contextmanager
def _catch_stop_signals():
    """Turn the first SIGINT/SIGTERM into a flag checked between steps; a second one stops at once."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _kl_weight_reset(vae):
    try:
        yield
    finally:
        vae.kl_weight = 1.0


def fit(vae, x_train, x_test=None, epochs=10, batch_size=256, lr=1e-3, elbo="trace", num_particles=1,
        seed=0, dynamic_binarize=False, grad_clip=None, max_bad_steps=10, checkpoint_every=0,
        kl_warmup=0, free_bits=0.0, progress=True, log=print, checkpoint=None, state=None):
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
        grad_clip: clip the total gradient norm to this (``None``: off).
        max_bad_steps: stop after this many consecutive steps whose loss or
            gradients were not finite (each such step is skipped: no update).
        checkpoint_every: also call ``checkpoint`` every this many steps (0: only
            at the end of each epoch and on SIGINT/SIGTERM).
        kl_warmup: steps of :class:`~pyro_vae.objectives.KLWarmup`: before the
            0-based step t, ``vae.kl_weight = min(1, (t + 1) / kl_warmup)``
            (0: off). The position is the step count, so a resume continues it.
        free_bits: KL floor per level in nats (0: off); trains on
            :class:`~pyro_vae.objectives.FreeBitsELBO`, an objective that is
            not a bound.
        progress: show a tqdm bar with the loss per data point.
        log: called with a one-line summary after each epoch (``None``: silent).
        checkpoint: ``checkpoint(state)`` is called with a resumable state dict
            (``model``, ``optim``, ``epoch`` completed, ``step``, ``batch``
            done in the current epoch, ``history``, RNG states) at the end of
            every epoch, every ``checkpoint_every`` steps, and on SIGINT/SIGTERM.
        state: such a state dict (or a checkpoint) to resume from: training
            then continues exactly as if it had never stopped.

    Returns:
        list of per-epoch metric dicts (``epoch``, ``train_loss``,
        ``test_elbo``, ``seconds``, ``kl_weight`` at the epoch's last step),
        resumed epochs included. ``train_loss`` is the loss trained on (with
        warm-up or free bits, not the negative ELBO).

    Raises:
        TrainingDiverged: ``max_bad_steps`` consecutive non-finite steps.
        TrainingInterrupted: SIGINT or SIGTERM (after ``checkpoint`` was called).
    """
    from tqdm.auto import tqdm

    vae.check_data(x_train)
    if x_test is not None:
        vae.check_data(x_test)
    for name, value in (("epochs", epochs), ("num_particles", num_particles), ("max_bad_steps", max_bad_steps)):
        if int(value) < 1:
            raise InputError(f"{name} must be a positive integer, got {value}; use {name}=1 or more")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr}; use e.g. lr=1e-3")
    device = x_train.device
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    batches = data_.Batches(x_train, batch_size, generator, dynamic_binarize=dynamic_binarize)
    if elbo == "jit" and kl_warmup:
        raise InputError("the jit ELBO compiles the loss once, so it cannot follow a KL warm-up; "
                         "use elbo='trace' or 'meanfield'")
    warmup = KLWarmup(kl_warmup)
    loss_fn = make_elbo(elbo, num_particles, free_bits)
    vae.check_elbo(loss_fn)
    svi = TorchOptimSVI(vae.model, vae.guide, loss_fn, lr, grad_clip=grad_clip)
    history, step, epoch, done = [], 0, 0, 0
    progress_in_epoch = {"total": 0.0, "seen": 0, "seconds": 0.0}
    if state is not None:
        vae.load_state_dict(state["model"])
        svi.load_state_dict(state["optim"])
        history, step, epoch = list(state["history"]), int(state["step"]), int(state["epoch"])
        done = int(state["batch"])
        progress_in_epoch = dict(state["progress_in_epoch"])
        generator.set_state(state["data_epoch_start"])
    data_epoch_start = generator.get_state()

    def snapshot():
        return {"model": vae.state_dict(), "optim": svi.state_dict(), "epoch": epoch, "step": step,
                "batch": done, "progress_in_epoch": dict(progress_in_epoch), "history": list(history),
                "data_epoch_start": data_epoch_start, "rng": rng_state()}

    bad = 0
    with _catch_stop_signals() as stop, pyro.validation_enabled(False), _kl_weight_reset(vae):
        while epoch < epochs:
            vae.train()
            started = time.perf_counter() - progress_in_epoch["seconds"]
            batch_iter = iter(batches)
            for _ in range(done):  # resuming mid-epoch: redraw the batches already done (same data RNG)
                next(batch_iter)
            if state is not None:
                set_rng_state(state["rng"])
                state = None
            with tqdm(batch_iter, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", initial=done,
                      total=len(batches), disable=not progress, leave=False) as bar:
                for xb in bar:
                    vae.kl_weight = warmup(step)
                    step += 1
                    done += 1
                    try:
                        loss = svi.step(xb)
                        bad = 0
                        progress_in_epoch["total"] += loss
                        progress_in_epoch["seen"] += xb.shape[0]
                        if done % 10 == 1:
                            bar.set_postfix(loss_per_image=f"{loss / xb.shape[0]:.2f}")
                    except NonFiniteStep as err:
                        bad += 1
                        message = (f"epoch {epoch + 1}, step {step}: loss {err.args[0]}, gradient norm "
                                   f"{err.args[1]}; the update was skipped")
                        if bad >= max_bad_steps:
                            raise TrainingDiverged(
                                f"{bad} steps in a row had a non-finite loss or gradient (last: {message}). "
                                "No update was applied for them and the last checkpoint is unchanged. "
                                "Lower the learning rate, set grad_clip, or check the data") from None
                        tqdm.write(f"warning: {message}", file=sys.stderr)
                    progress_in_epoch["seconds"] = time.perf_counter() - started
                    if stop:
                        interrupted = snapshot()
                        if checkpoint is not None:
                            checkpoint(interrupted)
                        name = signal.Signals(stop[0]).name
                        raise TrainingInterrupted(
                            f"{name} at epoch {epoch + 1}, step {step}; the state after this step was saved",
                            interrupted, stop[0])
                    if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 \
                            and done < len(batches):
                        checkpoint(snapshot())
            epoch += 1
            record = {"epoch": epoch,
                      "train_loss": (progress_in_epoch["total"] / progress_in_epoch["seen"]
                                     if progress_in_epoch["seen"] else math.nan),
                      "seconds": time.perf_counter() - started, "kl_weight": vae.kl_weight}
            if x_test is not None:
                vae.eval()
                terms = elbo_terms(vae, x_test, num_samples=1)
                record["test_elbo"] = float(terms["elbo"].mean())
                record.update({f"test_{key}": float(v.mean()) for key, v in terms.items() if key.startswith("kl_")})
            history.append(record)
            done, progress_in_epoch = 0, {"total": 0.0, "seen": 0, "seconds": 0.0}
            data_epoch_start = generator.get_state()
            if log is not None:
                log(f"epoch {epoch}: train loss {record['train_loss']:.2f} nats/image"
                    + (f", test ELBO {record['test_elbo']:.2f}" if "test_elbo" in record else "")
                    + f" ({record['seconds']:.1f} s)")
            if checkpoint is not None:
                checkpoint(snapshot())
    return history


# -------------------------------------------------------------------- runs
DATASETS = (*data_.DATASETS, "counts")


def is_image(vae):
    """Whether the VAE's data are images ``(C, H, W)``, which the picture files show."""
    return vae.x_shape is not None and len(vae.x_shape) == 3


def load_data(config, device):
    """``(x_train, x_test)`` for a :class:`RunConfig`, binarised as it says, on ``device``."""
    if config.dataset == "counts":
        x = data_.load_counts(config.data_file, config.transpose)
        if x.shape[0] < 2:
            raise InputError(f"{config.data_file} holds {x.shape[0]} row; training and a test set need 2 or more")
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed + 1))
        n_test = max(1, x.shape[0] // 10)
        return x[order[n_test:]].to(device), x[order[:n_test]].to(device)
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
        pictures: write ``curves.png`` at the end and, for images,
            ``samples.png``, ``reconstructions.png`` and ``levels.png``.

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
        raise InputError(f"batch size {config.batch_size} is larger than the data ({x_train.shape[0]} points); "
                         f"use --batch-size {x_train.shape[0]} or less")
    pyro.set_rng_seed(config.seed)  # the initial weights depend on the seed alone
    vae = build_vae(config, tuple(x_train.shape[1:])).to(device)
    vae.check_data(x_train)  # fail before any file is written
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        for stale in ("metrics.jsonl", "eval.json"):
            (out / stale).unlink(missing_ok=True)
    write_text_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    def checkpoint(fit_state):
        payload = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "x_shape": list(x_train.shape[1:]),
                   **fit_state}
        save_checkpoint(ckpt_path, payload)  # first the checkpoint: metrics.jsonl never runs ahead of it
        history = fit_state["history"]
        write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        if config.keep_best and fit_state["batch"] == 0 and history and \
                history[-1]["test_elbo"] >= max(r["test_elbo"] for r in history):
            save_checkpoint(out / "best.pt", payload)

    history = fit(vae, x_train, x_test, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                  elbo=config.elbo, num_particles=config.num_particles, seed=config.seed,
                  dynamic_binarize=config.binarize == "dynamic", grad_clip=config.grad_clip or None,
                  max_bad_steps=config.max_bad_steps, checkpoint_every=config.checkpoint_every,
                  kl_warmup=config.kl_warmup, free_bits=config.free_bits, progress=progress, checkpoint=checkpoint, state=state)
    if pictures:
        if is_image(vae):
            plots.save_samples(vae, out / "samples.png")
            plots.save_reconstructions(vae, x_test, out / "reconstructions.png")
            plots.save_levels(vae, x_test, out / "levels.png")
        plots.save_curves(out / "metrics.jsonl", out / "curves.png")
    return vae, history
