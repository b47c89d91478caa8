"""Mixed precision, measured: the same training with the networks in float32 and under
``torch.autocast(bfloat16)``, the log-probabilities in float32 either way.

The networks' outputs are cast back to float32 before any distribution sees them (the ``Autocast``
wrapper below), so the ELBO, the KL and the Bernoulli log-likelihood are computed in float32. Reports
the test ELBO after ``--epochs`` epochs (same seed, same data order) and the median seconds per epoch
of each, for the Pyro tutorial's MLP and the conv networks. Adopt bf16 only where the ELBO stays
within 0.2 nats of float32.

    python benchmarks/autocast.py --device cuda --json benchmarks/results/autocast_cuda.json
"""

import argparse
import json
import statistics

import pyro
import torch
from torch import nn

from pyro_vae import VAE, fit, nets
from pyro_vae.data import binarize, load_images
from report import device_name, machine, report


class Autocast(nn.Module):
    """A network run under ``torch.autocast(dtype)``, its output cast back to float32."""

    def __init__(self, net, dtype=torch.bfloat16):
        super().__init__()
        self.net, self.dtype = net, dtype
        for name in ("out_features", "x_shape", "latent_dim"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=self.dtype):
            y = self.net(x)
        return y.float()


def train_once(arch, x_train, x_test, epochs, batch_size, device, bf16):
    torch.manual_seed(0)
    enc, dec = nets.build(arch, (1, 28, 28), 50)
    if bf16:
        enc, dec = Autocast(enc), Autocast(dec)
    vae = VAE(enc, dec, [50], x_shape=(1, 28, 28)).to(device)
    history = fit(vae, x_train, x_test, epochs=epochs, batch_size=batch_size, dynamic_binarize=True, seed=0,
                  progress=False, log=None)
    return history[-1]["test_elbo"], statistics.median(r["seconds"] for r in history[1:] or history)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--archs", default="mlp,conv")
    p.add_argument("--data-dir")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x_train, _, x_test, _ = load_images("fashion-mnist", args.data_dir)
    x_train = x_train[: args.limit].to(device)
    x_test = binarize(x_test, torch.Generator().manual_seed(1)).to(device)
    rows = []
    for arch in args.archs.split(","):
        f32 = train_once(arch, x_train, x_test, args.epochs, args.batch_size, device, bf16=False)
        b16 = train_once(arch, x_train, x_test, args.epochs, args.batch_size, device, bf16=True)
        rows.append({"arch": arch, "test_elbo_float32": f32[0], "test_elbo_bf16": b16[0],
                     "elbo_difference": b16[0] - f32[0], "s_per_epoch_float32": f32[1], "s_per_epoch_bf16": b16[1],
                     "speedup": f32[1] / b16[1]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "pyro": pyro.__version__, "epochs": args.epochs,
              "batch_size": args.batch_size, "images": int(x_train.shape[0]), "rows": rows}
    return report(result, args.json)


if __name__ == "__main__":
    main()
