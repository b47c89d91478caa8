"""M2 (Kingma et al. 2014): the label y as a Pyro site, observed where given, summed out by TraceEnum_ELBO
where not (``VAE(condition=K, label_site=True)``)."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from torch import nn

from distributed_common import noise_free
from pyro_vae import VAE, evaluate, nets
from pyro_vae.errors import InputError

D_X, K = 12, 3
X = (torch.rand(5, D_X, generator=torch.Generator().manual_seed(0)) < 0.5).float()


def m2(enumerate="parallel", latent=2):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(D_X, 16), nn.Softplus())
    decoder = nn.Sequential(nn.Linear(latent + K, 16), nn.Softplus(), nn.Linear(16, D_X))
    return VAE(encoder, decoder, [latent], x_shape=(D_X,), condition=K, label_site=True, enumerate=enumerate,
               hidden=16)


def test_the_enumerated_elbo_is_the_sum_over_classes_by_hand():
    """Noise-free z (each Normal's rsample is its mean): TraceEnum_ELBO's loss on unlabelled x equals
    sum_y q(y | x) [loss with y observed] + sum_y q(y | x) log q(y | x), summed over the data points."""
    vae = m2()
    with noise_free():
        enumerated = TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, X)
        q = vae.classify(X)  # (B, K)
        by_class = torch.stack([torch.tensor([Trace_ELBO().loss(vae.model, vae.guide, X[i:i + 1],
                                                                torch.tensor([k])) for i in range(len(X))])
                                for k in range(K)], 1)  # (B, K): -log p(x, y=k, z) + log q(z | x, y=k)
    by_hand = float((q * by_class).sum() + (q * q.log()).sum())
    assert enumerated == pytest.approx(by_hand, rel=1e-5)


def test_parallel_and_sequential_enumeration_agree():
    with noise_free():
        parallel = TraceEnum_ELBO(max_plate_nesting=1).loss(m2("parallel").model, m2("parallel").guide, X)
        vae = m2("sequential")
        sequential = TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, X)
    assert parallel == pytest.approx(sequential, rel=1e-6)


def test_a_sampled_label_agrees_with_the_sum_in_expectation():
    vae = m2()
    with noise_free():
        enumerated = TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, X)
        pyro.set_rng_seed(0)
        draws = torch.tensor([Trace_ELBO().loss(vae.model, vae.guide, X) for _ in range(1000)])
    error = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - enumerated) < 4 * error, (float(draws.mean()), enumerated, float(error))


def test_labelled_unlabelled_and_the_auxiliary_classifier_train():
    """Pyro's ss_vae_M2 loop: a labelled step, an unlabelled (enumerated) step, and alpha log q(y | x)."""
    g = torch.Generator().manual_seed(1)
    prototypes = (torch.rand(K, D_X, generator=g) < 0.5).float()
    y = torch.randint(0, K, (120,), generator=g)
    x = (prototypes[y] - (torch.rand(120, D_X, generator=g) < 0.05).float()).abs()
    vae = m2()
    optim = pyro.optim.Adam({"lr": 1e-2})
    supervised = SVI(vae.model, vae.guide, optim, Trace_ELBO())
    unsupervised = SVI(vae.model, vae.guide, optim, TraceEnum_ELBO(max_plate_nesting=1))
    aux = SVI(vae.model_classify, vae.guide_classify, optim, Trace_ELBO())
    before = (vae.classify(x).argmax(-1) == y).float().mean()
    for step in range(150):
        supervised.step(x[:12], y[:12])  # 12 labels
        unsupervised.step(x[12:])
        aux.step(x[:12], y[:12], weight=10.0)
    accuracy = (vae.classify(x[12:]).argmax(-1) == y[12:]).float().mean()
    assert accuracy > 0.9 > before, (float(before), float(accuracy))


def test_the_iw_estimate_sums_the_label_out():
    vae = m2()
    per_class = torch.stack([evaluate.iw_log_likelihood(vae, X, 20, seed=0, y=torch.full((5,), k))
                             for k in range(K)])
    marginal = evaluate.iw_log_likelihood(vae, X, 20, seed=0)
    torch.testing.assert_close(marginal, torch.logsumexp(per_class, 0))
    assert (marginal > per_class.max(0).values).all()


def test_bad_m2_settings_and_labels_are_refused():
    encoder, decoder = nets.build("mlp", (1, 28, 28), 4, hidden=8)
    with pytest.raises(InputError, match="label_site=True makes the label y a site"):
        VAE(encoder, decoder, [4], label_site=True)
    with pytest.raises(InputError, match="enumerate must be 'parallel' or 'sequential'"):
        VAE(encoder, decoder, [4], condition=2, label_site=True, enumerate="exact")
    vae = m2()
    with pytest.raises(InputError, match="pass integer labels"):
        Trace_ELBO().loss(vae.model, vae.guide, X, torch.zeros(5, K))
    with pytest.raises(InputError, match=r"class labels must lie in 0\.\.2"):
        Trace_ELBO().loss(vae.model, vae.guide, X, torch.full((5,), 3))


def test_evaluate_reports_accuracy_and_log_p_x_with_the_label_summed_out():
    vae = m2()
    y = torch.tensor([0, 1, 2, 0, 1])
    summary = evaluate.evaluate(vae, X, iw_samples=20, elbo_samples=2, progress=False, seed=0, y=y)
    assert summary["accuracy"] == pytest.approx(float((vae.classify(X).argmax(-1) == y).float().mean()))
    vae.eval()
    assert summary["iw_log_likelihood"] == pytest.approx(float(evaluate.iw_log_likelihood(vae, X, 20, seed=0).mean()))
    assert "kl_y" in summary and summary["kl_y"] >= 0  # q(y | x) against the uniform prior
