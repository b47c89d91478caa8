"""Likelihoods p(x | decoder output): each trains by SVI and evaluates, scores as a direct
computation says, sums to one where it is discrete, and refuses data outside its support."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_vae import VAE, InputError, evaluate, likelihoods, nets

X_SHAPE = (1, 28, 28)


def _data(name, n=64, shape=X_SHAPE):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, *shape, generator=g)
    if name == "bernoulli":
        return u.bernoulli(generator=g)
    if name == "beta":
        return u.clamp(1e-3, 1 - 1e-3)
    if name.startswith("dlogistic"):
        return (u * 255).round() / 255
    if name in ("poisson", "nb"):
        return (u * 5).round()
    if name == "zinb":
        return (u * 5).round() * (u > 0.3)
    return u


NAMES = ["bernoulli", "cbernoulli", "gaussian", "gaussian:learned", "gaussian:pixel", "laplace", "beta",
         "dlogistic", "dlogistic:3", "poisson", "nb", "zinb"]


@pytest.mark.parametrize("dims, guide", [([4], "bottom-up"), ([3, 4], "top-down")], ids=["one-level", "chain"])
@pytest.mark.parametrize("name", NAMES)
def test_every_likelihood_trains_samples_and_evaluates(name, dims, guide):
    pyro.set_rng_seed(0)
    lik = likelihoods.from_name(name)
    vae = VAE(*nets.build("mlp", X_SHAPE, dims[-1], out_channels=lik.channels, hidden=32), dims,
              likelihood=lik, guide=guide, hidden=16)
    x = _data(name)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), loss=Trace_ELBO())
    losses = [svi.step(x) for _ in range(30)]
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.02 * abs(sum(losses[:5])), (losses[:5], losses[-5:])
    assert vae.model(None, batch_size=3).shape == (3, *X_SHAPE)
    assert vae.sample(2).shape == (2, *X_SHAPE) and vae.reconstruct(x[:3]).shape == (3, *X_SHAPE)
    summary = evaluate.evaluate(vae, x[:8], iw_samples=5, elbo_samples=2, progress=False)
    assert math.isfinite(summary["iw_log_likelihood"])


@pytest.mark.parametrize("k", [1, 3])
def test_discretized_logistic_sums_to_one_over_the_256_values(k):
    torch.manual_seed(0)
    lik = likelihoods.DiscretizedLogistic(k)
    out = torch.randn(5, 3 * k, dtype=torch.float64) * 2  # 5 data points of one value each (x_shape (1,)), each its own mixture
    d = lik._dist(out, 1)
    assert d.batch_shape == (5, 1)
    values = torch.arange(256.0, dtype=torch.float64) / 255
    log_p = d.log_prob(values[:, None, None].expand(256, 5, 1)).squeeze(-1)  # (256, 5)
    assert torch.allclose(torch.logsumexp(log_p, 0), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    # k = 1: the mass of a middle bin is the logistic CDF difference
    if k == 1:
        loc, scale = torch.sigmoid(out[:, 1]), torch.exp(out[:, 2].clamp(min=-7))
        cdf = lambda t: torch.sigmoid((t - loc) / scale)  # noqa: E731
        x = torch.tensor(100 / 255, dtype=torch.float64)
        assert torch.allclose(log_p[100], torch.log(cdf(x + 0.5 / 255) - cdf(x - 0.5 / 255)), atol=1e-9)
        # the end bins take the tails, exactly even far out in them
        logsigmoid = torch.nn.functional.logsigmoid
        assert torch.allclose(log_p[0], logsigmoid((0.5 / 255 - loc) / scale), atol=1e-9)
        assert torch.allclose(log_p[255], logsigmoid(-(1 - 0.5 / 255 - loc) / scale), atol=1e-9)
    samples = d.sample((1000,))
    assert torch.allclose(samples * 255, (samples * 255).round()) and samples.min() >= 0 and samples.max() <= 1


def test_count_likelihoods_score_as_their_torch_distributions():
    torch.manual_seed(0)
    out = torch.randn(4, 3 * 6)
    x = torch.poisson(torch.full((4, 6), 2.0))
    softplus = nn.functional.softplus
    nb, zinb, poisson = likelihoods.NegativeBinomial(), likelihoods.ZeroInflatedNegativeBinomial(), likelihoods.Poisson()
    logits, raw, gate = out.chunk(3, -1)
    r = softplus(raw) + 1e-4
    expected_nb = torch.distributions.NegativeBinomial(r, logits=logits).log_prob(x).sum(-1)
    assert torch.allclose(nb(out[:, :12].reshape(4, 12), 1).log_prob(x),
                          torch.distributions.NegativeBinomial(softplus(out[:, 6:12]) + 1e-4,
                                                               logits=out[:, :6]).log_prob(x).sum(-1))
    nb_part = torch.distributions.NegativeBinomial(r, logits=logits).log_prob(x)
    pi = torch.sigmoid(gate)
    zinb_expected = torch.where(x == 0, torch.log(pi + (1 - pi) * nb_part.exp()), torch.log1p(-pi) + nb_part)
    assert torch.allclose(zinb(out, 1).log_prob(x), zinb_expected.sum(-1), atol=1e-5)
    assert torch.allclose(poisson(out[:, :6], 1).log_prob(x),
                          torch.distributions.Poisson(softplus(out[:, :6]) + 1e-6).log_prob(x).sum(-1))
    assert expected_nb.shape == (4,)


def test_channels_split_along_the_datas_first_dim_for_vector_data():
    """Count data of shape (D,): the decoder's 2*D outputs are split into logits and dispersion."""
    lik = likelihoods.NegativeBinomial()
    vae = VAE(*nets.build("mlp", (20,), 3, out_channels=lik.channels, hidden=16), [3], likelihood=lik)
    assert "event_dims" not in vars(lik)  # the VAE leaves the likelihood as it was given
    out = vae.decoder(torch.randn(7, 3))
    assert out.shape == (7, 40)
    d = lik(out, 1)
    assert d.batch_shape == (7,) and d.event_shape == (20,)
    assert torch.equal(d.base_dist.logits, out[:, :20])


@pytest.mark.parametrize("name, bad, message", [
    ("bernoulli", lambda x: x * 2, r"Bernoulli likelihood needs data in \[0, 1\]"),
    ("cbernoulli", lambda x: x - 0.5, r"ContinuousBernoulli likelihood needs data in \[0, 1\]; got \d+ values outside"),
    ("beta", lambda x: x.round(), r"Beta likelihood needs data in \(0, 1\).*x\.clamp\(1e-3, 1 - 1e-3\)"),
    ("dlogistic", lambda x: x * 0.5 + 0.1 / 255, r"needs values on the grid i/255.*divided by 255"),
    ("poisson", lambda x: -x, r"Poisson likelihood needs counts >= 0; got \d+ negative values.*raw counts"),
    ("poisson", lambda x: x + 0.5, r"Poisson likelihood needs whole-number counts; got \d+ non-integers"),
    ("nb", lambda x: x * 0.3, r"NegativeBinomial likelihood needs whole-number counts"),
    ("zinb", lambda x: x - 1, r"ZeroInflatedNegativeBinomial likelihood needs counts >= 0"),
])
def test_bad_data_for_each_likelihood_gets_a_clear_error(name, bad, message):
    lik = likelihoods.from_name(name)
    vae = VAE(*nets.build("mlp", X_SHAPE, 4, out_channels=lik.channels, hidden=16), [4], likelihood=lik)
    x = _data(name, n=8)
    vae.check_data(x)  # the good data pass
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())
    with pytest.raises(InputError, match=message):
        svi.step(bad(x))


def test_a_users_own_likelihood_plugs_in():
    def student_t(out):
        return dist.StudentT(3.0, out, 0.2)

    x = _data("gaussian", n=32)
    pyro.set_rng_seed(0)
    vae = VAE(*nets.build("mlp", X_SHAPE, 4, hidden=32), [4], likelihood=student_t)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), loss=Trace_ELBO())
    losses = [svi.step(x) for _ in range(30)]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert math.isfinite(evaluate.evaluate(vae, x[:8], iw_samples=5, progress=False)["iw_log_likelihood"])
    assert vae.reconstruct(x[:2]).shape == (2, *X_SHAPE)
    with pytest.raises(InputError, match="must return a Pyro distribution, got int"):
        VAE(*nets.build("mlp", X_SHAPE, 4, hidden=8), [4], likelihood=lambda out: 3).model(x[:2])
    with pytest.raises(InputError, match=r"pass e\.g\. likelihoods\.Bernoulli\(\)"):
        VAE(*nets.build("mlp", X_SHAPE, 4, hidden=8), [4], likelihood=3)


def test_likelihoods_by_name():
    assert likelihoods.from_name("gaussian:pixel", 0.3).channels == 2
    assert likelihoods.from_name("gaussian", 0.3).scale == 0.3
    assert likelihoods.from_name("dlogistic:5").channels == 15
    assert likelihoods.from_name("zinb").channels == 3
    for bad in ("gamma", "gaussian:wide", "dlogistic:x", "nb:2"):
        with pytest.raises(InputError, match="unknown likelihood"):
            likelihoods.from_name(bad)
