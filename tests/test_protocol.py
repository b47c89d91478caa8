"""The density-estimation protocol: validation split, early stopping, best epoch, warm-up in epochs, presets."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pyro_vae import InputError, RunConfig, cli, nets
from pyro_vae.config import PRESETS
from pyro_vae.train import load_checkpoint, load_splits, train

from test_train import small_config


def test_the_validation_split_is_the_last_training_points_disjoint_and_seeded(idx_dir):
    from pyro_vae import data

    raw_train, _, raw_test, _ = data.load_images("fashion-mnist", str(idx_dir))
    config = small_config(idx_dir, val_size=100, binarize="none")
    x_train, x_val, x_test = load_splits(config, "cpu")
    assert (x_train.shape[0], x_val.shape[0], x_test.shape[0]) == (412, 100, 128)
    assert torch.equal(x_train, raw_train[:412]) and torch.equal(x_val, raw_train[412:])
    assert torch.equal(x_test, raw_test)
    # binarised: the held-out sets are drawn once, the same for the same seed, other bits for another seed
    a = load_splits(small_config(idx_dir, val_size=100), "cpu")
    b = load_splits(small_config(idx_dir, val_size=100), "cpu")
    c = load_splits(small_config(idx_dir, val_size=100, seed=5), "cpu")
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and not torch.equal(a[1], c[1])
    assert set(a[1].unique().tolist()) <= {0.0, 1.0}
    # and the test set's bits do not depend on whether there is a validation split
    assert torch.equal(load_splits(small_config(idx_dir), "cpu")[2], a[2])


def test_a_validation_split_too_large_is_refused(idx_dir, tmp_path):
    with pytest.raises(InputError, match=r"val_size 512 leaves nothing to train on \(512 training points\)"):
        train(small_config(idx_dir, val_size=512), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="no validation split; use --val-size 10000 with --patience 3"):
        RunConfig(patience=3).validate()
    with pytest.raises(InputError, match="in steps or in epochs, not both"):
        RunConfig(kl_warmup=10, kl_warmup_epochs=2).validate()


def _overfitting_run(idx_dir, out, **kw):
    """64 training images, a wide net and a high learning rate: the validation ELBO peaks early."""
    return train(small_config(idx_dir, val_size=448, batch_size=16, hidden=256, lr=3e-3, epochs=60, patience=3,
                              keep_best=True, **kw), out, progress=False, pictures=False)


def test_early_stopping_stops_patience_epochs_after_the_best_and_evaluate_reads_the_best(idx_dir, tmp_path,
                                                                                       capsys):
    out = tmp_path / "run"
    _, history = _overfitting_run(idx_dir, out)
    vals = [r["val_elbo"] for r in history]
    best = 1 + vals.index(max(vals))
    assert len(history) < 60, "the run never stopped"
    assert len(history) == best + 3  # exactly `patience` epochs without a better validation ELBO
    assert all("test_elbo" not in r for r in history)  # the test set waits for evaluate
    assert history[-1]["best_epoch"] == best
    assert load_checkpoint(out / "best.pt")["epoch"] == best
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == len(history)
    assert cli.main(["evaluate", str(out), "--iw-samples", "10", "--elbo-samples", "2", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["checkpoint"], summary["epoch"]) == ("best.pt", best)
    assert cli.main(["evaluate", str(out), "--iw-samples", "0", "--checkpoint", "last", "--no-progress"]) == 0
    assert json.loads((out / "eval.json").read_text())["epoch"] == len(history)
    # a stopped run stays stopped when resumed with more epochs
    _, again = train(small_config(idx_dir, val_size=448, batch_size=16, hidden=256, lr=3e-3, epochs=80, patience=3,
                                  keep_best=True), out, resume=True, progress=False, pictures=False)
    assert len(again) == len(history)


def test_kl_warmup_in_epochs_counts_the_epochs_batches(idx_dir, tmp_path):
    _, history = train(small_config(idx_dir, epochs=3, kl_warmup_epochs=2), tmp_path / "run", progress=False,
                       pictures=False)
    assert [r["kl_weight"] for r in history] == [0.5, 1.0, 1.0]  # 8 batches an epoch, 16 steps of warm-up


def test_the_preset_is_the_published_protocol_and_flags_override_it(idx_dir, tmp_path, monkeypatch):
    config = RunConfig.from_preset("vampprior-vae", data_dir="x")
    assert (config.arch, config.hidden, config.latent_dims, config.lr, config.batch_size) == \
        ("gated", 300, [40], 5e-4, 100)
    assert (config.val_size, config.patience, config.epochs, config.kl_warmup_epochs) == (10000, 50, 2000, 100)
    with pytest.raises(InputError, match="unknown preset 'vamp'; choose one of: vampprior-vae"):
        RunConfig.from_preset("vamp")
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "vampprior-vae", "--data-dir", str(idx_dir), "--out", str(out),
                     "--val-size", "112", "--epochs", "1", "--hidden", "32", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in PRESETS["vampprior-vae"]} == {**PRESETS["vampprior-vae"], "val_size": 112,
                                                              "epochs": 1, "hidden": 32}
    assert isinstance(load_checkpoint(out / "checkpoint.pt")["model"], dict)


def test_the_gated_networks_have_the_papers_layers():
    enc, dec = nets.build("gated", (1, 28, 28), 40, hidden=300)
    assert [type(m).__name__ for m in enc.net] == ["GatedDense", "GatedDense"] and enc.out_features == 300
    assert dec(torch.zeros(2, 3, 40)).shape == (2, 3, 1, 28, 28)
    x = torch.rand(5, 1, 28, 28)
    layer = enc.net[0]
    expected = layer.h(x.reshape(5, -1)) * torch.sigmoid(layer.g(x.reshape(5, -1)))
    assert torch.allclose(layer(x.reshape(5, -1)), expected)


def test_the_gated_conv_networks_have_the_papers_layers():
    """The ConvHVAE's networks, layer by layer as the VampPrior paper's code (``models/convHVAE_2level.py``), but
    for the decoder's first gated layer, which reads both levels at once (300 wide; the paper: 300 per level)."""
    enc, dec = nets.build("gated-conv", (1, 28, 28), 80, hidden=300)
    convs = [m for m in enc.net if isinstance(m, nets.GatedConv2d)]
    assert [(m.h.in_channels, m.h.out_channels, *m.h.kernel_size[:1], *m.h.stride[:1], *m.h.padding[:1])
            for m in convs] == [(1, 32, 7, 1, 3), (32, 32, 3, 2, 1), (32, 64, 5, 1, 2), (64, 64, 3, 2, 1),
                                (64, 6, 3, 1, 1)]
    assert enc.out_features == 294  # 6 channels of 7 x 7, the paper's h_size
    assert [(m.in_features, m.out_features) for m in dec.dense] == [(80, 300), (300, 784)]
    assert [type(m).__name__ for m in dec.net] == ["GatedConv2d"] * 4 + ["Conv2d"]
    assert all(m.h.out_channels == 64 and m.h.kernel_size == (3, 3) and m.h.padding == (1, 1) for m in dec.net[:4])
    assert dec.net[-1].kernel_size == (1, 1) and dec.net[-1].out_channels == 1
    x = torch.rand(2, 3, 1, 28, 28)  # (particles, batch, C, H, W)
    assert enc(x).shape == (2, 3, 294) and dec(torch.zeros(2, 3, 80)).shape == (2, 3, 1, 28, 28)
    layer = enc.net[0]
    assert torch.allclose(layer(x[0]), layer.h(x[0]) * torch.sigmoid(layer.g(x[0])))
    odd, _ = nets.build("gated-conv", (3, 30, 17), 5)  # any size: 30 -> 15 -> 8, 17 -> 9 -> 5
    assert odd.out_features == 6 * 8 * 5 and odd(torch.rand(4, 3, 30, 17)).shape == (4, 240)


@pytest.mark.parametrize("build, message", [
    (lambda: nets.GatedConvEncoder((784,)), r"GatedConvEncoder needs images of shape \(C, H, W\), got \(784,\)"),
    (lambda: nets.GatedConvEncoder((1, 28, 28), channels=(8, 8)), "needs 4 channel counts, got \\(8, 8\\)"),
    (lambda: nets.GatedConvEncoder((1, 28, 28), channels=32), "needs 4 channel counts, got 32"),
    (lambda: nets.GatedConvDecoder(5, (784,)), r"GatedConvDecoder needs images of shape \(C, H, W\)"),
    (lambda: nets.GatedConvDecoder(5, (1, 28, 28), layers=0), "number of layers must be a positive integer, got 0"),
    (lambda: nets.GatedConvEncoder((1, 28, 28))(torch.rand(2, 1, 27, 28)), r"expects inputs of shape \(batch, 1, 28"),
])
def test_the_gated_conv_networks_refuse_what_they_cannot_read(build, message):
    with pytest.raises(InputError, match=message):
        build()


# ------------------------------------------------ the HVAE of the table: skip connections
def _skip_chain(dims, arch="mlp", **kw):
    from pyro_vae import VAE

    enc, dec = nets.build(arch, (1, 28, 28), sum(dims), hidden=32)
    return VAE(enc, dec, dims, guide="top-down", hidden=32, skip=True, **kw)


@pytest.mark.parametrize("dims", [[3, 4], [2, 3, 4]])
def test_skip_connections_read_every_level_above(dims, images):
    import pyro.poutine as poutine

    from pyro_vae import VAE

    vae = _skip_chain(dims)
    assert [t.in_features for t in vae.transitions] == [sum(dims[:i + 1]) for i in range(len(dims) - 1)]
    x = images[:7]
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    for level, d in enumerate(dims):
        assert guide_tr.nodes[f"z{level}"]["value"].shape == (7, d)
        assert model_tr.nodes[f"z{level}"]["fn"].event_shape == (d,)
    assert model_tr.nodes["x"]["fn"].event_shape == (1, 28, 28)
    # the model's p(x | ...) reads every level: moving the top level, the levels below held, moves it (and without
    # skip connections it reads the bottom level only)
    zs = {f"z{level}": guide_tr.nodes[f"z{level}"]["value"] for level in range(len(dims))}

    def x_mean(model, **changed):
        trace = poutine.trace(poutine.condition(model, data={**zs, **changed})).get_trace(x)
        return trace.nodes["x"]["fn"].mean

    assert not torch.allclose(x_mean(vae.model), x_mean(vae.model, z0=zs["z0"] + 1.0))
    plain = VAE(*nets.build("mlp", (1, 28, 28), dims[-1], hidden=32), dims, guide="top-down", hidden=32)
    assert torch.equal(x_mean(plain.model), x_mean(plain.model, z0=zs["z0"] + 1.0))
    bottom = f"z{len(dims) - 1}"
    assert not torch.equal(x_mean(plain.model), x_mean(plain.model, **{bottom: zs[bottom] + 1.0}))
    assert vae.sample(3).shape == (3, 1, 28, 28) and vae.reconstruct(x).shape == x.shape
    assert vae.resample_below(x[:2], 1, 3).shape == (2, 3, 1, 28, 28)


@pytest.mark.parametrize("elbo", ["trace", "meanfield", "vectorized"])
def test_svi_lowers_the_loss_with_skip_connections(elbo, images):
    from conftest import check_svi_lowers_the_loss

    check_svi_lowers_the_loss(_skip_chain([3, 4]), elbo, images[:64])


def test_skip_connections_with_the_vampprior_and_conv_networks(images):
    from conftest import check_svi_lowers_the_loss
    from pyro_vae import priors

    check_svi_lowers_the_loss(_skip_chain([3, 4], arch="conv", prior=priors.VampPrior(5)), "trace", images[:64])


def test_skip_connections_with_the_vampprior_and_the_gated_conv_networks(images):
    """The ConvHVAE preset's model at a small width: the paper's layers with fewer channels."""
    from conftest import check_svi_lowers_the_loss
    from pyro_vae import VAE, priors

    enc = nets.GatedConvEncoder((1, 28, 28), channels=(4, 4, 8, 8))
    dec = nets.GatedConvDecoder(7, (1, 28, 28), hidden=32, channels=8, layers=2)
    vae = VAE(enc, dec, [3, 4], guide="top-down", hidden=32, skip=True, prior=priors.VampPrior(5))
    check_svi_lowers_the_loss(vae, "trace", images[:64])


def test_a_trained_skip_guide_approaches_the_exact_log_px():
    """The linear-Gaussian chain with skip connections (x and z1 read z0 too): its log p(x) is known in
    closed form, and the trained skip guide's IW estimate reaches it (it trains slower than the ladder's
    merge: 300 epochs; at 60 its IW estimate is still 0.4 nats short)."""
    from linear_gaussian import check_trained_guide_approaches_the_exact_log_px

    check_trained_guide_approaches_the_exact_log_px([2, 3], "top-down", skip=True, epochs=300)


def test_skip_needs_the_top_down_guide():
    with pytest.raises(InputError, match="top-down guide's order; use guide='top-down' with skip=True"):
        _skip_chain([3, 4]).__class__(*nets.build("mlp", (1, 28, 28), 7), [3, 4], skip=True)
    with pytest.raises(InputError, match="add --guide top-down"):
        RunConfig(latent_dims=[3, 4], skip=True).validate()


@pytest.mark.parametrize("preset, arch, size", [("vampprior-hvae", "gated", 0),
                                                ("vampprior-hvae", "gated-hvae", 0),
                                                ("vampprior-convhvae", "gated-conv", 8)])
def test_the_hvae_presets_resume_bitwise(preset, arch, size, idx_dir, tmp_path):
    kw = dict(data_dir=str(idx_dir), val_size=64, hidden=16, latent_dims=[3, 4], batch_size=64, arch=arch,
              kl_warmup_epochs=1, patience=3, image_size=size, prior="vamp:5",  # 8 x 8 images: the conv nets are slow
              optimizer="adam-normgrad" if arch == "gated-hvae" else "adam")  # the paper's HVAE: its optimizer
    straight, _ = train(RunConfig.from_preset(preset, epochs=2, **kw), tmp_path / "a", progress=False, pictures=False)
    train(RunConfig.from_preset(preset, epochs=1, **kw), tmp_path / "b", progress=False, pictures=False)
    resumed, _ = train(RunConfig.from_preset(preset, epochs=2, **kw), tmp_path / "b", resume=True,
                       progress=False, pictures=False)
    assert straight.skip and straight.guide_order == "top-down"
    assert type(straight.encoder).__name__ == {"gated": "GatedMLPEncoder", "gated-conv": "GatedConvEncoder",
                                               "gated-hvae": "TopEncoder"}[arch]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_density_benchmark_extrapolates_an_unfinished_curve_to_where_early_stopping_ends_it():
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from density import extrapolate

    t = np.arange(1, 401)
    curve = -230.0 - 60.0 * t ** -0.5 + np.random.default_rng(0).normal(0, 0.05, len(t))
    got = extrapolate(curve.tolist(), patience=50, max_epochs=2000, warmup=100)
    # the true curve's gain over 50 epochs falls below the noise (0.05) at epoch 941: stopped 50 epochs later
    assert 800 < got["extrapolated_stop_epoch"] - 50 < 1100
    assert got["extrapolated_val_elbo"] == pytest.approx(-230.0 - 60.0 * (got["extrapolated_stop_epoch"] - 50) ** -0.5,
                                                         abs=0.1)
    assert got["fit_noise"] == pytest.approx(0.05, abs=0.01)
    assert extrapolate(curve[:120].tolist(), warmup=100) == {}  # too short after the warm-up to fit
    endless = extrapolate(curve.tolist(), patience=0, max_epochs=2000, warmup=100)  # no early stopping
    assert endless["extrapolated_stop_epoch"] == 2000
    assert endless["extrapolated_val_elbo"] == pytest.approx(-230.0 - 60.0 * 2000 ** -0.5, abs=0.3)  # 5x the data
    assert extrapolate((-230.0 + 0.0 * t).tolist()) == {}  # a flat curve goes nowhere
    t = np.arange(1, 1001)  # the fitted gain over 50 epochs is below the noise by epoch 1000 already:
    levelled = (-230.0 - 60.0 * t ** -0.5 + np.random.default_rng(0).normal(0, 0.05, len(t))).tolist()
    best = max(range(1000), key=levelled.__getitem__) + 1  # so the run stops 50 epochs after its best so far
    got = extrapolate(levelled, patience=50, warmup=100)
    assert best < 990 and got["extrapolated_stop_epoch"] == best + 50
    assert got["extrapolated_val_elbo"] == round(levelled[best - 1], 2)  # the best epoch's, which early stopping keeps


def test_the_density_benchmark_reruns_a_collected_rows_first_epochs_and_finds_a_changed_record(
        idx_dir, tmp_path, monkeypatch, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import density

    monkeypatch.setattr(density, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(density, "_plot", lambda files: None)  # leave the README's picture alone
    run = tmp_path / "tiny-row"
    train(small_config(idx_dir, val_size=100, epochs=3, kl_warmup_epochs=2), run, progress=False, pictures=False)
    row, = density.collect([run], "test machine", note="how it ran")
    assert row["name"] == "tiny-row" and row["epochs"] == 3 and row["test_nll"] is None
    assert (tmp_path / "results" / "density" / "tiny-row.config.json").exists()
    assert cli.main(["evaluate", str(run), "--iw-samples", "2", "--limit", "16", "--no-progress"]) == 0
    row, = density.collect([run])  # collected again: its machine and note stay, its evaluation is kept beside it
    assert (row["machine"], row["note"], row["test_images"]) == ("test machine", "how it ran", 16)
    evaluation = json.loads((tmp_path / "results" / "density" / "tiny-row.eval.json").read_text())
    assert row["test_nll"] == -evaluation["iw_log_likelihood"] and evaluation["limit"] == 16
    (run / "eval.json").unlink()
    row, = density.collect([run], note="")  # no evaluation now, and no note
    assert row["test_nll"] is None and "note" not in row
    assert not (tmp_path / "results" / "density" / "tiny-row.eval.json").exists()

    # a run resumed on another device keeps the stored configuration its record started with; another change replaces it
    kept = tmp_path / "results" / "density" / "tiny-row.config.json"
    run_config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**run_config, "device": "cuda"}))
    density.collect([run], "test machine")
    assert json.loads(kept.read_text())["device"] == "cpu"
    (run / "config.json").write_text(json.dumps({**run_config, "device": "cuda", "lr": 0.5}))
    density.collect([run], "test machine")
    assert json.loads(kept.read_text())["lr"] == 0.5
    (run / "config.json").write_text(json.dumps(run_config))
    density.collect([run], "test machine")

    rows = density.check("tiny-row", epochs=2)
    assert [(e, k) for e, k, *_ in rows] == [(1, "train_loss"), (1, "val_elbo"), (2, "train_loss"), (2, "val_elbo")]
    assert all(recorded == rerun for *_, recorded, rerun in rows)  # bitwise: same machine, code and threads
    assert density.main(["check", "tiny-row", "--epochs", "2"]) == 0
    assert "identical to the record" in capsys.readouterr().out

    # a record that was not what the configuration trains is found out
    records_path = tmp_path / "results" / "density" / "tiny-row.metrics.jsonl"
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    records[1]["val_elbo"] += 0.5
    records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert density.main(["check", "tiny-row", "--epochs", "2"]) == 1
    assert "largest difference 5.00e-01 nats per image (over the tolerance 0.05)" in capsys.readouterr().out

    # a row trained on a GPU and rerun on the CPU draws other noise, and the check says so
    config_path = tmp_path / "results" / "density" / "tiny-row.config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "device": "cuda"}))
    density.main(["check", "tiny-row", "--epochs", "1"])
    assert "tiny-row trained on cuda, rerun on cpu: their random number generators differ" in capsys.readouterr().out

    with pytest.raises(InputError, match="is not a run directory of pyro-vae train: it has no config.json and no "
                                         "metrics.jsonl"):
        density.collect([tmp_path / "results"], "test machine")
    with pytest.raises(InputError, match="no collected row 'nope' with a stored configuration; rows: tiny-row"):
        density.check("nope")
    with pytest.raises(InputError, match="--epochs must be between 1 and the 3 epochs tiny-row recorded, got 4"):
        density.check("tiny-row", epochs=4)


def _density_benchmark():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import density

    return density


def _wait_for(path, what, seconds=180):
    import time

    for _ in range(seconds * 10):
        if path.exists() and path.stat().st_size:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {path.name} after {seconds} s: {what}")


def _wait_for_exit(pid, seconds=180):
    """Wait for this process's child ``pid`` (a shell that :func:`density.start` began) to end, reap it, and wait
    for the rest of its process group (a bash that did not exec its last command leaves it running on)."""
    import os
    import time

    for _ in range(seconds * 10):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
        except ChildProcessError:  # reaped already
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid} still runs after {seconds} s")
    for _ in range(seconds * 10):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process group {pid} still runs after {seconds} s")


def _stop_group(pid):
    import os
    import signal

    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def test_the_density_benchmark_starts_a_row_evaluates_it_when_it_stops_and_resumes_it(idx_dir, tmp_path,
                                                                                       monkeypatch):
    density = _density_benchmark()
    tiny = f"--preset vampprior-vae --data-dir {idx_dir} --epochs 2 --hidden 8 --latent-dims 2 --val-size 64 " \
           "--batch-size 64"
    monkeypatch.setattr(density, "ROWS", {"tiny": tiny, "slow": tiny.replace("--epochs 2", "--epochs 2000")})
    runs = tmp_path / "runs"
    with pytest.raises(InputError, match="no row 'vae'; rows: tiny, slow \\(or ROW-seedN"):
        density.start_command("vae", runs)
    seeded, what = density.start_command("tiny-seed12", runs, device="cpu")  # the row tiny, another seed
    assert what == "started from epoch 0" and f" {tiny} --seed 12 " in seeded and "tiny-seed12 " in seeded
    for wrong in ("tiny-seed0", "tiny-seed01", "tiny-seed", "vae-seed1", "tiny-seed1x"):  # seed 0 is tiny itself
        with pytest.raises(InputError, match=f"no row '{wrong}'"):
            density.start_command(wrong, runs)
    fresh, what = density.start_command("tiny", runs, threads=2, iw_samples=3, device="cpu")
    assert fresh.count(" --device cpu ") == 2 and "OMP_NUM_THREADS=2 nice" in fresh and "--seed 0" in fresh and "--resume" not in fresh
    assert what == "started from epoch 0" and not fresh.startswith("cd ")  # no copy of the code yet
    [(name, pid, what)] = density.start(["tiny", "tiny"], runs, iw_samples=3)  # in the background, once
    try:
        assert (name, what) == ("tiny", "started from epoch 0") and (runs / "tiny.pid").read_text() == f"{pid}\n"
        with pytest.raises(InputError, match=f"tiny is still running \\(process group {pid}\\); stop it first"):
            density.start(["tiny"], runs)
        _wait_for(runs / "tiny" / "eval.json", (runs / "tiny.log").read_text())
    finally:
        _stop_group(pid)
    evaluation = json.loads((runs / "tiny" / "eval.json").read_text())
    assert evaluation["iw_samples"] == 3 and evaluation["epoch"] in (1, 2)  # the best validation epoch
    with pytest.raises(InputError, match="tiny has finished \\(2 epochs\\) and its best epoch is evaluated at K=3"):
        density.start_command("tiny", runs, iw_samples=3)
    _wait_for_exit(pid)  # the first start's shell, stopped above
    with pytest.raises(InputError, match="no row 'nope'"):  # a mistake among the names starts nothing
        density.start(["tiny", "nope"], runs, iw_samples=3)
    [(name, pid, what)] = density.start(["tiny"], runs, iw_samples=3)  # nothing left to run: passed over
    assert pid is None and what.startswith("tiny has finished (2 epochs)") and "density.py collect" in what
    command, what = density.start_command("tiny", runs, iw_samples=5)
    assert what == "evaluated only" and " train " not in command and " evaluate " in command
    evaluated = json.loads((runs / "tiny" / "eval.json").read_text())
    (runs / "tiny" / "eval.json").write_text(json.dumps({**evaluated, "limit": 10}))  # as evaluate --limit 10 writes
    assert density.start_command("tiny", runs, iw_samples=3)[1] == "evaluated only"  # not the whole test set
    (runs / "tiny" / "eval.json").write_text(json.dumps(evaluated))
    code = runs / "tiny.code"  # the code the row started with, which its evaluation and resumes run
    assert (code / "pyro_vae" / "cli.py").exists() and (code / "SOURCE").read_text().startswith("pyro_vae from ")
    assert command.startswith(f"cd {code.resolve()} && ")
    with open(code / "pyro_vae" / "__init__.py", "a") as init:
        init.write('\nprint("pyro_vae from the row\'s own copy")\n')
    monkeypatch.setenv("PYTHONSAFEPATH", "1")  # python -m then leaves the working directory off sys.path
    [(_, pid, what)] = density.start(["tiny"], runs, iw_samples=5)
    _wait_for_exit(pid)
    monkeypatch.delenv("PYTHONSAFEPATH")
    assert what == "evaluated only" and json.loads((runs / "tiny" / "eval.json").read_text())["iw_samples"] == 5
    assert "pyro_vae from the row's own copy" in (runs / "tiny.log").read_text()
    (runs / "tiny" / "metrics.jsonl").write_text((runs / "tiny" / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    again, what = density.start_command("tiny", runs, device="cuda")  # (as if stopped after its first epoch)
    assert what == "resumed" and "--resume --device cuda " in again and again.count("--device cuda") == 2
    assert "--device" not in density.start_command("tiny", runs)[0]  # by default it goes on where it ran
    config = json.loads((runs / "tiny" / "config.json").read_text())
    (runs / "tiny" / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="tiny ran on cuda, and PyTorch sees no GPU here; pass --device cpu"):
        density.start_command("tiny", runs)
    assert "--resume --device cpu " in density.start_command("tiny", runs, device="cpu")[0]
    (runs / "tiny" / "config.json").write_text(json.dumps(config))
    assert "--resume" in again and "--data-dir" not in again  # it keeps its own settings
    assert again.startswith(f"cd {code.resolve()} && ")
    shutil.rmtree(code)  # a run started before rows kept their code
    again, what = density.start_command("tiny", runs)
    assert what == "resumed with today's code (it has no tiny.code)" and again.startswith("OMP_NUM_THREADS=")
    monkeypatch.setitem(density.ROWS, "tiny", tiny + " --prior vamp:3")  # the row changed since its run started
    with pytest.raises(InputError, match="has prior='standard', but the row tiny now has 'vamp:3'; move that run"):
        density.start_command("tiny", runs)
    monkeypatch.setitem(density.ROWS, "tiny", tiny)
    shutil.copytree(runs / "tiny", runs / "tiny-seed3")  # a run of seed 0 where seed 3's should be
    with pytest.raises(InputError, match="has seed=0, but the row tiny-seed3 now has 3; move that run"):
        density.start_command("tiny-seed3", runs)


def test_the_density_benchmark_does_not_evaluate_a_training_stopped_by_a_signal(idx_dir, tmp_path, monkeypatch):
    """Only the training is stopped (SIGTERM to it, not to the shell): the shell goes on to the evaluation
    unless the command chains them with ``&&``."""
    import os
    import signal
    import subprocess

    density = _density_benchmark()
    monkeypatch.setattr(density, "ROWS", {"slow": f"--preset vampprior-vae --data-dir {idx_dir} --hidden 8 "
                                                  "--latent-dims 2 --val-size 64 --batch-size 64"})
    runs = tmp_path / "runs"
    shell = subprocess.Popen(["bash", "-c", density.start_command("slow", runs, iw_samples=3)[0]],
                             start_new_session=True)
    try:
        _wait_for(runs / "slow" / "metrics.jsonl", "the training wrote no epoch")  # best.pt is there too
        [training] = Path(f"/proc/{shell.pid}/task/{shell.pid}/children").read_text().split()
        os.kill(int(training), signal.SIGTERM)
        assert shell.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        _stop_group(shell.pid)
    assert (runs / "slow" / "best.pt").exists() and not (runs / "slow" / "eval.json").exists()


def test_the_gpu_script_trains_the_rows_the_density_benchmark_names():
    density = _density_benchmark()
    script = (Path(density.__file__).parent / "density_gpu.sh").read_text()
    rows = dict(line.strip().strip('"').split("|") for line in script.splitlines()
                if re.match(r'\s+"[a-z0-9-]+\|', line))
    assert len(rows) >= 2 and all(density.ROWS[name] == flags for name, flags in rows.items()), rows


def test_a_row_gets_the_published_number_only_when_it_is_the_papers_architecture():
    density = _density_benchmark()
    vae = RunConfig.from_dict(PRESETS["vampprior-vae"]).to_dict()
    hvae = RunConfig.from_dict(PRESETS["vampprior-hvae"]).to_dict()
    conv = RunConfig.from_dict(PRESETS["vampprior-convhvae"]).to_dict()
    assert density.published(vae) == {"published_nll": 228.70, "published_sd": 0.15}
    assert density.published({**vae, "prior": "vamp:500"}) == {"published_nll": 227.35, "published_sd": 0.05}
    assert density.published(hvae)["published_nll"] == 227.37
    assert density.published({**hvae, "prior": "vamp:500"})["published_nll"] == 226.72
    assert density.published({**hvae, "prior": "vamp-hardtanh:500", "arch": "gated-hvae"})["published_nll"] == 226.72
    assert density.published(conv)["published_nll"] == 225.38 and conv["arch"] == "gated-conv"
    assert density.published({**conv, "arch": "conv"})["published_nll"] == 225.38  # the rows run before it
    beyond = [{**hvae, "latent_dims": [40, 40, 40]}, {**hvae, "posterior": "iaf:2"}, {**vae, "prior": "vamp:100"},
              {**vae, "hidden": 200}, {**vae, "latent_dims": [32]}, {**hvae, "skip": False}, {**vae, "arch": "mlp"},
              {**conv, "hidden": 200}, {**conv, "latent_dims": [40, 40, 40]},
              {**vae, "prior": "flow:2", "posterior": "iaf:2"}, {**hvae, "arch": "gated-hvae", "hidden": 200}]
    for config in beyond:
        assert density.published(config) == {"published_nll": None, "published_sd": None}, config
    flow = _row(model="vae", levels=1, latent_dims=[40], prior="flow:2", posterior="iaf:2", published_nll=None)
    assert density._label(flow) == "beyond: VAE, gated MLP, IAF posterior (2 steps), flow prior (2 steps)"
    paper = {**_row(), "arch": "gated-hvae", "prior": "vamp-hardtanh:500", "published_nll": 226.72,
             "optimizer": "adam-normgrad"}
    assert density._label(paper) == ("HVAE, gated MLP, the paper's networks, AdamNormGrad, VampPrior(500, the paper's "
                                     "pseudo-inputs)")
    label = {**_row(model="convhvae"), "published_nll": 225.38}
    assert density._label({**label, "arch": "gated-conv"}) == "ConvHVAE, gated conv, N(0, I)"
    assert density._label({**label, "arch": "conv"}) == "ConvHVAE, this library's plain conv nets, N(0, I)"


def _row(**changes):
    row = {"name": "r", "model": "hvae", "prior": "standard", "levels": 2, "latent_dims": [40, 40],
           "posterior": "gaussian", "epochs": 929, "max_epochs": 2000, "finished": True, "best_epoch": 879,
           "best_val_elbo": -230.747, "evaluated_epoch": 879, "test_images": 10000, "test_nll": 228.634,
           "test_elbo": -231.413,
           "published_nll": 227.37, "published_sd": 0.1, "seed": 0, "seconds": 7200.0, "machine": "a CPU",
           "median_epoch_seconds": 16.5}
    return {**row, **changes}


def test_the_density_table_says_what_is_final_and_what_is_not():
    density = _density_benchmark()
    head, rule, final, unfinished, beyond = density.table([
        _row(), _row(finished=False, epochs=343, best_epoch=335, evaluated_epoch=33, test_nll=236.924,
                     extrapolated_stop_epoch=1040, extrapolated_val_elbo=-229.08),
        _row(levels=3, latent_dims=[40, 40, 40], posterior="iaf:2", prior="vamp:500", published_nll=None,
             published_sd=None, test_nll=None, test_elbo=None, evaluated_epoch=None, finished=False, epochs=21)]
    ).splitlines()
    assert head.count("|") == rule.count("|") == final.count("|") == 12
    assert final == ("| HVAE, gated MLP, N(0, I) | 227.37 ± 0.10 | 929, stopped early | −230.75 (879) "
                     "| **228.63** (879) | −231.41 | — | 0 | 2.00 | 16.5 | a CPU |")
    assert "| 343 so far | −230.75 (335) | 236.92 (33) |" in unfinished and "| 1040 (−229.08) |" in unfinished
    assert beyond.startswith("| beyond: HVAE, gated MLP, 3 levels 40-40-40, IAF posterior (2 steps), "
                             "VampPrior(500) | — | 21 so far |") and "| not yet | — |" in beyond
    [part] = density.table([_row(test_images=100)]).splitlines()[2:]  # an evaluation of the first 100 images only
    assert "| 228.63 (879) |" in part and not density.is_final(_row(test_images=100))


def test_the_density_summary_sets_each_target_beside_the_best_final_row():
    density = _density_benchmark()
    vae = dict(model="vae", levels=1, latent_dims=[40], published_nll=228.70, published_sd=0.15)
    rows = [_row(name="vae-a", test_nll=228.71, **vae), _row(name="vae-b", test_nll=228.69, **vae),
            _row(name="vae-c", test_nll=228.10, test_images=100, **vae),  # interim: the first 100 images only
            _row(name="hvae-a", test_nll=227.43), _row(name="hvae-b", finished=False, epochs=130, test_nll=None),
            _row(name="flow", test_nll=227.35, prior="flow:2", published_nll=None, published_sd=None, **{
                key: value for key, value in vae.items() if not key.startswith("published")}),
            _row(name="hvae3", finished=False, epochs=24, levels=3, published_nll=None, published_sd=None)]
    lines = density.summary(rows).splitlines()
    assert lines[2] == ("| VAE, gated MLP, N(0, I) | 228.70 ± 0.15 | **228.69** (`vae-b`) | ≤ 228.7 | met, by 0.01; "
                        "not final yet: `vae-c` stopped, not evaluated on the whole test set yet |")
    assert lines[3] == "| VAE, gated MLP, VampPrior(500) | 227.35 ± 0.05 | not finished | ≤ 227.4 | not run |"
    assert lines[4] == ("| HVAE, gated MLP, N(0, I) | 227.37 ± 0.10 | **227.43** (`hvae-a`) | ≤ 227.4 | "
                        "missed, by 0.03; not final yet: `hvae-b` at epoch 130 |")
    assert lines[5:8] == ["| HVAE, gated MLP, VampPrior(500) | 226.72 ± 0.08 | not finished | ≤ 226.7 | not run |",
                          "| ConvHVAE, N(0, I) | 225.38 ± 0.08 | not finished | ≤ 225.4 | not run |",
                          "| ConvHVAE, VampPrior(500) | 224.67 ± 0.03 | not finished | ≤ 224.7 | not run |"]
    # beyond: strictly better than the class's best published row (the one-level VampPrior's 227.35)
    assert lines[8] == ("| beyond: VAE, gated MLP, anything the table lacks | — | **227.35** (`flow`) | < 227.35 | "
                        "missed, by less than 0.01 |")
    assert lines[9] == ("| beyond: HVAE, gated MLP, anything the table lacks | — | not finished | < 226.72 | "
                        "`hvae3` at epoch 24 |")
    assert len(lines) == 10  # no ConvHVAE beyond row: none was run
    better = [{**row, "test_nll": 227.30} if row["name"] == "flow" else row for row in rows]
    assert density.summary(better).splitlines()[8].endswith("| **227.30** (`flow`) | < 227.35 | met, by 0.05 |")
    at_target = [{**row, "test_nll": 228.7} if row["name"] == "vae-b" else row for row in rows]
    assert ("| **228.70** (`vae-b`) | ≤ 228.7 | met, by less than 0.01;"
            in density.summary(at_target).splitlines()[2])
    # a row run with several seeds counts as the mean of its final ones (never its best seed), against the
    # other rows' numbers; a seed still training is named
    seeded = rows + [_row(name="hvae-a-seed2", seed=2, test_nll=227.35),
                     _row(name="hvae-a-seed1", seed=1, finished=False, epochs=300, test_nll=None)]
    assert density.summary(seeded).splitlines()[4] == (
        "| HVAE, gated MLP, N(0, I) | 227.37 ± 0.10 | **227.39** (`hvae-a`, the mean of seeds 0 and 2: 227.43, 227.35) "
        "| ≤ 227.4 | met, by 0.01; not final yet: `hvae-b` at epoch 130, `hvae-a-seed1` at epoch 300 |")
    seeded += [_row(name="hvae-c", test_nll=227.38), _row(name="hvae-a-seed3", seed=3, test_nll=227.52)]
    assert "| **227.38** (`hvae-c`) | ≤ 227.4 |" in density.summary(seeded).splitlines()[4]  # 227.43 on average
    assert "| **227.35** (`hvae-a-seed2`) |" in density.summary(  # a seed whose seed-0 row is not final
        [row for row in seeded if row["name"] in ("hvae-a-seed2", "hvae-b")]).splitlines()[4]
    # a row that stopped but is not evaluated on the whole test set is named, never counted
    waiting = [{**row, "test_images": 100} if row["name"] == "hvae-a" else row for row in rows]
    assert density.summary(waiting).splitlines()[4] == (
        "| HVAE, gated MLP, N(0, I) | 227.37 ± 0.10 | not finished | ≤ 227.4 | `hvae-a` stopped, not evaluated on the "
        "whole test set yet, `hvae-b` at epoch 130 |")


def test_density_table_prints_the_summary_then_the_table(capsys):
    density = _density_benchmark()
    rows = json.loads((density.RESULTS / "density.json").read_text())
    assert density.main(["table"]) == 0
    assert capsys.readouterr().out == density.summary(rows) + "\n" + density.table(rows)


def test_the_readmes_density_table_is_the_collected_rows(tmp_path):
    density = _density_benchmark()
    rows = json.loads((density.RESULTS / "density.json").read_text())
    for row in rows:  # a stored row's published number is the one its stored configuration earns
        published = density.published(density.stored_config(row["name"]))
        assert {key: row[key] for key in published} == published, row["name"]
    readme = density.README.read_text()
    for marks, part in ((density.README_MARKS, density.table(rows)), (density.SUMMARY_MARKS, density.summary(rows))):
        start, end = (readme.index(mark) for mark in marks)
        assert readme[start + len(marks[0]):end] == part, \
            "README's density table or summary is stale: run python benchmarks/density.py table --readme"

    copy = tmp_path / "README.md"
    summary, table = density.SUMMARY_MARKS, density.README_MARKS
    copy.write_text("intro\n" + summary[0] + "old\n" + summary[1] + "between\n" + table[0] + "old\n" + table[1]
                    + "after\n")
    density.write_readme_table(copy, rows[:1])
    assert copy.read_text() == ("intro\n" + summary[0] + density.summary(rows[:1]) + summary[1] + "between\n"
                                + table[0] + density.table(rows[:1]) + table[1] + "after\n")
    copy.write_text("no table here\n")
    with pytest.raises(InputError, match="has no density summary between the lines"):
        density.write_readme_table(copy, rows)
    copy.write_text(summary[0] + summary[1] + "no table here\n")
    with pytest.raises(InputError, match="has no density table between the lines"):
        density.write_readme_table(copy, rows)


def test_every_collected_row_has_the_issues_fields_and_its_whole_record():
    density = _density_benchmark()
    required = ("model", "prior", "levels", "guide", "epochs", "best_epoch", "iw_samples", "test_nll", "test_elbo",
                "published_nll", "seed", "seconds", "machine")
    for row in json.loads((density.RESULTS / "density.json").read_text()):
        name, kept = row["name"], density.RESULTS / "density"
        assert all(key in row for key in required), (name, [key for key in required if key not in row])
        vals = [r["val_elbo"] for r in (json.loads(line) for line in (kept / f"{name}.metrics.jsonl").open())]
        assert row["epochs"] == len(vals) and row["best_val_elbo"] == max(vals), name
        assert vals[row["best_epoch"] - 1] == max(vals) and row["levels"] == len(row["latent_dims"]), name
        records = [json.loads(line) for line in (kept / f"{name}.metrics.jsonl").open()]
        assert row["median_epoch_seconds"] == density.median_epoch_seconds(records), name
        assert row["test_nll"] is None or row["test_nll"] > 0, name
        if (kept / f"{name}.eval.json").exists():  # kept since rows are collected with their evaluation
            evaluation = json.loads((kept / f"{name}.eval.json").read_text())
            assert (row["test_nll"], row["test_images"]) == (-evaluation["iw_log_likelihood"], evaluation["n"]), name
        if density.is_final(row):
            assert row["iw_samples"] == 5000 and row["epochs"] - row["best_epoch"] >= 50, name


def test_the_density_picture_draws_every_row_whole_and_its_first_epochs(tmp_path):
    import sys
    from pathlib import Path

    import matplotlib.colors
    import matplotlib.image
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import density

    long, short = tmp_path / "long.metrics.jsonl", tmp_path / "short.metrics.jsonl"
    long.write_text("".join(json.dumps({"epoch": e, "val_elbo": -300 + 60 * (1 - 0.99 ** e)}) + "\n"
                            for e in range(1, 401)))
    short.write_text("".join(json.dumps({"epoch": e, "val_elbo": -290 + e / 2}) + "\n" for e in range(1, 41)))
    out = tmp_path / "val.png"
    density._plot([long, short], path=out)
    image = matplotlib.image.imread(out)[..., :3]
    height, width, _ = image.shape
    assert width > 1.5 * height  # two panels side by side: all epochs, and the first ones
    split = int(width * 0.6)  # the left panel is 3/5 of the width
    near = {colour: (np.abs(image - matplotlib.colors.to_rgb(colour)).sum(-1) < 0.15).nonzero()[1]
            for colour in ("C0", "C1")}  # the columns of each row's curve (long: C0, short: C1)
    assert (near["C0"] < split).sum() > 100 and (near["C0"] > split).sum() > 100  # long: in both panels
    assert (near["C1"] > split).sum() > 100  # short (above 250 nats): in the first epochs' panel


def test_every_density_row_is_a_valid_run_and_only_the_tables_models_get_a_published_number():
    import shlex

    from pyro_vae.cli import train_config

    density = _density_benchmark()
    beyond = {"hvae3-vamp", "hvae-iaf", "vae-flow-iaf", "hvae3-standard", "hvae-paper-flow"}
    for name, flags in density.ROWS.items():
        config = train_config(["--out", "x", *shlex.split(flags)]).validate().to_dict()
        assert (density.published(config)["published_nll"] is None) == (name in beyond), name
    paper = train_config(["--out", "x", *shlex.split(density.ROWS["hvae-paper-vamp"])])
    assert (paper.arch, paper.prior, paper.optimizer) == ("gated-hvae", "vamp-hardtanh:500", "adam-normgrad")
