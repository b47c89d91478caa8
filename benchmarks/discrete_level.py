"""A discrete latent level (``--prior gmvae:K``, the component a Pyro site summed out by enumeration) against the
mixture-of-Gaussians prior (``--prior mog:K``, the component summed inside the prior's density), unsupervised,
on Fashion-MNIST: test ELBO, IW log p(x), seconds per epoch, and how well the K components cluster the ten
classes (each cluster mapped to its most frequent class).

    python benchmarks/discrete_level.py run --out ~/runs/discrete --epochs 10
    python benchmarks/discrete_level.py run --out ~/runs/discrete --epochs 10 --only gmvae   # one of the two

Each run is a ``pyro-vae train`` run directory (resumable); the rows go to
``benchmarks/results/discrete_level.json``.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pyro_vae import evaluate
from pyro_vae.train import RunConfig, load_labelled_splits, load_run, train

RESULTS = Path(__file__).parent / "results" / "discrete_level.json"


def mog_clusters(vae, x, batch_size=1000):
    """The mixture prior's component of each data point: argmax_k w_k N(E_q[z0 | x]; mu_k, sigma_k), ``(N,)``."""
    prior = vae.prior
    scales = torch.nn.functional.softplus(prior.raw_scales)
    out = []
    with torch.no_grad():
        for xb in x.split(batch_size):
            z = vae.q_top(xb).mean  # (B, D)
            log_n = torch.distributions.Normal(prior.locs, scales).log_prob(z[:, None]).sum(-1)  # (B, K)
            out.append((log_n + prior.logits.log_softmax(-1)).argmax(-1))
    return torch.cat(out)


def run(args):
    rows = []
    for name, prior in (("mog", f"mog:{args.k}"), ("gmvae", f"gmvae:{args.k}")):
        if args.only and name != args.only:
            continue
        out = Path(args.out).expanduser() / name
        config = RunConfig(arch="mlp", hidden=500, latent_dims=[args.latent], prior=prior, epochs=args.epochs,
                           batch_size=100, lr=1e-3, seed=args.seed, checkpoint_every=200)
        start = time.perf_counter()
        _, history = train(config, out, resume=(out / "checkpoint.pt").exists(), progress=False, pictures=True)
        seconds = time.perf_counter() - start
        vae, config = load_run(out)
        vae.eval()
        (_, _), _, (x_test, y_test) = load_labelled_splits(config, vae.device)
        torch.manual_seed(0)
        summary = evaluate.evaluate(vae, x_test, iw_samples=args.iw_samples, progress=False, seed=0)
        clusters = evaluate.predicted_classes(vae, x_test) if name == "gmvae" else mog_clusters(vae, x_test)
        rows.append({"model": name, "prior": prior, "epochs": history[-1]["epoch"], "latent_dim": args.latent,
                     "test_elbo": summary["elbo"], "iw_log_likelihood": summary["iw_log_likelihood"],
                     "iw_samples": args.iw_samples, "cluster_accuracy": evaluate.cluster_accuracy(clusters, y_test),
                     "clusters_used": int(clusters.unique().numel()),
                     "seconds_per_epoch": sum(r["seconds"] for r in history) / len(history),
                     "seconds_this_call": seconds, "seed": args.seed,
                     "machine": f"{platform.machine()} cpu x{torch.get_num_threads()} threads"})
        print(json.dumps(rows[-1]), flush=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    kept = [r for r in old if r["model"] not in {r["model"] for r in rows}]
    RESULTS.write_text(json.dumps(kept + rows, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--latent", type=int, default=10)
    r.add_argument("--iw-samples", type=int, default=200)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--only", choices=["mog", "gmvae"])
    run(parser.parse_args())
