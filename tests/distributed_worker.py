"""What one process of ``torchrun --nproc-per-node 2 tests/distributed_worker.py OUT`` does for
tests/test_distributed.py (one launch, several checks: starting processes is the slow part).

1. ``fit`` on the noise-free objective (every Normal's ``rsample`` returns its mean, so the loss is a
   deterministic function of the weights and the data): rank 0 saves the weights, which the test
   compares with one process's.
2. ``fit`` twice with the real noise and one seed: the weights must be equal (the run as a whole is
   reproducible), while the ranks' RNG streams differ (seed + rank); a run stopped after its third step
   and resumed from that state with two processes ends bitwise where the unbroken run ends.
3. ``evaluate`` sharded across the ranks against the one-process ``iw_log_likelihood`` on rank 0.
4. The command line inside this launch: ``pyro-vae train`` (rank 0 writes, the others do not),
   ``pyro-vae evaluate`` (the process group is the script's own and stays up), and bad input (each
   rank's stderr is kept: the error must be printed once).
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import pyro
import torch
import torch.distributed as dist

from pyro_vae import callbacks, cli, distributed, fit
from pyro_vae.errors import InputError
from pyro_vae.evaluate import evaluate, iw_log_likelihood
from pyro_vae.rundir import RunLock

sys.path.insert(0, str(Path(__file__).parent))
from distributed_common import StepLog, binary_data, noise_free, partly_labelled, small_m2, small_vae  # noqa: E402,E501


class RngSeen(callbacks.Callback):
    """Records every rank's first draw of the global RNG at the first step (a collective)."""

    def __init__(self):
        self.draws = None

    def on_step_start(self, loop, batch):
        if self.draws is None:
            self.draws = distributed.gather(float(torch.get_rng_state().float().sum()))


def main(out):
    out = Path(out)
    dist.init_process_group("gloo")  # the script's own group: fit and the command line use it, and leave it up
    group = distributed.current()
    assert group is not None and group.size == 2, group
    x = binary_data()
    report = {}

    with noise_free():
        pyro.clear_param_store()
        vae, steps = small_vae(), StepLog()
        history = fit(vae, x, epochs=2, batch_size=256, lr=1e-3, seed=0, progress=False, log=None, callbacks=[steps])
    if group.main:
        torch.save(vae.state_dict(), out / "noise_free.pt")
    report["noise_free"] = {"losses": steps.losses, "norms": steps.norms,
                            "train_loss": [r["train_loss"] for r in history]}

    with noise_free():  # M2: labelled and unlabelled batches, the labels cut with the batch
        pyro.clear_param_store()
        xl, yl = binary_data(labels=True)
        steps = StepLog()
        fit(small_m2(), xl, y_train=partly_labelled(yl), aux_loss=3.0, epochs=1, batch_size=64, lr=1e-3, seed=0,
            progress=False, log=None, callbacks=[steps])
    report["m2_losses"] = steps.losses

    weights = []
    for _ in range(2):
        pyro.clear_param_store()
        vae, seen = small_vae(), RngSeen()
        fit(vae, x, epochs=1, batch_size=256, lr=1e-3, seed=5, progress=False, log=None, callbacks=[seen])
        weights.append(vae.state_dict())
    report["reproducible"] = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # stopped after step 3 (inside the first epoch) and resumed with as many processes: bitwise the same
    first = out / "step3.pt"
    keep_first = distributed.on_main(lambda state: None if first.exists() else torch.save(state, first))
    pyro.clear_param_store()
    vae = small_vae()
    fit(vae, x, epochs=2, batch_size=64, lr=1e-3, seed=7, progress=False, log=None, checkpoint=keep_first,
        checkpoint_every=3)
    unbroken = vae.state_dict()
    distributed.barrier()
    pyro.clear_param_store()
    vae = small_vae(seed=1)  # other weights: the state must bring everything back
    fit(vae, x, epochs=2, batch_size=64, lr=1e-3, seed=7, progress=False, log=None,
        state=torch.load(first, weights_only=False))
    report["resumed_bitwise"] = all(torch.equal(unbroken[k], v) for k, v in vae.state_dict().items())

    # 129 points in batches of 64: the last batch has one point, so rank 1 has no share of it; stopped
    # after step 2 (the step before it), the resume's first step is that one: no rank may wait on another
    tiny = out / "tiny.pt"
    keep_tiny = distributed.on_main(lambda state: None if tiny.exists() else torch.save(state, tiny))
    pyro.clear_param_store()
    vae = small_vae()
    fit(vae, x[:129], epochs=1, batch_size=64, seed=2, progress=False, log=None, checkpoint=keep_tiny,
        checkpoint_every=2)
    unbroken = vae.state_dict()
    distributed.barrier()
    pyro.clear_param_store()
    vae = small_vae(seed=1)
    fit(vae, x[:129], epochs=1, batch_size=64, seed=2, progress=False, log=None,
        state=torch.load(tiny, weights_only=False))
    report["tiny_last_batch_resumed"] = all(torch.equal(unbroken[k], v) for k, v in vae.state_dict().items())

    try:  # objectives that read the batch's mean KL per level: not the one-process objective on a share
        fit(small_vae(), x, epochs=1, batch_size=256, progress=False, log=None, free_bits=0.5)
        report["free_bits_refused"] = False
    except InputError as err:
        report["free_bits_refused"] = "under torchrun" in str(err)
    report["rng_per_rank"] = seen.draws
    mine = torch.cat([v.reshape(-1) for v in weights[0].values()])
    others = distributed.gather(mine)
    report["weights_equal_across_ranks"] = all(torch.equal(others[0], o) for o in others)

    vae.eval()
    sharded = evaluate(vae, x[:450], iw_samples=20, elbo_samples=2, batch_size=100, progress=False, seed=3)
    if group.main:
        whole = iw_log_likelihood(vae, x[:450], num_samples=20, batch_size=100, seed=3)
        report["iw_sharded"], report["iw_whole"] = sharded["iw_log_likelihood"], float(whole.mean())

    data_dir = Path(sys.argv[2])
    run = out / "cli-run"
    code = cli.main(["train", "--data-dir", str(data_dir), "--out", str(run), "--epochs", "1", "--hidden", "16",
                     "--latent-dim", "2", "--batch-size", "128", "--no-progress"])
    report["train_exit"] = code
    code = cli.main(["evaluate", str(run), "--iw-samples", "5", "--elbo-samples", "1", "--no-progress"])
    report["evaluate_exit"] = code
    report["group_still_up"] = dist.is_initialized()

    said = io.StringIO()  # bad input: rank 0 checks first and prints; the others fail quietly with it
    with contextlib.redirect_stderr(said):
        report["bad_exit"] = cli.main(["train", "--data-dir", str(data_dir), "--out", str(out / "bad"),
                                       "--batch-size", "0", "--no-progress"])
    report["bad_said"] = said.getvalue()

    held = out / "held"  # a run directory another writer holds: rank 0's lock is refused, once
    held.mkdir(exist_ok=True)
    said = io.StringIO()
    with contextlib.ExitStack() as stack, contextlib.redirect_stderr(said):
        if group.main:
            stack.enter_context(RunLock(held))
        distributed.barrier()
        report["held_exit"] = cli.main(["train", "--data-dir", str(data_dir), "--out", str(held), "--epochs", "1",
                                        "--no-progress"])
    report["held_said"] = said.getvalue()
    (out / f"report{group.rank}.json").write_text(json.dumps(report))
    dist.barrier()  # leave together (see distributed.shutdown)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
