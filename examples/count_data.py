"""A negative-binomial (or zero-inflated NB) VAE on count data from a known low-dimensional model.

The example makes a cells x genes count matrix from a model whose latent is
known: per cell u ~ N(0, I_2) and a library size s ~ LogNormal(0, 0.3); per
gene a loading w_g, an offset b_g, a dispersion theta_g and (for ZINB) a
dropout rate pi_g; counts x_ig ~ NB(mean s * exp(w_g . u + b_g), theta_g),
set to 0 with probability pi_g. It writes the matrix to ``--out`` as a
``scipy.sparse`` ``.npz`` file, reads it back with ``data.load_counts``
as a user's own file would be read, and trains a VAE with Pyro's SVI on 80%
of the cells. The encoder reads log(1 + x), as scVI's does.

It prints the test ELBO and IW log p(x) and how well the learned latent
recovers u: the R^2 of a linear map from E_q[z | x] to u, fitted on the
training cells and scored on the test cells, next to the same R^2 for the top
principal components of log(1 + x) as a baseline.

    python examples/count_data.py                       # NB likelihood
    python examples/count_data.py --likelihood zinb     # ZINB, data with dropouts
    python examples/count_data.py --counts my.mtx --transpose   # your own matrix (no R^2: no truth)
"""

import argparse
from pathlib import Path

import numpy as np
import pyro
import scipy.sparse
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_vae import VAE, data, evaluate, likelihoods, nets, posteriors

LIKELIHOODS = {"nb": likelihoods.NegativeBinomial, "zinb": likelihoods.ZeroInflatedNegativeBinomial,
               "poisson": likelihoods.Poisson}


def generate(cells, genes, true_dim, dropout, seed):
    """Counts ``(cells, genes)`` and the true latent ``(cells, true_dim)`` of the model above."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((cells, true_dim))
    library = rng.lognormal(0.0, 0.3, size=(cells, 1))
    w = rng.standard_normal((true_dim, genes)) * 0.8
    b = rng.normal(1.0, 0.5, size=genes)
    theta = rng.uniform(2.0, 10.0, size=genes)
    mean = library * np.exp(u @ w + b)
    counts = rng.negative_binomial(theta, theta / (theta + mean))  # numpy's NB(n, p) has mean n (1 - p) / p
    if dropout:
        counts[rng.random(counts.shape) < rng.uniform(0.05, 0.3, size=genes)] = 0
    return counts.astype(np.float64), u


class Log1pEncoder(nn.Module):
    """``(*batch, G) counts -> (*batch, hidden[-1])``: an MLP on log(1 + x)."""

    def __init__(self, genes, hidden):
        super().__init__()
        self.mlp = nets.MLPEncoder((genes,), hidden=hidden)
        self.x_shape, self.out_features = self.mlp.x_shape, self.mlp.out_features

    def forward(self, x):
        return self.mlp(torch.log1p(x))


def linear_r2(features_train, target_train, features_test, target_test):
    """R^2 on the test rows of the least-squares affine map features -> target fitted on the training rows,
    pooled over the target's dims: 1 - sum |t - t_hat|^2 / sum |t - mean t|^2."""
    design = lambda f: np.hstack([f, np.ones((f.shape[0], 1))])  # noqa: E731
    coef, *_ = np.linalg.lstsq(design(features_train), target_train, rcond=None)
    residual = target_test - design(features_test) @ coef
    return 1.0 - (residual ** 2).sum() / ((target_test - target_train.mean(0)) ** 2).sum()


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    truth = None
    path = args.counts
    if path is None:
        counts, truth = generate(args.cells, args.genes, args.true_dim, args.likelihood == "zinb", args.seed)
        path = out / "counts.npz"
        scipy.sparse.save_npz(path, scipy.sparse.csr_matrix(counts))
        print(f"wrote {counts.shape[0]} cells x {counts.shape[1]} genes to {path} "
              f"({(counts == 0).mean():.0%} zeros, mean count {counts.mean():.2f})")
    x = data.load_counts(path, transpose=args.transpose)  # (cells, genes) float32
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n_train = int(0.8 * x.shape[0])
    train_idx, test_idx = order[:n_train], order[n_train:]
    device = torch.device("cuda" if args.cuda else "cpu")
    x_train, x_test = x[train_idx].to(device), x[test_idx].to(device)

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    likelihood = LIKELIHOODS[args.likelihood]()
    genes = x.shape[1]
    vae = VAE(encoder=Log1pEncoder(genes, hidden=(128,)),
              decoder=nets.MLPDecoder(args.latent_dim, (genes,), hidden=(128,), out_channels=likelihood.channels),
              latent_dims=[args.latent_dim], likelihood=likelihood).to(device)
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.learning_rate}), loss=Trace_ELBO())
    batches = data.Batches(x_train, args.batch_size, torch.Generator(device=device).manual_seed(args.seed))
    for epoch in range(1, args.num_epochs + 1):
        loss = sum(svi.step(xb) for xb in batches) / len(x_train)
        if epoch % 10 == 0 or epoch == args.num_epochs:
            print(f"  epoch {epoch:03d}  training loss: {loss:.3f} nats per cell", flush=True)

    vae.eval()
    summary = evaluate.evaluate(vae, x_test, iw_samples=args.iw_samples, progress=False)
    print(f"{args.likelihood}: test ELBO {summary['elbo']:.2f}  IW log p(x) (K={args.iw_samples}) "
          f"{summary['iw_log_likelihood']:.2f}  KL {summary['kl']:.2f} nats per cell")
    if truth is not None:
        with torch.no_grad():
            z = {name: posteriors.location(vae.posterior(vae.encoder(xs))).cpu().numpy()
                 for name, xs in (("train", x_train), ("test", x_test))}
        u_train, u_test = truth[train_idx.numpy()], truth[test_idx.numpy()]
        r2 = linear_r2(z["train"], u_train, z["test"], u_test)
        logs = np.log1p(x.numpy())
        centre = logs[train_idx.numpy()].mean(0)
        _, _, components = np.linalg.svd(logs[train_idx.numpy()] - centre, full_matrices=False)
        pca = lambda rows: (logs[rows.numpy()] - centre) @ components[:args.latent_dim].T  # noqa: E731
        r2_pca = linear_r2(pca(train_idx), u_train, pca(test_idx), u_test)
        print(f"R^2 of a linear map from the learned latent to the true one (test cells): {r2:.3f}  "
              f"(top {args.latent_dim} principal components of log(1 + x): {r2_pca:.3f})")
        summary.update(r2=float(r2), r2_pca=float(r2_pca))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--likelihood", default="nb", choices=sorted(LIKELIHOODS), help="p(x | z)")
    parser.add_argument("--counts", default=None, help="a .npz/.csv/.mtx count matrix of your own (cells x genes)")
    parser.add_argument("--transpose", action="store_true", help="the file is genes x cells (as 10x .mtx files)")
    parser.add_argument("--cells", default=3000, type=int, help="cells to generate")
    parser.add_argument("--genes", default=200, type=int, help="genes to generate")
    parser.add_argument("--true-dim", default=2, type=int, help="dimension of the generating latent")
    parser.add_argument("--latent-dim", default=2, type=int, help="the VAE's latent dimension")
    parser.add_argument("-n", "--num-epochs", default=100, type=int, help="training epochs")
    parser.add_argument("-lr", "--learning-rate", default=3e-3, type=float, help="Adam learning rate")
    parser.add_argument("--batch-size", default=128, type=int, help="cells per batch")
    parser.add_argument("--iw-samples", default=1000, type=int, help="K for the IW estimate")
    parser.add_argument("--out", default="runs/count_data", help="where the generated matrix is written")
    parser.add_argument("--cuda", action="store_true", default=False, help="whether to use cuda")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    main(parser.parse_args())
