"""A discrete latent level above z0 (``priors.PerClassGaussian``, the Gaussian-mixture VAE): y ~ Cat, z0 ~ N(mu_y,
sigma_y), x ~ p(x | z0); the guide's q(y | x) enumerated by TraceEnum_ELBO."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch import nn

from distributed_common import noise_free
from pyro_vae import VAE, evaluate, fit, priors
from pyro_vae.errors import InputError

D_X, K, D = 12, 3, 2
Y = torch.arange(30) % K
X = (torch.rand(30, D_X, generator=torch.Generator().manual_seed(0))
     < 0.1 + 0.8 * (Y[:, None] == torch.arange(D_X)[None] % K)).float()


def gmvae(levels=(D,), guide="bottom-up", seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(D_X, 16), nn.Softplus())
    decoder = nn.Sequential(nn.Linear(levels[-1], 16), nn.Softplus(), nn.Linear(16, D_X))
    return VAE(encoder, decoder, list(levels), x_shape=(D_X,), condition=K, label_site=True,
               prior=priors.PerClassGaussian(K), hidden=16, guide=guide)


def test_sites_the_prior_reads_the_label_and_the_decoder_does_not():
    vae = gmvae()
    assert vae.label_in_prior
    tr = poutine.trace(vae.model).get_trace(X[:4], Y[:4])
    z0 = tr.nodes["z0"]["fn"]
    assert torch.allclose(z0.base_dist.loc, vae.prior.locs[Y[:4]])  # p(z0 | y) = N(mu_y, sigma_y)
    sites = [n for n, site in tr.nodes.items() if site["type"] == "sample"]
    assert sites == ["data", "y", "z0", "x"] and tr.nodes["y"]["is_observed"]
    assert vae.decoder[0].in_features == D  # z0 alone


def test_the_enumerated_elbo_is_the_sum_over_the_discrete_level_by_hand():
    vae = gmvae()
    with noise_free():
        enumerated = TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, X[:6])
        q = vae.classify(X[:6])
        by_class = torch.stack([torch.tensor([Trace_ELBO().loss(vae.model, vae.guide, X[i:i + 1], torch.tensor([k]))
                                              for i in range(6)]) for k in range(K)], 1)
    assert enumerated == pytest.approx(float((q * by_class).sum() + (q * q.log()).sum()), rel=1e-5)


def test_the_iw_estimate_sums_the_discrete_level_out():
    vae = gmvae()
    pyro.set_rng_seed(0)
    marginal = evaluate.iw_log_likelihood(vae, X[:5], num_samples=4000, seed=0)
    per_class = torch.stack([evaluate.iw_log_likelihood(vae, X[:5], num_samples=4000, seed=0,
                                                        y=torch.full((5,), k)) for k in range(K)])
    assert torch.allclose(marginal, per_class.logsumexp(0), atol=0.05)


def test_it_clusters_unlabelled_data_and_samples_per_class():
    """No labels at all: q(y | x) groups three kinds of points. A GMVAE can merge two clusters in a local
    optimum (a known trait of the model), so the better of two seeded restarts must cluster well."""
    y = torch.arange(60) % K
    x = (torch.rand(60, D_X, generator=torch.Generator().manual_seed(0))
         < 0.05 + 0.9 * (y[:, None] == torch.arange(D_X)[None] % K)).float()
    scores = []
    for seed in range(2):
        vae = gmvae(seed=seed)
        fit(vae, x, epochs=40, batch_size=20, lr=1e-2, progress=False, log=None, seed=seed)
        scores.append(evaluate.cluster_accuracy(evaluate.predicted_classes(vae, x), y))
    assert max(scores) >= 0.9, scores
    assert vae.sample(4, y=1).shape == (4, D_X)
    assert vae.sample(5).shape == (5, D_X)  # the label from its prior


def test_a_chain_below_the_discrete_level_and_the_top_down_guide():
    vae = gmvae(levels=(D, 3), guide="top-down")
    fit(vae, X, epochs=1, batch_size=10, progress=False, log=None)
    assert vae.sample(3, y=0).shape == (3, D_X)


def test_cluster_accuracy_maps_each_cluster_to_its_most_frequent_class():
    assert evaluate.cluster_accuracy(torch.tensor([2, 2, 0, 0, 1]), torch.tensor([1, 1, 0, 2, 2])) == 0.8


def test_a_per_class_prior_without_a_label_site_is_refused():
    with pytest.raises(InputError, match="PerClassGaussian\\(3\\) is p\\(z0 \\| y\\)"):
        VAE(nn.Sequential(nn.Linear(D_X, 16)), nn.Linear(D, D_X), [D], x_shape=(D_X,), prior=priors.PerClassGaussian(K))
    with pytest.raises(InputError, match="needs k >= 2 classes"):
        priors.PerClassGaussian(1)


def test_the_command_line_trains_a_gmvae_and_evaluate_scores_its_clusters(idx_dir, tmp_path):
    import json

    from pyro_vae import cli

    out = tmp_path / "gmvae"
    assert cli.main(["train", "--data-dir", str(idx_dir), "--out", str(out), "--epochs", "1", "--prior", "gmvae:4",
                     "--batch-size", "64", "--latent-dims", "3", "--hidden", "32", "--no-progress"]) == 0
    assert cli.main(["evaluate", str(out), "--iw-samples", "2", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert 0.0 < summary["cluster_accuracy"] <= 1.0 and "accuracy" not in summary
    assert cli.main(["train", "--data-dir", str(idx_dir), "--out", str(tmp_path / "bad"), "--prior", "gmvae:4",
                     "--labels", "40", "--no-progress"]) == 2
