"""Count data as single-cell analysts use it: library-size scaling, gene dispersion, a log1p encoder, batch
covariates through the conditioning mechanism, 10x folders on the command line, and ``pyro-vae encode``."""

import json
import os

import numpy as np
import pyro.distributions as dist
import pytest
import scipy.io
import scipy.sparse
import torch
from pyro import poutine
from torch import nn

from pyro_vae import VAE, cli, data, likelihoods, nets
from pyro_vae.config import RunConfig
from pyro_vae.errors import InputError

G, D = 6, 2
COUNTS = torch.tensor([[0., 3, 1, 0, 7, 2], [5, 0, 0, 1, 0, 9], [2, 2, 2, 2, 2, 2]])


def vae(likelihood, condition=0):
    torch.manual_seed(0)
    encoder = nets.Log1p(nets.MLPEncoder((G,), hidden=(8,)))
    decoder = nets.MLPDecoder(D + condition, (G,), hidden=(8,), out_channels=likelihood.channels)
    return VAE(encoder, decoder, [D], likelihood=likelihood, condition=condition)


@pytest.mark.parametrize("family", ["poisson", "nb", "zinb"])
def test_the_library_scales_the_proportions_and_the_likelihood_is_the_hand_written_one(family):
    lik = likelihoods.ScaledCounts(family)
    model = vae(lik)
    trace = poutine.trace(model.model).get_trace(COUNTS)
    x_site, z = trace.nodes["x"], trace.nodes["z0"]["value"]
    out = model.decoder(z)
    parts = out.chunk(lik.channels, -1)
    rho = torch.softmax(parts[0], -1)
    mean = COUNTS.sum(-1, keepdim=True) * rho  # library x proportions
    if family == "poisson":
        by_hand = dist.Poisson(mean).log_prob(COUNTS).sum(-1)
    else:
        r = torch.nn.functional.softplus(lik.raw_dispersion) + 1e-4
        assert lik.raw_dispersion.shape == (G,)  # one dispersion per gene
        nb = dict(total_count=r.expand_as(mean), logits=torch.log(mean) - torch.log(r))
        by_hand = (dist.ZeroInflatedNegativeBinomial(**nb, gate_logits=parts[1]) if family == "zinb"
                   else dist.NegativeBinomial(**nb)).log_prob(COUNTS).sum(-1)
    torch.testing.assert_close(x_site["fn"].log_prob(COUNTS), by_hand)
    torch.testing.assert_close(x_site["fn"].mean if family != "zinb" else lik.mean(out, 1, COUNTS.sum(-1, keepdim=True)),
                               mean if family != "zinb" else mean * torch.sigmoid(-parts[1]))
    assert torch.allclose(lik.proportions(out).sum(-1), torch.ones(3))


def test_a_per_cell_and_gene_dispersion_reads_the_decoder():
    lik = likelihoods.ScaledCounts("nb", dispersion="gene-cell")
    assert lik.channels == 2 and lik.raw_dispersion is None
    assert likelihoods.from_name("zinb:library-cell").channels == 3
    assert likelihoods.from_name("nb:library").channels == 1
    vae(lik).model(COUNTS)
    with pytest.raises(InputError, match="unknown likelihood"):
        likelihoods.from_name("poisson:library-cell")


def test_sampling_uses_the_default_library_and_counts_are_checked():
    model = vae(likelihoods.ScaledCounts("nb", library_size=500.0))
    assert model.sample(4).sum(-1).allclose(torch.full((4,), 500.0), rtol=1e-4)  # E[x] at a library of 500
    with pytest.raises(InputError, match="counts >= 0"):
        model.model(-COUNTS)
    with pytest.raises(InputError, match="whole-number counts"):
        model.model(COUNTS + 0.5)


def test_a_batch_covariate_changes_the_decoders_output_and_not_the_datas_shape():
    model = vae(likelihoods.ScaledCounts("nb"), condition=2)
    z = model.encode(COUNTS, y=torch.tensor([0, 1, 0]))
    assert z.shape == (3, D)
    one = model._mean(model.decoder(model._decoded([z], model.conditioning(0, 3))), 1)
    other = model._mean(model.decoder(model._decoded([z], model.conditioning(1, 3))), 1)
    assert one.shape == other.shape == COUNTS.shape and not torch.allclose(one, other)


def test_the_log1p_encoder_reads_log_one_plus_x():
    inner = nets.MLPEncoder((G,), hidden=(8,))
    wrapped = nets.Log1p(inner)
    assert wrapped.out_features == 8 and wrapped.x_shape == (G,)
    torch.testing.assert_close(wrapped(COUNTS), inner(torch.log1p(COUNTS)))


# ---------------------------------------------------------------- files and the command line
def write_10x(folder, cells=60, genes=12, seed=0, batches=True):
    """A small 10x folder (genes x cells ``matrix.mtx``, barcodes, features) and a batch file beside it."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, cells)
    counts = rng.poisson(np.where(kind[:, None] == np.arange(genes)[None] % 2, 8.0, 1.0) * rng.uniform(1, 3, (cells, 1)))
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.mmwrite(str(folder / "matrix.mtx"), scipy.sparse.coo_matrix(counts.T))
    (folder / "barcodes.tsv").write_text("".join(f"AAAC{i:04d}-1\n" for i in range(cells)))
    (folder / "features.tsv").write_text("".join(f"G{g}\tG{g}\tGene Expression\n" for g in range(genes)))
    if batches:
        (folder.parent / "batches.txt").write_text("".join(f"b{i % 2}\n" for i in range(cells)))
    return counts


def test_the_command_line_trains_counts_with_their_defaults_batches_and_encodes_every_cell(tmp_path, capsys,
                                                                                          monkeypatch):
    counts = write_10x(tmp_path / "10x")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--out", "run", "--dataset", "counts", "--data-file", "10x/matrix.mtx",
                     "--transpose", "--batch-file", "batches.txt", "--epochs", "2", "--batch-size", "16",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "60 cells x 12 genes" in printed and "nats/cell" in printed
    config = json.loads((run / "config.json").read_text())
    assert config["latent_dims"] == [10] and config["hidden"] == 128 and config["binarize"] == "none"
    assert config["likelihood"] == "nb:library" and config["count_input"] == "log1p"
    assert os.path.isabs(config["data_file"]) and os.path.isabs(config["batch_file"])  # evaluate from anywhere
    assert config["batch_names"] == ["b0", "b1"]
    monkeypatch.chdir(tmp_path / "10x")
    assert cli.main(["evaluate", str(run), "--iw-samples", "3", "--no-progress"]) == 0
    summary = json.loads((run / "eval.json").read_text())
    assert summary["conditional_on_library"] is True and "batches" in summary["conditional_on"]
    assert cli.main(["encode", str(run)]) == 0
    lines = (run / "latent.csv").read_text().splitlines()
    assert len(lines) == 1 + len(counts) and lines[1].startswith("AAAC0000-1,") and len(lines[1].split(",")) == 11
    assert cli.main(["encode", str(run), "--out", str(tmp_path / "z.npy")]) == 0
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (60, 10)
    np.testing.assert_allclose(z[0], [float(v) for v in lines[1].split(",")[1:]], rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "batches.txt").write_text("b0\n" * 59), "holds 59 labels for 60 cells"),
    (lambda root: (root / "batches.txt").unlink(), "label file .* does not exist"),
])
def test_bad_batch_files_get_one_line(tmp_path, capsys, change, message):
    write_10x(tmp_path / "10x")
    change(tmp_path)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--dataset", "counts", "--data-file",
                     str(tmp_path / "10x" / "matrix.mtx"), "--transpose", "--batch-file", str(tmp_path / "batches.txt"),
                     "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err


def test_a_10x_matrix_read_without_transpose_is_warned_about(tmp_path, capsys):
    write_10x(tmp_path / "10x", cells=30, genes=12)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--dataset", "counts", "--data-file",
                     str(tmp_path / "10x" / "matrix.mtx"), "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    assert "looks transposed (add --transpose" in capsys.readouterr().err


def test_a_count_run_from_before_the_log1p_input_keeps_its_raw_input():
    saved = RunConfig(dataset="counts", data_file="x.npz", binarize="none").to_dict()
    del saved["count_input"]
    assert RunConfig.from_checkpoint({"config": saved}, "old.pt").count_input == "raw"
    with pytest.raises(InputError, match="--batch-file describes the cells of a count matrix; use it with --dataset counts"):
        RunConfig(batch_file="b.txt").validate(device=False)


def test_a_10x_folder_is_read_as_cells_by_genes_and_a_missing_file_is_named(tmp_path, capsys):
    counts = write_10x(tmp_path / "10x", cells=40, genes=12, batches=False)
    m = data.read_counts(tmp_path / "10x")
    assert m.shape == (40, 12) and np.array_equal(m.toarray(), counts)
    with pytest.raises(InputError, match="drop --transpose"):
        data.read_counts(tmp_path / "10x", transpose=True)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--dataset", "counts", "--data-file",
                     str(tmp_path / "10x"), "--epochs", "1", "--batch-size", "8", "--no-progress"]) == 0
    assert "40 cells x 12 genes" in capsys.readouterr().out
    assert cli.main(["encode", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "latent.csv").read_text().splitlines()[1].startswith("AAAC0000-1,")
    (tmp_path / "10x" / "features.tsv").unlink()
    with pytest.raises(InputError, match="features.tsv\\(.gz\\) or genes.tsv\\(.gz\\) missing"):
        data.read_counts(tmp_path / "10x")


def test_batch_corrected_expression_decodes_every_cell_as_one_batch(tmp_path):
    write_10x(tmp_path / "10x", cells=40, genes=12)
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--dataset", "counts", "--data-file", str(tmp_path / "10x"),
                     "--batch-file", str(tmp_path / "batches.txt"), "--epochs", "1", "--batch-size", "8",
                     "--no-progress"]) == 0
    assert cli.main(["encode", str(run), "--expression", "--out", str(tmp_path / "own.npy")]) == 0
    for b in ("b0", "b1"):
        assert cli.main(["encode", str(run), "--expression", "--as-batch", b, "--out", str(tmp_path / f"{b}.npy")]) == 0
    own, b0, b1 = (np.load(tmp_path / f"{n}.npy") for n in ("own", "b0", "b1"))
    assert own.shape == b0.shape == (40, 12)
    np.testing.assert_allclose(own.sum(1), 1e4, rtol=1e-3)  # expression per 10 000 counts
    np.testing.assert_allclose(own[::2], b0[::2], rtol=1e-5)  # cells 0, 2, ... are batch b0 already
    np.testing.assert_allclose(own[1::2], b1[1::2], rtol=1e-5)
    assert not np.allclose(b0, b1)
    assert cli.main(["encode", str(run), "--expression", "--as-batch", "b9"]) == 2


def test_a_latent_library_is_a_site_in_model_and_guide_with_the_elbo_by_hand():
    lik = likelihoods.from_name("nb:latent-library")
    model = vae(lik, condition=2)
    y = torch.tensor([0, 1, 1])
    with pytest.raises(InputError, match="latent library's prior is not set"):
        model.model(COUNTS, y)
    lik.library_prior_from(COUNTS, y)
    assert lik.library_loc.tolist() == pytest.approx([float(COUNTS[0].sum().log()),
                                                      float(COUNTS[1:].sum(-1).log().mean())])
    guide = poutine.trace(model.guide).get_trace(COUNTS, y)
    trace = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(COUNTS, y)
    assert guide.nodes["l"]["value"].shape == (3,) and trace.nodes["l"]["fn"].batch_shape == (3,)
    torch.testing.assert_close(trace.nodes["l"]["fn"].loc, lik.library_loc[y])  # each cell's batch's prior
    out = model.decoder(model._decoded([guide.nodes["z0"]["value"]], model.conditioning(y, 3)))
    library = guide.nodes["l"]["value"].exp().unsqueeze(-1)
    torch.testing.assert_close(trace.nodes["x"]["fn"].mean, library * lik.proportions(out))  # l scales rho
    guide.compute_log_prob()
    trace.compute_log_prob()
    by_hand = sum(trace.nodes[n]["log_prob_sum"] for n in ("z0", "l", "x")) - \
        sum(guide.nodes[n]["log_prob_sum"] for n in ("z0", "l"))
    elbo = sum(s["log_prob_sum"] for s in trace.nodes.values() if s["type"] == "sample" and "log_prob_sum" in s) - \
        sum(s["log_prob_sum"] for s in guide.nodes.values() if s["type"] == "sample" and "log_prob_sum" in s)
    torch.testing.assert_close(elbo, by_hand)


def test_the_command_line_trains_a_latent_library_and_evaluates_log_p_x(tmp_path):
    write_10x(tmp_path / "10x", cells=40, genes=12)
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--dataset", "counts", "--data-file", str(tmp_path / "10x"),
                     "--batch-file", str(tmp_path / "batches.txt"), "--likelihood", "zinb:latent-library",
                     "--epochs", "2", "--batch-size", "8", "--no-progress"]) == 0
    assert cli.main(["evaluate", str(run), "--iw-samples", "4", "--no-progress"]) == 0
    summary = json.loads((run / "eval.json").read_text())
    assert "kl_l" in summary and "conditional_on_library" not in summary
    assert summary["iw_log_likelihood"] >= summary["elbo"] - 5.0


def test_count_data_defaults_sit_under_the_users_flags():
    config = RunConfig.with_defaults({"dataset": "counts", "data_file": "x.npz", "epochs": 7})
    assert (config.epochs, config.batch_size, config.latent_dims, config.likelihood) == (7, 128, [10], "nb:library")
    assert os.path.isabs(config.data_file)
    assert RunConfig.with_defaults({}).epochs == RunConfig().epochs  # images keep theirs


def test_the_command_line_never_densifies_the_whole_count_matrix(tmp_path, monkeypatch):
    """Training reads the matrix sparse and densifies a batch at a time (the held-out tenth once): the
    largest block ever densified is far below the 200 cells."""
    write_10x(tmp_path / "10x", cells=200, genes=12, batches=False)
    densified = []
    original = scipy.sparse.csr_matrix.toarray

    def recorded(self, *args, **kwargs):
        densified.append(self.shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(scipy.sparse.csr_matrix, "toarray", recorded)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--dataset", "counts", "--data-file",
                     str(tmp_path / "10x"), "--epochs", "2", "--batch-size", "16", "--no-progress"]) == 0
    assert densified and max(densified) <= 20, sorted(set(densified))  # batches of 16, the 20 test cells


def test_fit_takes_a_sparse_matrix_and_checks_its_values():
    from pyro_vae import fit

    m = scipy.sparse.csr_matrix(COUNTS.numpy())
    model = vae(likelihoods.ScaledCounts("nb"))
    history = fit(model, m, COUNTS, epochs=2, batch_size=2, progress=False, log=None)
    assert len(history) == 2 and "test_elbo" in history[-1]
    with pytest.raises(InputError, match="counts >= 0"):
        fit(model, scipy.sparse.csr_matrix(-COUNTS.numpy()), epochs=1, batch_size=2, progress=False, log=None)
