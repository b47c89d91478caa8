"""VDVAE's training aids as parts of the loop: gradient-norm skipping and a weight average (EMA)."""

import copy
import json

import pyro
import pytest
import torch

from pyro_vae import VAE, cli, fit, nets
from pyro_vae.callbacks import Callback, Evaluation, GradientSkip, WeightAverage
from pyro_vae.checkpoints import rng_state, set_rng_state
from pyro_vae.evaluate import elbo_terms, evaluate
from pyro_vae.train import build_vae, load_checkpoint, load_data, load_run, RunConfig

X_SHAPE = (1, 28, 28)


class LoudOnCalls(torch.nn.Module):
    """Wraps a decoder; its output is ``factor`` times larger on the listed (1-based) calls, so that step's
    gradient norm is about 15 times the others' while its loss stays finite. The call count is a buffer:
    it is in the model's state, so a resumed run is loud on the same calls."""

    def __init__(self, decoder, calls, factor=10.0):
        super().__init__()
        self.decoder, self.calls, self.factor = decoder, set(calls), factor
        self.register_buffer("n", torch.zeros((), dtype=torch.long))

    def forward(self, z):
        self.n += 1
        out = self.decoder(z)
        return out * self.factor if int(self.n) in self.calls else out


def _vae(loud=()):
    torch.manual_seed(0)  # the same initial weights every time
    encoder, decoder = nets.build("mlp", X_SHAPE, 4, hidden=16)
    return VAE(encoder, LoudOnCalls(decoder, loud), [4], x_shape=X_SHAPE)


def _fit(vae, x, **kw):
    return fit(vae, x, **{"epochs": 2, "batch_size": 32, "progress": False, "log": None, **kw})


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _equal(a, b):
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


class StepSpy(Callback):
    """Per step: the gradient norm the skip was asked about, whether the weights and Adam's state stayed
    bitwise the same, the loss reported; and the trained weights at the start and after every step."""

    def __init__(self, skip=None):
        self.norms, self.unchanged, self.losses, self.weights = [], [], [], []
        if skip is not None:
            asked = skip.skip
            skip.skip = lambda norm: (self.norms.append(norm), asked(norm))[1]

    def on_fit_start(self, loop):
        self.weights.append(_clone(loop.vae.state_dict()))

    def on_step_start(self, loop, batch):
        optim = loop.svi.optimizer
        self._before = (_clone(loop.vae.state_dict()), copy.deepcopy(optim.state_dict()["state"]) if optim else {})

    def on_step_end(self, loop, batch, loss):
        after = (loop.vae.state_dict(), loop.svi.optimizer.state_dict()["state"])
        params = {k: v for k, v in after[0].items() if not k.endswith(".n")}  # the call counter always moves
        self.unchanged.append(_equal({k: self._before[0][k] for k in params}, params)
                              and _equal(self._before[1], after[1]))
        self.losses.append(loss)
        self.weights.append(_clone(loop.vae.state_dict()))


# ------------------------------------------------------------------ GradientSkip
def test_an_update_over_the_threshold_changes_nothing_and_is_counted(images):
    """Steps 3 and 5 (of 4 an epoch) have gradient norms of about 22 000, the others under 1 600: with a
    threshold of 5000 exactly those two change no weight and no Adam state, and each epoch records one.
    ``max_bad_steps=1``: a skipped step is not a non-finite one, so the run goes on."""
    skip = GradientSkip(5000)
    spy = StepSpy(skip)
    history = _fit(_vae(loud={3, 5}), images, callbacks=[skip, spy], max_bad_steps=1)
    assert [n > 5000 for n in spy.norms] == [False, False, True, False, True, False, False, False], spy.norms
    assert spy.unchanged == [False, False, True, False, True, False, False, False]
    assert all(loss is not None for loss in spy.losses)  # the loss of a skipped step is still reported
    assert [r["skipped_updates"] for r in history] == [1, 1] and skip.total == 2
    assert skip.state_dict() == {"in_epoch": 0, "total": 2}


def test_below_the_threshold_every_update_is_taken(images):
    skip = GradientSkip(1e6)
    spy = StepSpy(skip)
    vae = _vae()
    history = _fit(vae, images, callbacks=[skip, spy])
    assert spy.unchanged == [False] * 8 and [r["skipped_updates"] for r in history] == [0, 0]
    plain = _vae()
    _fit(plain, images)
    assert _equal(plain.state_dict(), vae.state_dict())  # the same run as without the part


def test_the_skipped_count_is_logged_in_metrics_jsonl(images, tmp_path):
    from pyro_vae.train import RunDirectory

    run = RunDirectory(tmp_path, RunConfig(), X_SHAPE)
    _fit(_vae(loud={3}), images, callbacks=[GradientSkip(5000)], checkpoint=run.save)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [1, 0]


# ------------------------------------------------------------------ WeightAverage
def test_the_average_is_the_hand_computed_ema_of_the_updates(images):
    """decay 0.5: average_0 = the initial weights, then average = 0.5 average + 0.5 weights after each
    update taken; step 3 is skipped (no update), so the recurrence leaves it out."""
    skip, ema = GradientSkip(5000), WeightAverage(0.5)
    spy = StepSpy()
    vae = _vae(loud={3})
    _fit(vae, images, callbacks=[skip, ema, spy])
    params = dict(vae.named_parameters())
    expected = _clone(spy.weights[0])
    for step, weights in enumerate(spy.weights[1:], start=1):
        if step == 3:
            assert spy.unchanged[step - 1]
            continue
        for name, value in weights.items():
            expected[name] = 0.5 * expected[name] + 0.5 * value if name in params else value.clone()
    assert ema.updates == 7 and skip.total == 1
    for name, value in expected.items():
        torch.testing.assert_close(ema.weights[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert not _equal(ema.weights, vae.state_dict())  # an average, not the last weights
    assert _equal(ema.weights["prior.loc"], vae.state_dict()["prior.loc"])  # buffers are copied


class RngBeforeEvaluation(Callback):
    """Keeps the RNG state at each epoch's end, just before the next part (an Evaluation) draws."""

    def __init__(self):
        self.states = []

    def on_epoch_end(self, loop):
        self.states.append(rng_state())


def test_evaluation_reads_the_average_and_the_trained_weights_are_restored(images):
    ema, rng, spy = WeightAverage(0.5), RngBeforeEvaluation(), StepSpy()
    x_val = images[:16]
    vae = _vae()
    history = _fit(vae, images, epochs=1, callbacks=[ema, spy, rng, Evaluation(x_val, "val")])
    trained = _clone(vae.state_dict())
    assert _equal(trained, spy.weights[-1])  # after the evaluation, the trained weights are back, bitwise

    def val_elbo(weights):
        set_rng_state(rng.states[0])
        vae.load_state_dict(weights)
        vae.eval()
        return float(elbo_terms(vae, x_val, num_samples=1)["elbo"].mean())

    assert history[0]["val_elbo"] == val_elbo(ema.weights)
    assert history[0]["val_elbo"] != val_elbo(trained)


# ------------------------------------------------------------------ resume
def _parts():
    return [GradientSkip(5000), WeightAverage(0.9)]


def test_resume_with_both_parts_is_bitwise(images):
    """Loud (skipped) steps 3 and 6: 2 epochs straight, and 1 + 1 after a resume from the end of epoch 1
    and from the middle of epoch 2 (after step 6), give the same weights, Adam state, average and counts."""
    straight_parts, saved = _parts(), []
    straight = _vae(loud={3, 6})
    expected = _fit(straight, images, callbacks=straight_parts, checkpoint=lambda s: saved.append(copy.deepcopy(s)),
                    checkpoint_every=2)
    assert [(s["epoch"], s["step"]) for s in saved] == [(0, 2), (1, 4), (1, 6), (2, 8)]
    assert [r["skipped_updates"] for r in expected] == [1, 1]
    assert saved[2]["callbacks"]["GradientSkip"] == {"in_epoch": 1, "total": 2}
    first = []
    _fit(_vae(loud={3, 6}), images, epochs=1, callbacks=_parts(), checkpoint=first.append)
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    for state in (copy.deepcopy(first[-1]), saved[2]):
        parts, final = _parts(), []
        resumed = _vae(loud={3, 6})
        history = _fit(resumed, images, callbacks=parts, state=state, checkpoint=final.append)
        assert _equal(resumed.state_dict(), straight.state_dict())
        assert _equal(final[-1]["optim"], saved[-1]["optim"])
        assert _equal(parts[1].state_dict(), straight_parts[1].state_dict())
        assert parts[0].state_dict() == straight_parts[0].state_dict() == {"in_epoch": 0, "total": 2}
        assert drop(history) == drop(expected)


# ------------------------------------------------------------------ the command line
def _train_cli(out, idx, *extra):
    return cli.main(["train", "--out", str(out), "--data-dir", str(idx), "--hidden", "16", "--latent-dims", "4",
                     "--batch-size", "64", "--no-progress", *extra])


def test_a_run_with_ema_resumes_bitwise_from_the_command_line(idx_dir, tmp_path):
    aids = ["--ema", "0.9", "--skip-grad-norm", "1e6"]
    assert _train_cli(tmp_path / "a", idx_dir, "--epochs", "2", *aids) == 0
    assert _train_cli(tmp_path / "b", idx_dir, "--epochs", "1", *aids) == 0
    assert _train_cli(tmp_path / "b", idx_dir, "--epochs", "2", "--resume") == 0
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in "ab")
    assert a["config"]["ema"] == b["config"]["ema"] == 0.9
    for key in ("model", "optim", "callbacks"):
        assert _equal(a[key], b[key]), key
    assert set(a["callbacks"]) >= {"GradientSkip", "WeightAverage"}
    assert not _equal(a["model"], a["callbacks"]["WeightAverage"]["weights"])
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [0, 0]


def test_evaluate_uses_the_weight_average(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_cli(out, idx_dir, "--epochs", "2", "--ema", "0.9") == 0
    assert cli.main(["evaluate", str(out), "--iw-samples", "3", "--elbo-samples", "2", "--limit", "32",
                     "--no-progress"]) == 0
    reported = json.loads((out / "eval.json").read_text())
    payload = load_checkpoint(out / "checkpoint.pt")
    config = RunConfig.from_checkpoint(payload, out)

    def by_hand(weights):
        vae = build_vae(config, tuple(payload["x_shape"]))
        vae.load_state_dict(weights)
        _, x_test = load_data(config, vae.device)
        pyro.set_rng_seed(0)
        with pyro.validation_enabled(False):
            return evaluate(vae, x_test[:32], iw_samples=3, elbo_samples=2, progress=False, seed=0)

    averaged, trained = by_hand(payload["callbacks"]["WeightAverage"]["weights"]), by_hand(payload["model"])
    for key in ("elbo", "iw_log_likelihood"):
        assert reported[key] == averaged[key], key
        assert reported[key] != trained[key], key
    assert _equal(load_run(out)[0].state_dict(), payload["callbacks"]["WeightAverage"]["weights"])
    assert _equal(load_run(out, averaged=False)[0].state_dict(), payload["model"])


def test_python_users_get_the_same_rules():
    from pyro_vae import InputError

    with pytest.raises(InputError, match=r"ema .* must be a number in \[0, 1\).*callbacks\.WeightAverage\(0\.999\)"):
        WeightAverage(1.5)
    with pytest.raises(InputError, match=r"skip_grad_norm .* must be a number >= 0.*callbacks\.GradientSkip\(40000\)"):
        GradientSkip(-2)
    with pytest.raises(InputError, match=r"ema .*got '0\.9'; use e\.g\. --ema 0\.999"):
        RunConfig(ema="0.9").validate()


def test_the_readme_snippet_runs(images):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "WeightAverage(0.99)" in block)
    scope = {"x_train": images.repeat(2, 1, 1, 1), "x_test": images[:16]}  # fit batches 256 by default
    exec(compile(code, "README.md", "exec"), scope)
    ema, vae = scope["ema"], scope["vae"]
    skipped = sum(r["skipped_updates"] for r in scope["history"])  # one step an epoch
    assert scope["samples"].shape == (16, 1, 28, 28) and ema.updates + skipped == 3
    assert _equal(vae.state_dict(), ema.weights)
