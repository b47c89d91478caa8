"""Count data as a single-cell analyst meets it: a simulated matrix with known truth, the command line on it, and
how well each embedding recovers the cell types, mixes the batches and ignores the library size.

The simulation: C cells x G genes, T cell types (each type raises a tenth of the genes), library sizes spread
over a factor of 10, gene-specific NB dispersion and dropout, two batches whose gene-wise multiplicative effect
is strong; written as a 10x Genomics folder (``matrix.mtx`` genes x cells, ``barcodes.tsv``, ``features.tsv``)
with a batch file (one label per cell) beside it.

    python benchmarks/single_cell.py simulate --out ~/runs/sc                 # the data
    python benchmarks/single_cell.py run --out ~/runs/sc                      # PCA and the command-line routes
    python benchmarks/single_cell.py de --out ~/runs/sc --run cli-batch-file  # differential expression, 0 vs 1

``simulate`` also writes the same cells as an AnnData file, ``cells.h5ad`` (the batch in ``.obs["batch"]``),
which the route ``cli-anndata`` reads with ``--batch-key batch``.

Scores of an embedding (every cell's latent mean): the adjusted Rand index of k-means (T clusters, 10
restarts) against the types; the accuracy of a 15-nearest-neighbour vote predicting each cell's batch from
the others (0.5: batches mixed, 1.0: separated); the R^2 of the log library size from a linear map of the
embedding (fitted on half the cells, scored on the other half); and, for the VAEs, the held-out ELBO per
cell from ``pyro-vae evaluate``. Rows go to ``benchmarks/results/single_cell.json``.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse

RESULTS = Path(__file__).parent / "results" / "single_cell.json"


def simulate(out, cells=3000, genes=500, types=4, seed=0):
    """Write the 10x folder and ``batches.txt`` under ``out``; returns the truth ``(types, batches, log_lib)``."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, types, cells)
    batch = rng.integers(0, 2, cells)
    base = rng.normal(0.0, 1.0, genes)
    effect = np.zeros((types, genes))
    for t in range(types):
        up = rng.choice(genes, genes // 10, replace=False)
        effect[t, up] = rng.normal(2.0, 0.5, len(up))
    batch_effect = rng.normal(0.0, 0.7, (2, genes))
    logits = base + effect[kind] + batch_effect[batch]
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    library = np.exp(rng.uniform(np.log(1000), np.log(10000), cells))  # a factor of 10
    theta = rng.uniform(1.0, 10.0, genes)
    mean = library[:, None] * rho
    counts = rng.negative_binomial(theta, theta / (theta + mean))
    counts[rng.random(counts.shape) < rng.uniform(0.0, 0.3, genes)] = 0  # dropout per gene
    out = Path(out)
    folder = out / "10x"
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.mmwrite(str(folder / "matrix.mtx"), scipy.sparse.coo_matrix(counts.T))  # genes x cells, as 10x writes
    (folder / "barcodes.tsv").write_text("".join(f"CELL{i:05d}-1\n" for i in range(cells)))
    (folder / "features.tsv").write_text("".join(f"GENE{g:04d}\tGENE{g:04d}\tGene Expression\n" for g in range(genes)))
    (out / "batches.txt").write_text("".join(f"batch{b}\n" for b in batch))
    truth = {"types": kind.tolist(), "batches": batch.tolist(), "log_library": np.log(counts.sum(1)).tolist(),
             "base": base.tolist(), "effect": effect.tolist(), "batch_effect": batch_effect.tolist()}
    _write_h5ad(out / "cells.h5ad", counts, batch)
    (out / "truth.json").write_text(json.dumps(truth))
    print(f"wrote {cells} cells x {genes} genes to {folder} ({(counts == 0).mean():.0%} zeros; library sizes "
          f"{counts.sum(1).min()}..{counts.sum(1).max()})")
    return truth


def _write_h5ad(path, counts, batch):
    """The cells as AnnData (needs ``anndata``; skipped with a note where it is missing)."""
    try:
        import anndata
        import pandas as pd
    except ImportError:
        print("anndata is not installed: no cells.h5ad (pip install anndata)")
        return
    obs = pd.DataFrame({"batch": pd.Categorical([f"batch{b}" for b in batch])},
                       index=[f"CELL{i:05d}-1" for i in range(len(batch))])
    var = pd.DataFrame(index=[f"GENE{g:04d}" for g in range(counts.shape[1])])
    anndata.AnnData(X=scipy.sparse.csr_matrix(counts.astype(np.float32)), obs=obs, var=var).write_h5ad(path)


# ------------------------------------------------------------------ scores
def kmeans(z, k, restarts=10, iters=100, seed=0):
    """Lloyd's k-means with k-means++ starts; the labels of the restart with the lowest inertia."""
    rng = np.random.default_rng(seed)
    best, labels = np.inf, None
    for _ in range(restarts):
        centres = [z[rng.integers(len(z))]]
        for _ in range(k - 1):
            d = np.min([((z - c) ** 2).sum(1) for c in centres], 0)
            centres.append(z[rng.choice(len(z), p=d / d.sum())])
        centres = np.array(centres)
        for _ in range(iters):
            assign = ((z[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.array([z[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = ((z - centres[assign]) ** 2).sum()
        if inertia < best:
            best, labels = inertia, assign
    return labels


def adjusted_rand_index(a, b):
    """Hubert and Arabie's adjusted Rand index of two labellings ``(N,)``."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = lambda m: (m * (m - 1) / 2).sum()  # noqa: E731
    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(a) * (len(a) - 1) / 2
    expected = rows * cols / total
    return float((both - expected) / (0.5 * (rows + cols) - expected))


def knn_batch_accuracy(z, batches, k=15):
    """How often the majority batch of a cell's k nearest other cells is its own (0.5: mixed)."""
    sq = (z ** 2).sum(1)
    d = sq[:, None] + sq[None] - 2 * z @ z.T
    np.fill_diagonal(d, np.inf)
    near = np.argpartition(d, k, axis=1)[:, :k]
    return float(((np.asarray(batches)[near].mean(1) > 0.5) == np.asarray(batches)).mean())


def library_r2(z, log_library, seed=0):
    """R^2 of the log library from an affine map of ``z``, fitted on half the cells, scored on the rest."""
    order = np.random.default_rng(seed).permutation(len(z))
    fit, test = order[: len(z) // 2], order[len(z) // 2:]
    design = np.hstack([z, np.ones((len(z), 1))])
    coef, *_ = np.linalg.lstsq(design[fit], log_library[fit], rcond=None)
    residual = log_library[test] - design[test] @ coef
    return float(1 - (residual ** 2).sum() / ((log_library[test] - log_library[fit].mean()) ** 2).sum())


def scores(z, truth, types):
    return {"ari": adjusted_rand_index(kmeans(z, types), truth["types"]),
            "knn_batch": knn_batch_accuracy(z, truth["batches"]),
            "r2_log_library": library_r2(z, np.asarray(truth["log_library"]))}


# ------------------------------------------------------------------ routes
def pca(out, components=10):
    counts = scipy.io.mmread(str(Path(out) / "10x" / "matrix.mtx")).T.toarray()
    logs = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    logs -= logs.mean(0)
    _, _, v = np.linalg.svd(logs, full_matrices=False)
    return logs @ v[:components].T


def pyro_vae(*args):
    subprocess.run([sys.executable, "-m", "pyro_vae", *args], check=True)


def cli_route(out, name, flags, epochs):
    """Train with ``pyro-vae train --dataset counts`` and ``flags``, evaluate, encode; the embedding and eval."""
    run = Path(out) / name
    data = ["--dataset", "counts", "--data-file", str(Path(out) / "10x" / "matrix.mtx"), "--transpose"]
    if "--data-file" in flags:  # the route reads another file (the AnnData one)
        data = ["--dataset", "counts"]
    start = time.perf_counter()
    pyro_vae("train", "--out", str(run), *data, "--epochs", str(epochs), "--no-progress", "--overwrite", *flags)
    seconds = time.perf_counter() - start
    pyro_vae("evaluate", str(run), "--iw-samples", "100", "--no-progress")
    pyro_vae("encode", str(run), "--out", str(run / "latent.npy"))
    return np.load(run / "latent.npy"), json.loads((run / "eval.json").read_text()), seconds


ROUTES = {
    "cli-raw-input": ["--count-input", "raw", "--latent-dims", "50", "--hidden", "400", "--likelihood", "nb"],
    "cli-defaults": [],
    "cli-batch-file": ["--batch-file", "BATCHES"],
    "cli-anndata": ["--data-file", "H5AD", "--batch-key", "batch"],
}


def run(args):
    out = Path(args.out).expanduser()
    truth = json.loads((out / "truth.json").read_text())
    types = len(set(truth["types"]))
    rows = [{"route": "PCA of log1p(counts per 10k), 10 PCs", **scores(pca(out), truth, types)}]
    print(json.dumps(rows[-1]), flush=True)
    for name, flags in ROUTES.items():
        if args.only and name not in args.only:
            continue
        flags = [{"BATCHES": str(out / "batches.txt"), "H5AD": str(out / "cells.h5ad")}.get(f, f) for f in flags]
        z, ev, seconds = cli_route(out, name, flags, args.epochs)
        rows.append({"route": f"pyro-vae train --dataset counts {' '.join(flags)}".strip().replace(str(out) + "/", ""),
                     **scores(z, truth, types), "test_elbo": ev["elbo"], "iw_log_likelihood": ev["iw_log_likelihood"],
                     "epochs": args.epochs, "seconds": seconds,
                     "machine": f"{platform.machine()} cpu, {args.threads} thread(s)"})
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")


def true_lfc(truth, a, b):
    """The simulation's log2 fold change of the expression proportions of type ``a`` over type ``b`` ``(G,)``,
    each type's proportions averaged over both batches (the batch-corrected truth)."""
    base, effect, batch_effect = (np.asarray(truth[k]) for k in ("base", "effect", "batch_effect"))

    def rho(t):
        logits = base + effect[t] + batch_effect  # (2 batches, G)
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).mean(0)

    return np.log2(rho(a)) - np.log2(rho(b))


def de(args):
    """``pyro-vae de`` on a trained route, type ``a`` against type ``b``, scored against the simulation."""
    out = Path(args.out).expanduser()
    truth = json.loads((out / "truth.json").read_text())
    if "effect" not in truth:
        raise SystemExit(f"{out}/truth.json predates the DE truth: run simulate again (same seed, same cells)")
    run = out / args.run
    groups = out / "types.txt"
    groups.write_text("".join(f"type{t}\n" for t in truth["types"]))
    table = run / f"de_type{args.a}_vs_type{args.b}.csv"
    start = time.perf_counter()
    pyro_vae("de", str(run), "--groups", str(groups), "--a", f"type{args.a}", "--b", f"type{args.b}",
             *(["--as-batch", args.as_batch] if args.as_batch else []), "--out", str(table))
    seconds = time.perf_counter() - start
    lines = table.read_text().splitlines()
    header = lines[0].split(",")
    rows = {r[0]: dict(zip(header[1:], r[1:])) for r in (line.split(",") for line in lines[1:])}
    genes = [f"GENE{g:04d}" for g in range(len(rows))]
    lfc = true_lfc(truth, args.a, args.b)
    estimate = np.array([float(rows[g]["lfc_median"]) for g in genes])
    proba = np.array([float(rows[g]["proba_de"]) for g in genes])
    called = np.array([rows[g]["is_de"] == "true" for g in genes])
    changed = np.abs(lfc) >= 1.0  # clearly changed genes
    unchanged = np.abs(lfc) < 0.25  # below scVI's delta
    ranks = proba.argsort().argsort()
    auc = float((ranks[changed][:, None] > ranks[unchanged][None]).mean())
    row = {"run": args.run, "a": args.a, "b": args.b, "as_batch": args.as_batch,
           "genes_changed_1": int(changed.sum()), "genes_called": int(called.sum()),
           "called_that_changed_0.25": float((np.abs(lfc[called]) >= 0.25).mean()) if called.any() else None,
           "changed_1_called": float(called[changed].mean()),
           "auc_proba_changed_vs_unchanged": auc,
           "lfc_correlation": float(np.corrcoef(estimate, lfc)[0, 1]), "seconds": seconds,
           "machine": f"{platform.machine()} cpu"}
    print(json.dumps(row), flush=True)
    path = RESULTS.with_name("single_cell_de.json")
    old = json.loads(path.read_text()) if path.is_file() else []
    old = [r for r in old if (r["run"], r["a"], r["b"], r.get("as_batch")) != (args.run, args.a, args.b, args.as_batch)]
    path.write_text(json.dumps(old + [row], indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate")
    s.add_argument("--out", required=True)
    s.add_argument("--cells", type=int, default=3000)
    s.add_argument("--genes", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--epochs", type=int, default=300, help="the count data's default")
    r.add_argument("--only", nargs="*")
    r.add_argument("--threads", type=int, default=1)
    d = sub.add_parser("de")
    d.add_argument("--out", required=True)
    d.add_argument("--run", default="cli-batch-file")
    d.add_argument("--a", type=int, default=0)
    d.add_argument("--b", type=int, default=1)
    d.add_argument("--as-batch")
    args = parser.parse_args()
    if args.command == "simulate":
        simulate(Path(args.out).expanduser(), args.cells, args.genes, seed=args.seed)
    elif args.command == "de":
        de(args)
    else:
        run(args)
