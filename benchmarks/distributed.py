"""Seconds per epoch of the same training with one process and with several (``torchrun``, gloo).

Each layout trains the tutorial MLP (784-400-50, batch 256, Fashion-MNIST's 60 000 training images,
dynamic binarisation) with ``pyro-vae train`` for ``--epochs`` epochs, and the median of the epochs'
``seconds`` (the training time of an epoch, without its test evaluation) is reported:

* ``1x2``: one process with two threads (``OMP_NUM_THREADS=2``), the plain path;
* ``2x1``: two processes with one thread each, ``torchrun --nproc-per-node 2`` (gloo);
* ``1x1``: one process with one thread (what one rank of ``2x1`` has).

Scaling efficiency = s/epoch of ``1x2`` / s/epoch of ``2x1``: above 1, two processes beat two threads.

    python benchmarks/distributed.py --epochs 3 --json benchmarks/results/distributed_cpu.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from report import machine, report

LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}


def seconds_per_epoch(procs, threads, epochs, extra, out):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    train = ["train", "--arch", "mlp", "--epochs", str(epochs), "--out", str(out), "--overwrite", "--no-progress",
             *extra]
    if procs == 1:
        cmd = [sys.executable, "-m", "pyro_vae", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "pyro_vae", *train]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs per layout (the median is reported)")
    p.add_argument("--layouts", default="1x2,2x1,1x1", help="which of " + ", ".join(LAYOUTS))
    p.add_argument("--json", help="write the result here too")
    p.add_argument("extra", nargs="*", help="more pyro-vae train flags (after --)")
    args = p.parse_args(argv)
    result = {"benchmark": "distributed", "model": "mlp 784-400-50, Fashion-MNIST 60k", "flags": args.extra,
              "machine": machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "layouts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts.split(","):
            procs, threads = LAYOUTS[name]
            epochs = seconds_per_epoch(procs, threads, args.epochs, args.extra, Path(tmp) / name)
            result["layouts"][name] = {"processes": procs, "threads": threads, "epoch_seconds": epochs,
                                       "median": statistics.median(epochs)}
            print(f"{name}: {statistics.median(epochs):.2f} s/epoch {epochs}", file=sys.stderr)
    layouts = result["layouts"]
    if "1x2" in layouts and "2x1" in layouts:
        result["efficiency_2x1_vs_1x2"] = layouts["1x2"]["median"] / layouts["2x1"]["median"]
    if "1x1" in layouts and "2x1" in layouts:
        result["speedup_2x1_vs_1x1"] = layouts["1x1"]["median"] / layouts["2x1"]["median"]
    report(result, args.json)


if __name__ == "__main__":
    main()
