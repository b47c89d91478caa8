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
      DIR/best.pt          with keep_best: the checkpoint of the best validation
                           ELBO (with val_size; else of the best test ELBO)
                           (with ema, both files also hold the weight average,
                           under callbacks/WeightAverage; "model" stays the
                           trained weights, which a resume continues)
      DIR/samples.png, reconstructions.png, levels.png, curves.png   (see plots.py)
      DIR/model.png        the model and the guide as pyro.render_model draws them
                           (where graphviz is installed; else one line says how to get it)
      DIR/tensorboard/     with tensorboard=True (--tensorboard): TensorBoard's event files
                           (tensorboard --logdir DIR/tensorboard; see tensorboard.py)

Checkpoints are written at the end of every epoch, every ``checkpoint_every``
steps, and when SIGINT/SIGTERM stops training; resuming from any of them
continues bitwise as if the run had never stopped (on the CPU).
"""

import contextlib
import json
import sys
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO

from . import data as data_
from . import cells as cells_
from . import distributed, likelihoods, nets, paper_hvae, plots, posteriors, priors, rundir, settings
from .callbacks import (Checkpoint, DataParallel, DivergenceGuard, EarlyStopping, EpochLog, EpochStats, Evaluation,
                        GradientSkip, KeepBest, KLWeight, ProgressBar, WeightAverage)
from .checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, write_text_atomic
from .config import BINARIZE, CLASSES, DATASETS, RunConfig, resolve_device  # noqa: F401 (public here since 0.1)
from .errors import InputError
from .loop import Loop, TrainingDiverged, TrainingInterrupted  # noqa: F401 (public here since 0.1)
from .objectives import BalancedKLELBO, FreeBitsELBO, KLWarmup, SemiSupervisedELBO
from .svi import DataParallelSVI, TorchOptimSVI
from .vae import VAE

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "jit": JitTrace_ELBO}
CLASS_NAMES = {"fashion-mnist": ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                                 "Ankle boot"),
               "mnist": tuple(str(i) for i in range(10)),
               "cifar-10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")}


def build_vae(config, x_shape):
    """The :class:`VAE` that ``config`` (a :class:`RunConfig`) describes, for data of ``x_shape``."""
    likelihood = likelihoods.from_name(config.likelihood, config.gaussian_scale)
    if config.cell_covariates:  # the latent library's prior is per batch, not per covariate
        likelihood.library_groups = len(config.batch_names)
    reads = sum(config.latent_dims) if config.skip else config.latent_dims[-1]  # what the decoder reads
    prior = priors.from_name(config.prior)
    label_level = getattr(prior, "reads_label", False)  # gmvae:K, a discrete level y above z0
    classes = prior.k if label_level else CLASSES if config.labels else 0
    covariates = cells_.width(config)  # count data's batch (one-hot) and continuous covariates
    reads += 0 if label_level else classes + covariates  # the decoder reads the label or batch beside the levels
    if config.arch in paper_hvae.ARCHS:  # a whole chain's networks
        networks = paper_hvae.networks(x_shape, config.latent_dims, config.hidden, likelihood.channels)
    else:
        networks = dict(zip(("encoder", "decoder"), nets.build(config.arch, x_shape, reads, hidden=config.hidden,
                                                               out_channels=likelihood.channels)),
                        posterior=posteriors.from_name(config.posterior))
    if config.dataset == "counts" and config.count_input == "log1p":
        networks["encoder"] = nets.Log1p(networks["encoder"])
    return VAE(latent_dims=config.latent_dims, likelihood=likelihood, beta=config.beta, prior=prior,
               guide=config.guide, hidden=config.hidden, skip=config.skip, condition=classes or covariates,
               label_site=bool(classes), enumerate=config.enumerate, **networks)


def make_elbo(name, num_particles=1, free_bits=0.0, kl_balance=None):
    """A Pyro ELBO by name (``trace``, ``meanfield``, ``jit``); particles are vectorised.

    With ``free_bits > 0``: a :class:`~pyro_vae.objectives.FreeBitsELBO`
    (analytic KL per level for ``meanfield``; ``jit`` is refused); with
    ``kl_balance`` a VAE: a :class:`~pyro_vae.objectives.BalancedKLELBO` that
    balances its levels while its ``kl_weight`` is below 1 (likewise).
    """
    settings.check({"elbo": name, "num_particles": num_particles, "free_bits": free_bits})
    kwargs = dict(num_particles=num_particles, vectorize_particles=num_particles > 1,
                  max_plate_nesting=1)  # the "data" plate
    if free_bits:
        return FreeBitsELBO(free_bits, analytic_kl=name == "meanfield", **kwargs)
    if kl_balance:
        if name == "jit":
            raise InputError("the jit ELBO compiles the loss once and cannot balance the KL; use elbo='trace'")
        return BalancedKLELBO(kl_balance, analytic_kl=name == "meanfield", **kwargs)
    if name == "jit":
        kwargs["ignore_jit_warnings"] = True
    return ELBOS[name](**kwargs)


def fit(vae, x_train, x_test=None, epochs=10, batch_size=256, lr=1e-3, elbo="trace", num_particles=1,
        seed=0, dynamic_binarize=False, grad_clip=None, max_bad_steps=10, checkpoint_every=0,
        kl_warmup=0, free_bits=0.0, progress=True, log=print, checkpoint=None, state=None, callbacks=(),
        kl_balance=False, writer=None, y_train=None, y_test=None, aux_loss=0.0, optimizer="adam"):
    """Train ``vae`` by SVI on ``vae.model`` and ``vae.guide`` with Adam
    (:class:`~pyro_vae.svi.TorchOptimSVI`: ``pyro.infer.SVI``'s step with one
    torch optimizer), in a :class:`~pyro_vae.loop.Loop` with parts around it.

    Args:
        vae: a :class:`VAE`, already on the data's device.
        x_train: training data ``(N, *x_shape)`` on that device, or a ``scipy.sparse`` matrix ``(N, G)``
            of counts (kept on the CPU; each batch is densified and moved to the VAE's device).
        x_test: optional test data ``(M, *x_shape)``; its ELBO per data point
            (one draw of z each) is measured after every epoch
            (:class:`~pyro_vae.callbacks.Evaluation`).
        epochs: the epoch to stop after (counting any resumed ones).
        batch_size, lr: minibatch size and Adam learning rate.
        elbo: ``"trace"``, ``"meanfield"`` (analytic KL) or ``"jit"``.
        num_particles: particles per data point (vectorised when > 1).
        seed: seeds torch, Python, NumPy and the data generator.
        dynamic_binarize: redraw Bernoulli(x) for every batch.
        grad_clip: clip the total gradient norm to this (``None``: off).
        optimizer: ``"adam"`` or ``"adam-normgrad"`` (Adam on each parameter's gradient scaled to unit norm, the
            VampPrior paper's; :class:`~pyro_vae.svi.NormalizedGradAdam`).
        max_bad_steps: stop after this many consecutive steps whose loss or
            gradients were not finite (each such step is skipped: no update),
            or whose loss exploded (:class:`~pyro_vae.callbacks.DivergenceGuard`:
            over 100x the first step's loss per data point).
        checkpoint_every: with ``checkpoint``, also every this many steps.
        kl_warmup: steps of :class:`~pyro_vae.objectives.KLWarmup` (0: off):
            :class:`~pyro_vae.callbacks.KLWeight` sets ``vae.kl_weight =
            min(1, (t + 1) / kl_warmup)`` before the 0-based step t.
        kl_balance: NVAE's KL balancing during the warm-up
            (:class:`~pyro_vae.objectives.BalancedKLELBO`; needs ``kl_warmup``).
        free_bits: KL floor per level in nats (0: off); trains on
            :class:`~pyro_vae.objectives.FreeBitsELBO`, an objective that is
            not a bound.
        progress: show a tqdm bar (:class:`~pyro_vae.callbacks.ProgressBar`).
        log: called with a one-line summary after each epoch (``None``: silent).
        checkpoint: ``checkpoint(state)`` is called with the loop's resumable
            state (:meth:`~pyro_vae.loop.Loop.state_dict`) at the end of every
            epoch, every ``checkpoint_every`` steps, and on SIGINT/SIGTERM
            (:class:`~pyro_vae.callbacks.Checkpoint`).
        state: such a state (or a checkpoint) to resume from: training then
            continues exactly as if it had never stopped.
        callbacks: the user's own :class:`~pyro_vae.callbacks.Callback` parts;
            they run after the metrics are in the epoch record and before the
            log line and the checkpoint, which therefore holds their state.
        writer: log to TensorBoard (:class:`~pyro_vae.tensorboard.TensorBoard`, after
            ``callbacks``): a ``torch.utils.tensorboard.SummaryWriter`` (to resume, make it with
            ``purge_step=state["step"] + 1``), a log directory (the part makes the writer, purging
            on a resume), or a ``TensorBoard`` part; its pictures reconstruct ``x_test`` (else
            ``x_train``). Needs ``pip install 'pyro-vae[tensorboard]'``.
        y_train: labels or covariates of ``x_train``, one row each, handed to ``vae.model(x, y)`` and
            ``vae.guide(x, y)`` batch by batch. A conditional VAE (``condition=K``) needs them: class
            labels ``(N,)`` or floats ``(N, K)``. For an M2 VAE (``label_site=True``) they are class
            labels ``(N,)`` with ``-1`` (:data:`~pyro_vae.data.UNLABELLED`) for an unlabelled point
            (:func:`~pyro_vae.data.balanced_labels` makes such a set): every epoch is then a pass over
            the unlabelled points, the label summed out, with the labelled batches spread among them
            (:class:`~pyro_vae.data.SemiSupervised`); without ``y_train`` every point is unlabelled.
        y_test: the same for ``x_test`` (for M2: its labels, all given; the record adds
            ``test_accuracy``).
        aux_loss: for M2, the weight alpha of the classification term ``alpha * -log q(y | x)`` added
            on labelled batches (:class:`~pyro_vae.objectives.SemiSupervisedELBO`; 0: off). An M2 VAE
            trains on that objective, ``TraceEnum_ELBO`` underneath (``elbo="trace"`` only); its
            ``train_loss`` is the objective trained on, the aux term included (not an ELBO).

    Returns:
        list of per-epoch metric dicts (``epoch``, ``train_loss``,
        ``test_elbo``, ``seconds``, ``kl_weight`` at the epoch's last step, and
        what the parts add), resumed epochs included.

    Raises:
        TrainingDiverged: ``max_bad_steps`` consecutive non-finite steps.
        TrainingInterrupted: SIGINT or SIGTERM (after ``checkpoint`` was called).

    Under ``torchrun`` (a process group of two or more processes, yours or
    :func:`pyro_vae.distributed.init`'s): every rank calls ``fit`` with the
    whole data; ``batch_size`` is the global batch, of which each rank takes
    its share, and the gradients are summed across ranks every step
    (:class:`~pyro_vae.svi.DataParallelSVI`, :class:`~pyro_vae.callbacks.DataParallel`),
    so the steps are those of one process on the whole batch. Each rank draws
    its own noise (``seed + rank``); only rank 0 logs, shows progress and calls
    ``checkpoint``; the held-out ELBO is rank 0's, shared.

    Global state: ``fit`` seeds torch's, Python's and NumPy's RNGs with ``seed``
    (``pyro.set_rng_seed``), and nothing else. It leaves the param store (the
    entries it added are removed at the end) and Pyro's validation as they are;
    the data are checked once, up front (:meth:`VAE.data_checked`), and
    ``pyro.enable_validation(False)`` skips the distributions' own checks.
    """
    settings.check(dict(epochs=epochs, seed=seed, lr=lr, elbo=elbo, num_particles=num_particles, grad_clip=grad_clip,
                        max_bad_steps=max_bad_steps, kl_warmup=kl_warmup, free_bits=free_bits,
                        checkpoint_every=checkpoint_every, kl_balance=kl_balance, optimizer=optimizer))
    vae.check_data(x_train)
    if x_test is not None:
        vae.check_data(x_test)
    if y_test is not None and x_test is None:
        raise InputError("y_test labels x_test, which was not given; pass x_test too, or leave y_test out")
    y_train, y_test = _checked_labels(vae, y_train, x_train, "y_train"), _checked_labels(vae, y_test, x_test, "y_test")
    m2 = getattr(vae, "label_site", False)
    if aux_loss and not m2:
        raise InputError("aux_loss trains the classifier q(y | x) of an M2 VAE; build the VAE with condition=K and "
                         "label_site=True, or drop aux_loss")
    if m2:
        labelled = int(y_train is not None and bool((y_train != data_.UNLABELLED).any()))
        settings.check({"aux_loss": aux_loss, "labels": labelled, "free_bits": free_bits, "kl_balance": kl_balance,
                        "elbo": elbo})
    device = vae.device if data_.is_sparse(x_train) else x_train.device  # sparse rows go where the VAE is
    group = distributed.current() or distributed.init(str(device))  # under torchrun: its group
    if group is not None and (free_bits or kl_balance):
        raise InputError("free bits and KL balancing weigh each level's KL averaged over the batch, which under "
                         "torchrun would be each process's share of it (not the one-process objective); train "
                         "without --free-bits and --kl-balance, or in one process")
    if group is not None and batch_size < group.size:
        raise InputError(f"batch size {batch_size} is smaller than the {group.size} processes, which each take a "
                         f"share of every batch; use a batch size of {group.size} or more")
    pyro.set_rng_seed(seed + (group.rank if group else 0))  # under torchrun every rank draws its own noise
    generator = torch.Generator(device=device).manual_seed(seed)  # the same batches on every rank
    data = _batch_source(vae, x_train, y_train, batch_size, generator, dynamic_binarize)
    loss_fn = (SemiSupervisedELBO(vae, aux_loss, num_particles) if m2
               else make_elbo(elbo, num_particles, free_bits, vae if kl_balance else None))
    vae.check_elbo(loss_fn)
    svi = (DataParallelSVI if group else TorchOptimSVI)(vae.model, vae.guide, loss_fn, lr, grad_clip=grad_clip,
                                                        optimizer=optimizer)
    parts = ([DataParallel(group)] if group else []) + [DivergenceGuard(patience=max_bad_steps)]
    parts += [KLWeight(KLWarmup(kl_warmup))] if kl_warmup else []
    parts += [EpochStats()] + ([Evaluation(x_test, "test", y=y_test)] if x_test is not None else []) + list(callbacks)
    parts += [] if writer is None else [_tensorboard_part(writer, x_train if x_test is None else x_test)]
    main = group is None or group.main  # under torchrun only rank 0 logs, shows progress and saves
    parts += [EpochLog(log, unit_of(vae))] if log is not None and main else []
    parts += [ProgressBar()] if progress and main else []
    parts += [Checkpoint(distributed.on_main(checkpoint), checkpoint_every)] if checkpoint is not None else []
    with _store_entries_dropped(vae):
        return Loop(vae, svi, data, epochs, parts, max_bad_steps).run(state)


def _batches_per_epoch(n, batch_size, labels=None):
    """Steps in an epoch of ``n`` points: ``ceil(n / B)``, or for partly labelled M2 data the labelled and
    the unlabelled parts' batches (:class:`~pyro_vae.data.SemiSupervised`)."""
    if labels is None or not bool((labels == data_.UNLABELLED).any()):
        return -(-n // batch_size)
    labelled = int((labels != data_.UNLABELLED).sum())
    return -(-labelled // batch_size) + -(-(n - labelled) // batch_size)


def _checked_labels(vae, y, x, name):
    """``fit``'s ``y_train``/``y_test`` checked against the VAE and moved to ``x``'s device (``None`` stays)."""
    if x is None:
        return None
    condition, m2 = getattr(vae, "condition", 0), getattr(vae, "label_site", False)
    if y is None:
        if condition and not m2:
            raise InputError(f"this VAE is conditional (condition={condition}): give {name}, the labels (N,) or "
                             f"covariates (N, {condition}) of its data")
        return None
    if not condition:
        raise InputError(f"{name} was given to a VAE without conditioning; build it with condition=K, or leave "
                         f"{name} out")
    y = data_.rows_of(y, x.shape[0], name).to(vae.device if data_.is_sparse(x) else x.device)
    if not m2:
        vae.conditioning(y, x.shape[0])  # the VAE's own check, with its one-line message
    elif y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
        raise InputError(f"{name} of an M2 VAE holds class labels: an integer tensor ({x.shape[0]},), -1 for an "
                         f"unlabelled point; got {y.dtype} of shape {tuple(y.shape)}")
    elif len(y) and (int(y.min()) < data_.UNLABELLED or int(y.max()) >= condition):
        raise InputError(f"{name} must hold labels in 0..{condition - 1}, or -1 for an unlabelled point; got "
                         f"values in {int(y.min())}..{int(y.max())}")
    elif name == "y_test" and bool((y == data_.UNLABELLED).any()):
        raise InputError("y_test must label every test point (its accuracy is measured against them)")
    return y


def _batch_source(vae, x, y, batch_size, generator, dynamic_binarize):
    """``fit``'s batches: plain, labelled pairs, or an M2 run's labelled and unlabelled batches."""
    if y is not None and getattr(vae, "label_site", False) and bool((y == data_.UNLABELLED).any()):
        return data_.SemiSupervised(x, y, batch_size, generator, dynamic_binarize=dynamic_binarize)
    return data_.Batches(x, batch_size, generator, dynamic_binarize=dynamic_binarize, y=y)


def _tensorboard_part(writer, images):
    """``fit``'s ``writer=``: a :class:`~pyro_vae.tensorboard.TensorBoard` part as given, or one around it."""
    from .tensorboard import TensorBoard

    return writer if isinstance(writer, TensorBoard) else TensorBoard(writer, images=images)


def _save_model_graph(vae, x, path, y=None):
    """``model.png`` (:func:`pyro_vae.plots.save_model_graph`), or one line on stderr saying why not."""
    try:
        plots.save_model_graph(vae, x, path, y)
    except InputError as err:
        from tqdm.auto import tqdm

        tqdm.write(f"pyro-vae: {path.name} not written: {err}", file=sys.stderr)


@contextlib.contextmanager
def _store_entries_dropped(vae):
    """Leave Pyro's param store as it was: the entries ``vae`` registers within are removed at the end
    (they would keep every trained VAE alive)."""
    store = pyro.get_param_store()
    before = set(store.keys())
    try:
        yield
    finally:
        prefix = f"{getattr(vae, 'name', None)}$$$"
        for key in [k for k in store.keys() if k.startswith(prefix) and k not in before]:
            del store[key]


# -------------------------------------------------------------------- runs
def is_image(vae):
    """Whether the VAE's data are images ``(C, H, W)``, which the picture files show."""
    return vae.x_shape is not None and len(vae.x_shape) == 3


def unit_of(vae):
    """What one data point of ``vae`` is called in messages: ``"image"``, ``"cell"`` (a count likelihood)
    or ``"data point"``."""
    if is_image(vae):
        return "image"
    counts = (likelihoods.Poisson, likelihoods.NegativeBinomial, likelihoods.ScaledCounts)
    return "cell" if isinstance(vae.likelihood, counts) else "data point"


def load_splits(config, device):
    """``(x_train, x_val, x_test)`` of :func:`load_labelled_splits`, without the labels."""
    return tuple(None if part is None else part[0] for part in load_labelled_splits(config, device))


def load_labelled_splits(config, device):
    """``((x_train, y_train), (x_val, y_val) or None, (x_test, y_test))`` for a :class:`RunConfig`, the
    data binarised as it says, on ``device``; the labels ``(N,)`` are the data set's classes (``None``
    for data without them). For a semi-supervised run (``config.labels``) ``y_train`` keeps that many
    labels, balanced and seeded (:func:`~pyro_vae.data.balanced_labels`), -1 for the rest.

    ``x_val`` is ``None`` without ``config.val_size``; otherwise it is the
    **last** ``val_size`` points of the training set (the VampPrior paper's
    protocol: images 50 000-59 999 of Fashion-MNIST's 60 000), which are then
    not trained on. The test set is Fashion-MNIST's own 10 000 images (MNIST's,
    CIFAR-10's; for count data, an image folder or an image tensor file: the
    first 10% of a shuffle seeded by ``seed + 1``, at least one point). Held-out
    sets are binarised once, with fixed seeds (test ``seed + 1``, validation
    ``seed + 2``), so every epoch and every evaluation reads the same bits.
    With ``squeeze`` every set is then mapped into [eps, 1 - eps] (:func:`squeeze`).
    """
    if config.dataset in ("counts", *data_.LOCAL_IMAGES):  # one file or folder: a seeded 10% is the test set
        if config.dataset == "folder":
            x = data_.load_folder(config.data_dir, config.image_size, config.channels)[0]
        elif config.dataset == "tensor":
            x = data_.load_image_tensor(config.data_file, config.image_size, config.channels)
        else:  # kept sparse: training densifies a batch at a time, the held-out rows once
            cells = cells_.read_cells(config.data_file, config.transpose, config.layer)
            x = cells.x
            if cells.named_genes and not config.genes:  # kept, so that other files' genes are matched by name
                config.genes = list(cells.genes)
            _say_counts(config, x.shape)
        if x.shape[0] < 2:
            raise InputError(f"{config.data_file} holds {x.shape[0]} row; training and a test set need 2 or more")
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed + 1))
        n_test = max(1, x.shape[0] // 10)
        x_train, x_test = _rows(x, order[n_test:]), _dense(_rows(x, order[:n_test]))
        y_train = y_val = y_test = None
        if config.cell_covariates:  # the cells' batches and covariates, cut as the cells are
            fit = order[n_test:]  # covariates are standardised on the training cells
            fit = fit[:-config.val_size] if 0 < config.val_size < len(fit) else fit
            y = cells_.conditioning(config, cells, fit_rows=fit.numpy())
            y_train, y_test = y[order[n_test:]], y[order[:n_test]]
    else:
        x_train, y_train, x_test, y_test = data_.load_images(config.dataset, config.data_dir,
                                                             image_size=config.image_size, channels=config.channels)
    x_val = y_val = None
    if config.val_size:
        if config.val_size >= x_train.shape[0]:
            raise InputError(f"val_size {config.val_size} leaves nothing to train on ({x_train.shape[0]} training "
                             f"points); use --val-size {x_train.shape[0] // 6} or less")
        x_train, x_val = x_train[:-config.val_size], _dense(x_train[-config.val_size:])
        if y_train is not None:
            y_train, y_val = y_train[:-config.val_size], y_train[-config.val_size:]
    if config.labels:
        if config.labels > x_train.shape[0]:
            raise InputError(f"--labels {config.labels} asks for more labelled images than the {x_train.shape[0]} "
                             f"trained on; use --labels {x_train.shape[0]} or less")
        y_train = data_.balanced_labels(y_train, config.labels, seed=config.seed, classes=CLASSES)
    if config.binarize != "none":
        g = torch.Generator().manual_seed(config.seed + 1)
        x_test = data_.binarize(x_test, g)
        if config.binarize == "fixed":
            x_train = data_.binarize(x_train, g)
        if x_val is not None:
            x_val = data_.binarize(x_val, torch.Generator().manual_seed(config.seed + 2))
    if config.squeeze:  # [0, 1] -> [eps, 1 - eps], for likelihoods whose support is the open interval
        x_train, x_test = squeeze(x_train, config.squeeze), squeeze(x_test, config.squeeze)
        x_val = None if x_val is None else squeeze(x_val, config.squeeze)
    def on(x, y):  # a sparse training matrix stays on the CPU (Batches moves each batch)
        return x if data_.is_sparse(x) else x.to(device), None if y is None else y.to(device)

    return on(x_train, y_train), None if x_val is None else on(x_val, y_val), on(x_test, y_test)


def _rows(x, index):
    """Rows ``index`` of a count matrix: a sparse matrix's rows stay sparse for training (``index`` of the
    training rows) and are densified for the held-out sets (see :func:`_dense`)."""
    return x[index.numpy()] if data_.is_sparse(x) else x[index]


def _dense(x):
    """A held-out set as a dense float32 tensor (a sparse one densified once)."""
    return torch.from_numpy(x.toarray()).float() if data_.is_sparse(x) else x


def _say_counts(config, shape):
    """One line on stdout, ``N cells x G genes (FILE)``, and one on stderr where the matrix looks transposed."""
    if not distributed.is_main():
        return
    from tqdm.auto import tqdm

    tqdm.write(f"{shape[0]} cells x {shape[1]} genes ({config.data_file})")
    hint = data_.orientation_hint(config.data_file, shape, config.transpose)
    if hint:
        tqdm.write(f"pyro-vae: {hint}", file=sys.stderr)


def squeeze(x, eps):
    """``eps + (1 - 2 eps) x``: data in [0, 1] mapped into [eps, 1 - eps]. A density of the squeezed
    data y is one of x after adding ``x[0].numel() * log(1 - 2 eps)`` nats (the change of variables)."""
    return eps + (1 - 2 * eps) * x


def load_data(config, device):
    """``(x_train, x_test)`` of :func:`load_splits` (without the validation split's points)."""
    x_train, _, x_test = load_splits(config, device)
    return x_train, x_test


RUN_KEYS = {"model": dict, "config": dict, "x_shape": (list, tuple), "epoch": int}


def load_run_checkpoint(path):
    """A run's checkpoint, loaded (never running code from it) and checked: the keys a run holds, with
    their types, and a valid configuration (:meth:`RunConfig.from_checkpoint`); refused naming ``path``."""
    payload = load_checkpoint(path)
    for key, kind in RUN_KEYS.items():
        if not isinstance(payload.get(key), kind):
            problem = "lacks" if key not in payload else f"has a {type(payload[key]).__name__} as"
            raise InputError(f"{path} {problem} '{key}', which every run checkpoint holds; it was not written "
                             "by pyro-vae train, or it is damaged: train again with --overwrite")
    if not all(isinstance(s, int) and s > 0 for s in payload["x_shape"]):
        raise InputError(f"{path} has x_shape {payload['x_shape']!r}, not a shape of positive sizes; train again "
                         "with --overwrite")
    RunConfig.from_checkpoint(payload, path)
    return payload


def load_weights(vae, payload, path):
    """``vae.load_state_dict(payload["model"])``; weights that do not fit the model are refused naming ``path``."""
    try:
        vae.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()
        raise InputError(f"{path} holds weights that do not fit the model its configuration describes "
                         f"({first[-1].strip() if first else type(err).__name__}); train again with --overwrite") \
            from None


def averaged_weights(payload):
    """The :class:`~pyro_vae.callbacks.WeightAverage` weights a checkpoint holds (a VAE ``state_dict``),
    or ``None`` for a run trained without ``ema``."""
    parts = payload.get("callbacks")
    average = parts.get("WeightAverage") if isinstance(parts, dict) else None
    return average.get("weights") if isinstance(average, dict) else None


def checkpoint_name(run_dir, config, asked=None):
    """Which checkpoint of a run to read: ``asked`` ``"best"`` (``best.pt``) or ``"last"``
    (``checkpoint.pt``); by default ``best.pt`` where the run kept it on a validation split (never an epoch
    chosen on the test set), else ``checkpoint.pt``."""
    if asked not in (None, "best", "last"):
        raise InputError(f"--checkpoint must be best or last, got {asked!r}")
    best = asked == "best" or (asked is None and config.val_size and config.keep_best
                               and (Path(run_dir) / "best.pt").exists())
    return "best.pt" if best else "checkpoint.pt"


def load_run(out_dir, device=None, checkpoint="checkpoint.pt", averaged=True):
    """The trained :class:`VAE` and :class:`RunConfig` stored in a run directory (its ``checkpoint``
    file: ``checkpoint.pt``, the last state, or ``best.pt``, the best validation epoch's).

    For a run trained with ``ema`` the VAE holds the weight average (the weights its held-out ELBO
    was measured with), unless ``averaged=False`` asks for the trained weights."""
    path = Path(out_dir) / checkpoint
    return run_from_checkpoint(load_run_checkpoint(path), path, device, averaged)


def run_from_checkpoint(payload, path, device=None, averaged=True):
    """:func:`load_run` for a checkpoint already loaded by :func:`load_run_checkpoint` from ``path``:
    the :class:`VAE` (on ``device``, else the run's) and its :class:`RunConfig`."""
    config = RunConfig.from_checkpoint(payload, path)
    if device is not None:
        config.device = device
    device = resolve_device(config.device)
    vae = build_vae(config, tuple(payload["x_shape"]))
    average = averaged_weights(payload) if averaged else None
    load_weights(vae, payload if average is None else {"model": average}, path)
    return vae.to(device), config


def _training_aids(config):
    """The parts that change the updates or the weights evaluated: ``skip_grad_norm``'s
    :class:`GradientSkip` and ``ema``'s :class:`WeightAverage` (none when both are 0)."""
    return ([GradientSkip(config.skip_grad_norm)] if config.skip_grad_norm else []) + \
        ([WeightAverage(config.ema)] if config.ema else [])


def _selection_parts(config, x_val, run, callbacks, y_val=None):
    """The parts that choose (early stopping, the best checkpoint): they read the validation ELBO where a
    validation split exists (the test set is then read only by ``evaluate``), else the test ELBO."""
    if x_val is None:
        return [*callbacks, *([KeepBest(distributed.on_main(run.save_best), "test_elbo")] if config.keep_best else [])]
    return [Evaluation(x_val, "val", y=y_val), *callbacks,
            *([EarlyStopping("val_elbo", config.patience)] if config.patience else []),
            *([KeepBest(distributed.on_main(run.save_best), "val_elbo")] if config.keep_best else [])]


class RunDirectory:
    """Writes a run's files: ``checkpoint.pt`` (then ``metrics.jsonl``, which never runs ahead of it) and
    ``best.pt``, each atomically; a checkpoint is the loop's state plus the run's config and data shape."""

    def __init__(self, out, config, x_shape):
        self.out, self.config, self.x_shape = Path(out), config, list(x_shape)

    def payload(self, state):
        return {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "x_shape": self.x_shape, **state}

    def save(self, state):
        """Write ``checkpoint.pt`` and ``metrics.jsonl`` for a loop state."""
        save_checkpoint(self.out / "checkpoint.pt", self.payload(state))
        write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))

    def save_best(self, state):
        """Write ``best.pt`` for a loop state."""
        save_checkpoint(self.out / "best.pt", self.payload(state))


def train(config, out_dir, resume=False, overwrite=False, progress=True, pictures=True, callbacks=(),
          tensorboard=False):
    """Run :func:`fit` for a :class:`RunConfig` and keep the run directory ``out_dir``.

    Args:
        config: a :class:`RunConfig` (or dict of its fields).
        out_dir: the run directory (created if needed).
        resume: continue the run in ``out_dir`` up to ``config.epochs``.
        overwrite: replace another run's files in ``out_dir``.
        pictures: write ``curves.png`` at the end and, for images,
            ``samples.png``, ``reconstructions.png`` and ``levels.png`` (and with a VampPrior
            ``pseudo_inputs.png``, :func:`~pyro_vae.plots.save_pseudo_inputs`).
        callbacks: the user's own parts, as in :func:`fit`; their state is
            in ``checkpoint.pt``, so give the same parts again to resume.
        tensorboard: log to TensorBoard in ``out_dir/tensorboard``
            (:class:`~pyro_vae.tensorboard.TensorBoard`; give it again to resume (the command line does
            that itself for a run whose directory has one): the stream goes on
            from the checkpoint's step). Needs ``pip install 'pyro-vae[tensorboard]'``.

    Returns:
        ``(vae, history)``; with ``config.ema`` the VAE holds the weight average.

    Raises:
        InputError: bad settings, an occupied ``out_dir`` without ``resume`` or
            ``overwrite``, or a resume whose model settings differ from the run's.
    """
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    distributed.init(config.device)  # under torchrun: join the group (else nothing)
    main = distributed.is_main()  # rank 0 checks first, locks and writes; see distributed.main_first

    def check():
        config.validate()
        if resume and overwrite:
            raise InputError("choose one of resume and overwrite, not both")
        if tensorboard:
            from .tensorboard import summary_writer_class

            summary_writer_class()  # the tensorboard package, before anything is written
        made = main and rundir.prepare(out_dir)  # the output location is checked before any data are loaded
        if main:
            try:
                lock.enter_context(rundir.RunLock(out_dir))  # refused here, so every rank hears of it
            except InputError:
                if made:
                    rundir.remove_if_unused(Path(out_dir))
                raise
        return made

    out = Path(out_dir)
    with contextlib.ExitStack() as lock:
        created = distributed.main_first(check)
        try:
            state, splits, vae = distributed.main_first(lambda: _prepare_run(config, out, resume, overwrite))
        except InputError:
            if created:
                rundir.remove_if_unused(out)
            raise
        return _run(config, out, state, vae, splits, progress, pictures and main, callbacks, tensorboard)


def _prepare_run(config, out, resume, overwrite):
    """Everything that can refuse a run, before anything is written: ``(state, splits, vae)`` (the splits
    of :func:`load_labelled_splits`)."""
    ckpt_path = out / "checkpoint.pt"
    state = None
    if resume:
        state = load_run_checkpoint(ckpt_path)
        config.check_resume(RunConfig.from_checkpoint(state, ckpt_path), int(state.get("batch", 0)) > 0, out)
    elif ckpt_path.exists() and not overwrite:
        raise InputError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    device = resolve_device(config.device)
    splits = load_labelled_splits(config, device)
    x_train, x_val, x_test = (None if part is None else part[0] for part in splits)
    if config.batch_size > x_train.shape[0]:
        raise InputError(f"batch size {config.batch_size} is larger than the data ({x_train.shape[0]} points); "
                         f"use --batch-size {x_train.shape[0]} or less")
    for name, x in (("test", x_test), ("validation", x_val)):
        if x is not None and x.shape[1:] != x_train.shape[1:]:
            raise InputError(f"the {name} data have shape {tuple(x.shape[1:])} per point but the training data "
                             f"{tuple(x_train.shape[1:])}; give both sets in one shape")
    pyro.set_rng_seed(config.seed)  # the initial weights depend on the seed alone
    vae = build_vae(config, tuple(x_train.shape[1:])).to(device)
    vae.check_data(x_train)
    if state is not None:
        load_weights(vae, state, ckpt_path)
    return state, splits, vae


def _run(config, out, state, vae, splits, progress, pictures, callbacks, tensorboard=False):
    """Train in the locked run directory ``out`` on ``splits`` (:func:`load_labelled_splits`) and write its
    files."""
    (x_train, y_train), (x_test, y_test) = splits[0], splits[2]
    x_val, y_val = splits[1] if splits[1] is not None else (None, None)
    m2 = bool(config.labels)
    conditioned = m2 or config.cell_covariates  # the labels, or the cells' batches and covariates
    if distributed.is_main():
        if state is None:  # a new run (or --overwrite): nothing of an old run may be taken for this one's
            for stale in ("checkpoint.pt", "best.pt", "metrics.jsonl", "eval.json"):
                (out / stale).unlink(missing_ok=True)
            for stale in (out / "tensorboard").glob("events.out.tfevents.*"):
                stale.unlink(missing_ok=True)
            if not tensorboard and (out / "tensorboard").is_dir() and not any((out / "tensorboard").iterdir()):
                (out / "tensorboard").rmdir()  # a resume of this run must not take up an old run's logging
        write_text_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    if state is None and getattr(vae.likelihood, "library_site", False):  # scVI's prior of the latent library
        vae.likelihood.library_prior_from(x_train, cells_.batch_index(config, y_train))
    run = RunDirectory(out, config, x_train.shape[1:])
    aids = _training_aids(config)
    parts = aids + _selection_parts(config, x_val, run, callbacks, y_val if conditioned else None)
    warmup = config.kl_warmup or config.kl_warmup_epochs * _batches_per_epoch(x_train.shape[0], config.batch_size,
                                                                              y_train if m2 else None)
    board = _tensorboard_part(out / "tensorboard", x_test if x_val is None else x_val) if tensorboard else None
    history = fit(vae, x_train, None if x_val is not None else x_test, epochs=config.epochs,
                  batch_size=config.batch_size, lr=config.lr, optimizer=config.optimizer,
                  elbo=config.elbo, num_particles=config.num_particles, seed=config.seed,
                  dynamic_binarize=config.binarize == "dynamic", grad_clip=config.grad_clip or None,
                  max_bad_steps=config.max_bad_steps, checkpoint_every=config.checkpoint_every,
                  kl_warmup=warmup, free_bits=config.free_bits, kl_balance=config.kl_balance, progress=progress,
                  checkpoint=run.save, state=state, callbacks=parts, writer=board,
                  y_train=y_train if conditioned else None,
                  y_test=y_test if conditioned and x_val is None else None,
                  aux_loss=config.aux_loss)
    for part in aids:  # the pictures and the VAE returned hold the weight average, as load_run's does
        if isinstance(part, WeightAverage):
            part.copy_to(vae)
    if pictures:
        _save_model_graph(vae, _dense(x_train[:2]).to(vae.device), out / "model.png",
                          y_train[:2] if config.cell_covariates else None)
        if is_image(vae):
            plots.save_samples(vae, out / "samples.png")
            shown = x_test if x_val is None else x_val  # with a validation split, the test set waits for evaluate
            plots.save_reconstructions(vae, shown, out / "reconstructions.png")
            plots.save_levels(vae, shown, out / "levels.png")
            if hasattr(vae.prior, "images"):  # a VampPrior: what its pseudo-inputs have become
                plots.save_pseudo_inputs(vae, out / "pseudo_inputs.png")
            if m2:
                plots.save_classes(vae, out / "classes.png", names=CLASS_NAMES.get(config.dataset))
        plots.save_curves(out / "metrics.jsonl", out / "curves.png")
        if len(vae.latent_dims) > 1:
            plots.save_level_curves(out / "metrics.jsonl", out / "kl_levels.png")
    distributed.barrier()  # under torchrun: no rank returns before rank 0 has written the run's files
    return vae, history
