"""fit and train: loss goes down, the run directory, checkpoints, resume."""

import json
import pickle

import pytest
import torch

from pyro_vae import VAE, InputError, RunConfig, fit, nets
from pyro_vae.train import TrainingDiverged, load_checkpoint, load_run, train


def small_config(idx_dir, **kw):
    return RunConfig(**{"data_dir": str(idx_dir), "hidden": 64, "latent_dim": 4, "batch_size": 64, **kw})


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
    assert json.loads((out / "config.json").read_text())["latent_dim"] == 4
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2] and lines == history
    assert {"train_loss", "test_elbo", "seconds"} <= set(lines[0])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 8 and ckpt["config"]["latent_dim"] == 4
    assert {"model", "optim", "rng", "history"} <= set(ckpt)
    assert not list(out.glob("*.tmp"))
    loaded, config = load_run(out)
    for (name, a), b in zip(vae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_exactly(idx_dir, tmp_path):
    straight, _ = train(small_config(idx_dir, epochs=2), tmp_path / "a", progress=False)
    train(small_config(idx_dir, epochs=1), tmp_path / "b", progress=False)
    resumed, history = train(small_config(idx_dir, epochs=2), tmp_path / "b", resume=True, progress=False)
    assert [r["epoch"] for r in history] == [1, 2]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in history]


def test_occupied_directory_and_bad_resume_are_refused(idx_dir, tmp_path):
    out = tmp_path / "run"
    train(small_config(idx_dir, epochs=1), out, progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(InputError, match="--resume"):
        train(small_config(idx_dir, epochs=1), out, progress=False)
    with pytest.raises(InputError, match="latent_dim"):
        train(small_config(idx_dir, epochs=2, latent_dim=8), out, resume=True, progress=False)
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


def test_divergence_stops_with_a_message_and_keeps_the_checkpoint(images):
    vae = VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=16), [4])
    with torch.no_grad():
        vae.decoder.net[-1].bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1"):
        fit(vae, images, epochs=1, batch_size=32, progress=False)


@pytest.mark.parametrize("bad, match", [
    (dict(arch="resnet"), "unknown arch"),
    (dict(likelihood="poisson"), "unknown likelihood"),
    (dict(dataset="cifar"), "unknown dataset"),
    (dict(elbo="renyi"), "unknown elbo"),
    (dict(binarize="sometimes"), "unknown binarize"),
    (dict(epochs=0), "epochs"),
    (dict(latent_dim=0), "latent_dim"),
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
