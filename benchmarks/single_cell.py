"""Count data as a single-cell analyst meets it: a simulated matrix with known truth, the command line on it, and
how well each embedding recovers the cell types, mixes the batches and ignores the library size.

The simulation: C cells x G genes, T cell types (each type raises a tenth of the genes), library sizes spread
over a factor of 10, gene-specific NB dispersion and dropout, two batches whose gene-wise multiplicative effect
is strong; written as a 10x Genomics folder (``matrix.mtx`` genes x cells, ``barcodes.tsv``, ``features.tsv``)
with a batch file (one label per cell) beside it.

    python benchmarks/single_cell.py simulate --out ~/runs/sc                 # the data
    python benchmarks/single_cell.py run --out ~/runs/sc                      # PCA and the command-line routes

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
    truth = {"types": kind.tolist(), "batches": batch.tolist(), "log_library": np.log(counts.sum(1)).tolist()}
    (out / "truth.json").write_text(json.dumps(truth))
    print(f"wrote {cells} cells x {genes} genes to {folder} ({(counts == 0).mean():.0%} zeros; library sizes "
          f"{counts.sum(1).min()}..{counts.sum(1).max()})")
    return truth


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
        flags = [str(out / "batches.txt") if f == "BATCHES" else f for f in flags]
        z, ev, seconds = cli_route(out, name, flags, args.epochs)
        rows.append({"route": f"pyro-vae train --dataset counts {' '.join(flags)}".strip().replace(str(out) + "/", ""),
                     **scores(z, truth, types), "test_elbo": ev["elbo"], "iw_log_likelihood": ev["iw_log_likelihood"],
                     "epochs": args.epochs, "seconds": seconds,
                     "machine": f"{platform.machine()} cpu, {args.threads} thread(s)"})
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")


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
    args = parser.parse_args()
    if args.command == "simulate":
        simulate(Path(args.out).expanduser(), args.cells, args.genes, seed=args.seed)
    else:
        run(args)
