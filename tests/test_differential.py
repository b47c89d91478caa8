"""Differential expression in scVI's change mode: the FDR calls by hand, and a run on simulated cells whose
truly changed genes come out on top, with their sign and size, from the command line."""

import numpy as np
import pytest
import scipy.io
import scipy.sparse

from pyro_vae import cli, differential
from pyro_vae.errors import InputError

# type t0 expresses genes 0-2 five times more than type t1 and genes 3-5 five times less, so that the other
# genes' proportions (what scVI's change mode compares) are the same in both types
CELLS, GENES, UP, DOWN = 240, 12, (0, 1, 2), (3, 4, 5)


def test_genes_are_called_at_the_posterior_expected_fdr():
    proba = np.array([0.99, 0.5, 0.97, 0.9, 0.2])
    # most probable first: 0.99, 0.97, 0.9, 0.5 ...; mean (1 - p): 0.01, 0.02, 0.0467, 0.16 -> the first three
    np.testing.assert_array_equal(differential.de_calls(proba, 0.05), [True, False, True, True, False])
    np.testing.assert_array_equal(differential.de_calls(proba, 0.015), [True, False, False, False, False])
    assert not differential.de_calls(np.array([0.5, 0.4]), 0.05).any()


def write_cells(root, seed=0):
    rng = np.random.default_rng(seed)
    kind = np.arange(CELLS) % 2
    rate = np.full((CELLS, GENES), 4.0)
    rate[np.ix_(kind == 0, UP)] = 20.0
    rate[np.ix_(kind == 1, DOWN)] = 20.0
    counts = rng.poisson(rate * rng.uniform(0.5, 2.0, (CELLS, 1)))  # library sizes vary 4x
    scipy.sparse.save_npz(root / "counts.npz", scipy.sparse.csr_matrix(counts.astype(np.float32)))
    (root / "types.txt").write_text("".join(f"t{k}\n" for k in kind))
    (root / "batches.txt").write_text("".join(f"b{(i // 2) % 2}\n" for i in range(CELLS)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("de")
    write_cells(root)
    assert cli.main(["train", "--out", str(root / "run"), "--dataset", "counts", "--data-file",
                     str(root / "counts.npz"), "--batch-file", str(root / "batches.txt"), "--latent-dims", "4",
                     "--hidden", "32", "--epochs", "40", "--batch-size", "16", "--lr", "3e-3", "--no-progress"]) == 0
    return root


def rows(path):
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return header, [dict(zip(header, line.split(","))) for line in lines[1:]]


def test_the_changed_genes_come_first_with_their_sign_and_the_rest_are_not_called(run, capsys):
    assert cli.main(["de", str(run / "run"), "--groups", str(run / "types.txt"), "--a", "t0", "--b", "t1",
                     "--draws", "2000"]) == 0
    printed = capsys.readouterr().out
    assert "120 cells of t0 against 120 of t1" in printed
    assert (run / "run" / "de_t0_vs_t1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the volcano plot
    header, table = rows(run / "run" / "de_t0_vs_t1.csv")
    assert header == ["gene", *differential.COLUMNS] and len(table) == GENES
    top = {row["gene"]: row for row in table[:6]}
    assert set(top) == {f"g{g}" for g in UP + DOWN}
    for g in UP + DOWN:
        row = top[f"g{g}"]
        assert float(row["proba_de"]) > 0.9 and row["is_de"] == "true"
        sign = 1 if g in UP else -1
        assert 1.0 < sign * float(row["lfc_mean"]) < 3.5  # log2 of 5 = 2.32, shrunk by the cells' spread
    null = [row for row in table if row["gene"] not in top]
    assert all(abs(float(row["lfc_median"])) < 0.5 and row["is_de"] == "false" for row in null)
    scale_a = sum(float(row["scale_a"]) for row in table)
    assert scale_a == pytest.approx(1.0, rel=1e-3)  # proportions
    # the same seed gives the same table; the rest is the default B; batch-corrected decoding runs
    assert cli.main(["de", str(run / "run"), "--groups", str(run / "types.txt"), "--a", "t0", "--draws", "2000",
                     "--out", str(run / "again.csv")]) == 0
    assert (run / "again.csv").read_text() == (run / "run" / "de_t0_vs_t1.csv").read_text()
    assert cli.main(["de", str(run / "run"), "--groups", str(run / "types.txt"), "--a", "t0", "--as-batch", "b1",
                     "--draws", "2000", "--out", str(run / "b1.csv")]) == 0
    _, corrected = rows(run / "b1.csv")
    scale = {row["gene"]: float(row["scale_a"]) for row in table}
    assert any(abs(float(row["scale_a"]) - scale[row["gene"]]) > 1e-4 for row in corrected)  # decoded as b1


@pytest.mark.parametrize("flags, message", [
    (["--a", "t0"], "give the groups with one of --groups FILE"),
    (["--groups", "types.txt", "--a", "t7"], "no cell is in group 't7'; the groups are t0, t1"),
    (["--groups", "types.txt", "--a", "t0", "--b", "t0"], "--a and --b are both 't0'"),
    (["--groupby", "kind", "--a", "t0"], "--groupby reads a column of an AnnData file's .obs"),
    (["--groups", "types.txt", "--a", "t0", "--as-batch", "b9"], "the run has no batch 'b9'"),
    (["--groups", "types.txt", "--a", "t0", "--fdr", "2"], "0 < fdr < 1"),
])
def test_bad_de_requests_get_one_line(run, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(run)
    assert cli.main(["de", str(run / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_differential_expression_needs_a_library_scaled_likelihood():
    from test_single_cell import COUNTS, vae
    from pyro_vae import likelihoods

    model = vae(likelihoods.from_name("poisson"))
    with pytest.raises(InputError, match="library-scaled count likelihood"):
        differential.differential_expression(model, COUNTS, COUNTS)
