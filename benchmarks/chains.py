"""One level vs two levels (each guide) on dynamically binarised Fashion-MNIST, equal budget.

Each named setting is trained with :func:`pyro_vae.train.train` (same network
widths, epochs, batch size, learning rate and seed), then evaluated on the
10 000 test images: ELBO and its per-level KL (10 draws per image), active
units per level, and the importance-weighted log p(x) with K=1000.

    python benchmarks/chains.py --epochs 30 --only one,bottom-up,top-down
    python benchmarks/chains.py --list
    python benchmarks/chains.py --table
    python benchmarks/chains.py --plot-levels top-down,top-down-warmup,top-down-warmup-balance

Writes ``benchmarks/results/chains-<name>.json`` per setting (and the run
directory under ``--runs``); ``--table`` prints a Markdown table of all results.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pyro_vae.evaluate import elbo_terms, evaluate
from pyro_vae.train import RunConfig, load_data, train

SETTINGS = {
    "one": dict(latent_dims=[50]),
    "bottom-up": dict(latent_dims=[16, 50], guide="bottom-up"),
    "top-down": dict(latent_dims=[16, 50], guide="top-down"),
    "top-down-warmup": dict(latent_dims=[16, 50], guide="top-down", kl_warmup=2350),
    "top-down-freebits": dict(latent_dims=[16, 50], guide="top-down", free_bits=2.0),
    "bottom-up-warmup": dict(latent_dims=[16, 50], guide="bottom-up", kl_warmup=2350),
    "one-warmup": dict(latent_dims=[50], kl_warmup=2350),
    "top-down-warmup-balance": dict(latent_dims=[16, 50], guide="top-down", kl_warmup=2350, kl_balance=True),
}
RESULTS = Path(__file__).parent / "results"


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def run(name, epochs, runs_dir, iw_samples, device):
    config = RunConfig(**SETTINGS[name], epochs=epochs, device=device, seed=0)
    started = time.perf_counter()
    vae, history = train(config, Path(runs_dir) / name, overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    _, x_test = load_data(config, vae.device)
    summary = evaluate(vae, x_test, iw_samples=iw_samples, elbo_samples=10, progress=False)
    if "kl_mixture" in summary:  # estimated shares (bottom-up guide): again with 16 times the mixture draws
        again = elbo_terms(vae, x_test, num_samples=10, mixture=512)
        summary.update({f"{k}_mixture512": float(v.mean()) for k, v in again.items() if k.startswith("kl_z")})
    result = {"setting": name, "config": config.to_dict(), "train_seconds": seconds, "machine": machine(),
              "torch": torch.__version__, "history": history, **summary}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"chains-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "config")}), flush=True)


def table():
    """A Markdown table of every ``chains-<name>.json``: per level each one's share of the KL in the model's
    order (with the bottom-up guide also at M=512 mixture draws, and its own per-site log-ratio terms),
    active units against the model's conditional, and, where defined, the units carrying over 0.1 nat."""
    rows = ["| levels | guide | objective | test ELBO | IW log p(x), K=1000 | KL share per level | bottom-up "
            "log-ratio terms | active units | units over 0.1 nat | train s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in SETTINGS:
        path = RESULTS / f"chains-{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        levels = [f"z{i}" for i in range(len(r["latent_dims"]))]
        c = r["config"]
        objective = ", ".join(filter(None, [f"warm-up {c['kl_warmup']} steps" if c["kl_warmup"] else "",
                                            "KL balancing" if c.get("kl_balance") else "",
                                            f"free bits {c['free_bits']:g}" if c["free_bits"] else ""])) or "ELBO"
        share = ", ".join("%.2f" % r["kl_" + z] for z in levels)
        if "kl_z0_mixture512" in r:
            share += " (M=512: " + ", ".join("%.2f" % r[f"kl_{z}_mixture512"] for z in levels) + ")"
        logratio = ", ".join("%.2f" % r["logratio_" + z] for z in levels) if "logratio_z0" in r else "-"
        units = ", ".join("%d/%d" % (r["active_units_" + z], d) for z, d in zip(levels, r["latent_dims"]))
        over = ", ".join(str(sum(u > 0.1 for u in r["unit_kl_" + z])) for z in levels) if "unit_kl_z0" in r else "-"
        guide = c["guide"] if len(levels) > 1 else "-"
        rows.append(f"| {r['latent_dims']} | {guide} | {objective} | {r['elbo']:.2f} | {r['iw_log_likelihood']:.2f} | "
                    f"{share} | {logratio} | {units} | {over} | {r['train_seconds']:.0f} |")
    print("\n".join(rows))


def plot_levels(names, path):
    """Each level's KL share on the test images per epoch (from the results' histories), one panel per
    setting in ``names``: where a level's line falls to 0 and stays, it collapsed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), dpi=120, sharey=True)
    for ax, name in zip(axes, names):
        r = json.loads((RESULTS / f"chains-{name}.json").read_text())
        for i in range(len(r["latent_dims"])):
            ax.plot([h["epoch"] for h in r["history"]], [h[f"test_kl_z{i}"] for h in r["history"]], "o-",
                    markersize=2, label=f"z{i} ({r['latent_dims'][i]} units)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KL share, nats per image (test)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated settings (default: all)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--runs", default="runs/chains")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--list", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--plot-levels", metavar="NAME[,NAME...]",
                   help="draw the settings' per-level KL over epochs into docs/img/chains_kl_levels.png")
    args = p.parse_args()
    if args.plot_levels:
        plot_levels(args.plot_levels.split(","), Path(__file__).resolve().parents[1] / "docs/img/chains_kl_levels.png")
        return
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in SETTINGS.items()))
        return
    if args.table:
        table()
        return
    for name in (args.only.split(",") if args.only else SETTINGS):
        run(name, args.epochs, args.runs, args.iw_samples, args.device)


if __name__ == "__main__":
    main()
