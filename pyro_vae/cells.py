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
        named: whether the cells have names of their own (not row numbers), which side files may be
            matched against.
        named_genes: whether the genes have names of their own (not ``g0 ..``).
    """

    x: object
    names: list
    genes: list
    obs: object = None
    path: str = ""
    named: bool = True
    named_genes: bool = True


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
    named = cells is not None and len(cells) == x.shape[0]
    genes = _feature_names(path)
    named_genes = genes is not None and len(genes) == x.shape[1]
    return Cells(x, cells if named else [str(i) for i in range(x.shape[0])],
                 unique_names(genes) if named_genes else [f"g{j}" for j in range(x.shape[1])], path=str(path),
                 named=named, named_genes=named_genes)


def unique_names(names):
    """``names`` with repeats made unique as scanpy's ``var_names_make_unique`` does (``A, A, A`` ->
    ``A, A-1, A-2``): 10x references repeat some gene symbols."""
    seen, out = {}, []
    taken = set(names)
    for name in names:
        if name in seen:
            k = seen[name]
            while f"{name}-{k}" in taken:
                k += 1
            seen[name] = k + 1
            taken.add(f"{name}-{k}")
            out.append(f"{name}-{k}")
        else:
            seen[name] = 1
            out.append(name)
    return out


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
        obs, var, m, layers, raw = _h5ad_parts(anndata, path, layer)
    except InputError:
        raise
    except Exception as err:  # h5py and anndata raise assorted types for broken files
        raise InputError(f"could not read the AnnData file {path}: {type(err).__name__}: {err}") from err
    m = scipy.sparse.csr_matrix(m)  # sparse stays as it is; the values are checked in their own dtype
    if 0 in m.shape:
        raise InputError(f"{path} holds {m.shape[0]} cells x {m.shape[1]} genes; training needs both")
    where = f"{path} ({'layer ' + repr(layer) if layer else '.X'})"
    try:
        data_.check_counts(m, where)
    except InputError as err:
        others = [name for name in layers if name != layer]
        hint = (f"; name the raw counts with --layer ({', '.join(others)})" if others else
                "; store the raw counts in .X or a layer" + (" (this file's .raw is not read: copy adata.raw.X "
                                                             "into a layer)" if raw else ""))
        raise InputError(f"{err}{hint}") from None
    return Cells(m.astype(np.float32), [str(v) for v in obs.index], unique_names([str(v) for v in var.index]), obs,
                 str(path))


def _h5ad_parts(anndata, path, layer):
    """``(obs, var, matrix, layer names, has .raw)`` of an ``.h5ad`` file, reading only ``.obs``, ``.var`` and
    the one matrix asked for (not every layer, as ``anndata.read_h5ad`` would)."""
    import h5py

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    with h5py.File(path, "r") as f:
        layers = list(f["layers"].keys()) if "layers" in f else []
        if layer and layer not in layers:
            raise InputError(f"{path} has no layer {layer!r}; its layers are: {', '.join(layers) or 'none'} (leave "
                             "--layer out to read .X)")
        if not layer and "X" not in f:
            raise InputError(f"{path} has no .X; name a layer with --layer ({', '.join(layers) or 'it has none'})")
        return (read_elem(f["obs"]), read_elem(f["var"]), read_elem(f["layers"][layer] if layer else f["X"]),
                layers, "raw" in f)


def _feature_names(path):
    """The genes of a 10x ``features.tsv(.gz)`` / ``genes.tsv(.gz)`` in (or beside) ``path``: the symbol
    column where there is one, else the ids; ``None`` where there is no such file."""
    _, rows = data_.side_table(path, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    return None if rows is None else [row[1] if len(row) > 1 else row[0] for row in rows]


# ------------------------------------------------------------------ covariates
def read_covariates(path, n, cell_names=None):
    """Continuous covariates, one row per cell of a CSV file (a header row of names, else ``c0 ..``; a
    first column of cell names, as pandas' and R's ``write.csv`` write, is matched against ``cell_names``):
    ``(values, names)``, ``values`` ``(n, C)`` float64 in the cells' order. Rows by position need exactly
    ``n`` of them; named rows must cover every cell. A value that is not a finite number is refused with
    one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"covariate file {path} does not exist; pass a CSV with one row of numbers per cell")
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    header = bool(rows) and not all(_number(v) is not None for v in rows[0][1:] or rows[0])
    named = bool(rows[header:]) and _number(rows[header][0]) is None  # a first column of names
    names = [v.strip() for v in rows[0]][named:] if header else \
        [f"c{j}" for j in range(len(rows[0]) - named if rows else 0)]
    rows = rows[header:]
    if not names:
        raise InputError(f"{path} holds no columns of numbers; give one row of numbers per cell")
    row_names = [row[0].strip() for row in rows] if named else None
    rows = [row[1:] for row in rows] if named else rows
    values = np.empty((len(rows), len(names)))
    for i, row in enumerate(rows):
        parsed = [_number(v) for v in row]
        if len(row) != len(names) or any(v is None or not np.isfinite(v) for v in parsed):
            bad = next((v for v, p in zip(row, parsed) if p is None or not np.isfinite(p)), f"{len(row)} columns")
            raise InputError(f"{path}: row {i + 1} of the covariates holds {bad!r}; each row needs {len(names)} "
                             "finite numbers")
        values[i] = parsed
    if row_names is None:
        if len(rows) != n:
            raise InputError(f"{path} holds {len(rows)} rows of covariates for {n} cells; give one row per cell, in "
                             "the data's cell order (or a first column of cell names)")
        return values, names
    if cell_names is None:
        raise InputError(f"{path} names its rows, but the cells have no names to match them with (a 10x "
                         "barcodes.tsv or an AnnData file names them); drop the name column and give the rows in "
                         "the data's cell order")
    where = {name: i for i, name in enumerate(row_names)}
    missing = [name for name in cell_names if name not in where]
    if missing:
        raise InputError(f"{path} has no covariates for {len(missing)} of the {n} cells (e.g. {missing[0]!r}); "
                         "give a row for every cell, named as the data name it")
    return values[[where[name] for name in cell_names]], names


def _number(v):
    try:
        return float(v)
    except ValueError:
        return None


def obs_column(cells, key, flag, instead):
    """AnnData's ``.obs[key]`` for the cells (``pandas.Series``); a file without ``.obs``, a missing column or
    a cell without a value is refused in one line naming ``flag`` (and the flag to use ``instead``)."""
    if cells.obs is None:
        raise InputError(f"{flag} reads a column of an AnnData file's .obs, but {cells.path} is not a .h5ad file; "
                         f"use {instead} for it")
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
        return [label(v) for v in obs_column(cells, config.batch_key, "--batch-key", "--batch-file")]
    path = batch_file or config.batch_file
    if not path:
        return None
    codes, names = data_.read_labels(path, n)
    return [names[c] for c in codes.tolist()]


def label(v):
    """A batch label as text, a whole number the same however the column stores it (``1``, ``1.0``)."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


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


def covariates(config, cells, covariate_file=None, fit_rows=None):
    """The cells' continuous covariates standardised with the run's means and spreads (a new run takes
    them from the cells ``fit_rows`` (its training cells; default all) and keeps them in
    ``config.covariate_names/_mean/_std``): ``(N, C)`` float32, or ``None`` for a run without them."""
    n = cells.x.shape[0]
    if config.covariate_keys:
        columns = [obs_column(cells, key, "--covariate-keys", "--covariate-file") for key in config.covariate_keys]
        bad = next(((k, c.dtype) for k, c in zip(config.covariate_keys, columns) if not _numeric(c)), None)
        if bad is not None:
            raise InputError(f"{cells.path}: .obs[{bad[0]!r}] is not numeric (dtype {bad[1]}); continuous covariates "
                             "are numbers (a categorical column goes to --batch-key)")
        values = np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)
        names = list(config.covariate_keys)
        if not np.isfinite(values).all():
            raise InputError(f"{cells.path}: the covariates {', '.join(names)} hold NaN or infinite values")
    elif covariate_file or config.covariate_file:
        values, names = read_covariates(covariate_file or config.covariate_file, n,
                                        cells.names if cells.named else None)
    else:
        return None
    if not config.covariate_names:
        fit = values if fit_rows is None else values[np.asarray(fit_rows)]
        spread = fit.std(0)
        config.covariate_names = names
        config.covariate_mean = fit.mean(0).tolist()
        config.covariate_std = np.where(spread > 0, spread, 1.0).tolist()
    elif names != list(config.covariate_names):
        raise InputError(f"the covariates are {', '.join(names)}, but the run was trained on "
                         f"{', '.join(config.covariate_names)}; give the run's covariates, in its order")
    standard = (values - np.asarray(config.covariate_mean)) / np.asarray(config.covariate_std)
    return torch.as_tensor(standard, dtype=torch.float32)


def _numeric(column):
    """Whether an ``.obs`` column holds numbers (or booleans), not categories that look like numbers."""
    import pandas as pd

    return pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype)


def conditioning(config, cells, batch_file=None, covariate_file=None, fit_rows=None):
    """What a run's VAE reads beside each cell: ``None`` without covariates; the batch codes ``(N,)``
    (read one-hot) with a batch alone; else a float tensor ``(N, B + C)``: the batch one-hot, then the
    standardised continuous covariates (:meth:`pyro_vae.VAE.conditioning` reads both; a new run
    standardises with the cells ``fit_rows``, its training cells)."""
    codes = batch_codes(config, cells, batch_file)
    values = covariates(config, cells, covariate_file, fit_rows)
    if values is None:
        return codes
    if codes is None:
        return values
    return torch.cat([torch.nn.functional.one_hot(codes, len(config.batch_names)).float(), values], 1)


def in_run_order(config, cells):
    """``cells`` with their genes in the run's order (``config.genes``, kept by training where the data
    name their genes): another file's genes are matched by name, and one the run needs but the file lacks
    is refused; without names on either side only the count of genes is checked."""
    g = cells.x.shape[1]
    if not (config.genes and cells.named_genes):
        if config.genes and g != len(config.genes):
            raise InputError(f"{cells.path} has {g} genes but the run was trained on {len(config.genes)}; give the "
                             "run's genes, in its order")
        return cells
    if list(cells.genes) == list(config.genes):
        return cells
    where = {name: j for j, name in enumerate(cells.genes)}
    missing = [name for name in config.genes if name not in where]
    if missing:
        raise InputError(f"{cells.path} lacks {len(missing)} of the run's {len(config.genes)} genes (e.g. "
                         f"{', '.join(missing[:3])}); give a matrix with the run's genes")
    index = [where[name] for name in config.genes]
    return dataclasses.replace(cells, x=cells.x[:, index], genes=list(config.genes))


def of_run(config, source=None):
    """``(cells, y)``: the cells a run reads (its own data, or another file through ``source``, the run's
    config from :func:`reading`), their genes in the run's order, and their conditioning (``None`` for a run
    without covariates)."""
    source = source or config
    cells = in_run_order(config, read_cells(source.data_file, source.transpose, source.layer))
    return cells, conditioning(source, cells) if config.cell_covariates else None


def reading(config, data_file, transpose=False, layer=None, batch_file=None, batch_key=None, covariate_file=None,
            covariate_keys=None):
    """The run's ``config`` made to read another file, ``data_file``, with its own batch and covariates: the
    flags given, else for an AnnData file the run's layer, batch key and covariate keys. The run's batch
    names, covariate names and standardisation stay; a run that reads a batch or covariates needs them
    for the new cells too, and one that does not refuses them."""
    h5ad = is_anndata(data_file)
    layer = layer or (config.layer if h5ad else None)
    if batch_file is None and batch_key is None and h5ad:
        batch_key = config.batch_key
    if covariate_file is None and not covariate_keys and h5ad:
        covariate_keys = list(config.covariate_keys)
    other = dataclasses.replace(config, data_file=str(data_file), transpose=bool(transpose), layer=layer,
                                batch_file=batch_file, batch_key=batch_key, covariate_file=covariate_file,
                                covariate_keys=list(covariate_keys or []))
    for what, needed, given in (("batch", config.batch_names, other.batch_file or other.batch_key),
                                ("covariates", config.covariate_names, other.covariate_file or other.covariate_keys)):
        flags = "--batch-file (or --batch-key for an AnnData file)" if what == "batch" else \
            "--covariate-file (or --covariate-keys for an AnnData file)"
        if needed and not given:
            raise InputError(f"the run reads each cell's {what}: give {data_file}'s with {flags}")
        if given and not needed:
            raise InputError(f"the run was trained without {what}; leave out {flags.split(' ')[0]}")
    return other


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
