"""One level vs two levels (each guide) on dynamically binarised Fashion-MNIST, equal budget.

Each named setting is trained with :func:`pyro_vae.train.train` (same network
widths, epochs, batch size, learning rate and seed), then evaluated on the
10 000 test images: ELBO and its per-level KL (10 draws per image), active
units per level, and the importance-weighted log p(x) with K=1000.

    python benchmarks/chains.py --epochs 30 --only one,bottom-up,top-down
    python benchmarks/chains.py --list

Writes ``benchmarks/results/chains-<name>.json`` per setting (and the run
directory under ``--runs``); ``--table`` prints a Markdown table of all results.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pyro_vae.evaluate import evaluate
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
    result = {"setting": name, "config": config.to_dict(), "train_seconds": seconds, "machine": machine(),
              "torch": torch.__version__, "history": history, **summary}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"chains-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "config")}), flush=True)


def table():
    rows = ["| setting | latent dims | guide | ELBO | IW log p(x), K=1000 | KL per level (z0, z1) | "
            "active units per level | train s |", "|---|---|---|---|---|---|---|---|"]
    for name in SETTINGS:
        path = RESULTS / f"chains-{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        levels = [f"z{i}" for i in range(len(r["latent_dims"]))]
        c = r["config"]
        extra = (f", warm-up {c['kl_warmup']} steps" if c["kl_warmup"] else "") + \
                (f", free bits {c['free_bits']}" if c["free_bits"] else "")
        rows.append(f"| {name} | {r['latent_dims']} | {c['guide'] if len(levels) > 1 else '-'}{extra} | "
                    f"{r['elbo']:.2f} | {r['iw_log_likelihood']:.2f} | "
                    f"{', '.join('%.2f' % r['kl_' + z] for z in levels)} | "
                    f"{', '.join('%d/%d' % (r['active_units_' + z], d) for z, d in zip(levels, r['latent_dims']))} | "
                    f"{r['train_seconds']:.0f} |")
    print("\n".join(rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated settings (default: all)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--runs", default="runs/chains")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--list", action="store_true")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
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
