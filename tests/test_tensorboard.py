"""TensorBoard logging (pyro_vae.tensorboard): the tags and steps a run writes, through fit and through
``pyro-vae train --tensorboard``; a resume (at an epoch's end, or inside an epoch after a crash) goes on
with the same event stream, no step twice; bad input is one clear error."""

import copy
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from pyro_vae import VAE, InputError, cli, fit, nets
from pyro_vae import tensorboard as tb
from pyro_vae.callbacks import Callback

README = Path(__file__).resolve().parents[1] / "README.md"
STEP_TAGS = {"train/loss", "train/kl_weight", "train/grad_norm", "train/lr"}


def _vae(levels=1):
    torch.manual_seed(0)  # the same initial weights every time
    return VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=16), [4] * levels,
               guide="top-down" if levels > 1 else "bottom-up")


def _fit(vae, x, **kw):
    return fit(vae, x[:128], x[-32:], **{"epochs": 2, "batch_size": 32, "progress": False, "log": None, **kw})


def read(log_dir):
    """The event stream of ``log_dir`` as TensorBoard shows it (purged where a run restarted)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def assert_one_stream(events):
    """Every tag's steps strictly increase: nothing logged twice, nothing out of order."""
    tags = events.Tags()
    for tag in tags["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    for tag in tags["images"]:
        steps = [e.step for e in events.Images(tag)]
        assert steps == sorted(set(steps)), (tag, steps)


def test_fit_logs_steps_epochs_and_pictures_and_changes_no_number(images, tmp_path):
    """A ready SummaryWriter: per step the loss, KL weight, gradient norm and learning rate; per epoch the
    record's numbers (held-out ELBO, each level's KL and active units), per-unit lists as histograms and
    the pictures; the run itself is bitwise the run without the writer."""
    plain = _fit(_vae(2), images, kl_warmup=6)
    writer = SummaryWriter(tmp_path / "tb")
    history = _fit(_vae(2), images, kl_warmup=6, writer=writer)
    writer.close()
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in history] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in plain]

    events = read(tmp_path / "tb")
    tags = events.Tags()
    epoch_tags = {f"epoch/{k}" for k, v in history[-1].items() if not isinstance(v, list)}
    assert {"epoch/test_elbo", "epoch/test_kl_z0", "epoch/test_kl_z1", "epoch/test_active_units_z1",
            "epoch/train_loss"} <= epoch_tags
    assert set(tags["scalars"]) == STEP_TAGS | epoch_tags
    for tag in STEP_TAGS:
        assert [s for s, _ in scalars(events, tag)] == list(range(1, 9)), tag
    assert [v for _, v in scalars(events, "train/kl_weight")] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6,
                                                                               1, 1, 1])
    assert [v for _, v in scalars(events, "train/lr")] == pytest.approx([1e-3] * 8)
    assert all(math.isfinite(v) and v > 0 for _, v in scalars(events, "train/grad_norm"))
    for key in ("test_elbo", "test_kl_z0", "train_loss", "epoch"):
        assert scalars(events, f"epoch/{key}") == [(4, pytest.approx(history[0][key])),
                                                   (8, pytest.approx(history[1][key]))]
    assert {t for t in tags["histograms"]} == {k for k in (f"epoch/{k}" for k, v in history[-1].items()
                                                           if isinstance(v, list))}
    assert set(tags["images"]) == {"images/samples", "images/reconstructions", "images/levels"}
    for tag in tags["images"]:
        assert [e.step for e in events.Images(tag)] == [4, 8]
    levels = events.Images("images/levels")[-1]
    assert (levels.width, levels.height) == (9 * 30 + 2, 4 * 3 * 30 + 2)  # 4 images x (L + 2) rows of 1 + 8 tiles


def test_cli_tensorboard_resume_goes_on_with_one_stream(idx_dir, tmp_path, capsys):
    """``pyro-vae train --tensorboard`` for one epoch, then ``--resume --epochs 2`` (the flag need not be given
    again): OUT/tensorboard holds one stream, each step once, the pictures of both epochs."""
    out = tmp_path / "run"
    flags = ["train", "--out", str(out), "--data-dir", str(idx_dir), "--hidden", "16", "--latent-dim", "2",
             "--batch-size", "64", "--no-progress", "--tensorboard"]
    assert cli.main(flags + ["--epochs", "1"]) == 0
    assert "tensorboard/" in capsys.readouterr().out
    assert cli.main(flags[:-1] + ["--epochs", "2", "--resume"]) == 0  # a run that logged goes on logging
    assert "tensorboard/" in capsys.readouterr().out
    events = read(out / "tensorboard")
    assert_one_stream(events)
    assert [s for s, _ in scalars(events, "train/loss")] == list(range(1, 17))  # 512 images, batch 64: 8 steps
    assert [s for s, _ in scalars(events, "epoch/test_elbo")] == [8, 16]
    assert set(events.Tags()["images"]) == {"images/samples", "images/reconstructions"}  # one level: no levels
    assert [e.step for e in events.Images("images/samples")] == [8, 16]


class Crash(Callback):
    """Raises at the end of step ``at`` (a crash: the steps after the last checkpoint were logged)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, loop, batch, loss):
        if loop.step == self.at:
            raise RuntimeError("crash")


def test_resume_inside_an_epoch_drops_what_was_logged_after_the_checkpoint(images, tmp_path):
    """A run checkpointed at step 3 of 4, logging on to step 5 (an epoch end at 4 among them), then
    crashing: resumed from step 3 with the same log directory, the stream TensorBoard shows is the
    unbroken run's, step for step and value for value."""
    _fit(_vae(), images, writer=tmp_path / "unbroken")
    saved = []
    with pytest.raises(RuntimeError, match="crash"):
        _fit(_vae(), images, writer=tmp_path / "tb", checkpoint_every=3, callbacks=[Crash(6)],
             checkpoint=lambda state: saved.append(copy.deepcopy(state)))
    assert [s["step"] for s in saved] == [3, 4]
    assert [s for s, _ in scalars(read(tmp_path / "tb"), "train/loss")] == [1, 2, 3, 4, 5]  # closed on the crash
    _fit(_vae(), images, writer=tmp_path / "tb", state=saved[0])

    events, unbroken = read(tmp_path / "tb"), read(tmp_path / "unbroken")
    assert_one_stream(events)
    assert set(events.Tags()["scalars"]) == set(unbroken.Tags()["scalars"])
    for tag in STEP_TAGS | {"epoch/test_elbo", "epoch/train_loss", "epoch/test_kl_z0"}:
        assert scalars(events, tag) == scalars(unbroken, tag), tag
    assert [e.step for e in events.Images("images/samples")] == [4, 8]


def test_the_readme_snippet_runs(images, tmp_path):
    code = next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                if "SummaryWriter(" in block)
    scope = {"x_train": images[:64], "x_test": images[-32:], "run_dir": tmp_path}
    exec(compile(code, "README.md", "exec"), scope)
    assert [s for s, _ in scalars(read(tmp_path / "tb"), "train/loss")] == [1, 2, 3, 4]  # 64 images, batch 32
    events = read(tmp_path / "tb2")
    assert_one_stream(events)
    assert [s for s, _ in scalars(events, "epoch/test_elbo")] == [2, 4, 6]
    assert [s for s, _ in scalars(events, "train/loss")] == list(range(1, 7))


def test_bad_writer_and_settings_are_one_clear_error(images, tmp_path):
    with pytest.raises(InputError, match=r"^writer must be a torch.utils.tensorboard.SummaryWriter or a log "
                                         r"directory, got int"):
        _fit(_vae(), images, writer=42)
    with pytest.raises(InputError, match="images_every must be an integer >= 0"):
        tb.TensorBoard(tmp_path / "tb", images_every=-1)
    with pytest.raises(InputError, match="every must be an integer >= 1"):
        tb.TensorBoard(tmp_path / "tb", every=0)


def test_only_rank_0_writes(images, tmp_path, monkeypatch):
    monkeypatch.setattr(tb.distributed, "is_main", lambda: False)
    _fit(_vae(), images, epochs=1, writer=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_a_missing_tensorboard_package_is_one_clear_error(idx_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.raises(InputError) as err:
        tb.TensorBoard(tmp_path / "tb")
    assert str(err.value) == tb.MISSING == ("TensorBoard logging needs the tensorboard package: pip install "
                                            "'pyro-vae[tensorboard]' (or pip install tensorboard)")
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--data-dir", str(idx_dir), "--epochs", "1", "--tensorboard"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"pyro-vae: error: {tb.MISSING}"
    assert not out.exists()  # refused before anything was written
