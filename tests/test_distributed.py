"""Data-parallel training and evaluation under ``torchrun`` (two processes, gloo, on the CPU).

Starting processes is what costs here (about 10 s a launch on two cores), so the checks share launches:
one runs ``tests/distributed_worker.py`` (the equivalence with one process, reproducibility, the sharded
evaluation, the command line inside a user's own group); one run of ``pyro-vae train`` is stopped by a
SIGTERM to one rank, resumed with two processes and SIGKILLed there, then resumed with one.
Bad input is checked inside the worker's launch too.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_idx_dir
from distributed_common import StepLog, binary_data, noise_free, partly_labelled, small_m2, small_vae
from test_crash import wait_for
from pyro_vae import cli, distributed, fit
from pyro_vae.checkpoints import load_checkpoint
from pyro_vae.errors import InputError

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TRAIN = ["--hidden", "32", "--latent-dim", "4", "--batch-size", "64", "--checkpoint-every", "4", "--no-progress"]


def launch(args, env, **kwargs):
    return subprocess.Popen([*TORCHRUN, *args], env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, PYRO_VAE_CACHE=str(tmp_path_factory.mktemp("cache")), PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_idx_dir(tmp_path_factory.mktemp("dist") / "idx", n_train=1024, n_test=128)


@pytest.fixture(scope="module")
def worker(data_dir, env, tmp_path_factory):
    """The reports of both ranks of one ``torchrun`` launch of ``distributed_worker.py``, and its folder."""
    out = tmp_path_factory.mktemp("worker")
    proc = launch([str(HERE / "distributed_worker.py"), str(out), str(data_dir)], env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    reports = [json.loads((out / f"report{rank}.json").read_text()) for rank in (0, 1)]
    return reports, out, stdout


def test_two_processes_take_the_steps_one_process_takes_on_the_whole_batch(worker):
    """Global batch 256 over 599 points (batches 256, 256, 87; the last split 44/43): the losses, the
    gradient norms and the weights after 6 steps equal one process's. To float tolerance, not bitwise:
    two half-batch sums added by the all-reduce round differently from one sum over the batch."""
    reports, out, _ = worker
    with noise_free():
        vae, steps = small_vae(), StepLog()
        history = fit(vae, binary_data(), epochs=2, batch_size=256, lr=1e-3, seed=0, progress=False, log=None,
                      callbacks=[steps])
    two = reports[0]["noise_free"]
    assert reports[1]["noise_free"] == two  # every rank saw the same global numbers
    assert len(two["losses"]) == len(steps.losses) == 6
    assert two["losses"] == pytest.approx(steps.losses, rel=1e-6)  # the whole batch's loss, not a shard's
    assert two["norms"] == pytest.approx(steps.norms, rel=1e-5)  # the sum of the shards' gradients
    assert two["train_loss"] == pytest.approx([r["train_loss"] for r in history], rel=1e-6)
    start, theirs = small_vae().state_dict(), torch.load(out / "noise_free.pt")
    trained = dict(vae.named_parameters())
    for name, value in vae.state_dict().items():
        if name in trained:  # it moved, so the comparison below means something
            assert (value - start[name]).abs().max() > 1e-4, name
        torch.testing.assert_close(theirs[name], value, rtol=0, atol=1e-6, msg=name)


def test_labels_are_cut_with_the_batch_so_two_processes_take_one_processs_m2_steps(worker):
    """M2 with every fifth point labelled (labelled and unlabelled batches, the aux loss on): each rank
    takes its share of the batch's labels, so the two-process losses are one process's."""
    reports, _, _ = worker
    with noise_free():
        x, y = binary_data(labels=True)
        steps = StepLog()
        fit(small_m2(), x, y_train=partly_labelled(y), aux_loss=3.0, epochs=1, batch_size=64, lr=1e-3, seed=0,
            progress=False, log=None, callbacks=[steps])
    assert len(steps.losses) == 2 + 8  # 120 labelled points in 2 batches, 479 unlabelled in 8
    assert reports[0]["m2_losses"] == reports[1]["m2_losses"] == pytest.approx(steps.losses, rel=1e-5)


def test_each_rank_draws_its_own_noise_a_seed_reproduces_the_run_and_a_resume_is_bitwise(worker):
    reports, _, _ = worker
    first, second = reports[0]["rng_per_rank"]
    assert first != second  # seed + rank
    assert all(r["reproducible"] for r in reports)
    assert all(r["resumed_bitwise"] for r in reports)  # each rank took back its own RNG stream
    assert all(r["tiny_last_batch_resumed"] for r in reports)  # a rank without a share of a batch waits on nobody
    assert all(r["free_bits_refused"] for r in reports)
    assert all(r["weights_equal_across_ranks"] for r in reports)


def test_the_sharded_evaluation_gives_the_one_process_numbers(worker, env):
    reports, out, _ = worker
    assert reports[0]["iw_sharded"] == reports[0]["iw_whole"]
    two = json.loads((out / "cli-run" / "eval.json").read_text())
    assert two["processes"] == 2
    saved = {k: v for k, v in two.items() if k != "processes"}
    os.environ["PYRO_VAE_CACHE"] = env["PYRO_VAE_CACHE"]
    assert cli.main(["evaluate", str(out / "cli-run"), "--iw-samples", "5", "--elbo-samples", "1",
                     "--no-progress"]) == 0
    one = json.loads((out / "cli-run" / "eval.json").read_text())
    assert one == saved


def test_only_rank_zero_writes_and_prints_and_a_users_group_stays_up(worker):
    reports, out, stdout = worker
    assert [(r["train_exit"], r["evaluate_exit"], r["group_still_up"]) for r in reports] == [(0, 0, True)] * 2
    assert stdout.count("trained 1 epochs") == 1 and stdout.count("wrote ") == 1  # train's (evaluate's: stderr)
    assert {p.name for p in (out / "cli-run").iterdir()} >= {"checkpoint.pt", "metrics.jsonl", "eval.json"}


def rank_pid(root, rank):
    """The pid of the process under ``root`` (torchrun) whose environment says ``RANK=rank``."""
    for _ in range(2000):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if f"RANK={rank}".encode() in environ and ppid == root:
                return int(entry.name)
        time.sleep(0.01)
    raise AssertionError(f"no rank {rank} under {root}")


def step_of(path):
    try:
        return int(load_checkpoint(path)["step"])
    except Exception:
        return -1


def test_a_signal_to_one_rank_stops_all_a_killed_rank_fails_clearly_and_the_run_resumes_with_two_or_one(
        data_dir, env, tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint.pt"
    base = ["-m", "pyro_vae", "train", "--data-dir", str(data_dir), "--out", str(out), *TRAIN]

    # SIGTERM to rank 1 alone: both ranks stop after the same step, rank 0 writes the checkpoint, one message
    proc = launch([*base, "--epochs", "40"], env)
    wait_for(lambda: step_of(ckpt) >= 4, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert stderr.count("pyro-vae: interrupted by SIGTERM") == 1, stderr[-3000:]
    assert "torchrun --nproc-per-node 2 -m pyro_vae train --out" in stderr
    said = re.search(r"SIGTERM at epoch \d+, step (\d+)", stderr)
    stopped = load_checkpoint(ckpt)
    assert said and stopped["step"] == int(said.group(1)) >= 4  # the state after the step both ranks stopped at
    assert len(stopped["callbacks"]["DataParallel"]["rng"]) == 2

    # resumed with two processes, then SIGKILL to rank 1: the job fails, saying why; the checkpoint is whole
    proc = launch([*base, "--resume", "--epochs", "40"], env)
    wait_for(lambda: step_of(ckpt) >= stopped["step"] + 8, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "another process of this run has stopped" in stderr, stderr[-3000:]
    killed = load_checkpoint(ckpt)
    assert killed["step"] >= stopped["step"] + 8

    # ... and one process finishes it (its RNG is rank 0's saved stream)
    os.environ["PYRO_VAE_CACHE"] = env["PYRO_VAE_CACHE"]
    epochs = killed["epoch"] + 2
    assert cli.main(["train", "--data-dir", str(data_dir), "--out", str(out), *TRAIN, "--resume", "--epochs",
                     str(epochs)]) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert all(torch.isfinite(torch.tensor(r["test_elbo"])) for r in history)


def test_bad_input_under_torchrun_is_reported_once(worker):
    reports, _, _ = worker
    assert [r["bad_exit"] for r in reports] == [2, 2]
    assert reports[0]["bad_said"] == ("pyro-vae: error: batch_size must be a positive integer, got 0; "
                                      "use --batch-size 1 or more\n")
    assert reports[1]["bad_said"] == ""  # rank 1 met it too, after rank 0, and does not repeat it
    assert [r["held_exit"] for r in reports] == [2, 2]
    assert reports[0]["held_said"].count("pyro-vae: error:") == 1 and "is in use by another pyro-vae process" \
        in reports[0]["held_said"]
    assert reports[1]["held_said"] == ""  # not "another process of this run has stopped"


# ------------------------------------------------------------------ in one process, no launch
def test_shards_cover_the_batch_once_in_order():
    x = torch.arange(87)
    pieces = [distributed.Group(r, 2, r, "gloo").shard(x) for r in range(2)]
    assert [len(p) for p in pieces] == [44, 43] and torch.equal(torch.cat(pieces), x)
    slices = [distributed.Group(r, 3, r, "gloo").shard_slice(1050, 100) for r in range(3)]
    assert slices == [slice(0, 400), slice(400, 800), slice(800, 1050)]  # whole batches of 100 per rank


def test_the_seeded_iw_estimate_does_not_depend_on_how_the_data_are_split():
    from pyro_vae.evaluate import iw_log_likelihood

    vae, x = small_vae(), binary_data(n=250)
    whole = iw_log_likelihood(vae, x, num_samples=7, batch_size=50, seed=4)
    parts = [iw_log_likelihood(vae, x[s], num_samples=7, batch_size=50, seed=4, offset=s.start)
             for s in (slice(0, 100), slice(100, 250))]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(iw_log_likelihood(vae, x, num_samples=7, batch_size=50, seed=5), whole)


def test_an_error_every_rank_meets_is_printed_by_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cli._say("error: alike")
    cli._say("error: mine", True)
    assert capsys.readouterr().err == "pyro-vae (rank 1): error: mine\n"
    monkeypatch.setenv("RANK", "0")
    cli._say("error: alike")
    assert capsys.readouterr().err == "pyro-vae: error: alike\n"


def test_data_parallel_svi_needs_a_group():
    with pytest.raises(InputError, match="torchrun"):
        from pyro_vae.svi import DataParallelSVI

        DataParallelSVI(lambda: None, lambda: None, None, 1e-3)


def test_sample_and_explore_refuse_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["sample", str(tmp_path)]) == 2
    assert "runs in one process; start it without torchrun" in capsys.readouterr().err


def test_an_explicit_gpu_index_is_refused_for_a_multi_process_node(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.device_for("cuda") == "cuda:1" and distributed.device_for("cpu") == "cpu"
    with pytest.raises(InputError, match="would put every process of this node on one GPU; under torchrun pass "
                                         "--device cuda"):
        distributed.device_for("cuda:0")
