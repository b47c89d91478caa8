"""The training loop: the order of things, and nothing else.

:class:`Loop` runs epochs of SVI steps over a source of batches and calls the
hooks of its :class:`~pyro_vae.callbacks.Callback` parts at fixed points::

    on_fit_start(loop)                       # after a resume's state is restored
    for each epoch:
        on_epoch_start(loop)
        for each batch:
            on_step_start(loop, batch)       # e.g. the KL warm-up sets vae.kl_weight
            loss = svi.step(batch)           # svi.step(x, y) for a pair (x, y); None if the guard skipped it
            on_step_end(loop, batch, loss)   # progress bar, running loss, checkpoint every N
            (SIGINT/SIGTERM seen right after the step, loop.signalled: on_interrupt(loop, signum), then stop)
            (loop.should_stop set by a part: stop here)
        loop.history gets loop.record = {"epoch": n}
        on_epoch_end(loop)                   # parts fill loop.record; evaluation, log, checkpoint
    on_fit_end(loop)                         # or on_exception(loop, error) when anything raised

The loop owns the epochs, the batches, the step, the non-finite guard and the
stop signals. Its :meth:`Loop.state_dict` holds the model, the optimizer,
the counters, the history, the data source's order, the RNG states and every
stateful part's state, so that resuming from it continues bitwise.
"""

import contextlib
import signal
import sys
import threading

from . import distributed
from .checkpoints import rng_state, set_rng_state
from .errors import InputError
from .svi import NonFiniteStep


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient; the last checkpoint is left as it was."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the loop between two steps.

    ``state`` is the resumable state at that point (already handed to the
    parts' ``on_interrupt``, which is where a checkpoint part saves it);
    ``signal`` the signal's number.
    """

    def __init__(self, message, state, signum):
        super().__init__(message)
        self.state, self.signal = state, signum


@contextlib.contextmanager
def catch_stop_signals():
    """Turn the first SIGINT/SIGTERM into a flag checked after each step; a second one stops at once."""
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


class Loop:
    """One run of SVI over ``data``, with ``callbacks`` around it.

    Args:
        vae: the :class:`~pyro_vae.VAE` being trained (on the data's device).
        svi: an object with ``step(batch) -> float`` that raises
            :class:`~pyro_vae.svi.NonFiniteStep` for a skipped step, and
            ``state_dict``/``load_state_dict`` (:class:`~pyro_vae.svi.TorchOptimSVI`).
        data: a batch source: ``len(data)`` batches an epoch, each a tensor ``x_b`` or a pair
            ``(x_b, y_b)`` (labels or covariates, handed on as ``svi.step(x_b, y_b)``;
            :func:`~pyro_vae.data.batch_points` counts either),
            ``data.epoch(skip)`` an iterator over one epoch's batches after
            the first ``skip``, ``state_dict``/``load_state_dict`` for its
            order (:class:`~pyro_vae.data.Batches`).
        epochs: the epoch to stop after, counting resumed ones.
        callbacks: the parts, called in this order at every hook.
        max_bad_steps: raise :class:`TrainingDiverged` after this many
            consecutive non-finite steps.

    Attributes a part may read: ``vae``, ``svi``, ``data``, ``epochs``,
    ``epoch`` (epochs completed), ``step`` (steps taken, skipped ones
    included), ``batch`` (batches done in the current epoch), ``history``
    (one record per completed epoch), ``record`` (the current epoch's, in
    ``on_epoch_end``). A part sets ``should_stop = True`` to end the run after
    the current step or epoch.

    Stop signals: ``signals`` lists the SIGINT/SIGTERM received so far (live);
    right after each step the loop copies it to ``signalled``, which the parts
    may rewrite in ``on_step_end`` (:class:`~pyro_vae.callbacks.DataParallel`
    puts there what every rank agreed on); the loop then stops if it is not
    empty. ``resume_rng``: the RNG state the first resumed step draws from (set
    by :meth:`load_state_dict`; a part may replace it in ``on_fit_start``).
    """

    def __init__(self, vae, svi, data, epochs, callbacks=(), max_bad_steps=10):
        self.vae, self.svi, self.data, self.epochs = vae, svi, data, int(epochs)
        self.callbacks = list(callbacks)
        self.max_bad_steps = int(max_bad_steps)
        self.epoch = self.step = self.batch = self.bad_steps = 0
        self.history, self.record, self.should_stop = [], None, False
        self.signals, self.signalled, self.resume_rng = [], [], None
        keys = [cb.state_key for cb in self.callbacks if cb.state_dict() is not None]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise InputError(f"two callbacks keep state under the same key {twice[0]!r}; give one of them "
                             "another state_key")

    # ------------------------------------------------------------ state
    def state_dict(self):
        """Everything a resume needs (a dict of tensors and plain values, for ``torch.save``)."""
        parts = {cb.state_key: cb.state_dict() for cb in self.callbacks}
        return {"model": self.vae.state_dict(), "optim": self.svi.state_dict(), "epoch": self.epoch,
                "step": self.step, "batch": self.batch, "bad_steps": self.bad_steps,
                "history": [dict(r) for r in self.history],
                "data": self.data.state_dict(), "rng": rng_state(),
                "callbacks": {k: v for k, v in parts.items() if v is not None}}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`; the global RNG is restored when the first resumed step is drawn."""
        state = upgrade_state(state)
        self.vae.load_state_dict(state["model"])
        self.svi.load_state_dict(state["optim"])
        self.epoch, self.step, self.batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
        self.bad_steps = int(state.get("bad_steps", 0))  # a streak of skipped steps goes on after a resume
        self.history = [dict(r) for r in state["history"]]
        self.data.load_state_dict(state["data"])
        for cb in self.callbacks:
            if cb.state_key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.state_key])
        self.resume_rng = state["rng"]

    # ------------------------------------------------------------ the order of things
    def run(self, state=None):
        """Train up to ``epochs`` (continuing ``state`` if given); returns ``history``."""
        if state is not None:
            self.load_state_dict(state)
        with catch_stop_signals() as self.signals, self.vae.data_checked():
            try:
                self._call("on_fit_start")
                while self.epoch < self.epochs and not self.should_stop:
                    self._run_epoch()
            except BaseException as err:
                self._call("on_exception", err)
                raise
            self._call("on_fit_end")
        return self.history

    def _run_epoch(self):
        self.vae.train()
        batches = self.data.epoch(skip=self.batch)
        if self.resume_rng is not None:  # after redrawing the batches already done
            set_rng_state(self.resume_rng)
            self.resume_rng = None
        self._call("on_epoch_start")
        for batch in batches:
            self._call("on_step_start", batch)
            self.step += 1
            self.batch += 1
            loss = self._guarded_step(batch)
            self.signalled = list(self.signals)  # one arriving during the hooks is seen after the next step
            self._call("on_step_end", batch, loss)
            if self.signalled:
                self._interrupt(self.signalled[0])
            if self.should_stop:
                return
        self.epoch += 1
        self.batch = 0
        self.record = {"epoch": self.epoch}
        self.history.append(self.record)
        self._call("on_epoch_end")

    def _guarded_step(self, batch):
        try:
            loss = self.svi.step(*batch) if isinstance(batch, (tuple, list)) else self.svi.step(batch)
        except NonFiniteStep as err:
            self.bad_steps += 1
            message = (f"epoch {self.epoch + 1}, step {self.step}: loss {err.args[0]}, gradient norm "
                       f"{err.args[1]}; the update was skipped")
            if self.bad_steps >= self.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_steps} steps in a row had a non-finite loss or gradient (last: {message}). "
                    "No update was applied for them and the last checkpoint is unchanged. "
                    "Lower the learning rate, set grad_clip, or check the data") from None
            from tqdm.auto import tqdm

            if distributed.is_main():  # every rank skipped the same step (the loss is the group's)
                tqdm.write(f"warning: {message}", file=sys.stderr)
            return None
        self.bad_steps = 0
        return loss

    def _interrupt(self, signum):
        self._call("on_interrupt", signum)
        raise TrainingInterrupted(f"{signal.Signals(signum).name} at epoch {self.epoch + 1}, step {self.step}; "
                                  "the state after this step was saved", self.state_dict(), signum)

    def _call(self, hook, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)


def upgrade_state(state):
    """A state written before the loop had parts (``progress_in_epoch``, ``data_epoch_start``), in today's form."""
    if "callbacks" in state:
        return state
    state = dict(state)
    progress = state.pop("progress_in_epoch", None)
    state["callbacks"] = {"EpochStats": dict(progress)} if progress is not None else {}
    state["data"] = {"epoch_start": state.pop("data_epoch_start")}
    return state
