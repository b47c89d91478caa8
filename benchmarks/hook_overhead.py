"""What the loop and its parts cost per step, apart from the step itself.

Runs :class:`pyro_vae.loop.Loop` with a step that does nothing (returns a constant loss) over the same
batches as ``fit`` would draw, once with no parts and once with the parts ``fit`` assembles for a run
directory (KL warm-up, epoch stats, evaluation off, a user part, the log line off, a checkpoint every
10 000 steps that writes nowhere), against a bare ``for batch in batches`` loop. Prints microseconds
per step: the difference is what the hooks add to every SVI step (compare: one SVI step of the
tutorial MLP is about 10 ms on a 2-core CPU and 4 ms on an H100).

    python benchmarks/hook_overhead.py --json benchmarks/results/hook_overhead_cpu.json
"""

import argparse
import statistics
import time

import torch

from pyro_vae import VAE, nets
from pyro_vae.callbacks import Callback, Checkpoint, EpochStats, KLWeight
from pyro_vae.data import Batches
from pyro_vae.loop import Loop
from pyro_vae.objectives import KLWarmup
from report import device_name, machine, report


class NoStep:
    def step(self, xb):
        return 1.0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class UserPart(Callback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, loop, batch, loss):
        self.steps += 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.rand(args.steps * 4, 1, 28, 28)
    vae = VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=8), [4])

    def batches():
        return Batches(x, 4, torch.Generator().manual_seed(0), dynamic_binarize=False)

    def bare():
        for _ in batches():
            pass

    def loop(parts):
        return lambda: Loop(vae, NoStep(), batches(), 1, parts()).run()

    full = lambda: [KLWeight(KLWarmup(100)), EpochStats(), UserPart(), Checkpoint(lambda s: None, 10000)]  # noqa: E731
    timings = {}
    for name, fn in (("bare", bare), ("loop_no_parts", loop(list)), ("loop_with_parts", loop(full))):
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) / args.steps * 1e6)
        timings[name] = statistics.median(runs)
    result = {"machine": machine(), "torch": torch.__version__,
              "steps": args.steps, "us_per_step": timings,
              "hooks_us_per_step": timings["loop_with_parts"] - timings["bare"]}
    return report(result, args.json)


if __name__ == "__main__":
    main()
