"""Many processes: the process group that ``torchrun`` sets up, and the few collectives training needs.

A run launched by ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1 in the
environment) is data-parallel: every process holds the whole model, reads its
own shard of each global batch, and the gradients are summed across processes
by one ``torch.distributed.all_reduce`` a step (:class:`~pyro_vae.svi.DataParallelSVI`),
so every process applies the update one process would have applied to the
whole batch. Everything else is the ordinary single-process code: a run
without ``torchrun`` never creates a process group and never calls into here
beyond :func:`current` (which then says ``None``).

Backends: ``gloo`` on the CPU, ``nccl`` on CUDA (one GPU per local rank,
``cuda:LOCAL_RANK``), chosen from the device unless ``PYRO_VAE_BACKEND`` (or
``init(backend=...)``) names one.

Nothing here imports the rest of the library: the parts that use it
(``svi``, ``callbacks``, ``train``, ``cli``) import it.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError


@dataclass(frozen=True)
class Group:
    """The data-parallel process group this process belongs to.

    Attributes:
        rank: this process's rank, 0 ... ``size - 1`` (0 writes the files).
        size: the number of processes (``WORLD_SIZE``).
        local_rank: the rank on this node (``LOCAL_RANK``): the CUDA device it uses.
        backend: ``"gloo"`` or ``"nccl"``.
    """

    rank: int
    size: int
    local_rank: int
    backend: str

    @property
    def main(self):
        """Whether this is rank 0, the process that writes files and prints."""
        return self.rank == 0

    def shard(self, x):
        """This rank's contiguous share of the rows of ``x`` ``(B, ...)``: ``x.tensor_split(size)[rank]``
        (sizes differ by at most one; a shard can be empty when ``B < size``)."""
        return x.tensor_split(self.size)[self.rank]

    def shard_slice(self, n, block=1):
        """The ``slice`` of ``range(n)`` this rank owns when ``n`` rows are cut into blocks of ``block``
        rows and the blocks are dealt out contiguously (whole blocks per rank)."""
        blocks = -(-n // block)
        per, extra = divmod(blocks, self.size)
        start = self.rank * per + min(self.rank, extra)
        stop = start + per + (self.rank < extra)
        return slice(min(n, start * block), min(n, stop * block))


def launched():
    """Whether ``torchrun`` (or another launcher setting ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``)
    started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current():
    """The :class:`Group` of an initialised process group of two or more processes, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Group(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def device_for(device):
    """The device this rank trains on for a requested ``device`` string (``"cpu"``, ``"cuda"``,
    ``"cuda:1"``): under ``torchrun`` a bare ``"cuda"`` is ``cuda:LOCAL_RANK``."""
    if launched() and str(device) == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if launched() and str(device).startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise InputError(f"--device {device} would put every process of this node on one GPU; under torchrun "
                         "pass --device cuda: each process then uses cuda:LOCAL_RANK")
    return device


def init(device="cpu", backend=None):
    """Join the process group ``torchrun`` describes (a no-op when there is none or it is joined already).

    Args:
        device: the training device (``"cpu"``, ``"cuda"``, ``"cuda:K"``): ``nccl`` for CUDA, else
            ``gloo``; on CUDA this process's device is set to ``cuda:LOCAL_RANK``.
        backend: ``"gloo"`` or ``"nccl"`` to override (default: ``PYRO_VAE_BACKEND`` or the device's).

    Returns:
        the :class:`Group`, or ``None`` for a single process.

    Raises:
        InputError: an unknown backend, ``nccl`` without CUDA, or fewer GPUs than local ranks.
    """
    if not launched():
        return None
    if not (dist.is_available() and dist.is_initialized()):
        cuda = str(device).startswith("cuda")
        backend = backend or os.environ.get("PYRO_VAE_BACKEND") or ("nccl" if cuda else "gloo")
        if backend not in ("gloo", "nccl"):
            raise InputError(f"unknown process-group backend {backend!r}; use gloo (CPU or CUDA) or nccl (CUDA)")
        if backend == "nccl" and not cuda:
            raise InputError(f"the nccl backend sums CUDA tensors, but the device is {device}; use gloo on the CPU "
                             "(unset PYRO_VAE_BACKEND) or train with --device cuda")
        if cuda or backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if not torch.cuda.is_available() or local >= torch.cuda.device_count():
                seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
                raise InputError(f"local rank {local} needs cuda:{local} but this node has {seen} GPU(s); "
                                 f"start at most {seen} processes per node (--nproc-per-node), or train on "
                                 "the CPU with --device cpu", rank_specific=seen > 0)
            torch.cuda.set_device(local)
        with _collective("joining the process group"):
            dist.init_process_group(backend)
        global _OWNED
        _OWNED = True
    return current()


_OWNED = False  # whether init() created the process group (then shutdown() destroys it)


class PeerLost(RuntimeError):
    """A collective failed: another process of the run stopped (killed, crashed or lost its node)."""


@contextlib.contextmanager
def _collective(what):
    """Turn a collective's failure (a peer gone: gloo's closed connection, NCCL's error) into :class:`PeerLost`."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, PeerLost):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        rank, size = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
        raise PeerLost(f"rank {rank} of {size}: {what} failed, so another process of this run has stopped "
                       f"({first}); the last checkpoint written is kept") from err


def main_first(fn):
    """``fn()`` on rank 0 first and then, once it succeeded there, on every other rank; each rank's result.

    What can refuse a run (settings, files, data) runs this way so that an error every rank would meet is
    reported once, by rank 0: the other ranks raise an :class:`~pyro_vae.errors.InputError` with the same
    message that the command line does not print again. An ``InputError`` that only a later rank meets is
    ``rank_specific`` (printed by that rank). In a single process: ``fn()``.
    """
    group = current()
    if group is None:
        return fn()
    if group.main:
        return _told_by_main(group, fn, share=False)
    _told_by_main(group, None, share=False)
    try:
        return fn()
    except InputError as err:
        err.rank_specific = True
        raise


def _told_by_main(group, compute, share):
    """Rank 0 runs ``compute()`` and tells every rank how it went (with its value if ``share``); the others
    wait for that and raise rank 0's error (an ``InputError`` as the same message, which rank 0 prints)."""
    box = [None]
    if group.main:
        try:
            value = compute()
        except BaseException as err:
            box[0] = ("InputError" if isinstance(err, InputError) else type(err).__name__, str(err))
            with _collective("reporting rank 0's error"):
                dist.broadcast_object_list(box, src=0, device=_object_device())
            raise
        box[0] = ("ok", value if share else None)
        with _collective("sharing rank 0's outcome"):
            dist.broadcast_object_list(box, src=0, device=_object_device())
        return value
    with _collective("waiting for rank 0"):
        dist.broadcast_object_list(box, src=0, device=_object_device())
    kind, value = box[0]
    if kind == "InputError":
        raise InputError(value)
    if kind != "ok":
        raise RuntimeError(f"rank 0 failed ({kind}: {value}); rank {group.rank} stops with it")
    return value


def shutdown():
    """Leave the process group that :func:`init` joined (one that a user's script created is left alone)."""
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        _OWNED = False
        try:  # leave together: a rank that tears its connections down while another still sends aborts it
            dist.barrier()
        except RuntimeError:
            pass  # a peer is gone already
        dist.destroy_process_group()


def on_main(fn):
    """``fn`` on rank 0 (and in a single process); elsewhere a function that does nothing and returns ``None``."""
    group = current()
    if group is None or group.main:
        return fn
    return lambda *args, **kwargs: None


def is_main():
    """Whether this process writes files and prints: rank 0, or a single process."""
    group = current()
    return group is None or group.main


def _object_device():
    """Where ``*_object`` collectives stage their bytes: the current CUDA device for ``nccl``."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def from_main(compute):
    """``compute()`` run on rank 0 only and its result (any picklable value) handed to every rank;
    in a single process just ``compute()``. Every rank must call it at the same point.

    A failure on rank 0 is raised there and on every other rank (an :class:`~pyro_vae.errors.InputError`
    as the same, unprinted, error; anything else as a ``RuntimeError`` naming it), so that no rank waits
    for a value that will never come.
    """
    group = current()
    return compute() if group is None else _told_by_main(group, compute, share=True)


def gather(value):
    """Every rank's ``value`` (picklable), as a list in rank order, on every rank; ``[value]`` alone."""
    group = current()
    if group is None:
        return [value]
    out = [None] * group.size
    with _collective("gathering from every rank"):
        dist.all_gather_object(out, value)
    return out


def broadcast_tensors(tensors):
    """Overwrite ``tensors`` (a list, any shapes and dtypes, on this rank's device) with rank 0's values,
    one broadcast per dtype; a no-op in a single process."""
    group = current()
    if group is None:
        return
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        with _collective("broadcasting rank 0's tensors"):
            dist.broadcast(flat, src=0)
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            t.data.copy_(part.view_as(t))


def barrier():
    """Wait until every rank gets here (e.g. until rank 0 has written a run's files); a no-op alone."""
    if current() is not None:
        with _collective("waiting for every rank"):
            dist.barrier()


def all_reduce_sum(flat):
    """``flat`` summed over every rank, in place (``torch.distributed.all_reduce``)."""
    with _collective("summing gradients"):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat
