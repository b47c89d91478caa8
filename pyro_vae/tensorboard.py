"""TensorBoard logging of a training run: the part :class:`TensorBoard` around the loop.

``pyro-vae train --tensorboard`` writes ``OUT/tensorboard``; ``fit(..., writer=...)`` takes a
``torch.utils.tensorboard.SummaryWriter`` (or a log directory). Needs the ``tensorboard`` package
(``pip install 'pyro-vae[tensorboard]'``); nothing else in the library imports it.

Tags (every scalar at the loop's global step, ``loop.step``):

==========================  ====================================================================
``train/loss``              each step's loss, nats per data point (steps the guard skipped: none)
``train/kl_weight``         the KL weight the step trained with (the warm-up's)
``train/grad_norm``         the step's total gradient norm, before clipping
``train/lr``                the optimizer's learning rate
``epoch/<key>``             each epoch's record: ``epoch/test_elbo`` (or ``val_elbo``),
                            ``epoch/test_kl_z<l>``, ``epoch/test_active_units_z<l>``,
                            ``epoch/train_loss``, ``epoch/seconds``, ``epoch/kl_weight``, ...
                            (lists, such as ``test_unit_kl_z<l>``, as histograms)
``images/samples``          image VAEs: 64 draws of the model (the same noise every epoch)
``images/reconstructions``  a fixed batch of 32 held-out images beside their reconstructions
``images/levels``           chains: per image, one row per level l, the image then 8 draws that
                            keep z0..z_{l-1} and redraw the rest (``plots.save_levels``' rows)
==========================  ====================================================================

The pictures are drawn as :mod:`pyro_vae.plots` draws them, in eval mode from a fork of the RNG (so
training, and a resume, go on bitwise as without the part), with the weight average where the loop
keeps one (:class:`~pyro_vae.callbacks.WeightAverage`).
"""

import math
import os
import re
import time
from pathlib import Path

import torch

from . import distributed, plots
from .callbacks import Callback, evaluation_weights
from .data import batch_points
from .errors import InputError

MISSING = ("TensorBoard logging needs the tensorboard package: pip install 'pyro-vae[tensorboard]' "
           "(or pip install tensorboard)")
WRITER_METHODS = ("add_scalar", "add_histogram", "add_image", "flush", "close")


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; :class:`InputError` with the install command where the
    ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(MISSING) from None
    return SummaryWriter


def is_writer(obj):
    """Whether ``obj`` writes like a ``SummaryWriter`` (``add_scalar``, ``add_histogram``, ``add_image``,
    ``flush``, ``close``)."""
    return all(callable(getattr(obj, name, None)) for name in WRITER_METHODS)


class TensorBoard(Callback):
    """Logs the run to TensorBoard: per step the loss, KL weight, gradient norm and learning rate; per
    epoch every number of the epoch's record and, for images, samples, reconstructions and levels (the
    tags are listed in :mod:`pyro_vae.tensorboard`). Put it after the parts that fill the record
    (:func:`pyro_vae.fit` does, for ``writer=``).

    Args:
        writer: a log directory, or a ready ``SummaryWriter`` (or an object with its ``add_scalar``,
            ``add_histogram``, ``add_image``, ``flush`` and ``close``).

            A directory: the part makes the ``SummaryWriter`` when the fit starts, with
            ``purge_step=loop.step + 1``: TensorBoard then drops what an interrupted run logged after the
            step the run resumes from, so the stream goes on with no step twice (a new run in a reused
            directory hides the old run's). The part closes it when the fit ends.

            A writer: yours, flushed (not closed) when the fit ends; to resume, make it with
            ``purge_step=state["step"] + 1`` yourself.
        images: data ``(N, C, H, W)`` whose first 32 are reconstructed every ``images_every`` epochs (held-out
            data; ``None``: no reconstructions and no levels).
        images_every: draw the pictures every this many epochs and at the last (0: never).
        every: log the per-step scalars every this many steps.

    Under ``torchrun`` only rank 0 writes; on the other ranks the part does nothing.
    """

    def __init__(self, writer, images=None, images_every=1, every=1):
        if isinstance(writer, (str, os.PathLike)):
            summary_writer_class()  # refused now, before any training, where tensorboard is missing
            self.log_dir, self._given = Path(writer), None
        elif is_writer(writer):
            self.log_dir, self._given = None, writer
        else:
            raise InputError(f"writer must be a torch.utils.tensorboard.SummaryWriter or a log directory, got "
                             f"{type(writer).__name__}; pass e.g. SummaryWriter('runs/tb') or 'runs/tb'")
        for name, value in (("images_every", images_every), ("every", every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "images_every" else 1):
                raise InputError(f"TensorBoard's {name} must be an integer >= {0 if name == 'images_every' else 1}"
                                 f", got {value!r}")
        self.images = None if images is None else images[:32]
        self.images_every, self.every = images_every, every
        self.writer = None

    # ------------------------------------------------------------ the writer
    def on_fit_start(self, loop):
        if not distributed.is_main():
            self.writer = None
            return
        if self._given is not None:
            self.writer = self._given
            return
        _after_existing_event_files(self.log_dir)
        self.writer = summary_writer_class()(str(self.log_dir), purge_step=loop.step + 1)

    def _flush(self, loop, *_):
        if self.writer is not None:
            self.writer.flush()

    def _finish(self, loop, *_):
        if self.writer is None:
            return
        if self._given is None:
            self.writer.close()
        else:
            self.writer.flush()
        self.writer = None

    on_interrupt = _flush
    on_fit_end = on_exception = _finish

    # ------------------------------------------------------------ what is logged
    def on_step_end(self, loop, batch, loss):
        if self.writer is None or loop.step % self.every:
            return
        step, add = loop.step, self.writer.add_scalar
        if loss is not None:
            add("train/loss", loss / batch_points(batch), step)
        add("train/kl_weight", float(loop.vae.kl_weight), step)
        grad_norm = getattr(loop.svi, "grad_norm", None)
        if grad_norm is not None:
            add("train/grad_norm", float(grad_norm), step)
        lr = _learning_rate(loop.svi)
        if lr is not None:
            add("train/lr", lr, step)

    def on_epoch_end(self, loop):
        if self.writer is None:
            return
        for key, value in loop.record.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", float(value), loop.step)
            elif isinstance(value, (list, tuple)):
                finite = [float(v) for v in value if isinstance(v, (int, float)) and math.isfinite(v)]
                if finite:
                    self.writer.add_histogram(f"epoch/{key}", torch.tensor(finite), loop.step)
        last = loop.epoch >= loop.epochs or loop.should_stop
        if self.images_every and (loop.epoch % self.images_every == 0 or last) and _is_image(loop.vae):
            with evaluation_weights(loop):
                for tag, grid in pictures(loop.vae, self.images).items():
                    self.writer.add_image(f"images/{tag}", grid, loop.step)


def _is_image(vae):
    return getattr(vae, "x_shape", None) is not None and len(vae.x_shape) == 3


def _learning_rate(svi):
    optimizer = getattr(svi, "optimizer", None)
    if optimizer is not None and optimizer.param_groups:
        return float(optimizer.param_groups[0]["lr"])
    lr = getattr(svi, "lr", None)
    return float(lr) if isinstance(lr, (int, float)) else None


@plots.drawing
@torch.no_grad()
def pictures(vae, x=None, samples=64, images=4, draws=8, seed=0):
    """The grids the part logs, ``{"samples", "reconstructions", "levels"}`` (the last two with ``x``, the
    last for chains only), each a ``(3, H, W)`` tensor in [0, 1] (``torchvision.utils.make_grid``'s,
    padding 2, white), drawn from the same noise (``seed``) every time: the pictures of
    :mod:`pyro_vae.plots` without their labels."""
    from torchvision.utils import make_grid

    def grid(tiles, nrow):
        return make_grid(tiles.clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)

    out = {}
    with plots.seeded(seed, vae.device):
        out["samples"] = grid(vae.sample(samples), 8)
    if x is None:
        return out
    x = x.to(vae.device)
    with plots.seeded(seed, vae.device):
        recon = vae.reconstruct(x)
    out["reconstructions"] = grid(torch.stack([x, recon.clamp(0, 1)], dim=1).reshape(-1, *x.shape[1:]), 16)
    if vae.levels:
        x = x[:images]
        with plots.seeded(seed, vae.device):
            rows = [vae.resample_below(x, level, draws) for level in range(vae.levels + 2)]
        out["levels"] = grid(torch.cat([torch.cat([x[i:i + 1], d[i].clamp(0, 1)])
                                        for i in range(x.shape[0]) for d in rows]), draws + 1)
    return out


_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def _after_existing_event_files(log_dir):
    """Wait (under a second) until a new event file's name, which starts with the time in whole seconds,
    sorts after those in ``log_dir``: TensorBoard reads a directory's files in name order, and the new
    file's purge must come after the events it drops."""
    if not log_dir.is_dir():
        return
    stamps = [int(m.group(1)) for p in log_dir.iterdir() if (m := _EVENT_FILE.match(p.name))]
    wait = max(stamps, default=-1) + 1 - time.time()
    if wait > 0:
        time.sleep(wait)
