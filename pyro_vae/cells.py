"""Single-cell inputs: a count matrix with its cells' and genes' names, and what each cell is conditioned on.

:func:`read_cells` reads a count matrix file or 10x folder (:func:`pyro_vae.data.read_counts`) or an AnnData
``.h5ad`` file (:func:`read_anndata`; ``.X`` or a named layer) into :class:`Cells`. :func:`conditioning` turns
a run's covariates into the ``y`` its conditional VAE reads (the labels issue's one mechanism for labels and
covariates, :meth:`pyro_vae.VAE.conditioning`): a categorical batch (``--batch-file`` or, for AnnData,
``--batch-key``) and continuous covariates (``--covariate-file`` or ``--covariate-keys``), standardised with
the run's stored means and spreads.
"""

import csv
import dataclasses
import gzip
from pathlib import Path

import numpy as np
import torch

from . import data as data_
from .errors import InputError

ANNDATA = (".h5ad",)


@dataclasses.dataclass
class Cells:
    """A count matrix and its annotations.

    Attributes:
        x: ``scipy.sparse.csr_matrix`` ``(N, G)`` float32 counts.
        names: the N cells' names (barcodes, AnnData's ``obs_names``, else ``"0" .. "N-1"``).
        genes: the G genes' names (a 10x ``features.tsv``'s symbols, AnnData's ``var_names``, else
            ``"g0" ..``).
        obs: AnnData's ``.obs`` (a ``pandas.DataFrame``, N rows), or ``None`` for other files.
        path: the file read.
    """

    x: object
    names: list
    genes: list
    obs: object = None
    path: str = ""


def is_anndata(path):
    """Whether ``path`` names an AnnData file (``.h5ad``)."""
    return str(path).lower().endswith(ANNDATA)


def read_cells(path, transpose=False, layer=None):
    """The :class:`Cells` of a count file, 10x folder or ``.h5ad`` file (``layer``: an AnnData layer
    instead of ``.X``; ``transpose``: a genes x cells matrix file)."""
    if is_anndata(path):
        if transpose:
            raise InputError(f"{path} is an AnnData file, cells x genes already; drop --transpose")
        return read_anndata(path, layer)
    if layer:
        raise InputError(f"--layer names a layer of an AnnData .h5ad file; {path} is not one (leave --layer out)")
    x = data_.read_counts(path, transpose)
    _, cells = data_.barcodes(path)
    genes = _feature_names(Path(path))
    return Cells(x, cells if cells is not None and len(cells) == x.shape[0] else [str(i) for i in range(x.shape[0])],
                 genes if genes is not None and len(genes) == x.shape[1] else [f"g{j}" for j in range(x.shape[1])],
                 path=str(path))


def read_anndata(path, layer=None):
    """An AnnData ``.h5ad`` file as :class:`Cells`: ``.X`` (or ``.layers[layer]``) as counts, its
    ``obs_names``, ``var_names`` and ``.obs``. Needs the optional ``anndata`` package
    (``pip install 'pyro-vae[anndata]'``). Values that are not counts are refused naming the cell, the
    gene and the file's layers (``.X`` often holds normalised values; the raw counts are then a layer)."""
    import scipy.sparse

    path = Path(path)
    if not path.is_file():
        raise InputError(f"AnnData file {path} does not exist")
    try:
        import anndata
    except ImportError as err:
        raise InputError(f"reading {path.name} needs the anndata package: pip install 'pyro-vae[anndata]' "
                         "(or pip install anndata)") from err
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise assorted types for broken files
        raise InputError(f"could not read the AnnData file {path}: {type(err).__name__}: {err}") from err
    layers = list(adata.layers.keys())
    if layer and layer not in adata.layers:
        raise InputError(f"{path} has no layer {layer!r}; its layers are: {', '.join(layers) or 'none'} (leave "
                         "--layer out to read .X)")
    m = adata.layers[layer] if layer else adata.X
    if m is None:
        raise InputError(f"{path} has no .X; name a layer with --layer ({', '.join(layers) or 'it has none'})")
    m = scipy.sparse.csr_matrix(m, dtype=np.float64)
    if 0 in m.shape:
        raise InputError(f"{path} holds {m.shape[0]} cells x {m.shape[1]} genes; training needs both")
    where = f"{path} ({'layer ' + repr(layer) if layer else '.X'})"
    try:
        data_.check_counts(m, where)
    except InputError as err:
        others = [name for name in layers if name != layer]
        hint = (f"; name the raw counts with --layer ({', '.join(others)})" if others else
                "; store the raw counts in .X or a layer")
        raise InputError(f"{err}{hint}") from None
    return Cells(m.astype(np.float32), [str(v) for v in adata.obs_names], [str(v) for v in adata.var_names],
                 adata.obs, str(path))


def _feature_names(path):
    """The genes of a 10x ``features.tsv(.gz)`` / ``genes.tsv(.gz)`` in (or beside) ``path``: the symbol
    column where there is one, else the ids; ``None`` where there is no such file."""
    folder = path if path.is_dir() else path.parent
    for name in ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"):
        file = folder / name
        if file.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(file, "rt") as f:
                rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
            return [row[1] if len(row) > 1 else row[0] for row in rows]
    return None


# ------------------------------------------------------------------ covariates
def read_covariates(path, n):
    """Continuous covariates, one row per cell of a CSV file (a header row of names, else ``c0 ..``):
    ``(values, names)``, ``values`` ``(n, C)`` float64. A row count other than ``n``, a value that is not a
    finite number, or a file without columns is refused with one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"covariate file {path} does not exist; pass a CSV with one row of numbers per cell")
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and not all(_number(v) is not None for v in rows[0]):
        names, rows = [v.strip() for v in rows[0]], rows[1:]
    else:
        names = [f"c{j}" for j in range(len(rows[0]) if rows else 0)]
    if not names:
        raise InputError(f"{path} holds no columns; give one row of numbers per cell")
    if len(rows) != n:
        raise InputError(f"{path} holds {len(rows)} rows of covariates for {n} cells; give one row per cell, in the "
                         "data's cell order")
    values = np.empty((n, len(names)))
    for i, row in enumerate(rows):
        parsed = [_number(v) for v in row]
        if len(row) != len(names) or any(v is None or not np.isfinite(v) for v in parsed):
            bad = next((v for v, p in zip(row, parsed) if p is None or not np.isfinite(p)), f"{len(row)} columns")
            raise InputError(f"{path}: row {i + 1} of the covariates holds {bad!r}; each row needs {len(names)} "
                             "finite numbers")
        values[i] = parsed
    return values, names


def _number(v):
    try:
        return float(v)
    except ValueError:
        return None


def _obs_column(cells, key, what):
    if cells.obs is None:
        raise InputError(f"--{what} reads a column of an AnnData file's .obs, but {cells.path} is not a .h5ad file; "
                         f"use --{'batch-file' if what == 'batch-key' else 'covariate-file'} for it")
    if key not in cells.obs.columns:
        raise InputError(f"{cells.path} has no .obs column {key!r}; its columns are: "
                         f"{', '.join(map(str, cells.obs.columns[:12])) or 'none'}")
    column = cells.obs[key]
    missing = int(column.isna().sum())
    if missing:
        raise InputError(f"{cells.path}: .obs[{key!r}] has no value for {missing} cells; every cell needs one")
    return column


def _batch_labels(config, cells, batch_file=None):
    """Each cell's batch label as strings, from ``batch_file`` (else the run's), or AnnData's
    ``.obs[config.batch_key]``; ``None`` for a run without batches."""
    n = cells.x.shape[0]
    if config.batch_key:
        return [str(v) for v in _obs_column(cells, config.batch_key, "batch-key")]
    path = batch_file or config.batch_file
    if not path:
        return None
    codes, names = data_.read_labels(path, n)
    return [names[c] for c in codes.tolist()]


def batch_codes(config, cells, batch_file=None):
    """The batch of each cell as indices into ``config.batch_names`` ``(N,)`` int64, or ``None``: a
    new run takes the sorted distinct labels as its ``batch_names``; a saved run's cells must be of its
    batches (one it never saw is refused)."""
    labels = _batch_labels(config, cells, batch_file)
    if labels is None:
        return None
    if not config.batch_names:
        config.batch_names = sorted(set(labels))
    known = {name: i for i, name in enumerate(config.batch_names)}
    unknown = sorted(set(labels) - set(known))
    if unknown:
        raise InputError(f"the cells hold batches the run was not trained on ({', '.join(unknown[:3])}); the run "
                         f"knows {', '.join(map(str, config.batch_names[:5]))}")
    return torch.tensor([known[v] for v in labels], dtype=torch.long)


def covariates(config, cells, covariate_file=None):
    """The cells' continuous covariates standardised with the run's means and spreads (a new run takes
    them from these cells and keeps them in ``config.covariate_names/_mean/_std``): ``(N, C)`` float32,
    or ``None`` for a run without them."""
    n = cells.x.shape[0]
    if config.covariate_keys:
        columns = [_obs_column(cells, key, "covariate-keys") for key in config.covariate_keys]
        try:
            values = np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)
        except (TypeError, ValueError):
            bad = next(k for k, c in zip(config.covariate_keys, columns) if not _numeric(c))
            raise InputError(f"{cells.path}: .obs[{bad!r}] is not numeric; continuous covariates are numbers "
                             "(a categorical column goes to --batch-key)") from None
        names = list(config.covariate_keys)
        if not np.isfinite(values).all():
            raise InputError(f"{cells.path}: the covariates {', '.join(names)} hold NaN or infinite values")
    elif covariate_file or config.covariate_file:
        values, names = read_covariates(covariate_file or config.covariate_file, n)
    else:
        return None
    if not config.covariate_names:
        spread = values.std(0)
        config.covariate_names = names
        config.covariate_mean = values.mean(0).tolist()
        config.covariate_std = np.where(spread > 0, spread, 1.0).tolist()
    elif names != list(config.covariate_names):
        raise InputError(f"the covariates are {', '.join(names)}, but the run was trained on "
                         f"{', '.join(config.covariate_names)}; give the run's covariates, in its order")
    standard = (values - np.asarray(config.covariate_mean)) / np.asarray(config.covariate_std)
    return torch.as_tensor(standard, dtype=torch.float32)


def _numeric(column):
    try:
        np.asarray(column, dtype=np.float64)
        return True
    except (TypeError, ValueError):
        return False


def conditioning(config, cells, batch_file=None, covariate_file=None):
    """What a run's VAE reads beside each cell: ``None`` without covariates; the batch codes ``(N,)``
    (read one-hot) with a batch alone; else a float tensor ``(N, B + C)``: the batch one-hot, then the
    standardised continuous covariates (:meth:`pyro_vae.VAE.conditioning` reads both)."""
    codes = batch_codes(config, cells, batch_file)
    values = covariates(config, cells, covariate_file)
    if values is None:
        return codes
    if codes is None:
        return values
    return torch.cat([torch.nn.functional.one_hot(codes, len(config.batch_names)).float(), values], 1)


def width(config):
    """The width K of a run's cell conditioning: its batches plus its continuous covariates."""
    return len(config.batch_names) + len(config.covariate_names)


def batch_index(config, y):
    """Each cell's batch ``(N,)`` from its conditioning ``y`` (:func:`conditioning`), or ``None``."""
    if y is None or not config.batch_names:
        return None
    return y if not y.is_floating_point() else y[:, :len(config.batch_names)].argmax(1)


def as_batch(config, y, name):
    """The conditioning ``y`` with every cell moved to the batch called ``name`` (its continuous
    covariates kept): an ``int`` for batch codes, a float tensor like ``y`` otherwise."""
    if not config.batch_names:
        raise InputError("--as-batch needs a run trained with batches (--batch-file or --batch-key)")
    if name not in config.batch_names:
        raise InputError(f"the run has no batch {name!r}; its batches are "
                         f"{', '.join(map(str, config.batch_names[:5]))}")
    b = list(config.batch_names).index(name)
    if not y.is_floating_point():
        return b
    moved = y.clone()
    moved[:, :len(config.batch_names)] = 0.0
    moved[:, b] = 1.0
    return moved
