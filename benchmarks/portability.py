"""Checkpoints across devices: a CUDA run evaluates and resumes on the CPU, a CPU run resumes on CUDA,
and a resume on the same device is bitwise.

Each run is the Pyro tutorial's MLP on dynamically binarised Fashion-MNIST (``--epochs`` epochs,
``--limit`` training images). Writes one JSON with what held:

* ``same_device_bitwise[cuda]``: 2 epochs straight == 1 + 1 after a resume, every parameter equal;
* ``cuda_to_cpu``: the CUDA run's test ELBO evaluated on CPU and on CUDA (same weights; the draws of z
  differ, so the numbers agree to Monte Carlo noise), and a CUDA checkpoint resumed to the end on CPU;
* ``cpu_to_cuda``: a CPU checkpoint resumed to the end on CUDA.

Across devices bitwise equality cannot hold: CPU and CUDA generators are different algorithms and
the kernels sum in another order; the resumed run warns and goes on with a new batch order.

    python benchmarks/portability.py --out /tmp/port --json benchmarks/results/portability_cuda.json
"""

import argparse
import json
import platform
import warnings
from pathlib import Path

import pyro
import torch

from pyro_vae.evaluate import elbo_terms
from pyro_vae.train import RunConfig, load_data, load_run, train


def run(out, device, epochs, data_dir, resume=False):
    config = RunConfig(data_dir=data_dir, epochs=epochs, device=device, checkpoint_every=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vae, history = train(config, out, resume=resume, overwrite=not resume, progress=False, pictures=False)
    return vae, history, [str(w.message) for w in caught if "batch order" in str(w.message)]


def test_elbo(vae, device, data_dir):
    _, x_test = load_data(RunConfig(data_dir=data_dir), device)
    pyro.set_rng_seed(0)
    vae.eval()
    return float(elbo_terms(vae.to(device), x_test, num_samples=1)["elbo"].mean())


def equal(a, b):
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="scratch folder for the runs")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data-dir")
    p.add_argument("--json")
    args = p.parse_args(argv)
    out, n = Path(args.out), args.epochs
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "epochs": n}
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA GPU here"
        print(json.dumps(result, indent=2))
        return result

    straight, hist, _ = run(out / "cuda_straight", "cuda", n, args.data_dir)
    run(out / "cuda_resumed", "cuda", n - 1, args.data_dir)
    resumed, hist_r, _ = run(out / "cuda_resumed", "cuda", n, args.data_dir, resume=True)
    result["same_device_bitwise"] = {"cuda": equal(straight, resumed) and
                                     [r["train_loss"] for r in hist] == [r["train_loss"] for r in hist_r]}

    on_cpu, _ = load_run(out / "cuda_straight", device="cpu")
    run(out / "cuda_then_cpu", "cuda", n - 1, args.data_dir)
    cpu_end, hist_c, warned = run(out / "cuda_then_cpu", "cpu", n, args.data_dir, resume=True)
    result["cuda_to_cpu"] = {
        "test_elbo_on_cuda": test_elbo(straight, "cuda", args.data_dir),
        "test_elbo_on_cpu": test_elbo(on_cpu, "cpu", args.data_dir),
        "resumed_on_cpu_epochs": [r["epoch"] for r in hist_c],
        "resumed_on_cpu_test_elbo": hist_c[-1]["test_elbo"], "straight_cuda_test_elbo": hist[-1]["test_elbo"],
        "warning": warned[:1]}

    run(out / "cpu_then_cuda", "cpu", n - 1, args.data_dir)
    cuda_end, hist_g, warned = run(out / "cpu_then_cuda", "cuda", n, args.data_dir, resume=True)
    result["cpu_to_cuda"] = {"resumed_on_cuda_epochs": [r["epoch"] for r in hist_g],
                             "resumed_on_cuda_test_elbo": hist_g[-1]["test_elbo"],
                             "params_on": str(next(cuda_end.parameters()).device), "warning": warned[:1]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
