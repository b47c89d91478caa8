"""Seconds per epoch: ``pyro_vae.fit`` (SVI + Trace_ELBO) vs a hand-written PyTorch loop of the same math.

Both train the same network (784-400-50 MLP with softplus, or another of
``nets.build``'s architectures) with the same loss (single-sample negative
ELBO summed over the batch: Bernoulli log-likelihood, log q(z|x) - log p(z) at the sampled z), the
same Adam settings, batch size and dynamic binarisation, on the same
on-device tensor. They run interleaved in one process, and the ratio of the
medians is reported with the machine it ran on.

    python benchmarks/speed.py --device cpu --epochs 3
    python benchmarks/speed.py --device cuda --epochs 5 --json out.json
"""

import argparse
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

from pyro_vae import VAE, fit, nets
from pyro_vae.data import Batches, load_images
from pyro_vae.svi import make_optimizer
from report import device_name, machine, report


def hand_written_epoch(vae, optimizer, batches):
    """One epoch of the same math in plain PyTorch, on the VAE's own networks."""
    for xb in batches:
        q = vae.posterior(vae.encoder(xb))  # the same Normal(loc, scale).to_event(1)
        loc, scale = q.base_dist.loc, q.base_dist.scale
        z = loc + scale * torch.randn_like(loc)
        logits = vae.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, xb, reduction="none").flatten(1).sum(-1)
        log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.9189385332046727).sum(-1)
        log_pz = (-0.5 * z ** 2 - 0.9189385332046727).sum(-1)
        loss = -(log_px - log_qz + log_pz).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="mlp", choices=nets.ARCHS,
                   help="the networks (nets.build), the paper's gated ones too (default mlp)")
    p.add_argument("--elbo", default="trace", choices=["trace", "jit"])
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per method (median reported)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    pyro.enable_validation(False)  # as pyro-vae train runs: the hand-written loop validates nothing either
    x_train, _, _, _ = load_images("fashion-mnist", args.data_dir)
    x = x_train[: args.limit].to(device)

    def new_vae():
        torch.manual_seed(0)
        return VAE(*nets.build(args.arch, (1, 28, 28), 50), [50]).to(device)

    # warm-up both paths (CUDA context, allocator, JIT tracing)
    fit(new_vae(), x[:2560], epochs=1, batch_size=args.batch_size, elbo=args.elbo, dynamic_binarize=True,
        progress=False)
    hand_vae = new_vae()
    optimizer = make_optimizer(hand_vae.parameters(), lr=1e-3)  # the same Adam that fit uses
    gen = torch.Generator(device=device).manual_seed(0)
    hand_written_epoch(hand_vae, optimizer, Batches(x[:2560], args.batch_size, gen, dynamic_binarize=True))

    pyro_times, hand_times = [], []
    pyro_vae = new_vae()
    batches = Batches(x, args.batch_size, gen, dynamic_binarize=True)
    for epoch in range(1, args.epochs + 1):
        sync(device)
        hist = fit(pyro_vae, x, epochs=1, batch_size=args.batch_size, elbo=args.elbo,
                   dynamic_binarize=True, seed=epoch, progress=False)
        pyro_times.append(hist[-1]["seconds"])
        sync(device)
        t0 = time.perf_counter()
        hand_written_epoch(hand_vae, optimizer, batches)
        sync(device)
        hand_times.append(time.perf_counter() - t0)
        print(f"epoch {epoch}: pyro_vae {pyro_times[-1]:.3f} s, hand-written {hand_times[-1]:.3f} s", flush=True)

    result = {
        "machine": machine(),
        "device": device_name(device),
        "torch": torch.__version__, "pyro": pyro.__version__, "arch": args.arch, "elbo": args.elbo,
        "images": int(x.shape[0]), "batch_size": args.batch_size, "epochs": args.epochs,
        "pyro_vae_s_per_epoch": statistics.median(pyro_times),
        "hand_written_s_per_epoch": statistics.median(hand_times),
    }
    result["ratio"] = result["pyro_vae_s_per_epoch"] / result["hand_written_s_per_epoch"]
    return report(result, args.json)


if __name__ == "__main__":
    main()
