"""The loop and its parts: hook order, state in checkpoints, errors in a part, stopping early."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from pyro_vae import VAE, InputError, callbacks, fit, nets
from pyro_vae.callbacks import Callback, EarlyStopping
from pyro_vae.loop import upgrade_state
from pyro_vae.train import load_checkpoint, train

from test_train import small_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _vae():
    torch.manual_seed(0)  # the same initial weights every time
    return VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=16), [4])


def _fit(x, **kw):
    return fit(_vae(), x, **{"epochs": 2, "batch_size": 32, "progress": False, "log": None, **kw})


def keep(saved):
    """A checkpoint function that keeps copies (a state holds the live parameters' tensors)."""
    return lambda state: saved.append(copy.deepcopy(state))


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            calls = object.__getattribute__(self, "calls")
            return lambda loop, *args: calls.append((name, loop.epoch, loop.step, loop.batch))
        return object.__getattribute__(self, name)


def test_hooks_are_called_in_order(images):
    rec = Recorder()
    _fit(images[:64], x_test=images[:16], callbacks=[rec])
    expected = [("on_fit_start", 0, 0, 0)]
    step = 0
    for epoch in range(2):
        expected.append(("on_epoch_start", epoch, step, 0))
        for batch in range(2):
            expected.append(("on_step_start", epoch, step, batch))
            step += 1
            expected.append(("on_step_end", epoch, step, batch + 1))
        expected.append(("on_epoch_end", epoch + 1, step, 0))
    expected.append(("on_fit_end", 2, 4, 0))
    assert rec.calls == expected


class StepCounter(Callback):
    """A part with state: the steps it saw, the sum of their losses and a tensor."""

    def __init__(self):
        self.steps, self.loss_sum, self.trace = 0, 0.0, torch.zeros(3)

    def state_dict(self):
        return {"steps": self.steps, "loss_sum": self.loss_sum, "trace": self.trace.clone()}

    def load_state_dict(self, state):
        self.steps, self.loss_sum, self.trace = state["steps"], state["loss_sum"], state["trace"].clone()

    def on_step_end(self, loop, batch, loss):
        self.steps += 1
        self.loss_sum += loss
        self.trace += batch.mean() * torch.arange(3.0)

    def on_epoch_end(self, loop):
        loop.record["counted_steps"] = self.steps


def test_a_stateful_part_resumes_bitwise_from_a_mid_epoch_checkpoint(images):
    x = images[:96]
    straight_part, straight_vae = StepCounter(), _vae()
    expected = fit(straight_vae, x, epochs=3, batch_size=32, progress=False, log=None, callbacks=[straight_part])

    saved = []
    first = StepCounter()
    fit(_vae(), x, epochs=2, batch_size=32, progress=False, log=None, callbacks=[first],
        checkpoint=keep(saved), checkpoint_every=2)
    mid = saved[2]  # after step 4 of 6: epoch 2, batch 1
    assert (mid["epoch"], mid["step"], mid["batch"]) == (1, 4, 1)
    assert mid["callbacks"]["StepCounter"]["steps"] == 4

    resumed_part, resumed_vae = StepCounter(), _vae()
    history = fit(resumed_vae, x, epochs=3, batch_size=32, progress=False, log=None, callbacks=[resumed_part],
                  state=mid)
    assert resumed_part.steps == straight_part.steps == 9
    assert resumed_part.loss_sum == straight_part.loss_sum
    assert torch.equal(resumed_part.trace, straight_part.trace)
    for (name, a), b in zip(straight_vae.state_dict().items(), resumed_vae.state_dict().values()):
        assert torch.equal(a, b), name
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert drop(history) == drop(expected)
    assert [r["counted_steps"] for r in history] == [3, 6, 9]


def test_a_state_written_before_the_loop_had_parts_resumes_bitwise(images):
    x = images[:96]
    straight = _vae()
    expected = fit(straight, x, epochs=2, batch_size=32, progress=False, log=None)
    saved = []
    fit(_vae(), x, epochs=2, batch_size=32, progress=False, log=None, checkpoint=keep(saved), checkpoint_every=2)
    mid = dict(saved[1])  # step 4: epoch 2, batch 1
    old = {k: v for k, v in mid.items() if k not in ("callbacks", "data")}
    old["progress_in_epoch"] = mid["callbacks"]["EpochStats"]
    old["data_epoch_start"] = mid["data"]["epoch_start"]
    assert upgrade_state(old)["callbacks"] == {"EpochStats": mid["callbacks"]["EpochStats"]}
    resumed = _vae()
    history = fit(resumed, x, epochs=2, batch_size=32, progress=False, log=None, state=old)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in expected]


class FailAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, loop, batch, loss):
        if loop.step == self.step:
            raise RuntimeError(f"my tracker is down at step {loop.step}")


class Closes(Callback):
    def __init__(self):
        self.errors = []

    def on_exception(self, loop, error):
        self.errors.append(error)


def test_a_part_that_raises_stops_the_run_with_the_checkpoint_intact(idx_dir, tmp_path):
    straight, _ = train(small_config(idx_dir, epochs=2, kl_warmup=20), tmp_path / "a", progress=False,
                        pictures=False)
    out = tmp_path / "b"
    closes = Closes()
    with pytest.raises(RuntimeError, match="my tracker is down at step 7"):
        train(small_config(idx_dir, epochs=2, kl_warmup=20, checkpoint_every=3), out, progress=False,
              pictures=False, callbacks=[FailAtStep(7), closes])
    assert len(closes.errors) == 1 and "step 7" in str(closes.errors[0])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["step"], ckpt["batch"]) == (6, 6)  # the last checkpoint before the error, whole
    assert not list(out.glob("*.tmp"))
    resumed, _ = train(small_config(idx_dir, epochs=2, kl_warmup=20, checkpoint_every=3), out, resume=True,
                       progress=False, pictures=False)
    assert resumed.kl_weight == 1.0
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


class StopAfter(Callback):
    def __init__(self, epoch=None, step=None):
        self.epoch, self.step = epoch, step

    def on_step_end(self, loop, batch, loss):
        if loop.step == self.step:
            loop.should_stop = True

    def on_epoch_end(self, loop):
        if loop.epoch == self.epoch:
            loop.should_stop = True


def test_a_user_part_stops_training_early(images):
    history = _fit(images[:64], epochs=10, callbacks=[StopAfter(epoch=3)])
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_a_stop_inside_an_epoch_is_checkpointed(images):
    saved = []
    history = _fit(images[:96], epochs=10, callbacks=[StopAfter(step=5)], checkpoint=keep(saved))
    assert [r["epoch"] for r in history] == [1]
    assert (saved[-1]["epoch"], saved[-1]["step"], saved[-1]["batch"]) == (1, 5, 2)


class Metric(Callback):
    """Puts a scripted value into each epoch's record."""

    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, loop):
        loop.record["score"] = self.values[loop.epoch - 1]


def test_early_stopping_waits_patience_epochs_and_stays_stopped_on_resume(images):
    scores = [1.0, 3.0, 2.0, 3.0, 2.5, 9.0, 9.0]  # best 3.0 at epoch 2; epochs 3, 4, 5 no better
    saved = []
    stopper = EarlyStopping("score", patience=3)
    history = _fit(images[:64], epochs=7, callbacks=[Metric(scores), stopper], checkpoint=keep(saved))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert (stopper.best, stopper.best_epoch, stopper.stopped) == (3.0, 2, True)
    assert history[-1]["best_epoch"] == 2
    again = _fit(images[:64], epochs=7, callbacks=[Metric(scores), EarlyStopping("score", patience=3)],
                 state=saved[-1])
    assert [r["epoch"] for r in again] == [1, 2, 3, 4, 5]


def test_keep_best_keeps_the_epoch_early_stopping_counts_from(images):
    scores = [1.0, 3.0, 2.0, 3.0, 2.5]  # a tie at epoch 4: early stopping counts from epoch 2
    saved = []
    stopper = EarlyStopping("score", patience=3)
    _fit(images[:64], epochs=5, callbacks=[Metric(scores), stopper,
                                           callbacks.KeepBest(lambda state: saved.append(state["epoch"]), "score")])
    assert saved == [1, 2] and stopper.best_epoch == 2  # best.pt holds the epoch the record calls best
    saved.clear()
    _fit(images[:64], epochs=3, callbacks=[Metric([5.0, 4.0, 4.0]),
                                           callbacks.KeepBest(lambda state: saved.append(state["epoch"]), "score",
                                                              mode="min")])
    assert saved == [1, 2]


def test_early_stopping_min_mode_and_min_delta(images):
    stopper = EarlyStopping("score", patience=2, mode="min", min_delta=0.5)
    history = _fit(images[:64], epochs=6, callbacks=[Metric([5.0, 4.0, 3.8, 3.7, 1.0, 1.0]), stopper])
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # 3.8 and 3.7 are not 0.5 below 4.0


def test_early_stopping_on_a_missing_metric_names_it(images):
    with pytest.raises(InputError, match=r"no 'val_elbo' in the epoch's metrics \(they are: epoch, train_loss"):
        _fit(images[:64], callbacks=[EarlyStopping("val_elbo")])


def test_bad_parts_are_refused():
    with pytest.raises(InputError, match="patience must be a positive integer"):
        EarlyStopping(patience=0)
    with pytest.raises(InputError, match="mode must be 'max' or 'min'"):
        EarlyStopping(mode="up")
    with pytest.raises(InputError, match="callable schedule"):
        callbacks.KLWeight(0.5)
    with pytest.raises(InputError, match="callable save"):
        callbacks.Checkpoint("checkpoint.pt")


def test_two_parts_with_the_same_state_key_are_refused(images):
    with pytest.raises(InputError, match="two callbacks keep state under the same key 'StepCounter'"):
        _fit(images[:64], callbacks=[StepCounter(), StepCounter()])


def test_a_user_schedule_sets_the_kl_weight(images):
    seen = []

    class Watch(Callback):
        def on_step_end(self, loop, batch, loss):
            seen.append(loop.vae.kl_weight)

    vae = _vae()
    fit(vae, images[:64], epochs=2, batch_size=32, progress=False, log=None,
        callbacks=[callbacks.KLWeight(lambda step: 0.1 * (step + 1)), Watch()])
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert vae.kl_weight == 1.0


def test_readme_callback_snippet_runs(images, tmp_path, capsys):
    code = next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                if "class StopWhenFlat" in block)
    # held-out data unlike the training images: the test ELBO soon stops improving, so a part stops the run
    noise = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    scope = {"x_train": images[:96], "x_test": noise, "run_dir": tmp_path}
    exec(compile(code, "README.md", "exec"), scope)
    history = scope["history"]
    assert 1 <= len(history) <= 50 and "test_elbo" in history[-1]
    rows = [json.loads(line) for line in (tmp_path / "my_metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in history]
    assert len(history) < 50, "the stopping part never stopped"


def test_a_batch_order_saved_on_another_device_resumes_with_a_warning(images):
    """A CUDA generator's state (16 bytes of Philox seed and offset) cannot drive a CPU generator:
    the resume warns and goes on with an order seeded from it, the same for two such resumes."""
    x = images[:96]
    saved = []
    fit(_vae(), x, epochs=2, batch_size=32, progress=False, log=None, checkpoint=keep(saved), checkpoint_every=2)
    mid = copy.deepcopy(saved[1])
    mid["data"] = {"epoch_start": torch.arange(16, dtype=torch.uint8), "device": "cuda"}
    results = []
    for _ in range(2):
        vae = _vae()
        with pytest.warns(UserWarning, match="saved by a cuda generator and cannot be replayed on cpu"):
            fit(vae, x, epochs=2, batch_size=32, progress=False, log=None, state=copy.deepcopy(mid))
        results.append(vae.state_dict())
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


def test_a_resume_at_an_epochs_last_batch_records_the_warm_up_weight(images):
    """A signal during an epoch's last step saves batch == len(data): the resumed loop records the epoch
    without taking a step, with the weight of the last step taken (not 1.0)."""
    x = images[:96]
    expected = fit(_vae(), x, epochs=2, batch_size=32, progress=False, log=None, kl_warmup=10)
    saved = []

    class SaveAtStep(Callback):
        def on_step_end(self, loop, batch, loss):
            if loop.step == 3:
                saved.append(copy.deepcopy(loop.state_dict()))

    fit(_vae(), x, epochs=1, batch_size=32, progress=False, log=None, kl_warmup=10, callbacks=[SaveAtStep()])
    assert saved[0]["batch"] == 3
    history = fit(_vae(), x, epochs=2, batch_size=32, progress=False, log=None, kl_warmup=10, state=saved[0])
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert drop(history) == drop(expected) and history[0]["kl_weight"] == 0.3


def test_a_streak_of_skipped_steps_goes_on_after_a_resume(images):
    from pyro_vae.loop import Loop

    loop = Loop(_vae(), type("S", (), {"state_dict": lambda self: {}, "load_state_dict": lambda self, s: None})(),
                type("D", (), {"state_dict": lambda self: {}, "load_state_dict": lambda self, s: None})(), 1)
    loop.bad_steps = 7
    state = loop.state_dict()
    again = Loop(loop.vae, loop.svi, loop.data, 1)
    again.load_state_dict(state)
    assert again.bad_steps == 7
