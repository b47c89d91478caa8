"""Seconds for the importance-weighted log p(x) (K particles per image): ``pyro_vae.evaluate`` vs a
hand-written PyTorch estimator of the same math on the same networks.

The VAE is the Pyro tutorial's (784-400-50 MLP, Bernoulli, standard normal prior), untrained but with
fixed weights: speed does not depend on training, and both estimates must agree within Monte Carlo
noise (printed). The hand-written estimator draws all K particles of a batch of images at once, as
many images per batch as fit ``--rows``; pyro_vae's chunking picks its own sizes (from the free GPU
memory on CUDA). Reports the median of ``--repeats`` runs of each and the peak GPU memory.

    python benchmarks/iw_speed.py --device cuda --iw-samples 1000 --json benchmarks/results/iw_cuda.json
"""

import argparse
import math
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

from pyro_vae import VAE, evaluate, nets
from pyro_vae.data import binarize, load_images
from report import device_name, machine, report

LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)


@torch.no_grad()
def hand_written_iw(vae, x, k, rows):
    """log (1/K) sum_k p(x, z_k) / q(z_k | x) per image, in plain PyTorch on the VAE's own networks."""
    out = []
    per_batch = max(1, rows // k)
    for xb in x.split(per_batch):
        q = vae.posterior(vae.encoder(xb))
        loc, scale = q.base_dist.loc, q.base_dist.scale
        eps = torch.randn((k, *loc.shape), device=x.device)
        z = loc + scale * eps
        logits = vae.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").flatten(2).sum(-1)
        log_qz = (-0.5 * eps ** 2 - scale.log() - LOG_2PI_HALF).sum(-1)
        log_pz = (-0.5 * z ** 2 - LOG_2PI_HALF).sum(-1)
        out.append(torch.logsumexp(log_px + log_pz - log_qz, dim=0) - math.log(k))
    return torch.cat(out)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return time.perf_counter() - t0, float(value.mean()), peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--limit", type=int, default=None, help="only the first N test images (default all 10 000)")
    p.add_argument("--rows", type=int, default=None,
                   help="hand-written: particles x images at once (default: pyro_vae's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    _, _, x_test, _ = load_images("fashion-mnist", args.data_dir)
    x = binarize(x_test[: args.limit], torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(0)
    vae = VAE(*nets.build("mlp", (1, 28, 28), 50), [50]).to(device).eval()
    rows = args.rows or evaluate.default_max_rows(x)
    k = args.iw_samples

    pyro_times, hand_times = [], []
    for _ in range(args.repeats):
        pyro.set_rng_seed(0)
        seconds, pyro_ll, pyro_peak = timed(lambda: evaluate.iw_log_likelihood(vae, x, num_samples=k), device)
        pyro_times.append(seconds)
        torch.manual_seed(0)
        seconds, hand_ll, hand_peak = timed(lambda: hand_written_iw(vae, x, k, rows), device)
        hand_times.append(seconds)
        print(f"pyro_vae {pyro_times[-1]:.2f} s ({pyro_ll:.3f}), hand-written {hand_times[-1]:.2f} s ({hand_ll:.3f})",
              flush=True)
    result = {
        "machine": machine(),
        "device": device_name(device),
        "torch": torch.__version__, "pyro": pyro.__version__, "images": int(x.shape[0]), "iw_samples": k,
        "rows_at_once": rows, "repeats": args.repeats,
        "pyro_vae_seconds": statistics.median(pyro_times), "hand_written_seconds": statistics.median(hand_times),
        "pyro_vae_peak_mib": pyro_peak, "hand_written_peak_mib": hand_peak,
        "pyro_vae_mean_log_px": pyro_ll, "hand_written_mean_log_px": hand_ll,
    }
    result["ratio"] = result["pyro_vae_seconds"] / result["hand_written_seconds"]
    return report(result, args.json)


if __name__ == "__main__":
    main()
