"""The Pyro-style example scripts run with the public API alone."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_idx_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("extra", [[], ["--jit"]])
def test_tutorial_example_prints_test_elbo_per_epoch(extra, tmp_path, cli_env):
    idx_dir = make_idx_dir(tmp_path / "idx", n_train=1024, n_test=512)
    result = subprocess.run([sys.executable, str(EXAMPLES / "vae.py"), "-n", "2", "--data-dir", str(idx_dir),
                             *extra], capture_output=True, text=True, env=cli_env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if "test ELBO" in l]
    assert len(lines) == 2
    elbos = [float(l.rsplit(":", 1)[1]) for l in lines]
    assert all(e < 0 for e in elbos) and elbos[1] > elbos[0]


def test_cvae_example_trains_and_draws_each_class(tmp_path, cli_env):
    idx_dir = make_idx_dir(tmp_path / "idx", n_train=512, n_test=128)
    out = tmp_path / "classes.png"
    result = subprocess.run([sys.executable, str(EXAMPLES / "cvae.py"), "-n", "2", "--data-dir", str(idx_dir),
                             "--out", str(out)], capture_output=True, text=True, env=cli_env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "test ELBO" in line]
    assert len(lines) == 2 and all(float(line.rsplit(" ", 1)[1]) < 0 for line in lines)
    from PIL import Image

    assert Image.open(out).size[1] > 10 * 28  # ten labelled rows of draws


@pytest.mark.parametrize("enum", ["parallel"])  # sequential's agreement is tests/test_m2.py's
def test_ss_vae_example_trains_m2_with_few_labels(enum, tmp_path, cli_env):
    idx_dir = make_idx_dir(tmp_path / "idx", n_train=400, n_test=100)
    result = subprocess.run([sys.executable, str(EXAMPLES / "ss_vae.py"), "-n", "2", "-sup", "50", "-enum", enum,
                             "--aux-loss", "-hl", "32", "-zd", "4", "-bs", "50", "--data-dir", str(idx_dir)],
                            capture_output=True, text=True, env=cli_env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "test accuracy" in line]
    assert len(lines) == 2 and all(0.0 <= float(line.rsplit(" ", 1)[1]) <= 1.0 for line in lines)


@pytest.mark.parametrize("name", ["vae.py", "hierarchical.py", "swap_prior.py", "count_data.py", "cvae.py",
                                  "ss_vae.py"])
def test_example_uses_only_the_public_api(name):
    text = (EXAMPLES / name).read_text()
    assert "from pyro_vae import" in text
    assert "pyro_vae." not in text.replace("from pyro_vae import", "")


def test_hierarchical_example_prints_per_level_kl_and_iw_for_each_guide(tmp_path, cli_env):
    idx_dir = make_idx_dir(tmp_path / "idx", n_train=512, n_test=64)
    result = subprocess.run([sys.executable, str(EXAMPLES / "hierarchical.py"), "-n", "2", "--warmup-epochs", "1",
                             "--iw-samples", "20", "--data-dir", str(idx_dir)],
                            capture_output=True, text=True, env=cli_env, timeout=300)
    assert result.returncode == 0, result.stderr
    for guide in ("bottom-up", "top-down"):
        losses = [float(l.rsplit(":", 1)[1]) for l in result.stdout.splitlines()
                  if l.startswith(f"[{guide} epoch")]
        assert len(losses) == 2
        (summary,) = [l for l in result.stdout.splitlines() if l.startswith(f"{guide}: test ELBO")]
        assert "IW log p(x) (K=20)" in summary
        assert "z0: KL" in summary and "/16 active" in summary and "z1: KL" in summary and "/50 active" in summary


@pytest.mark.parametrize("compare, names", [
    ("priors", ("standard normal", "mixture of Gaussians", "VampPrior")),
    ("posteriors", ("Gaussian posterior", "IAF posterior")),
])
def test_swap_prior_example_prints_elbo_and_iw_for_each_model(tmp_path, cli_env, compare, names):
    idx_dir = make_idx_dir(tmp_path / "idx", n_train=512, n_test=64)
    result = subprocess.run([sys.executable, str(EXAMPLES / "swap_prior.py"), "-n", "2", "--iw-samples", "20",
                             "--pseudo-inputs", "8", "--components", "3", "--data-dir", str(idx_dir),
                             "--compare", compare], capture_output=True, text=True, env=cli_env, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in names:
        (line,) = [l for l in result.stdout.splitlines() if l.startswith(f"{name}: test ELBO")]
        elbo = float(line.split("test ELBO")[1].split()[0])
        iw = float(line.split("(K=20)")[1].split()[0])
        assert elbo < 0 and iw > elbo - 1


def test_count_data_example_recovers_the_true_latent(tmp_path, cli_env):
    """NB VAE on 800 generated cells: the learned latent maps linearly onto the true one (R^2 > 0.9 on
    held-out cells, the PCA baseline printed too), and the matrix it wrote reads back as counts."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "count_data.py"), "--cells", "800", "--genes", "100",
                             "-n", "30", "--iw-samples", "20", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=cli_env, timeout=300)
    assert result.returncode == 0, result.stderr
    (line,) = [l for l in result.stdout.splitlines() if l.startswith("R^2 of a linear map")]
    r2 = float(line.split("(test cells):")[1].split()[0])
    r2_pca = float(line.rsplit(":", 1)[1].rstrip(")"))
    assert r2 > 0.9 and 0 < r2_pca <= 1, line
    (summary,) = [l for l in result.stdout.splitlines() if l.startswith("nb: test ELBO")]
    elbo, iw = float(summary.split("test ELBO")[1].split()[0]), float(summary.split("(K=20)")[1].split()[0])
    assert elbo < 0 and iw > elbo - 1
    from pyro_vae import data

    counts = data.load_counts(tmp_path / "counts.npz")
    assert counts.shape == (800, 100) and bool((counts == counts.round()).all()) and float(counts.min()) == 0
