"""Semi-supervised M2 on Fashion-MNIST: the runs' numbers, and a plain classifier on the same labelled images.

    # the M2 runs (pyro-vae train ... --labels N [--aux-loss 46] --val-size 10000), then evaluate each:
    pyro-vae evaluate RUN --iw-samples 1000
    # a plain classifier with M2's q(y | x) architecture, trained on the same N labelled images only:
    python benchmarks/semi_supervised.py classifier --labels 3000 --labels 600
    # rows of every evaluated run and classifier into benchmarks/results/semi_supervised.json:
    python benchmarks/semi_supervised.py collect RUN [RUN ...]

The classifier is M2's q(y | x) alone (784 -> 500 softplus -> 500 softplus -> 10), Adam 1e-3, batch 100,
dynamically binarised images as M2 sees them, trained until the validation accuracy (the last 10 000 training
images, as the M2 runs hold out) has not improved for 20 epochs; the test accuracy is that of its best
validation epoch.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from pyro_vae import data
from pyro_vae.checkpoints import read_records
from pyro_vae.train import RunConfig, load_labelled_splits

RESULTS = Path(__file__).parent / "results" / "semi_supervised.json"


def machine():
    return f"{platform.machine()} cpu x{torch.get_num_threads()} threads"


def classifier(n, seed=0, patience=20, max_epochs=500):
    """Train the plain classifier on ``n`` balanced labels; returns its row."""
    config = RunConfig(labels=n, val_size=10000, seed=seed)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_labelled_splits(config, "cpu")
    keep = y_train != data.UNLABELLED
    x, y = x_train[keep].flatten(1), y_train[keep]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(784, 500), nn.Softplus(), nn.Linear(500, 500), nn.Softplus(), nn.Linear(500, 10))
    optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    best, best_epoch, state, start = -1.0, 0, None, time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        for idx in torch.randperm(len(x), generator=g).split(100):
            loss = nn.functional.cross_entropy(net(data.binarize(x[idx], g)), y[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
        with torch.no_grad():
            accuracy = float((net(x_val.flatten(1)).argmax(-1) == y_val).float().mean())
        if accuracy > best:
            best, best_epoch, state = accuracy, epoch, {k: v.clone() for k, v in net.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    net.load_state_dict(state)
    with torch.no_grad():
        test = float((net(x_test.flatten(1)).argmax(-1) == y_test).float().mean())
    return {"model": "classifier", "labels": n, "aux_loss": None, "epochs": epoch, "best_epoch": best_epoch,
            "val_accuracy": best, "test_accuracy": test, "seed": seed,
            "seconds": time.perf_counter() - start, "machine": machine()}


def m2_row(run):
    """The row of an evaluated M2 run directory (its config.json, metrics.jsonl and eval.json)."""
    run = Path(run).expanduser()
    config = json.loads((run / "config.json").read_text())
    metrics = read_records(run / "metrics.jsonl")
    ev = json.loads((run / "eval.json").read_text())
    return {"model": "m2", "labels": config["labels"], "aux_loss": config["aux_loss"] or None,
            "epochs": metrics[-1]["epoch"], "best_epoch": ev["epoch"],
            "val_accuracy": max(m["val_accuracy"] for m in metrics), "test_accuracy": ev["accuracy"],
            "test_elbo": ev["elbo"], "iw_log_likelihood": ev.get("iw_log_likelihood"),
            "iw_samples": ev.get("iw_samples"), "seed": config["seed"],
            "seconds": sum(m["seconds"] for m in metrics), "seconds_per_epoch": sum(m["seconds"] for m in metrics)
            / len(metrics), "enumerate": config["enumerate"], "machine": "x86_64 cpu x1 threads (2-core machine, "
            "shared with three other trainings)"}


def save(rows):
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    key = lambda r: (r["model"], r["labels"], r["aux_loss"])  # noqa: E731
    new = {key(r) for r in rows}
    RESULTS.write_text(json.dumps([r for r in old if key(r) not in new] + rows, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classifier")
    c.add_argument("--labels", type=int, action="append", required=True)
    c.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("collect")
    k.add_argument("runs", nargs="+")
    args = parser.parse_args()
    rows = [classifier(n, args.seed) for n in args.labels] if args.command == "classifier" else \
        [m2_row(run) for run in args.runs]
    for row in rows:
        print(json.dumps(row))
    save(rows)
