"""Differential expression between two groups of cells, in scVI's "change" mode (Boyeau et al. 2019).

For each group, :func:`expression_draws` draws cells with replacement and, for each, one draw of the guide
q(z | x), decoded to normalised expression (the decoder's proportions, :meth:`pyro_vae.VAE.expression`
with ``kept="draw"``; with ``as_y``, every cell decoded as one batch: batch-corrected). The i-th draws of the
two groups are paired into log fold changes, ``LFC_g = log2(h_a,g + pseudocount) - log2(h_b,g + pseudocount)``,
whose posterior gives each gene's mean, median and spread and the probability that ``|LFC_g| >= delta``
(``proba_de``); genes are called DE at a posterior expected false discovery rate (:func:`de_calls`).

``pyro-vae de RUN --groups FILE --a NAME [--b NAME]`` (or ``--groupby COLUMN`` for an AnnData run) writes
one row per gene, most probably DE first.
"""

import math

import numpy as np
import torch

from .errors import InputError

COLUMNS = ("lfc_mean", "lfc_median", "lfc_std", "proba_de", "bayes_factor", "scale_a", "scale_b", "is_de")


@torch.no_grad()
def expression_draws(vae, x, y=None, as_y=None, draws=5000, generator=None, batch_size=1000):
    """``draws`` samples of normalised expression (proportions summing to 1 per draw) of the cells ``x``
    ``(N, G)`` (a tensor or a scipy sparse matrix, densified ``batch_size`` rows at a time): cells drawn
    with replacement (``generator``), one guide draw each, read with their conditioning ``y`` (``(N,)`` or
    ``(N, K)``) and decoded under ``as_y`` (an ``int`` batch, each cell's own ``(N, K)``, or ``None``: ``y``).
    Returns ``(draws, G)`` float32."""
    if not getattr(vae.likelihood, "uses_library", False):
        raise InputError("differential expression compares the decoder's expression proportions; train with a "
                         "library-scaled count likelihood (nb:library, zinb:library, poisson:library, ...)")
    picks = torch.randint(0, x.shape[0], (draws,), generator=generator)
    out = []
    for start in range(0, draws, batch_size):
        index = picks[start:start + batch_size]
        rows = x[index.numpy()] if hasattr(x, "tocsr") else x[index]
        rows = torch.from_numpy(rows.toarray()) if hasattr(rows, "toarray") else rows
        rows = rows.to(vae.device, torch.float32)
        yb = None if y is None else y[index].to(vae.device)
        as_yb = as_y[index].to(vae.device) if torch.is_tensor(as_y) else as_y
        out.append(vae.expression(rows, y=yb, as_y=as_yb, library=1.0, kept="draw").cpu())
    return torch.cat(out)


def differential_expression(vae, x_a, x_b, y_a=None, y_b=None, as_y=None, draws=5000, delta=0.25,
                            pseudocount=0.0, fdr=0.05, seed=0):
    """scVI's change-mode differential expression of group A ``x_a`` ``(N_a, G)`` against group B
    ``x_b`` ``(N_b, G)`` (each with its conditioning ``y_a`` / ``y_b``, as the run's VAE reads it).

    Args:
        as_y: decode both groups as this one batch (an ``int``; or a pair of per-cell conditionings, A's
            ``(N_a, K)`` and B's ``(N_b, K)``): batch-corrected expression.
        draws: posterior draws per group (scVI's ``n_samples``, 5000).
        delta: the smallest absolute log2 fold change that counts as a change (scVI's 0.25).
        pseudocount: added to the proportions before the log (scVI's default 0).
        fdr: the posterior expected false discovery rate of the genes called DE.
        seed: the draws' seed; the same seed gives the same table.

    Returns:
        a dict of NumPy arrays ``(G,)``: ``lfc_mean``, ``lfc_median``, ``lfc_std`` (log2 A over B),
        ``proba_de`` (P(abs(LFC) >= delta)), ``bayes_factor`` (log odds of ``proba_de``), ``scale_a``,
        ``scale_b`` (mean normalised expression per group) and ``is_de`` (called at ``fdr``).
    """
    if x_a.shape[0] == 0 or x_b.shape[0] == 0:
        raise InputError(f"both groups need cells; got {x_a.shape[0]} and {x_b.shape[0]}")
    if draws < 1 or delta < 0 or pseudocount < 0 or not 0 < fdr < 1:
        raise InputError(f"need draws >= 1, delta >= 0, pseudocount >= 0 and 0 < fdr < 1; got draws={draws}, "
                         f"delta={delta}, pseudocount={pseudocount}, fdr={fdr}")
    cuda = [vae.device] if vae.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the caller's random state is left as it was
        torch.manual_seed(seed)  # the guide's draws
        g = torch.Generator().manual_seed(seed)
        as_a, as_b = as_y if isinstance(as_y, tuple) else (as_y, as_y)
        h_a = expression_draws(vae, x_a, y_a, as_a, draws, g).double()
        h_b = expression_draws(vae, x_b, y_b, as_b, draws, g).double()
    tiny = torch.finfo(torch.float32).tiny
    lfc = torch.log2((h_a + pseudocount).clamp(min=tiny)) - torch.log2((h_b + pseudocount).clamp(min=tiny))
    proba = (lfc.abs() >= delta).double().mean(0)
    eps = 1e-8
    result = dict(lfc_mean=lfc.mean(0), lfc_median=lfc.median(0).values, lfc_std=lfc.std(0),
                  proba_de=proba, bayes_factor=torch.log(proba + eps) - torch.log(1 - proba + eps),
                  scale_a=h_a.mean(0), scale_b=h_b.mean(0))
    result = {k: v.numpy() for k, v in result.items()}
    result["is_de"] = de_calls(result["proba_de"], fdr)
    return result


def de_calls(proba_de, fdr=0.05):
    """The genes called DE at a posterior expected false discovery rate ``fdr``: the largest set of the most
    probable genes whose mean ``1 - proba_de`` is at most ``fdr`` (scVI's ``is_de_fdr``); ``(G,)`` bool."""
    proba_de = np.asarray(proba_de, dtype=np.float64)
    order = np.argsort(-proba_de, kind="stable")
    expected = np.cumsum(1 - proba_de[order]) / np.arange(1, len(order) + 1)
    calls = np.zeros(len(order), dtype=bool)
    passing = np.flatnonzero(expected <= fdr)
    if len(passing):
        calls[order[:passing[-1] + 1]] = True
    return calls


def table(result, genes):
    """The rows of ``result`` (:func:`differential_expression`) as CSV text, one gene per row, the most
    probably DE first (ties by the larger ``abs(lfc_mean)``)."""
    order = sorted(range(len(genes)), key=lambda g: (-result["proba_de"][g], -abs(result["lfc_mean"][g])))
    lines = ["gene," + ",".join(COLUMNS)]
    for g in order:
        values = [str(bool(result[c][g])).lower() if c == "is_de" else _number(result[c][g]) for c in COLUMNS]
        lines.append(f"{genes[g]}," + ",".join(values))
    return "\n".join(lines) + "\n"


def _number(v):
    v = float(v)
    return f"{v:.6g}" if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


def de_run(run_dir, a, b=None, groups=None, groupby=None, as_batch=None, out=None, draws=5000, delta=0.25,
           fdr=0.05, seed=0, checkpoint=None, device=None, picture=True):
    """``pyro-vae de``: differential expression of the run's cells in group ``a`` against group ``b`` (default:
    every other cell), the groups given by ``groups`` (a text file of one label per cell, in the data's cell
    order) or ``groupby`` (an ``.obs`` column of the run's AnnData file). Writes :func:`table` to ``out``
    (default ``RUN/de_A_vs_B.csv``) and, with ``picture``, its volcano plot beside it (the same name, ``.png``,
    :func:`pyro_vae.plots.save_volcano`); returns ``(path, result, (N_a, N_b))``."""
    from pathlib import Path

    from . import cells as cells_
    from . import data as data_
    from .checkpoints import write_text_atomic
    from .config import RunConfig
    from .train import checkpoint_name, load_run, load_run_checkpoint

    run_dir = Path(run_dir)
    if (groups is None) == (groupby is None):
        raise InputError("give the groups with one of --groups FILE (a label per cell) or --groupby COLUMN (an "
                         "AnnData .obs column)")
    saved = RunConfig.from_checkpoint(load_run_checkpoint(run_dir / "checkpoint.pt"), run_dir / "checkpoint.pt")
    if saved.dataset != "counts":
        raise InputError("pyro-vae de compares groups of cells: give a run trained on count data (--dataset counts)")
    vae, config = load_run(run_dir, device=device, checkpoint=checkpoint_name(run_dir, saved, checkpoint))
    vae.eval()
    cells, y = cells_.of_run(config)
    n = cells.x.shape[0]
    if groupby is not None:
        labels = np.asarray([cells_.label(v) for v in cells_.obs_column(cells, groupby, "--groupby", "--groups FILE")])
    else:
        codes, names = data_.read_labels(groups, n)
        labels = np.asarray(names)[codes.numpy()]
    known = sorted(set(labels.tolist()))
    for name in (a, b):
        if name is not None and name not in known:
            raise InputError(f"no cell is in group {name!r}; the groups are {', '.join(known[:8])}")
    in_a = labels == a
    in_b = labels == b if b is not None else ~in_a
    if a == b:
        raise InputError(f"--a and --b are both {a!r}; compare two different groups")
    as_y = cells_.as_batch(config, y, as_batch) if as_batch is not None else None
    ia, ib = np.flatnonzero(in_a), np.flatnonzero(in_b)
    if torch.is_tensor(as_y):  # continuous covariates: each cell keeps its own
        as_y = (as_y[torch.from_numpy(ia)], as_y[torch.from_numpy(ib)])
    result = differential_expression(
        vae, cells.x[ia], cells.x[ib], None if y is None else y[torch.from_numpy(ia)],
        None if y is None else y[torch.from_numpy(ib)], as_y=as_y, draws=draws, delta=delta, fdr=fdr, seed=seed)
    out = Path(out) if out else run_dir / f"de_{_safe(a)}_vs_{_safe(b if b is not None else 'rest')}.csv"
    write_text_atomic(out, table(result, cells.genes))
    if picture:
        from .plots import save_volcano

        save_volcano(result, cells.genes, out.with_suffix(".png"), a, b if b is not None else "the rest")
    return out, result, (len(ia), len(ib))


def _safe(name):
    """A group's name as part of a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))
