"""The latent of every data point of a run: ``pyro-vae encode RUN --out latent.csv|.npy``.

:func:`encode_run` loads a run's VAE, reads its data (a count matrix: every cell, in the file's order; an
image data set: its test images) or another count file, and writes each row's posterior mean
(:meth:`pyro_vae.VAE.encode`), one row per data point: a CSV with a name per row (the cells' barcodes where a
10x ``barcodes.tsv(.gz)`` sits beside the matrix, else the row numbers), or an ``N x D`` NumPy array.
"""

import io
from pathlib import Path

import numpy as np
import torch

from . import data as data_
from .checkpoints import write_bytes_atomic, write_text_atomic
from .errors import InputError
from .config import RunConfig
from .train import batch_codes, checkpoint_name, load_labelled_splits, load_run, load_run_checkpoint

FORMATS = (".csv", ".npy")


def encode_run(run_dir, out=None, data_file=None, batch_file=None, transpose=False, level=None, checkpoint=None,
               device=None, batch_size=1000, expression=False, as_batch=None):
    """Write the posterior means of a run's data (or of ``data_file``) to ``out``; returns ``(path, (N, D))``.

    Args:
        run_dir: a run directory of ``pyro-vae train``.
        out: ``.csv`` or ``.npy`` path (default ``run_dir/latent.csv``).
        data_file, transpose: another count matrix to encode (cells x genes; ``transpose`` for genes x cells),
            its genes those the run was trained on, in the same order.
        batch_file: with ``data_file``, its cells' batches (for a run trained with ``--batch-file``; each
            label one of the run's).
        level: the chain's level (default the one nearest the data).
        checkpoint: ``"best"``, ``"last"`` or ``None`` (best where the run kept one on a validation split).
        batch_size: rows encoded at once (a sparse matrix is densified this many rows at a time).
        expression: write each row's normalised expression instead (:meth:`pyro_vae.VAE.expression`:
            the decoder's mean at 10 000 counts for a library-scaled likelihood), one column per gene.
        as_batch: with ``expression``, decode every cell as if of this batch (a name of the run's batches):
            batch-corrected expression.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "latent.csv"
    if out.suffix.lower() not in FORMATS:
        raise InputError(f"--out must end in {' or '.join(FORMATS)}, got {out.name}")
    if batch_file and not data_file:
        raise InputError("--batch-file goes with --data-file (the run's own cells use the run's batch file)")
    config = RunConfig.from_checkpoint(load_run_checkpoint(run_dir / "checkpoint.pt"), run_dir / "checkpoint.pt")
    vae, config = load_run(run_dir, device=device, checkpoint=checkpoint_name(run_dir, config, checkpoint))
    vae.eval()
    x, names, y = _rows(config, vae, data_file, batch_file, transpose)
    if config.dataset == "counts" and x.shape[1] != vae.x_shape[0]:
        raise InputError(f"{data_file} has {x.shape[1]} genes but the run was trained on {vae.x_shape[0]}; give "
                         "the run's genes, in its order")
    as_y = _as_batch(config, as_batch) if expression else None
    if as_batch is not None and not expression:
        raise InputError("--as-batch decodes the expression of every cell as one batch; add --expression")
    z = []
    for start in range(0, x.shape[0], batch_size):
        rows = x[start:start + batch_size]
        rows = torch.from_numpy(rows.toarray()) if hasattr(rows, "toarray") else rows
        rows = rows.to(vae.device, torch.float32)
        yb = None if y is None else y[start:start + batch_size].to(vae.device)
        z.append((vae.expression(rows, y=yb, as_y=as_y) if expression else vae.encode(rows, y=yb, level=level)).cpu())
    z = torch.cat(z).flatten(1).numpy()
    if out.suffix.lower() == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, z)
        write_bytes_atomic(out, buffer.getvalue())
    else:
        column = "x" if expression else "z"
        header = "name," + ",".join(f"{column}{j}" for j in range(z.shape[1]))
        lines = [f"{name}," + ",".join(f"{v:.6g}" for v in row) for name, row in zip(names, z)]
        write_text_atomic(out, "\n".join([header, *lines]) + "\n")
    return out, z.shape


def _rows(config, vae, data_file, batch_file, transpose):
    """``(x, names, y)``: the rows to encode (a sparse matrix or a tensor), their names, their batches."""
    if config.dataset != "counts":
        if data_file:
            raise InputError("--data-file is for runs on count data; an image run encodes its test images")
        _, _, (x, _) = load_labelled_splits(config, "cpu")
        return x, [str(i) for i in range(x.shape[0])], None
    path, transposed = (data_file, transpose) if data_file else (config.data_file, config.transpose)
    x = data_.read_counts(path, transposed)  # sparse: densified a batch at a time
    y = None
    if config.batch_file:
        if data_file and not batch_file:
            raise InputError("the run was trained with --batch-file: give the cells' batches with --batch-file")
        y = _batches_of(config, batch_file, x.shape[0]) if data_file else batch_codes(config, x.shape[0])
    return x, _cell_names(Path(path), x.shape[0]), y


def _as_batch(config, name):
    """The run's index of the batch called ``name`` (``None`` stays: each cell's own batch)."""
    if name is None:
        return None
    if not config.batch_file:
        raise InputError("--as-batch needs a run trained with --batch-file")
    if name not in config.batch_names:
        raise InputError(f"the run has no batch {name!r}; its batches are {', '.join(map(str, config.batch_names[:5]))}")
    return list(config.batch_names).index(name)


def _batches_of(config, path, n):
    """The run's batch index of each of the ``n`` cells listed in ``path``; a batch it never saw is refused."""
    codes, names = data_.read_labels(path, n)
    known = {name: i for i, name in enumerate(config.batch_names)}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError(f"{path} has batches the run was not trained on ({', '.join(unknown[:3])}); the run knows "
                         f"{', '.join(map(str, config.batch_names[:5]))}")
    return torch.tensor([known[names[c]] for c in codes.tolist()], dtype=torch.long)


def _cell_names(path, n):
    """The cells' names: a 10x folder's ``barcodes.tsv(.gz)`` beside the matrix, else ``0 .. n-1``."""
    _, cells = data_.barcodes(path)
    return cells if cells is not None and len(cells) == n else [str(i) for i in range(n)]
