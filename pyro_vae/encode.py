"""The latent of every data point of a run: ``pyro-vae encode RUN --out latent.csv|.npy``.

:func:`encode_run` loads a run's VAE, reads its data (a count matrix: every cell, in the file's order; an
image data set: its test images) or another count file, and writes each row's posterior mean
(:meth:`pyro_vae.VAE.encode`), one row per data point: a CSV with a name per row (the cells' barcodes where a
10x ``barcodes.tsv(.gz)`` sits beside the matrix, an AnnData file's ``obs_names``, else the row numbers), or an
``N x D`` NumPy array.
"""

import io
from pathlib import Path

import numpy as np
import torch

from . import cells as cells_
from .checkpoints import write_bytes_atomic, write_text_atomic
from .errors import InputError
from .config import RunConfig
from .train import checkpoint_name, load_labelled_splits, load_run, load_run_checkpoint

FORMATS = (".csv", ".npy")


def encode_run(run_dir, out=None, data_file=None, batch_file=None, transpose=False, level=None, checkpoint=None,
               device=None, batch_size=1000, expression=False, as_batch=None, covariate_file=None, layer=None,
               batch_key=None, covariate_keys=None):
    """Write the posterior means of a run's data (or of ``data_file``) to ``out``; returns ``(path, (N, D))``.

    Args:
        run_dir: a run directory of ``pyro-vae train``.
        out: ``.csv`` or ``.npy`` path (default ``run_dir/latent.csv``).
        data_file, transpose: another count matrix to encode (cells x genes; ``transpose`` for genes x cells;
            or an AnnData ``.h5ad`` file, read with the run's layer, batch key and covariate keys), its genes
            those the run was trained on, in the same order.
        batch_file, covariate_file, layer, batch_key, covariate_keys: with ``data_file``, where its counts,
            its cells' batches and continuous covariates are (for a run that reads them; each batch one of
            the run's; an AnnData file's default to the run's layer and keys), see
            :func:`pyro_vae.cells.reading`. Its genes are matched to the run's by name where both name them.
        level: the chain's level (default the one nearest the data).
        checkpoint: ``"best"``, ``"last"`` or ``None`` (best where the run kept one on a validation split).
        batch_size: rows encoded at once (a sparse matrix is densified this many rows at a time).
        expression: write each row's normalised expression instead (:meth:`pyro_vae.VAE.expression`:
            the decoder's proportions times 10 000 counts for a library-scaled likelihood), one column per gene
            (named in a CSV's header where the data name their genes).
        as_batch: with ``expression``, decode every cell as if of this batch (a name of the run's batches;
            continuous covariates stay each cell's own): batch-corrected expression.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "latent.csv"
    if out.suffix.lower() not in FORMATS:
        raise InputError(f"--out must end in {' or '.join(FORMATS)}, got {out.name}")
    other = dict(layer=layer, batch_file=batch_file, batch_key=batch_key, covariate_file=covariate_file,
                 covariate_keys=covariate_keys)
    if any(other.values()) and not data_file:
        raise InputError("--layer, --batch-file, --batch-key, --covariate-file and --covariate-keys describe "
                         "--data-file (the run's own cells are read as the run read them)")
    if as_batch is not None and not expression:
        raise InputError("--as-batch decodes the expression of every cell as one batch; add --expression")
    config = RunConfig.from_checkpoint(load_run_checkpoint(run_dir / "checkpoint.pt"), run_dir / "checkpoint.pt")
    vae, config = load_run(run_dir, device=device, checkpoint=checkpoint_name(run_dir, config, checkpoint))
    vae.eval()
    x, names, genes, y = _rows(config, data_file, transpose, other)
    if config.dataset == "counts" and x.shape[1] != vae.x_shape[0]:
        raise InputError(f"{data_file} has {x.shape[1]} genes but the run was trained on {vae.x_shape[0]}; give "
                         "the run's genes, in its order")
    as_y = cells_.as_batch(config, y, as_batch) if as_batch is not None else None
    z = []
    for start in range(0, x.shape[0], batch_size):
        rows = x[start:start + batch_size]
        rows = torch.from_numpy(rows.toarray()) if hasattr(rows, "toarray") else rows
        rows = rows.to(vae.device, torch.float32)
        yb = None if y is None else y[start:start + batch_size].to(vae.device)
        as_yb = as_y[start:start + batch_size].to(vae.device) if torch.is_tensor(as_y) else as_y
        z.append((vae.expression(rows, y=yb, as_y=as_yb) if expression else vae.encode(rows, y=yb, level=level)).cpu())
    z = torch.cat(z).flatten(1).numpy()
    if out.suffix.lower() == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, z)
        write_bytes_atomic(out, buffer.getvalue())
    else:
        columns = genes if expression and genes else [f"z{j}" for j in range(z.shape[1])]
        header = "name," + ",".join(columns)
        lines = [f"{name}," + ",".join(f"{v:.6g}" for v in row) for name, row in zip(names, z)]
        write_text_atomic(out, "\n".join([header, *lines]) + "\n")
    return out, z.shape


def _rows(config, data_file, transpose, other):
    """``(x, names, genes, y)``: the rows to encode (a sparse matrix or a tensor), their names, the genes'
    names (``None`` for images), their conditioning (:func:`pyro_vae.cells.conditioning`); ``other``: how
    ``data_file`` is read (:func:`pyro_vae.cells.reading`)."""
    if config.dataset != "counts":
        if data_file:
            raise InputError("--data-file is for runs on count data; an image run encodes its test images")
        _, _, (x, _) = load_labelled_splits(config, "cpu")
        return x, [str(i) for i in range(x.shape[0])], None, None
    cells, y = cells_.of_run(config, cells_.reading(config, data_file, transpose, **other) if data_file else None)
    return cells.x, cells.names, cells.genes, y  # x sparse: densified a batch at a time
