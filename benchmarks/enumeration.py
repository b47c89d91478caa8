"""The cost of summing M2's label out: seconds per unlabelled SVI step with parallel vs sequential enumeration.

The network of ``examples/ss_vae.py`` (Pyro's ss_vae_M2 defaults: 784-500-50, 10 classes, batch 200) on
Fashion-MNIST's first images, dynamically binarised; ``TraceEnum_ELBO(max_plate_nesting=1)`` steps of
the unlabelled objective, alternating the two modes, median of ``--steps`` timed steps each (after
``--warmup``). Reports the two medians, their ratio and the machine.

    python benchmarks/enumeration.py --steps 20 --json benchmarks/results/enumeration_cpu.json
"""

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, data, nets
from report import device_name, machine, report


def m2(mode, device):
    torch.manual_seed(0)
    return VAE(nets.MLPEncoder((1, 28, 28), hidden=(500,)), nets.MLPDecoder(60, (1, 28, 28), hidden=(500,)),
               [50], condition=10, label_site=True, enumerate=mode, hidden=500).to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x = data.load_images("fashion-mnist", args.data_dir)[0][:args.batch_size * 4].to(device)
    g = torch.Generator(device=device).manual_seed(0)
    steps = {}
    for mode in ("parallel", "sequential"):
        pyro.clear_param_store()
        vae = m2(mode, device)
        svi = SVI(vae.model, vae.guide, Adam({"lr": 4.2e-4}), TraceEnum_ELBO(max_plate_nesting=1))
        times = []
        for i in range(args.warmup + args.steps):
            xb = data.binarize(x[(i % 4) * args.batch_size:][:args.batch_size], g)
            start = time.perf_counter()
            svi.step(xb)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        steps[mode] = statistics.median(times)
    report({"benchmark": "m2 enumeration", "batch_size": args.batch_size, "classes": 10,
            "seconds_per_step": steps, "sequential_over_parallel": steps["sequential"] / steps["parallel"],
            "device": device_name(device), "machine": machine()}, args.json)


if __name__ == "__main__":
    main()
