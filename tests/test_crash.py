"""Kill and signal tests: a run killed at any moment resumes from an intact checkpoint.

Each test starts ``pyro-vae train`` in a subprocess, kills it at a chosen
moment (with SIGKILL: no handler runs), checks that whatever ``checkpoint.pt``
is on disk loads, resumes, and compares the final parameters with a run that
never stopped: they must be bitwise equal.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_idx_dir
from pyro_vae.train import load_checkpoint, load_run

EPOCHS = 3
FLAGS = ["--hidden", "32", "--latent-dim", "4", "--batch-size", "64", "--checkpoint-every", "4",
         "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_idx_dir(tmp_path_factory.mktemp("crash") / "idx", n_train=1024, n_test=128)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The parameters of the same run that never stopped, made the same way (a subprocess with one
    thread: bitwise equality needs the same float reductions)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    env = dict(os.environ, PYRO_VAE_CACHE=str(out.parent / "cache"), PYTHONWARNINGS="ignore")
    proc = start(out, data_dir, env)
    assert proc.wait(timeout=300) == 0, proc.communicate()
    vae, _ = load_run(out)
    return vae.state_dict()


def start(out, data_dir, env, *extra):
    env = dict(env, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pyro_vae.cli", "train", "--data-dir", str(data_dir), "--out", str(out),
           "--epochs", str(EPOCHS), *FLAGS, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.communicate()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)


def finish_and_compare(out, data_dir, env, reference):
    ckpt = out / "checkpoint.pt"
    resume = ["--resume"] if ckpt.exists() else ["--overwrite"]
    if ckpt.exists():
        load_checkpoint(ckpt)  # intact: loads, or this raises
    env = {k: v for k, v in env.items() if k != "PYRO_VAE_CHECKPOINT_DELAY"}
    proc = start(out, data_dir, env, *resume)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    vae, _ = load_run(out)
    for name, value in vae.state_dict().items():
        assert torch.equal(value, reference[name]), name
    return resume


@pytest.mark.parametrize("position", ["first-checkpoint-write", "later-checkpoint-write", "between-checkpoints",
                                      "late-in-first-epoch"])
def test_sigkill_then_resume_matches_an_unbroken_run(position, data_dir, reference, tmp_path, cli_env):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"

    class tmp:  # the checkpoint's temporary file: a unique name beside it
        @staticmethod
        def exists():
            return out.is_dir() and any(out.glob(".checkpoint.pt.*.tmp"))

    env = dict(cli_env, PYRO_VAE_CHECKPOINT_DELAY="0.5")
    proc = start(out, data_dir, env)
    try:
        if position == "first-checkpoint-write":
            wait_for(tmp.exists, proc)  # paused between writing the temporary file and renaming it
            assert not ckpt.exists()
        elif position == "later-checkpoint-write":
            wait_for(lambda: ckpt.exists() and load_checkpoint(ckpt)["step"] >= 8 and tmp.exists(), proc)
        elif position == "between-checkpoints":
            wait_for(lambda: ckpt.exists() and not tmp.exists(), proc)
            time.sleep(0.05)
        else:  # after the step-12 checkpoint, near the end of the first epoch (16 steps)
            wait_for(lambda: ckpt.exists() and load_checkpoint(ckpt)["step"] >= 12, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    used = finish_and_compare(out, data_dir, cli_env, reference)
    assert used == (["--overwrite"] if position == "first-checkpoint-write" else ["--resume"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_write_a_checkpoint_and_say_how_to_resume(signum, data_dir, reference, tmp_path,
                                                                    cli_env):
    out = tmp_path / "run"
    env = dict(cli_env, PYRO_VAE_CHECKPOINT_DELAY="0.3")
    proc = start(out, data_dir, env)
    wait_for(lambda: (out / "checkpoint.pt").exists(), proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert signal.Signals(signum).name in stderr
    load_checkpoint(out / "checkpoint.pt")
    assert finish_and_compare(out, data_dir, cli_env, reference) == ["--resume"]
