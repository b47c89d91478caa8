"""Single-cell data as it comes in AnnData ``.h5ad`` files (``.X`` or a layer, the batch from ``.obs``) and
continuous covariates beside the batch, through the conditional VAE's one conditioning mechanism."""

import json

import numpy as np
import pytest
import scipy.sparse
import torch

from pyro_vae import cells, cli, likelihoods
from pyro_vae.config import RunConfig
from pyro_vae.errors import InputError

from test_single_cell import COUNTS, vae

anndata = pytest.importorskip("anndata")  # the test extra installs it; pip install 'pyro-vae[anndata]'
pd = pytest.importorskip("pandas")

N, G = 40, 12


def write_h5ad(path, n=N, genes=G, seed=0, log_x=True):
    """An AnnData file: raw counts in the layer ``counts`` (and in ``.X`` unless ``log_x``: then ``.X`` holds
    log-normalised values, as after scanpy's preprocessing), ``.obs`` with a batch, a numeric covariate and a
    column with a missing value."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    counts = rng.poisson(np.where(kind[:, None] == np.arange(genes)[None] % 2, 8.0, 1.0) * rng.uniform(1, 3, (n, 1)))
    counts = scipy.sparse.csr_matrix(counts.astype(np.float32))
    x = counts.copy()
    if log_x:
        x = scipy.sparse.csr_matrix(np.log1p(counts.toarray() / counts.sum(1).A * 1e4))
    obs = pd.DataFrame({"sample": pd.Categorical([f"s{i % 2}" for i in range(n)]),
                        "pct_mito": rng.uniform(0, 10, n), "cell_type": [str(k) for k in kind],
                        "gappy": [None if i == 3 else "a" for i in range(n)]},
                       index=[f"CELL{i:03d}" for i in range(n)])
    var = pd.DataFrame(index=[f"Gene{g}" for g in range(genes)])
    adata = anndata.AnnData(X=x, obs=obs, var=var, layers={"counts": counts})
    adata.write_h5ad(path)
    return counts.toarray(), obs


def test_an_h5ad_file_is_read_with_its_layer_and_names(tmp_path):
    counts, obs = write_h5ad(tmp_path / "a.h5ad")
    got = cells.read_cells(tmp_path / "a.h5ad", layer="counts")
    assert scipy.sparse.issparse(got.x) and got.x.dtype == np.float32
    np.testing.assert_array_equal(got.x.toarray(), counts)
    assert got.names[:2] == ["CELL000", "CELL001"] and got.genes[-1] == f"Gene{G - 1}"
    assert list(got.obs.columns) == list(obs.columns)
    write_h5ad(tmp_path / "raw.h5ad", log_x=False)  # counts in .X
    np.testing.assert_array_equal(cells.read_cells(tmp_path / "raw.h5ad").x.toarray(), counts)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), r"\.X\) is not a count matrix.*\(not an integer.*name the raw counts with --layer \(counts\)"),  # .X holds log-normalised values
    (dict(layer="raw"), r"has no layer 'raw'; its layers are: counts"),
    (dict(layer="counts", transpose=True), "AnnData file, cells x genes already; drop --transpose"),
])
def test_an_h5ad_file_that_does_not_hold_counts_where_asked_gets_one_line(tmp_path, kwargs, message):
    write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=message):
        cells.read_cells(tmp_path / "a.h5ad", **kwargs)


def test_the_batch_and_covariates_come_from_obs_standardised_with_the_runs_numbers(tmp_path):
    counts, obs = write_h5ad(tmp_path / "a.h5ad")
    config = RunConfig(dataset="counts", data_file=str(tmp_path / "a.h5ad"), layer="counts", batch_key="sample",
                       covariate_keys=["pct_mito"], binarize="none")
    got = cells.read_cells(config.data_file, layer="counts")
    y = cells.conditioning(config, got)
    assert config.batch_names == ["s0", "s1"] and config.covariate_names == ["pct_mito"]
    assert y.shape == (N, 3) and y.dtype == torch.float32
    np.testing.assert_array_equal(y[:, :2].argmax(1).numpy(), np.arange(N) % 2)  # the batch one-hot first
    mito = obs["pct_mito"].to_numpy()
    np.testing.assert_allclose(y[:, 2].numpy(), (mito - mito.mean()) / mito.std(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cells.batch_index(config, y).numpy(), np.arange(N) % 2)
    # a saved run reads new cells with its own mean and spread, not theirs
    half = cells.Cells(got.x[:10], got.names[:10], got.genes, got.obs.iloc[:10], got.path)
    np.testing.assert_allclose(cells.conditioning(config, half)[:, 2].numpy(), y[:10, 2].numpy(), rtol=1e-6)
    moved = cells.as_batch(config, y, "s1")
    assert (moved[:, 1] == 1).all() and (moved[:, 0] == 0).all() and torch.equal(moved[:, 2], y[:, 2])


@pytest.mark.parametrize("settings, message", [
    (dict(batch_key="batch"), r"has no \.obs column 'batch'; its columns are: sample, pct_mito, cell_type, gappy"),
    (dict(batch_key="gappy"), r"\.obs\['gappy'\] has no value for 1 cells"),
    (dict(covariate_keys=["pct_mito", "cell_type"]), r"\.obs\['cell_type'\] is not numeric \(dtype category\)"),
])
def test_a_bad_obs_column_gets_one_line(tmp_path, settings, message):
    write_h5ad(tmp_path / "a.h5ad")
    config = RunConfig(dataset="counts", data_file=str(tmp_path / "a.h5ad"), layer="counts", binarize="none",
                       **settings)
    with pytest.raises(InputError, match=message):
        cells.conditioning(config, cells.read_cells(config.data_file, layer="counts"))


@pytest.mark.parametrize("settings, message", [
    (dict(batch_key="sample", data_file="x.mtx"), "--batch-key reads an AnnData .h5ad file; --data-file x.mtx is not"),
    (dict(layer="counts", data_file="x.npz"), "--layer reads an AnnData .h5ad file"),
    (dict(batch_key="sample", batch_file="b.txt"), "--batch-file and --batch-key both give the batch"),
    (dict(covariate_keys=["a"], covariate_file="c.csv"), "--covariate-file and --covariate-keys both"),
    (dict(covariate_file="c.csv", dataset="fashion-mnist", data_file=None),
     "--covariate-file describes the cells of a count matrix; use it with --dataset counts"),
])
def test_single_cell_settings_are_checked_once(settings, message):
    base = dict(dataset="counts", data_file="x.h5ad", binarize="none")
    with pytest.raises(InputError, match=message):
        RunConfig(**{**base, **settings}).validate()


@pytest.mark.parametrize("text, message", [
    ("age,dose\n1,2\n3,4\n", "holds 2 rows of covariates for 3 cells"),
    ("age,dose\n1,2\n3,x\n5,6\n", "row 2 of the covariates holds 'x'; each row needs 2 finite numbers"),
    ("age,dose\n1,2\n3,nan\n5,6\n", "row 2 of the covariates holds 'nan'"),
    ("age,dose\n1,2\n3\n5,6\n", "row 2 of the covariates holds '1 columns'"),
])
def test_a_bad_covariate_file_gets_one_line(tmp_path, text, message):
    (tmp_path / "c.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        cells.read_covariates(tmp_path / "c.csv", 3)
    (tmp_path / "ok.csv").write_text("1.5,2\n3,4\n5,6\n")  # no header: named c0, c1
    values, names = cells.read_covariates(tmp_path / "ok.csv", 3)
    assert names == ["c0", "c1"] and values.tolist() == [[1.5, 2], [3, 4], [5, 6]]


def test_a_continuous_covariate_changes_the_decoders_output_and_the_library_prior_reads_the_batch_alone():
    lik = likelihoods.from_name("nb:latent-library")
    lik.library_groups = 2  # two batches, then one continuous covariate
    model = vae(lik, condition=3)
    assert lik.library_loc.shape == (2,)
    y = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.0, 1.0, 2.0]])
    lik.library_prior_from(COUNTS, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(lik.library_prior(y, 3).loc, lik.library_loc[torch.tensor([0, 1, 1])])
    z = model.encode(COUNTS, y=y)
    low, high = y.clone(), y.clone()
    low[:, 2], high[:, 2] = -2.0, 2.0
    one = model._mean(model.decoder(model._decoded([z], model.conditioning(low, 3))), 1)
    other = model._mean(model.decoder(model._decoded([z], model.conditioning(high, 3))), 1)
    assert one.shape == other.shape == COUNTS.shape and not torch.allclose(one, other)
    model.model(COUNTS, y)  # sites run with the float conditioning


def test_the_command_line_trains_on_an_h5ad_file_with_batch_and_covariates_and_encodes_with_names(tmp_path, capsys):
    counts, obs = write_h5ad(tmp_path / "a.h5ad")
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--dataset", "counts", "--data-file", str(tmp_path / "a.h5ad"),
                     "--layer", "counts", "--batch-key", "sample", "--covariate-keys", "pct_mito",
                     "--likelihood", "nb:latent-library", "--epochs", "1", "--batch-size", "8", "--no-progress"]) == 0
    assert f"{N} cells x {G} genes" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["batch_names"] == ["s0", "s1"] and config["covariate_names"] == ["pct_mito"]
    train = torch.randperm(N, generator=torch.Generator().manual_seed(0 + 1))[N // 10:].numpy()  # seed 0's split
    assert config["covariate_mean"] == pytest.approx([obs["pct_mito"].to_numpy()[train].mean()])
    assert cli.main(["evaluate", str(run), "--iw-samples", "3", "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())["conditional_on"] == "the cells' batches and covariates"
    assert cli.main(["encode", str(run)]) == 0
    lines = (run / "latent.csv").read_text().splitlines()
    assert len(lines) == 1 + N and lines[1].startswith("CELL000,") and len(lines[1].split(",")) == 1 + 10
    assert cli.main(["encode", str(run), "--expression", "--as-batch", "s0", "--out", str(tmp_path / "e.csv")]) == 0
    header = (tmp_path / "e.csv").read_text().splitlines()[0]
    assert header == "name," + ",".join(f"Gene{g}" for g in range(G))  # the genes' names
    # another AnnData file (ten of the cells, genes in another order) is read with the run's layer, batch key,
    # covariate keys and standardisation, its genes put in the run's order: the same latent as the run's own
    adata = anndata.read_h5ad(tmp_path / "a.h5ad")
    adata[5:15, ::-1].copy().write_h5ad(tmp_path / "b.h5ad")
    assert cli.main(["encode", str(run), "--out", str(tmp_path / "own.npy")]) == 0
    assert cli.main(["encode", str(run), "--data-file", str(tmp_path / "b.h5ad"), "--out", str(tmp_path / "b.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), np.load(tmp_path / "own.npy")[5:15], rtol=1e-5, atol=1e-6)
    adata[:, 1:].copy().write_h5ad(tmp_path / "fewer.h5ad")
    assert cli.main(["encode", str(run), "--data-file", str(tmp_path / "fewer.h5ad")]) == 2
    assert "lacks 1 of the run's 12 genes (e.g. Gene0)" in capsys.readouterr().err
    # a plain matrix of the same cells, with a batch file and a covariate file beside it
    scipy.sparse.save_npz(tmp_path / "m.npz", scipy.sparse.csr_matrix(counts[5:15].astype(np.float32)))
    (tmp_path / "b.txt").write_text("".join(f"s{i % 2}\n" for i in range(5, 15)))
    (tmp_path / "c.csv").write_text("pct_mito\n" + "".join(f"{v!r}\n" for v in obs["pct_mito"][5:15]))
    assert cli.main(["encode", str(run), "--data-file", str(tmp_path / "m.npz"), "--batch-file",
                     str(tmp_path / "b.txt"), "--covariate-file", str(tmp_path / "c.csv"), "--out",
                     str(tmp_path / "m.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), np.load(tmp_path / "own.npy")[5:15], rtol=1e-5, atol=1e-6)
    assert cli.main(["encode", str(run), "--data-file", str(tmp_path / "m.npz"), "--batch-file",
                     str(tmp_path / "b.txt")]) == 2
    assert "the run reads each cell's covariates" in capsys.readouterr().err
    # differential expression between .obs groups, every cell decoded as batch s0 (its covariate kept)
    assert cli.main(["de", str(run), "--groupby", "cell_type", "--a", "0", "--b", "1", "--as-batch", "s0",
                     "--draws", "200"]) == 0
    table = (run / "de_0_vs_1.csv").read_text().splitlines()
    assert len(table) == 1 + G and {line.split(",")[0] for line in table[1:]} == {f"Gene{g}" for g in range(G)}
    assert cli.main(["de", str(run), "--groupby", "cell_type", "--a", "0", "--b", "1", "--draws", "200", "--out",
                     str(tmp_path / "own_batches.csv")]) == 0
    assert sorted(table) != sorted((tmp_path / "own_batches.csv").read_text().splitlines())  # as_y is read


def test_the_command_line_reads_a_covariate_file_beside_a_matrix_and_refuses_bad_obs_in_one_line(tmp_path, capsys):
    from test_single_cell import write_10x

    write_10x(tmp_path / "10x", cells=N, genes=G)
    (tmp_path / "cov.csv").write_text("depth\n" + "".join(f"{i % 7}\n" for i in range(N)))
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--dataset", "counts", "--data-file", str(tmp_path / "10x"),
                     "--batch-file", str(tmp_path / "batches.txt"), "--covariate-file", str(tmp_path / "cov.csv"),
                     "--epochs", "1", "--batch-size", "8", "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["covariate_names"] == ["depth"] and config["covariate_std"][0] > 0
    assert cli.main(["encode", str(run), "--data-file", str(tmp_path / "10x"), "--batch-file",
                     str(tmp_path / "batches.txt")]) == 2  # the run also read covariates
    assert "the run reads each cell's covariates: give" in capsys.readouterr().err
    write_h5ad(tmp_path / "a.h5ad")
    assert cli.main(["train", "--out", str(tmp_path / "r2"), "--dataset", "counts", "--data-file",
                     str(tmp_path / "a.h5ad"), "--layer", "counts", "--batch-key", "donor", "--epochs", "1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no .obs column 'donor'" in err and len(err.strip().splitlines()) == 1


def test_covariates_follow_their_cells_through_the_split_and_are_standardised_on_the_training_cells(tmp_path):
    from pyro_vae.train import load_labelled_splits

    counts, _ = write_h5ad(tmp_path / "a.h5ad", log_x=False)
    totals = counts.sum(1)
    (tmp_path / "c.csv").write_text("total\n" + "".join(f"{t}\n" for t in totals))
    config = RunConfig(dataset="counts", data_file=str(tmp_path / "a.h5ad"), covariate_file=str(tmp_path / "c.csv"),
                       binarize="none", val_size=8)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_labelled_splits(config, "cpu")
    mean, std = config.covariate_mean[0], config.covariate_std[0]
    for x, y in ((x_train, y_train), (x_val, y_val), (x_test, y_test)):
        sums = np.asarray(x.sum(1)).reshape(-1) if scipy.sparse.issparse(x) else x.sum(1).numpy()
        np.testing.assert_allclose(y[:, 0].numpy() * std + mean, sums, rtol=1e-5)
    train_sums = np.asarray(x_train.sum(1)).reshape(-1)
    assert mean == pytest.approx(train_sums.mean()) and std == pytest.approx(train_sums.std())  # not all cells'
    assert config.genes == [f"Gene{g}" for g in range(G)]


def test_a_covariate_file_with_cell_names_is_matched_by_name(tmp_path):
    (tmp_path / "c.csv").write_text(",age,dose\nB,3,4\nA,1,2\nZ,9,9\nC,5,6\n")  # pandas' to_csv, shuffled, extra
    values, names = cells.read_covariates(tmp_path / "c.csv", 3, ["A", "B", "C"])
    assert names == ["age", "dose"] and values.tolist() == [[1, 2], [3, 4], [5, 6]]
    with pytest.raises(InputError, match=r"no covariates for 1 of the 4 cells \(e.g. 'D'\)"):
        cells.read_covariates(tmp_path / "c.csv", 4, ["A", "B", "C", "D"])
    with pytest.raises(InputError, match="names its rows, but the cells have no names"):
        cells.read_covariates(tmp_path / "c.csv", 3)


def test_numbers_stored_as_categories_are_not_covariates_and_batch_labels_read_alike(tmp_path):
    _, obs = write_h5ad(tmp_path / "a.h5ad")
    adata = anndata.read_h5ad(tmp_path / "a.h5ad")
    adata.obs["leiden"] = pd.Categorical([str(i % 3) for i in range(N)])
    adata.obs["donor"] = [float(i % 2) for i in range(N)]
    adata.write_h5ad(tmp_path / "b.h5ad")
    config = RunConfig(dataset="counts", data_file=str(tmp_path / "b.h5ad"), layer="counts", binarize="none",
                       covariate_keys=["leiden"])
    got = cells.read_cells(config.data_file, layer="counts")
    with pytest.raises(InputError, match=r"\.obs\['leiden'\] is not numeric \(dtype category\)"):
        cells.conditioning(config, got)
    config = RunConfig(dataset="counts", data_file=str(tmp_path / "b.h5ad"), layer="counts", binarize="none",
                       batch_key="donor")
    cells.conditioning(config, got)
    assert config.batch_names == ["0", "1"]  # 0.0 and 1.0 read as 0 and 1, as an integer column's are


def test_repeated_gene_names_are_made_unique_as_scanpy_does():
    assert cells.unique_names(["A", "B", "A", "A", "A-1"]) == ["A", "B", "A-2", "A-3", "A-1"]



def test_reading_h5ad_without_anndata_says_how_to_install_it(tmp_path, monkeypatch):
    import builtins

    write_h5ad(tmp_path / "a.h5ad")
    real = builtins.__import__

    def no_anndata(name, *args, **kwargs):
        if name == "anndata":
            raise ImportError("No module named 'anndata'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_anndata)
    with pytest.raises(InputError, match=r"needs the anndata package: pip install 'pyro-vae\[anndata\]'"):
        cells.read_cells(tmp_path / "a.h5ad", layer="counts")


def test_an_h5ad_file_is_read_without_its_other_layers(tmp_path, monkeypatch):
    import anndata.io

    write_h5ad(tmp_path / "a.h5ad")
    read = []
    real = anndata.io.read_elem
    monkeypatch.setattr(anndata.io, "read_elem", lambda elem: read.append(elem.name) or real(elem))
    cells.read_cells(tmp_path / "a.h5ad", layer="counts")
    assert sorted(read) == ["/layers/counts", "/obs", "/var"]  # not /X: a large atlas is not held twice
