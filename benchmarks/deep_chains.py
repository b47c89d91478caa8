"""Milliseconds per step of the top-down guide at depth: pyro_vae against a hand-written step.

For each depth (levels of ``--dim`` units, networks of width ``--hidden``), one process times, in
interleaved blocks:

* ``pyro_vae``: one SVI step as ``fit`` takes it (``TorchOptimSVI``, ``Trace_ELBO``, the VAE's plain
  Pyro ``model`` and top-down ``guide``), which computes each transition p(z_l | z_l-1) once: the guide
  merges with it and the model reuses it (:class:`pyro_vae.chain.TransitionMemo`);
* ``twice``: the same step with that reuse switched off (each transition computed in the guide and
  again in the model, as before issue 20);
* ``hand_written``: the same math in plain PyTorch on the same modules (ladder features, heads,
  precision-weighted merge, each transition once, reparameterised draws, Bernoulli likelihood, the same
  Adam), the reference the ratio is taken against.

Medians of ``--repeats`` blocks of ``--steps`` steps; a least-squares line of ms per step against the
number of levels gives the slope (ms per level) and how straight it is (R^2)::

    OMP_NUM_THREADS=1 python benchmarks/deep_chains.py --depths 1,3,8,12,24 --json out.json
"""

import argparse
import math
import statistics
import time

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, chain, nets
from pyro_vae.svi import TorchOptimSVI, make_optimizer
from report import device_name, machine, report

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _log_normal(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - LOG_SQRT_2PI).sum(-1)


def hand_written_step(vae, optimizer, xb):
    """One step of the top-down guide's negative ELBO in plain PyTorch; each transition computed once."""
    d = [vae.encoder(xb)]
    for level in reversed(range(vae.levels)):
        d.insert(0, vae.ladder[level](d[0]))
    z, log_q, log_p = None, 0.0, 0.0
    for level in range(vae.levels + 1):
        head = vae.posterior if level == vae.levels else vae.ladder_heads[level]
        q = head(d[level]).base_dist
        loc, scale = q.loc, q.scale
        if level == 0:
            loc_p, scale_p = torch.zeros_like(loc), torch.ones_like(scale)
        else:
            p = vae.transitions[level - 1](z).base_dist
            loc_p, scale_p = p.loc, p.scale
            prec_e, prec_p = scale.pow(-2), scale_p.pow(-2)
            var = 1.0 / (prec_e + prec_p)
            loc, scale = (loc * prec_e + loc_p * prec_p) * var, var.sqrt()
        z = loc + scale * torch.randn_like(loc)
        log_q = log_q + _log_normal(z, loc, scale)
        log_p = log_p + _log_normal(z, loc_p, scale_p)
    log_px = -F.binary_cross_entropy_with_logits(vae.decoder(z), xb, reduction="none").flatten(1).sum(-1)
    loss = -(log_px + log_p - log_q).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def build(levels, dim, hidden, device):
    torch.manual_seed(0)
    dims = [dim] * levels
    enc, dec = nets.build("mlp", (1, 28, 28), dims[-1], hidden=hidden)
    return VAE(enc, dec, dims, guide="top-down", hidden=hidden).to(device)


def time_block(step, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0) / steps


def measure(levels, args, device, x):
    """Median ms per step of the three steps at one depth."""
    pyro.clear_param_store()
    vae, twin, hand = (build(levels, args.dim, args.hidden, device) for _ in range(3))
    for v, name in ((vae, "a"), (twin, "b")):
        v.name = name  # two VAEs in one param store
    svi = TorchOptimSVI(vae.model, vae.guide, Trace_ELBO(), 1e-4)
    svi_twice = TorchOptimSVI(twin.model, twin.guide, Trace_ELBO(), 1e-4)
    optimizer = make_optimizer(hand.parameters(), lr=1e-4)
    take = chain.TransitionMemo.take

    def twice():
        chain.TransitionMemo.take = lambda self, level, parent, module: None
        try:
            svi_twice.step(x)
        finally:
            chain.TransitionMemo.take = take

    steps = {"pyro_vae": lambda: svi.step(x), "twice": twice, "hand_written": lambda: hand_written_step(hand, optimizer, x)}
    times = {name: [] for name in steps}
    with vae.data_checked(), twin.data_checked():
        for step in steps.values():  # warm-up
            for _ in range(3):
                step()
        for _ in range(args.repeats):
            for name, step in steps.items():
                times[name].append(time_block(step, args.steps, device))
    return {name: statistics.median(t) for name, t in times.items()}


def line(xs, ys):
    """Least-squares slope, intercept and R^2 of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((b - intercept - slope * a) ** 2 for a, b in zip(xs, ys))
    ss_tot = sum((b - my) ** 2 for b in ys)
    return slope, intercept, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--depths", default="1,3,8,12,24", help="numbers of levels, comma-separated")
    p.add_argument("--dim", type=int, default=16, help="units per level")
    p.add_argument("--hidden", type=int, default=256, help="width of every network")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per method (median reported)")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    pyro.enable_validation(False)  # as pyro-vae train runs: the hand-written step validates nothing either
    x = torch.rand(args.batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0)).bernoulli().to(device)
    rows = []
    for levels in (int(d) for d in args.depths.split(",")):
        ms = measure(levels, args, device, x)
        rows.append({"levels": levels, **{f"{k}_ms_per_step": round(v, 3) for k, v in ms.items()},
                     "ratio": round(ms["pyro_vae"] / ms["hand_written"], 3),
                     "ratio_twice": round(ms["twice"] / ms["hand_written"], 3)})
        print(rows[-1], flush=True)
    depths = [r["levels"] for r in rows]
    fits = {k: line(depths, [r[f"{k}_ms_per_step"] for r in rows]) for k in ("pyro_vae", "hand_written", "twice")}
    result = {
        "machine": machine(), "device": device_name(device), "torch": torch.__version__, "pyro": pyro.__version__,
        "dim": args.dim, "hidden": args.hidden, "batch_size": args.batch_size, "steps": args.steps,
        "repeats": args.repeats, "rows": rows,
        "slope_ms_per_level": {k: round(v[0], 3) for k, v in fits.items()},
        "r2_linear": {k: round(v[2], 4) for k, v in fits.items()},
    }
    return report(result, args.json)


if __name__ == "__main__":
    main()
