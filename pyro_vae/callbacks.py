"""The parts around the training loop (:class:`~pyro_vae.loop.Loop`).

A part subclasses :class:`Callback` and overrides the hooks it needs; each
hook gets the loop (``loop.vae``, ``loop.epoch``, ``loop.step``,
``loop.record``, ``loop.should_stop``, ...). A part with state returns it
from :meth:`Callback.state_dict` (tensors and plain values) and takes it back
in :meth:`Callback.load_state_dict`: the checkpoint holds it, so a resume is
bitwise exact with any set of parts.

Built in (what :func:`pyro_vae.fit` assembles from its keywords):

========================  ======================================================
:class:`KLWeight`         sets ``vae.kl_weight`` from a schedule before each step
:class:`DivergenceGuard`  stops a run whose loss explodes while staying finite
:class:`EpochStats`       ``train_loss``, ``seconds``, ``kl_weight`` of each epoch
:class:`Evaluation`       ``test_elbo`` and ``test_kl_*`` on held-out data
:class:`EarlyStopping`    stops when a metric has not improved for ``patience``
:class:`ProgressBar`      a tqdm bar per epoch
:class:`EpochLog`         one line per epoch
:class:`Checkpoint`       hands the loop's state to ``save`` every N steps, every
                          epoch, on SIGINT/SIGTERM and after an early stop
:class:`KeepBest`         hands the state to ``save`` when a metric is the best yet
:class:`DataParallel`     one process of a ``torchrun`` group: rank 0's weights at
                          the start, the stop signals every rank agrees on, every
                          rank's RNG in the checkpoint
========================  ======================================================

Training aids (VDVAE's), which :func:`pyro_vae.train.train` adds for ``--skip-grad-norm`` and
``--ema`` and a Python user passes in ``callbacks=[...]``:

========================  ======================================================
:class:`GradientSkip`     skips updates whose gradient norm exceeds a threshold
:class:`WeightAverage`    an exponential moving average of the weights, which
                          held-out data are evaluated with (:func:`evaluation_weights`)
========================  ======================================================
"""

import contextlib
import hashlib
import math
import time

import pyro
import torch

from . import distributed, settings
from .checkpoints import rng_state, set_rng_state
from .data import batch_points
from .errors import InputError
from .evaluate import accuracy, elbo_terms, level_order, level_record
from .loop import TrainingDiverged


class Callback:
    """A part of the training loop; every hook does nothing unless overridden.

    Hooks, in the order the loop calls them (see :mod:`pyro_vae.loop`):
    ``on_fit_start(loop)``, ``on_epoch_start(loop)``,
    ``on_step_start(loop, batch)``, ``on_step_end(loop, batch, loss)`` (``loss``
    the step's loss in nats for the batch, ``None`` if the non-finite guard
    skipped it), ``on_epoch_end(loop)`` (``loop.record`` is the epoch's record,
    already in ``loop.history``: add metrics to it), ``on_interrupt(loop,
    signum)``, ``on_fit_end(loop)``, ``on_exception(loop, error)``.
    """

    @property
    def state_key(self):
        """The name of this part's state in a checkpoint (the class name; override for two of a kind)."""
        return type(self).__qualname__

    def state_dict(self):
        """This part's state to keep in a checkpoint, or ``None`` for a part without state."""
        return None

    def load_state_dict(self, state):
        """Take back what :meth:`state_dict` returned."""

    def on_fit_start(self, loop):
        pass

    def on_epoch_start(self, loop):
        pass

    def on_step_start(self, loop, batch):
        pass

    def on_step_end(self, loop, batch, loss):
        pass

    def on_epoch_end(self, loop):
        pass

    def on_interrupt(self, loop, signum):
        pass

    def on_fit_end(self, loop):
        pass

    def on_exception(self, loop, error):
        pass


class KLWeight(Callback):
    """Sets ``vae.kl_weight = schedule(step)`` before each 0-based step; back to 1 when the fit ends.

    ``schedule`` is a callable such as :class:`pyro_vae.objectives.KLWarmup`;
    its position is the loop's step count, so a resume continues it.
    """

    def __init__(self, schedule):
        if not callable(schedule):
            raise InputError(f"KLWeight needs a callable schedule step -> weight, got {type(schedule).__name__}; "
                             "pass e.g. pyro_vae.objectives.KLWarmup(10000)")
        self.schedule = schedule

    def on_fit_start(self, loop):
        if loop.step:  # resumed: the weight of the last step taken (an epoch's record may be due before a step)
            loop.vae.kl_weight = self.schedule(loop.step - 1)

    def on_step_start(self, loop, batch):
        loop.vae.kl_weight = self.schedule(loop.step)

    def on_fit_end(self, loop):
        loop.vae.kl_weight = 1.0

    def on_exception(self, loop, error):
        loop.vae.kl_weight = 1.0


class DivergenceGuard(Callback):
    """Stops a run whose loss explodes but stays finite (which the loop's non-finite guard cannot see).

    The rule: the reference is the mean loss per data point of the run's first ``reference_steps`` good
    steps (by default the first step's: the untrained model's, before any update could blow it up); a step
    whose loss per data point exceeds ``factor * max(|reference|, 1)`` nats is exploding;
    ``patience`` exploding steps in a row raise :class:`~pyro_vae.loop.TrainingDiverged`, before the
    checkpoint part runs for that step, so the last checkpoint written is kept.
    """

    def __init__(self, factor=100.0, patience=10, reference_steps=1):
        self.factor, self.patience, self.reference_steps = float(factor), int(patience), int(reference_steps)
        self.total, self.count, self.streak = 0.0, 0, 0

    def state_dict(self):
        return {"total": self.total, "count": self.count, "streak": self.streak}

    def load_state_dict(self, state):
        self.total, self.count, self.streak = float(state["total"]), int(state["count"]), int(state["streak"])

    def on_step_end(self, loop, batch, loss):
        if loss is None:
            return
        per_point = loss / batch_points(batch)
        if self.count < self.reference_steps:
            self.total += per_point
            self.count += 1
            return
        reference = self.total / self.count
        limit = self.factor * max(abs(reference), 1.0)
        self.streak = self.streak + 1 if per_point > limit else 0
        if self.streak >= self.patience:
            raise TrainingDiverged(
                f"the loss exploded: {per_point:.4g} nats per data point at step {loop.step}, over {self.factor:g}x "
                f"the first {self.count} steps' {reference:.4g} for {self.streak} steps in a row. The last "
                "checkpoint is kept. Lower the learning rate (--lr) or set --grad-clip, then resume")


class EpochStats(Callback):
    """Adds ``train_loss`` (the loss trained on, nats per data point, averaged over the epoch's good
    steps), ``seconds`` (the epoch's wall time, across a resume) and ``kl_weight`` (at the epoch's last
    step) to each epoch's record."""

    def __init__(self):
        self.total, self.seen, self.seconds, self._started = 0.0, 0, 0.0, None

    def state_dict(self):
        return {"total": self.total, "seen": self.seen, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.total, self.seen, self.seconds = float(state["total"]), int(state["seen"]), float(state["seconds"])

    def on_epoch_start(self, loop):
        self._started = time.perf_counter() - self.seconds

    def on_step_end(self, loop, batch, loss):
        if loss is not None:
            self.total += loss
            self.seen += batch_points(batch)
        self.seconds = time.perf_counter() - self._started

    def on_epoch_end(self, loop):
        loop.record.update(train_loss=self.total / self.seen if self.seen else math.nan,
                           seconds=time.perf_counter() - self._started, kl_weight=loop.vae.kl_weight)
        self.total, self.seen, self.seconds = 0.0, 0, 0.0


class Evaluation(Callback):
    """Adds ``{prefix}_elbo`` and, per level, ``{prefix}_kl_z0``, ``{prefix}_kl_z1``, ... (each level's
    share of the KL, nats per data point), ``{prefix}_active_units_z<l>`` and ``{prefix}_unit_kl_z<l>``
    (nats per unit, where defined; see :func:`~pyro_vae.evaluate.level_record`), from one draw of z
    per data point of ``x`` (two for a guide that does not draw in the model's order, such as the
    bottom-up guide, whose active units are read from draws: the ELBO is then their average), to each
    epoch's record: how the levels collapse, or not, over training.

    Args:
        x: held-out data ``(M, *x_shape)`` on the training device.
        prefix: the metrics' prefix (``"test"``, ``"val"``).
        every: evaluate every this many epochs (and at the last).
        y: the labels or covariates of ``x`` for a conditional VAE (``(M,)`` or ``(M, K)``), which
            the ELBO is then conditional on; for an M2 VAE (``label_site=True``) the labels it
            classifies: the ELBO sums the label out and ``{prefix}_accuracy`` is added.

    With a :class:`WeightAverage` part in the loop, the averaged weights are evaluated. Under
    ``torchrun`` rank 0 evaluates and every rank gets its numbers (so that every rank chooses alike).
    """

    def __init__(self, x, prefix="test", every=1, y=None):
        self.x, self.prefix, self.every, self.y = x, prefix, int(every), y
        self._draws = None

    @property
    def state_key(self):
        return f"Evaluation[{self.prefix}]"

    def on_epoch_end(self, loop):
        if loop.epoch % self.every and loop.epoch < loop.epochs:
            return
        loop.record.update(distributed.from_main(lambda: self._measure(loop)))  # under torchrun: rank 0's

    def _measure(self, loop):
        was_training = loop.vae.training
        loop.vae.eval()
        labels, y = (self.y, None) if getattr(loop.vae, "label_site", False) else (None, self.y)
        with evaluation_weights(loop):
            if self._draws is None:  # two where the active units come from draws (see evaluate.active_units)
                self._draws = 1 if level_order(loop.vae, self.x, y=y) == "model" else 2
            terms = elbo_terms(loop.vae, self.x, num_samples=self._draws, moments=self.x.shape[0] >= 2, y=y)
            record = {f"{self.prefix}_elbo": float(terms["elbo"].mean()), **level_record(terms, self.prefix)}
            if labels is not None:
                record[f"{self.prefix}_accuracy"] = accuracy(loop.vae, self.x, labels)
        loop.vae.train(was_training)
        return record


class _Monitor:
    """The best value of one metric of the epoch records, higher or lower being better."""

    def __init__(self, monitor, mode):
        if mode not in ("max", "min"):
            raise InputError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best = None

    def value(self, loop):
        if self.monitor not in loop.record:
            raise InputError(f"no {self.monitor!r} in the epoch's metrics (they are: {', '.join(loop.record)}); "
                             "give held-out data to evaluate, or monitor another metric")
        return loop.record[self.monitor]

    def improved(self, value, min_delta=0.0):
        if self.best is None:
            return True
        return value > self.best + min_delta if self.mode == "max" else value < self.best - min_delta


class EarlyStopping(Callback):
    """Stops training when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    Args:
        monitor: a metric of the epoch records (e.g. ``"val_elbo"``, ``"test_elbo"``).
        patience: epochs without improvement before stopping (>= 1).
        mode: ``"max"`` (an ELBO) or ``"min"`` (a loss).
        min_delta: the smallest change that counts as an improvement.

    Its state (best value, epochs waited, whether it stopped) is in the
    checkpoint: a resumed run that had stopped stays stopped.
    """

    def __init__(self, monitor="val_elbo", patience=10, mode="max", min_delta=0.0):
        if not (isinstance(patience, int) and patience >= 1):
            raise InputError(f"patience must be a positive integer number of epochs, got {patience!r}")
        self._monitor = _Monitor(monitor, mode)
        self.patience, self.min_delta = patience, float(min_delta)
        self.wait, self.best_epoch, self.stopped = 0, 0, False

    @property
    def best(self):
        return self._monitor.best

    def state_dict(self):
        return {"best": self._monitor.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped": self.stopped}

    def load_state_dict(self, state):
        self._monitor.best, self.best_epoch = state["best"], int(state["best_epoch"])
        self.wait, self.stopped = int(state["wait"]), bool(state["stopped"])

    def on_fit_start(self, loop):
        if self.stopped:
            loop.should_stop = True

    def on_epoch_end(self, loop):
        value = self._monitor.value(loop)
        if self._monitor.improved(value, self.min_delta):
            self._monitor.best, self.best_epoch, self.wait = value, loop.epoch, 0
        else:
            self.wait += 1
        loop.record["best_epoch"] = self.best_epoch
        if self.wait >= self.patience:
            self.stopped = loop.should_stop = True


class ProgressBar(Callback):
    """A tqdm bar per epoch, with the loss per data point every 10 steps."""

    def __init__(self):
        self.bar = None

    def on_epoch_start(self, loop):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=f"epoch {loop.epoch + 1}/{loop.epochs}", unit="batch", initial=loop.batch,
                        total=len(loop.data), leave=False)

    def on_step_end(self, loop, batch, loss):
        self.bar.update(1)
        if loss is not None and loop.batch % 10 == 1:
            self.bar.set_postfix(loss_per_image=f"{loss / batch_points(batch):.2f}")

    def _close(self, *_):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_epoch_end = on_fit_end = on_interrupt = on_exception = _close


class EpochLog(Callback):
    """Calls ``log`` (``print`` by default) with one line per epoch, losses in nats per ``unit``."""

    def __init__(self, log=print, unit="image"):
        self.log, self.unit = log, unit

    def on_epoch_end(self, loop):
        r = loop.record
        self.log(f"epoch {r['epoch']}: train loss {r['train_loss']:.2f} nats/{self.unit}"
                 + (f", test ELBO {r['test_elbo']:.2f}" if "test_elbo" in r else "")
                 + (f", validation ELBO {r['val_elbo']:.2f}" if "val_elbo" in r else "")
                 + "".join(f", {name} accuracy {r[key]:.4f}" for key, name in (("test_accuracy", "test"),
                                                                              ("val_accuracy", "validation"))
                           if key in r)
                 + (f", {r['skipped_updates']} updates skipped" if r.get("skipped_updates") else "")
                 + f" ({r['seconds']:.1f} s)")


class Checkpoint(Callback):
    """Hands ``loop.state_dict()`` to ``save`` at the end of every epoch, every ``every`` steps inside an
    epoch (0: never inside), on SIGINT/SIGTERM, and when a part stopped the run inside an epoch.

    ``save(state)`` writes it somewhere (e.g. :func:`pyro_vae.checkpoints.save_checkpoint` with a path);
    pass that state to :func:`pyro_vae.fit` as ``state=`` to resume. The state holds the live tensors of
    the model and optimizer: write it out (or ``copy.deepcopy`` it) before training goes on.
    """

    def __init__(self, save, every=0):
        if not callable(save):
            raise InputError(f"Checkpoint needs a callable save(state), got {type(save).__name__}")
        self.save, self.every = save, int(every)
        self._saved_step = None

    def _save(self, loop):
        self.save(loop.state_dict())
        self._saved_step = loop.step

    def on_fit_start(self, loop):
        self._saved_step = loop.step

    def on_step_end(self, loop, batch, loss):
        if self.every and loop.step % self.every == 0 and loop.batch < len(loop.data):
            self._save(loop)

    def on_epoch_end(self, loop):
        self._save(loop)

    def on_interrupt(self, loop, signum):
        self._save(loop)

    def on_fit_end(self, loop):
        if self._saved_step != loop.step:  # a part stopped the run inside an epoch
            self._save(loop)


class KeepBest(Callback):
    """Hands ``loop.state_dict()`` to ``save`` at the end of each epoch whose ``monitor`` is better than every
    earlier epoch's (on a tie the earlier epoch is kept, the one :class:`EarlyStopping` counts from)."""

    def __init__(self, save, monitor="test_elbo", mode="max"):
        self.save = save
        self._monitor = _Monitor(monitor, mode)

    def on_epoch_end(self, loop):
        value = self._monitor.value(loop)
        earlier = [r[self._monitor.monitor] for r in loop.history[:-1] if self._monitor.monitor in r]  # [-1]: this one
        if not earlier or (value > max(earlier) if self._monitor.mode == "max" else value < min(earlier)):
            self.save(loop.state_dict())


class GradientSkip(Callback):
    """Skips every update whose total gradient norm (before any clipping) exceeds ``threshold``
    (VDVAE's ``skip_threshold``): the step's loss is still reported, but no parameter and no optimizer
    state changes, as for a step the non-finite guard skipped.

    Adds ``skipped_updates`` (the epoch's count) to each epoch's record; ``total`` counts the run's.
    A skipped step is not a bad step: its loss and gradients were finite, so it ends a streak of
    non-finite steps (``max_bad_steps``) like any finite step; :class:`DivergenceGuard` judges its loss
    as any other. The decision is made inside the step, by the optimizer's ``skip_if`` predicate
    (:class:`~pyro_vae.svi.TorchOptimSVI`), which this part sets for the run.

    Args:
        threshold: a gradient norm > 0 (0: off, no update is skipped).
    """

    def __init__(self, threshold):
        settings.check({"skip_grad_norm": threshold})
        self.threshold = float(threshold)
        self.in_epoch, self.total = 0, 0

    def state_dict(self):
        return {"in_epoch": self.in_epoch, "total": self.total}

    def load_state_dict(self, state):
        self.in_epoch, self.total = int(state["in_epoch"]), int(state["total"])

    def skip(self, grad_norm):
        """Whether the update of a step with total gradient norm ``grad_norm`` is skipped (and count it)."""
        if not (self.threshold and grad_norm > self.threshold):
            return False
        self.in_epoch += 1
        self.total += 1
        return True

    def on_fit_start(self, loop):
        """Make :meth:`skip` the optimizer's ``skip_if`` for this run."""
        if not hasattr(loop.svi, "skip_if"):
            raise InputError(f"GradientSkip needs an SVI object with a skip_if predicate, but the loop's is a "
                             f"{type(loop.svi).__name__}; train with pyro_vae.fit (TorchOptimSVI)")
        loop.svi.skip_if = self.skip

    def on_epoch_end(self, loop):
        loop.record["skipped_updates"] = self.in_epoch
        self.in_epoch = 0

    def _release(self, loop, *_):
        """The optimizer asks no one after the run (or its error)."""
        if getattr(loop.svi, "skip_if", None) == self.skip:
            loop.svi.skip_if = None

    on_fit_end = on_exception = _release


class WeightAverage(Callback):
    """An exponential moving average (EMA) of the VAE's weights, VDVAE's ``ema_rate``:
    ``average = decay * average + (1 - decay) * weights`` after every update applied (steps skipped by the
    non-finite guard or :class:`GradientSkip` leave it alone), starting from the weights at the start of
    the run. Buffers (e.g. a fixed prior's ``loc``) are copied, not averaged.

    Held-out data are evaluated with the average (:class:`Evaluation` runs inside :meth:`swapped`);
    the loop keeps training the trained weights. Its state (``decay``, ``updates`` and ``weights``, a
    ``state_dict`` of the VAE) is in every checkpoint, so a resume continues it bitwise and
    :func:`pyro_vae.train.load_run` loads it in place of the trained weights.

    Args:
        decay: in [0, 1); 0 keeps the last weights (no averaging), 0.999 averages over about 1000 steps.
    """

    def __init__(self, decay):
        settings.check({"ema": decay})
        self.decay = float(decay)
        self.updates, self.weights, self._resumed = 0, None, False

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state):
        if float(state["decay"]) != self.decay:
            raise InputError(f"the checkpoint's weight average has decay {float(state['decay']):g}, this part "
                             f"{self.decay:g}; resume with callbacks.WeightAverage({float(state['decay']):g}) "
                             f"(--ema {float(state['decay']):g})")
        self.updates = int(state["updates"])
        self.weights = {k: v.clone() for k, v in state["weights"].items()}
        self._resumed = True

    def on_fit_start(self, loop):
        """Start the average at the VAE's weights (a part used again in a new run starts again), or move a
        resumed one to the VAE's device."""
        current = loop.vae.state_dict()
        if not self._resumed:
            self.updates = 0
            self.weights = {k: v.detach().clone() for k, v in current.items()}
        else:  # a checkpoint is loaded on the CPU: follow the model's device
            self.weights = {k: v.to(current[k].device) if k in current else v for k, v in self.weights.items()}
        self._resumed = False

    def on_step_end(self, loop, batch, loss):
        """Average after an update applied (a foreign SVI object without ``updated``: after a finite loss)."""
        if getattr(loop.svi, "updated", loss is not None):
            self.update(loop.vae)

    @torch.no_grad()
    def update(self, vae):
        """One step of the average towards ``vae``'s weights (each tensor of ``vae.state_dict()``, any shape)."""
        current = vae.state_dict()
        for name in current.keys() - self.weights.keys():  # a parameter created after the run started
            self.weights[name] = current[name].detach().clone()
        params = dict(vae.named_parameters())
        floats = [k for k in current if k in params and current[k].is_floating_point()]
        if floats:
            torch._foreach_lerp_([self.weights[k] for k in floats], [current[k] for k in floats], 1.0 - self.decay)
        for name in current.keys() - set(floats):
            self.weights[name].copy_(current[name])
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self, vae):
        """Within the block ``vae`` holds the averaged weights; its trained ones are put back after
        (bitwise, into the same tensors: the optimizer's references stay valid)."""
        trained = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        vae.load_state_dict(self.weights)
        try:
            yield vae
        finally:
            vae.load_state_dict(trained)

    def copy_to(self, vae):
        """Put the averaged weights into ``vae`` for good (e.g. after training, to sample or evaluate)."""
        vae.load_state_dict(self.weights)


def evaluation_weights(loop):
    """A context manager in which ``loop.vae`` holds the weights held-out data are read with: the
    average of the loop's :class:`WeightAverage` part where it has one, else the trained weights."""
    for cb in loop.callbacks:
        if isinstance(cb, WeightAverage) and cb.weights is not None:
            return cb.swapped(loop.vae)
    return contextlib.nullcontext(loop.vae)


class DataParallel(Callback):
    """Makes the loop one process of a data-parallel group (``torchrun``; see :mod:`pyro_vae.distributed`),
    with a :class:`~pyro_vae.svi.DataParallelSVI` as its ``svi``. :func:`pyro_vae.fit` adds it first when a
    process group of two or more processes exists.

    * ``on_fit_start``: every rank takes rank 0's parameters and buffers (as DDP does when it wraps a
      model), and its own RNG stream: on a resume, its saved state where the checkpoint came from a
      group with this rank, else one seeded from rank 0's saved state and the rank.
    * ``on_step_start``: this rank's pending SIGINT/SIGTERM rides on the step's all-reduce; BatchNorm
      running statistics are rank 0's (DDP's ``broadcast_buffers``).
    * ``on_step_end``: ``loop.signalled`` becomes what the ranks agreed on, so every rank stops (and
      checkpoints) after the same step.
    * state: the group's size and every rank's RNG state (so that a resume with as many processes is
      bitwise); building it is a collective, which every rank reaches at the same checkpoints. So
      ``loop.state_dict()`` must be called on every rank (a part that saves on rank 0 builds the state
      everywhere and writes it on rank 0 only, as :class:`Checkpoint` does under :func:`pyro_vae.fit`).
    """

    def __init__(self, group):
        self.group = group
        self._saved = None
        self._norm_buffers = []

    def state_dict(self):
        return {"size": self.group.size, "rng": distributed.gather(rng_state())}

    def load_state_dict(self, state):
        self._saved = state

    def on_fit_start(self, loop):
        if not hasattr(loop.svi, "stop_requested"):
            raise InputError("the DataParallel part needs the loop's svi to be a pyro_vae.svi.DataParallelSVI")
        distributed.broadcast_tensors(list(loop.vae.state_dict(keep_vars=True).values()))
        self._norm_buffers = [b for m in loop.vae.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                              for b in m.buffers()]
        if loop.resume_rng is not None:
            saved = (self._saved or {}).get("rng") or []
            if self.group.rank < len(saved):
                loop.resume_rng = saved[self.group.rank]
            elif self.group.rank > 0:
                loop.resume_rng = _rng_for_rank(loop.resume_rng, self.group.rank)
        self._saved = None

    def on_step_start(self, loop, batch):
        loop.svi.stop_requested = loop.signals[0] if loop.signals else 0
        if self._norm_buffers:
            distributed.broadcast_tensors(self._norm_buffers)

    def on_step_end(self, loop, batch, loss):
        loop.signalled = [loop.svi.stop_agreed] if loop.svi.stop_agreed else []


def _rng_for_rank(state, rank):
    """A fresh RNG state for ``rank``, seeded from another state's bytes and the rank (deterministic)."""
    digest = hashlib.sha256(bytes(state["torch"].tolist()) + rank.to_bytes(4, "little")).digest()
    kept = rng_state()
    pyro.set_rng_seed(int.from_bytes(digest[:4], "little"))
    fresh = rng_state()
    set_rng_state(kept)
    return fresh
