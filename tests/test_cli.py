"""The command line: ``pyro-vae train | evaluate``, in-process and as a subprocess.

Bad input through the command line (exit status 2, a clear message, no
traceback) is tested in test_bad_input.py.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyro_vae
from pyro_vae import cli
from pyro_vae.checkpoints import load_checkpoint

from conftest import needs_fashion_mnist

CLI = [sys.executable, "-m", "pyro_vae.cli"]
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "samples.png", "reconstructions.png", "levels.png",
             "curves.png")
QUICK = ["--no-progress", "--batch-size", "64"]


def run_cli(args, env, timeout=300):
    """``pyro-vae ARGS`` in a subprocess; returns the CompletedProcess (text mode)."""
    return subprocess.run(CLI + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def _subparser(command):
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _flags(command):
    return [o for action in _subparser(command)._actions for o in action.option_strings]


def _help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _check_run_dir(run_dir, epochs):
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
        assert (run_dir / name).stat().st_size > 0, f"{name} is empty"
    for name in ("samples.png", "reconstructions.png", "levels.png", "curves.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
    metrics = _metrics(run_dir)
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    for m in metrics:
        assert {"train_loss", "test_elbo", "seconds"} <= set(m)
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["test_elbo"]) and m["seconds"] >= 0
    return json.loads((run_dir / "config.json").read_text()), metrics


# ------------------------------------------------------------------ --help
def test_train_help_lists_every_flag(capsys):
    text = _help("train", capsys)
    flags = _flags("train")
    assert len(flags) > 15
    for flag in flags:
        assert flag in text, f"{flag} missing from train --help"
    for flag in ("--dataset", "--epochs", "--out", "--arch", "--latent-dim", "--likelihood", "--elbo",
                 "--device", "--seed", "--resume", "--overwrite", "--data-dir", "--batch-size", "--binarize",
                 "--no-progress", "--latent-dims", "--guide", "--kl-warmup", "--free-bits"):
        assert flag in flags, f"the parser has no {flag}"
        assert flag in text


def test_evaluate_help_lists_every_flag(capsys):
    text = _help("evaluate", capsys)
    flags = _flags("evaluate")
    for flag in flags:
        assert flag in text, f"{flag} missing from evaluate --help"
    for flag in ("--iw-samples", "--limit", "--no-progress", "--device", "--seed"):
        assert flag in flags and flag in text
    assert "run_dir" in text


# -------------------------------------------------------- train/evaluate
def test_train_then_evaluate(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data-dir", str(idx_dir), "--epochs", "2", "--out", str(out), *QUICK]) == 0
    config, metrics = _check_run_dir(out, epochs=2)
    assert config["data_dir"] == str(idx_dir) and config["epochs"] == 2 and config["batch_size"] == 64
    assert all(m["test_elbo"] < 0 for m in metrics)
    printed = capsys.readouterr().out
    assert "trained 2 epochs" in printed

    assert cli.main(["evaluate", str(out), "--iw-samples", "5", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    for key in ("elbo", "reconstruction", "kl", "iw_log_likelihood"):
        assert math.isfinite(summary[key]), key
    assert summary["n"] == 128 and summary["iw_samples"] == 5
    assert summary["elbo"] < 0 and summary["kl"] >= 0
    assert summary["elbo"] == pytest.approx(summary["reconstruction"] - summary["kl"], abs=1e-2)
    assert summary["iw_log_likelihood"] >= summary["elbo"] - 1.0
    # seeded: the same run and settings give the same numbers; another --seed gives other draws
    assert cli.main(["evaluate", str(out), "--iw-samples", "5", "--no-progress"]) == 0
    assert json.loads((out / "eval.json").read_text()) == summary
    assert cli.main(["evaluate", str(out), "--iw-samples", "5", "--no-progress", "--seed", "1"]) == 0
    assert json.loads((out / "eval.json").read_text())["elbo"] != summary["elbo"]


@pytest.mark.parametrize("extra", [
    ["--arch", "conv", "--likelihood", "gaussian", "--binarize", "none", "--elbo", "meanfield"],
    ["--arch", "conv", "--likelihood", "dlogistic:2", "--binarize", "none", "--prior", "mog:3"],
    ["--likelihood", "gaussian:pixel", "--binarize", "none", "--prior", "vamp:4", "--latent-dims", "3,8",
     "--guide", "top-down"],
    ["--posterior", "iaf:2", "--latent-dims", "3,8", "--guide", "top-down", "--elbo", "meanfield"],
    ["--posterior", "iaf:1", "--latent-dims", "3,8", "--prior", "flow:1"],
    pytest.param(["--elbo", "jit"], marks=pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*:FutureWarning")),
], ids=["conv-gaussian-meanfield", "conv-dlogistic-mog", "pixel-gaussian-vamp-chain", "iaf-top-down-meanfield",
        "iaf-bottom-up-flow-prior", "jit"])
def test_train_variants(idx_dir, tmp_path, extra):
    out = tmp_path / "run"
    assert cli.main(["train", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(out),
                     "--latent-dim", "8", *QUICK, *extra]) == 0
    config, _ = _check_run_dir(out, epochs=1)
    assert (out / "pseudo_inputs.png").exists() == config["prior"].startswith("vamp")  # the VampPrior's u_k
    for flag, value in zip(extra[::2], extra[1::2]):
        expected = [int(v) for v in value.split(",")] if flag == "--latent-dims" else value
        assert config[flag.lstrip("-").replace("-", "_")] == expected
    assert cli.main(["evaluate", str(out), "--iw-samples", "3", "--elbo-samples", "2", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert all(math.isfinite(summary[k]) for k in ("elbo", "reconstruction", "kl", "iw_log_likelihood"))


def test_train_evaluate_and_resume_on_a_count_file(tmp_path, capsys):
    """--dataset counts: a 10x-style genes x cells .mtx file, an NB likelihood, a chain with the IAF posterior."""
    import scipy.io
    import scipy.sparse

    torch.manual_seed(0)
    cells = torch.distributions.NegativeBinomial(3.0, logits=torch.randn(30) * 0.5).sample((200,))  # (200, 30)
    path = tmp_path / "matrix.mtx"
    scipy.io.mmwrite(str(path), scipy.sparse.coo_matrix(cells.numpy().T))
    out = tmp_path / "run"
    common = ["--dataset", "counts", "--data-file", str(path), "--transpose", "--binarize", "none",
              "--likelihood", "nb", "--latent-dims", "2,4", "--posterior", "iaf:1", "--hidden", "32"]
    assert cli.main(["train", "--out", str(out), "--epochs", "2", *common, *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "nats/cell" in printed and "200 cells x 30 genes" in printed and "checkpoint.pt curves.png" in printed
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[1]["train_loss"] < metrics[0]["train_loss"]
    assert (out / "curves.png").is_file() and not (out / "samples.png").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "counts" and config["data_file"] == str(path) and config["transpose"] is True
    assert cli.main(["evaluate", str(out), "--iw-samples", "5", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["n"] == 20 and summary["latent_dims"] == [2, 4]  # 10% of the 200 cells held out
    assert summary["iw_log_likelihood"] >= summary["elbo"] - 1.0
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert [m["epoch"] for m in _metrics(out)] == [1, 2, 3]
    assert cli.main(["sample", str(out)]) == 2
    assert "not images; draw samples in Python with vae.sample(n)" in capsys.readouterr().err


def test_resume_continues_the_run(idx_dir, tmp_path, capsys):
    common = ["--data-dir", str(idx_dir), "--latent-dim", "8", "--hidden", "64", *QUICK]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main(["train", "--out", str(straight), "--epochs", "2", *common]) == 0
    assert cli.main(["train", "--out", str(split), "--epochs", "1", *common]) == 0
    first = _metrics(split)
    assert [m["epoch"] for m in first] == [1]

    # the rest of the settings come from the run's checkpoint
    assert cli.main(["train", "--out", str(split), "--resume", "--epochs", "2", "--no-progress"]) == 0
    config, metrics = _check_run_dir(split, epochs=2)
    assert metrics[0] == first[0], "resuming rewrote the first epoch"
    assert config["latent_dims"] == [8] and config["epochs"] == 2
    # a resumed run continues exactly where it stopped (same RNG, Adam state, data order)
    for a, b in zip(_metrics(straight), metrics):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["test_elbo"] == pytest.approx(a["test_elbo"], rel=1e-3)
    capsys.readouterr()

    ckpt = (split / "checkpoint.pt").read_bytes()
    lines = (split / "metrics.jsonl").read_text()
    assert cli.main(["train", "--out", str(split), "--resume", "--epochs", "3", "--latent-dim", "9",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "latent_dims" in err and "[8]" in err and "[9]" in err
    assert (split / "checkpoint.pt").read_bytes() == ckpt
    assert (split / "metrics.jsonl").read_text() == lines


def test_chain_train_then_evaluate(idx_dir, tmp_path):
    """A two-level top-down chain with KL warm-up and free bits, from the command line to eval.json."""
    out, warmup, batch_size, epochs = tmp_path / "chain", 5, 256, 2
    assert cli.main(["train", "--data-dir", str(idx_dir), "--out", str(out), "--epochs", str(epochs),
                     "--latent-dims", "4,8", "--guide", "top-down", "--kl-warmup", str(warmup),
                     "--free-bits", "0.1", "--hidden", "16", "--batch-size", str(batch_size), "--no-progress"]) == 0
    config, metrics = _check_run_dir(out, epochs=epochs)
    assert config["latent_dims"] == [4, 8] and config["guide"] == "top-down"
    assert config["kl_warmup"] == warmup and config["free_bits"] == 0.1
    # 512 training images in batches of 256: 2 steps an epoch, so the warm-up (5 steps) spans both epochs
    steps = math.ceil(512 / batch_size)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == epochs * steps
    for m in metrics:
        t = m["epoch"] * steps - 1  # the 0-based count of the epoch's last step
        assert m["kl_weight"] == min(1.0, (t + 1) / warmup), m
        assert math.isfinite(m["test_kl_z0"]) and math.isfinite(m["test_kl_z1"]) and "test_kl_z2" not in m
    assert [m["kl_weight"] for m in metrics] == [0.4, 0.8]

    # plots.save_levels: 4 images x (L + 2) rows of 1 + 8 tiles (28 x 28), make_grid padding 2, each pixel
    # drawn 2 x 2, with the rows' labels on the left and a title line on top
    from PIL import Image

    images, samples, levels, tile, pad, zoom = 4, 8, 2, 28, 2, 2
    with Image.open(out / "levels.png") as png:
        width, height = png.size
    assert width - zoom * ((samples + 1) * (tile + pad) + pad) > 50
    assert 0 < height - zoom * (images * (levels + 1) * (tile + pad) + pad) < 40

    assert cli.main(["evaluate", str(out), "--iw-samples", "5", "--limit", "50", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["n"] == summary["limit"] == 50 and summary["latent_dims"] == [4, 8]
    assert 0 <= summary["active_units_z0"] <= 4 and 0 <= summary["active_units_z1"] <= 8
    assert isinstance(summary["active_units_z0"], int) and isinstance(summary["active_units_z1"], int)
    assert "kl_z2" not in summary and "active_units_z2" not in summary
    assert all(math.isfinite(summary[k]) for k in ("elbo", "reconstruction", "kl", "kl_z0", "kl_z1",
                                                    "iw_log_likelihood"))
    assert summary["kl_z0"] + summary["kl_z1"] == pytest.approx(summary["kl"], abs=1e-4)
    assert summary["elbo"] == pytest.approx(summary["reconstruction"] - summary["kl"], abs=1e-2)


def test_sample_temperatures_and_from_image(idx_dir, tmp_path, capsys):
    """``pyro-vae sample --temperature`` (one value: a plain grid; a list: one labelled row each) and
    ``--from-image INDEX --keep-levels K`` on a tiny two-level chain."""
    from PIL import Image

    out = tmp_path / "chain"
    assert cli.main(["train", "--data-dir", str(idx_dir), "--out", str(out), "--epochs", "1", "--latent-dims", "4,8",
                     "--guide", "top-down", "--hidden", "16", "--batch-size", "256", "--no-progress"]) == 0
    for flag in ("--temperature", "--from-image", "--keep-levels"):
        assert flag in _flags("sample") and flag in _help("sample", capsys)
    tile, zoom = 28 + 2, 2
    assert cli.main(["sample", str(out), "--temperature", "0.5", "--n", "16"]) == 0
    with Image.open(out / "samples_t0.5.png") as png:  # 16 samples, 8 a row, make_grid as samples.png
        assert png.size == (2 + 8 * tile, 2 + 2 * tile)
    assert cli.main(["sample", str(out), "--temperature", "0,0.5,1"]) == 0  # 3 rows of 8, labelled
    with Image.open(out / "samples_t0_0.5_1.png") as png:
        width, height = png.size
        assert width > zoom * (2 + 8 * tile) and 0 < height - zoom * (2 + 3 * tile) < 40
        first = png.convert("L").crop((width - zoom * (2 + 8 * tile), height - zoom * (2 + 3 * tile), width, height))
    row0 = torch.tensor(list(first.getdata()), dtype=torch.float).reshape(first.size[1], first.size[0])
    tiles = [row0[zoom * 2:zoom * 30, zoom * (2 + j * tile):zoom * (30 + j * tile)] for j in range(8)]
    assert all(torch.equal(tiles[0], t) for t in tiles[1:])  # t = 0: every level at its mean, one picture
    assert cli.main(["sample", str(out), "--from-image", "5", "--keep-levels", "1", "--n", "4"]) == 0
    with Image.open(out / "from5_keep1.png") as png:  # the image, then 4 draws: one row
        assert png.size[0] > zoom * (2 + 5 * tile) and 0 < png.size[1] - zoom * (2 + tile) < 40
    assert cli.main(["sample", str(out), "--from-image", "5", "--keep-levels", "2", "--temperature", "0.5,1",
                     "--out", str(tmp_path / "kept.png")]) == 0
    assert (tmp_path / "kept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_resume_of_a_chain_with_another_guide_is_refused(idx_dir, tmp_path, capsys):
    out = tmp_path / "chain"
    assert cli.main(["train", "--out", str(out), "--data-dir", str(idx_dir), "--epochs", "1", "--latent-dims", "3,4",
                     "--guide", "top-down", "--hidden", "16", *QUICK]) == 0
    ckpt, lines = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "2", "--guide", "bottom-up",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "guide: run has 'top-down', asked 'bottom-up'" in err, err
    assert "latent_dims" not in err, err  # only the setting that differs is named
    assert (out / "checkpoint.pt").read_bytes() == ckpt
    assert (out / "metrics.jsonl").read_text() == lines


def test_resume_without_a_run(tmp_path, idx_dir, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "empty"), "--resume", "--data-dir", str(idx_dir),
                     "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@needs_fashion_mnist
@pytest.mark.slow
def test_real_fashion_mnist_run(tmp_path):
    out = tmp_path / "real"
    assert cli.main(["train", "--dataset", "fashion-mnist", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    config, metrics = _check_run_dir(out, epochs=1)
    assert config["dataset"] == "fashion-mnist"
    assert math.isfinite(metrics[0]["test_elbo"]) and metrics[0]["test_elbo"] < 0
    assert cli.main(["evaluate", str(out), "--iw-samples", "10", "--limit", "200", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["n"] == 200 and summary["dataset"] == "fashion-mnist"
    assert math.isfinite(summary["elbo"]) and summary["elbo"] < 0
    assert math.isfinite(summary["iw_log_likelihood"]) and summary["iw_log_likelihood"] >= summary["elbo"] - 1.0


# --------------------------------------------------------------- bad input
# (every bad input, through the CLI and the API, is in test_bad_input.py)
def test_occupied_out_is_refused_then_overwrite_replaces_it(idx_dir, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    assert cli.main(["train", "--out", str(occupied), "--data-dir", str(idx_dir), "--epochs", "1",
                     "--latent-dim", "3", "--hidden", "16", *QUICK]) == 0
    before = (occupied / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--out", str(occupied), "--data-dir", str(idx_dir), "--epochs", "1", *QUICK]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (occupied / "checkpoint.pt").read_bytes() == before
    assert len(_metrics(occupied)) == 1
    assert cli.main(["train", "--out", str(occupied), "--data-dir", str(idx_dir), "--epochs", "1",
                     "--overwrite", *QUICK]) == 0
    assert (occupied / "checkpoint.pt").read_bytes() != before
    config, _ = _check_run_dir(occupied, epochs=1)
    assert config["latent_dims"] == pyro_vae.RunConfig().latent_dims


# ------------------------------------------------------- bad data, Python API
def _small_vae(likelihood=None):
    enc, dec = pyro_vae.nets.build("mlp", (1, 28, 28), 4)
    return pyro_vae.VAE(enc, dec, [4], likelihood=likelihood)


def test_fit_bernoulli_refuses_values_outside_unit_interval():
    x = torch.rand(16, 1, 28, 28) * 2 - 0.5
    with pytest.raises(pyro_vae.InputError, match=r"Bernoulli.*\[0, 1\]"):
        pyro_vae.fit(_small_vae(), x, epochs=1, batch_size=8, progress=False)
    good = torch.rand(16, 1, 28, 28)
    with pytest.raises(pyro_vae.InputError, match="Bernoulli"):
        pyro_vae.fit(_small_vae(), good, x_test=x, epochs=1, batch_size=8, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_refuses_nan_and_inf(bad):
    x = torch.rand(16, 1, 28, 28)
    x[3, 0, 5, 5] = bad
    with pytest.raises(pyro_vae.InputError, match="NaN or infinite"):
        pyro_vae.fit(_small_vae(), x, epochs=1, batch_size=8, progress=False)


def test_fit_gaussian_accepts_values_outside_unit_interval():
    x = torch.randn(16, 1, 28, 28)
    history = pyro_vae.fit(_small_vae(pyro_vae.likelihoods.Gaussian()), x, epochs=1, batch_size=8,
                           progress=False)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])


def test_device_auto_is_the_default_and_says_which_it_chose(idx_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(["train", "--data-dir", str(idx_dir), "--out", str(out), "--epochs", "1", "--hidden", "16",
                     "--latent-dim", "2", "--no-progress"]) == 0
    assert "device cpu (--device auto: PyTorch sees no CUDA GPU" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"  # the device it ran on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli._chosen_device("auto") == "cuda" and cli._chosen_device("cpu") == "cpu"
    cli._announce()  # said once the command's input has passed its checks
    assert capsys.readouterr().out == "device cuda (--device auto: PyTorch sees a CUDA GPU; --device cpu " \
        "or cuda to choose)\n"


def test_cuda_is_an_alias_of_device_cuda(idx_dir, tmp_path, capsys):
    args = cli._parser().parse_args(["train", "--out", "x", "--cuda"])
    assert args.device == "cuda"
    if torch.cuda.is_available():
        return
    assert cli.main(["train", "--data-dir", str(idx_dir), "--out", str(tmp_path / "run"), "--cuda"]) == 2
    assert "PyTorch sees no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.parametrize("guide, readers", [("bottom-up", ["z2"]), ("top-down", ["z0", "z1", "z2"])])
def test_the_model_graph_shows_model_and_guide_with_every_level(guide, readers):
    from pyro_vae import plots
    from pyro_vae.train import RunConfig, build_vae

    vae = build_vae(RunConfig(latent_dims=[2, 3, 4], guide=guide, hidden=8), (1, 28, 28))
    source = plots.model_graph(vae, torch.zeros(2, 1, 28, 28)).source
    for side in ("model", "guide"):
        assert f"cluster_{side}" in source and f"cluster_{side}_data" in source  # the data plate, per side
        for level in ("z0", "z1", "z2"):
            assert f"{side}_{level} [label={level}" in source
    assert "model_z1 -> model_z2" in source and "model_z2 -> model_x" in source
    assert sorted(line.split("-> ")[1].split()[0] for line in source.splitlines() if "guide_x ->" in line) == \
        [f"guide_{r}" for r in readers]  # the levels that read x in this guide


def test_every_run_writes_model_png_or_says_how_to_get_graphviz(idx_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import graphviz

    flags = ["--data-dir", str(idx_dir), "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress"]
    if shutil.which("dot"):
        assert cli.main(["train", "--out", str(tmp_path / "with"), *flags]) == 0
        assert (tmp_path / "with" / "model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "model.png" in capsys.readouterr().out
    capsys.readouterr()

    def no_dot(*args, **kwargs):
        raise graphviz.ExecutableNotFound(("dot",))

    monkeypatch.setattr(graphviz.Digraph, "pipe", no_dot)
    assert cli.main(["train", "--out", str(tmp_path / "without"), *flags]) == 0  # the run itself is fine
    said = capsys.readouterr()
    assert "model.png not written: pyro.render_model needs graphviz: the dot program (apt install graphviz" in said.err
    assert not (tmp_path / "without" / "model.png").exists() and "model.png" not in said.out
