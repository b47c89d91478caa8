"""fit and train: loss goes down, the run directory, checkpoints, resume."""

import json
import pickle

import pytest
import torch

from pyro_vae import VAE, InputError, RunConfig, fit, nets
from pyro_vae.train import TrainingDiverged, load_checkpoint, load_run, train


def small_config(idx_dir, **kw):
    return RunConfig(**{"data_dir": str(idx_dir), "hidden": 64, "latent_dims": [4], "batch_size": 64, **kw})


def test_fit_lowers_the_loss_and_reports_per_image(images):
    vae = VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=64), [4])
    history = fit(vae, images, images[:32], epochs=4, batch_size=32, lr=3e-3, progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_elbo"] > history[0]["test_elbo"]
    # per image: the loss of a 784-pixel Bernoulli image is hundreds of nats, not tens of thousands
    assert 50 < history[-1]["train_loss"] < 800
    assert all(r["seconds"] > 0 for r in history)


def test_train_writes_the_run_directory(idx_dir, tmp_path):
    out = tmp_path / "run"
    vae, history = train(small_config(idx_dir, epochs=2), out, progress=False)
    assert json.loads((out / "config.json").read_text())["latent_dims"] == [4]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2] and lines == history
    assert {"train_loss", "test_elbo", "seconds"} <= set(lines[0])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 8 and ckpt["config"]["latent_dims"] == [4]
    assert {"model", "optim", "rng", "history"} <= set(ckpt)
    assert not list(out.glob("*.tmp"))
    loaded, config = load_run(out)
    for (name, a), b in zip(vae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_exactly(idx_dir, tmp_path):
    """4 epochs in one go and 2 + 2 after a resume give bitwise equal parameters and losses."""
    straight, _ = train(small_config(idx_dir, epochs=4), tmp_path / "a", progress=False)
    train(small_config(idx_dir, epochs=2), tmp_path / "b", progress=False)
    resumed, history = train(small_config(idx_dir, epochs=4), tmp_path / "b", resume=True, progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in history]
    assert [r["test_elbo"] for r in a] == [r["test_elbo"] for r in history]


def _without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_of_a_top_down_chain_mid_warmup_continues_exactly(idx_dir, tmp_path):
    """A two-level top-down chain whose KL warm-up (12 steps) spans the resume (8 steps an epoch):
    2 epochs in one go and 1 + 1 after a resume give bitwise equal parameters and history."""
    chain = dict(latent_dims=[3, 4], guide="top-down", kl_warmup=12, hidden=16)
    straight, expected = train(small_config(idx_dir, epochs=2, **chain), tmp_path / "a", progress=False,
                               pictures=False)
    train(small_config(idx_dir, epochs=1, **chain), tmp_path / "b", progress=False, pictures=False)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 8
    resumed, history = train(small_config(idx_dir, epochs=2, **chain), tmp_path / "b", resume=True,
                             progress=False, pictures=False)
    assert [r["kl_weight"] for r in expected] == [8 / 12, 1.0]
    assert list(straight.state_dict()) == list(resumed.state_dict())
    assert any(name.startswith("transitions.") for name in straight.state_dict())
    assert any(name.startswith("ladder.") for name in straight.state_dict())
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert {"test_kl_z0", "test_kl_z1", "kl_weight"} <= set(history[-1])
    assert _without_seconds(history) == _without_seconds(expected)
    a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert _without_seconds(a) == _without_seconds(b) == _without_seconds(expected)
    assert resumed.kl_weight == 1.0  # fit leaves the VAE at the full KL


def _legacy(config):
    """A config dict as runs before multilevel chains wrote it: ``latent_dim``, no guide, warm-up or free bits."""
    old = dict(config)
    (old["latent_dim"],) = old.pop("latent_dims")
    for key in ("guide", "kl_warmup", "free_bits"):
        del old[key]
    return old


def test_a_legacy_latent_dim_config_is_one_level():
    old = _legacy(RunConfig(latent_dims=[7]).to_dict())
    assert old["latent_dim"] == 7 and "latent_dims" not in old
    kept = dict(old)
    config = RunConfig.from_dict(old)
    assert old == kept, "from_dict changed its argument"
    assert config.latent_dims == [7] and config.validate().latent_dims == [7]
    assert (config.guide, config.kl_warmup, config.free_bits) == ("bottom-up", 0, 0.0)
    with pytest.raises(InputError, match="unknown configuration keys: latent_dimz"):
        RunConfig.from_dict({**old, "latent_dimz": 3})


def test_a_run_written_before_chains_still_loads_and_resumes(idx_dir, tmp_path):
    out = tmp_path / "old"
    vae, _ = train(small_config(idx_dir, epochs=1, hidden=16), out, progress=False, pictures=False)
    # rewrite the run as the one-level code wrote it: latent_dim in checkpoint.pt and config.json,
    # epoch records without the chain's metrics
    path = out / "checkpoint.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["config"] = _legacy(payload["config"])
    payload["history"] = [{k: v for k, v in r.items() if k in ("epoch", "train_loss", "test_elbo", "seconds")}
                          for r in payload["history"]]
    torch.save(payload, path)
    (out / "config.json").write_text(json.dumps(payload["config"], indent=2) + "\n")
    assert "latent_dims" not in load_checkpoint(path)["config"]

    loaded, config = load_run(out)
    assert config.latent_dims == [4] and loaded.latent_dims == [4] and loaded.levels == 0
    assert list(loaded.state_dict()) == list(vae.state_dict())
    for (name, a), b in zip(vae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # and it resumes with today's settings (latent_dims=[4] is the run's latent_dim=4)
    _, history = train(small_config(idx_dir, epochs=2, hidden=16), out, resume=True, progress=False, pictures=False)
    assert [r["epoch"] for r in history] == [1, 2]
    assert load_checkpoint(path)["config"]["latent_dims"] == [4]


def test_sigint_mid_epoch_saves_a_checkpoint_that_resumes_exactly(idx_dir, tmp_path, monkeypatch):
    import os
    import signal

    import pyro_vae.train as train_module
    from pyro_vae.train import TrainingInterrupted

    straight, _ = train(small_config(idx_dir, epochs=2), tmp_path / "a", progress=False)
    saves = []
    real_save = train_module.save_checkpoint

    def save_then_interrupt(path, payload):
        real_save(path, payload)
        saves.append(payload["step"])
        if len(saves) == 2:  # Ctrl-C while the run goes on
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    with pytest.raises(TrainingInterrupted, match="SIGINT at epoch 1, step 7") as info:
        train(small_config(idx_dir, epochs=2, checkpoint_every=3), tmp_path / "b", progress=False)
    assert saves == [3, 6, 7] and info.value.signal == signal.SIGINT
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["batch"] == 7
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed, history = train(small_config(idx_dir, epochs=2), tmp_path / "b", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in history]


def test_keep_best_keeps_the_best_epoch(idx_dir, tmp_path):
    out = tmp_path / "run"
    _, history = train(small_config(idx_dir, epochs=3, keep_best=True), out, progress=False)
    best = load_checkpoint(out / "best.pt")
    elbos = [r["test_elbo"] for r in history]
    assert best["epoch"] == 1 + elbos.index(max(elbos))


def test_occupied_directory_and_bad_resume_are_refused(idx_dir, tmp_path):
    out = tmp_path / "run"
    train(small_config(idx_dir, epochs=1), out, progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(InputError, match="--resume"):
        train(small_config(idx_dir, epochs=1), out, progress=False)
    with pytest.raises(InputError, match=r"latent_dims: run has \[4\], asked \[8\]"):
        train(small_config(idx_dir, epochs=2, latent_dims=[8]), out, resume=True, progress=False)
    with pytest.raises(InputError, match="no checkpoint"):
        train(small_config(idx_dir, epochs=1), tmp_path / "empty", resume=True, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before
    train(small_config(idx_dir, epochs=1, seed=3), out, overwrite=True, progress=False)
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 3


def test_corrupt_and_malicious_checkpoints_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="garbage.pt"):
        load_checkpoint(garbage)

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "pyro_vae.checkpoint/1", "x": Exploit()}, f)
    with pytest.raises(InputError, match="evil.pt"):
        load_checkpoint(evil)
    torch.save({"format": "pyro_vae.checkpoint/1", "x": Exploit()}, tmp_path / "evil2.pt")
    marker.unlink(missing_ok=True)  # torch.save itself ran nothing; make sure loading does not either
    with pytest.raises(InputError, match="evil2.pt"):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()

    not_ours = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, not_ours)
    with pytest.raises(InputError, match="not a pyro_vae checkpoint"):
        load_checkpoint(not_ours)


class NaNOnCalls(torch.nn.Module):
    """Wraps a decoder; its output is NaN on the listed (1-based) calls."""

    def __init__(self, decoder, calls):
        super().__init__()
        self.decoder, self.calls, self.n = decoder, calls, 0

    def forward(self, z):
        self.n += 1
        out = self.decoder(z)
        return out * float("nan") if self.calls == "all" or self.n in self.calls else out


def test_a_non_finite_step_is_skipped_and_training_goes_on(images, capsys):
    enc, dec = nets.build("mlp", (1, 28, 28), 4, hidden=16)
    vae = VAE(enc, NaNOnCalls(dec, {2}), [4], x_shape=(1, 28, 28))
    history = fit(vae, images, epochs=1, batch_size=32, progress=False)
    assert "step 2: loss nan" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))


def test_consecutive_bad_steps_stop_training_without_an_update(images):
    enc, dec = nets.build("mlp", (1, 28, 28), 4, hidden=16)
    vae = VAE(enc, NaNOnCalls(dec, "all"), [4], x_shape=(1, 28, 28))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="3 steps in a row.*epoch 1, step 3"):
        fit(vae, images, epochs=2, batch_size=16, max_bad_steps=3, progress=False)
    for name, value in vae.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_gradient_clipping_bounds_the_update(images):
    enc, dec = nets.build("mlp", (1, 28, 28), 4, hidden=16)
    vae = VAE(enc, dec, [4])
    history = fit(vae, images, epochs=1, batch_size=32, grad_clip=1.0, progress=False)
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))


@pytest.mark.parametrize("bad, match", [
    (dict(arch="resnet"), "unknown arch"),
    (dict(likelihood="gamma"), "unknown likelihood"),
    (dict(dataset="cifar"), "unknown dataset"),
    (dict(elbo="renyi"), "unknown elbo"),
    (dict(binarize="sometimes"), "unknown binarize"),
    (dict(epochs=0), "epochs"),
    (dict(latent_dims=[0]), "latent_dim"),
    (dict(lr=-1.0), "lr"),
    (dict(batch_size=100000), "larger than the data"),
])
def test_bad_settings_are_refused_before_any_file_is_written(bad, match, idx_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match=match):
        train(small_config(idx_dir, **bad), out, progress=False)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU exists here")
def test_cuda_without_gpu_is_refused(idx_dir, tmp_path):
    with pytest.raises(InputError, match="no CUDA GPU"):
        train(small_config(idx_dir, device="cuda"), tmp_path / "run", progress=False)
