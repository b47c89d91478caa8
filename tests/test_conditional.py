"""The conditional VAE (``VAE(condition=K)``): p(x | z, y) p(z) and q(z | x, y) as plain Pyro functions."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_vae import VAE, evaluate, likelihoods, nets, posteriors, priors
from pyro_vae.errors import InputError

X_SHAPE, K = (1, 28, 28), 10


def cvae(latent=4, **kwargs):
    torch.manual_seed(0)
    dims = kwargs.get("latent_dims", [latent])
    reads = sum(dims) if kwargs.get("skip") else dims[-1]
    encoder, decoder = nets.build("mlp", X_SHAPE, reads + K, hidden=32)
    return VAE(encoder, decoder, kwargs.pop("latent_dims", [latent]), condition=K, **kwargs)


X = (torch.rand(6, *X_SHAPE, generator=torch.Generator().manual_seed(0)) < 0.5).float()
Y = torch.tensor([0, 3, 9, 3, 1, 0])


def test_sites_and_shapes_with_labels():
    vae = cvae()
    guide = poutine.trace(vae.guide).get_trace(X, Y)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(X, Y)
    assert guide.nodes["z0"]["value"].shape == (6, 4)
    assert model.nodes["x"]["value"].shape == (6, *X_SHAPE) and model.nodes["x"]["is_observed"]
    assert vae.posterior.in_features == 32 + K  # q(z | x, y): the encoder's features beside one-hot y
    assert set(n for n, s in model.nodes.items() if s["type"] == "sample") == {"data", "z0", "x"}  # y is data


def test_labels_and_their_one_hot_floats_are_the_same_conditioning():
    vae = cvae()
    pyro.set_rng_seed(1)
    a = Trace_ELBO().loss(vae.model, vae.guide, X, Y)
    pyro.set_rng_seed(1)
    b = Trace_ELBO().loss(vae.model, vae.guide, X, nn.functional.one_hot(Y, K).float())
    pyro.set_rng_seed(1)
    c = Trace_ELBO().loss(vae.model, vae.guide, X, (Y + 1) % K)
    assert a == b and a != c


@pytest.mark.parametrize("kwargs", [dict(latent_dims=[2, 3], guide="top-down"), dict(latent_dims=[2, 3]),
                                    dict(latent_dims=[2, 3], guide="top-down", skip=True),
                                    dict(prior=priors.VampPrior(5)), dict(prior=priors.MixtureOfGaussians(3)),
                                    dict(posterior=posteriors.iaf(1))])
def test_every_depth_guide_prior_and_posterior_family_takes_y(kwargs):
    vae = cvae(**kwargs)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    assert math.isfinite(elbo.loss(vae.model, vae.guide, X, Y))
    assert vae.sample(3, y=4).shape == (3, *X_SHAPE)
    assert vae.reconstruct(X, Y).shape == X.shape
    assert vae.resample_below(X, 0, 2, y=Y).shape == (6, 2, *X_SHAPE)
    summary = evaluate.evaluate(vae, X, iw_samples=3, elbo_samples=1, progress=False, seed=0, y=Y)
    assert math.isfinite(summary["iw_log_likelihood"]) and summary["n"] == 6


@pytest.mark.parametrize("y, message", [
    (None, r"this VAE is conditional \(condition=10\): pass y"),
    (torch.tensor([0, 1, 2, 3, 4, 10]), r"class labels must lie in 0\.\.9 \(condition=10\), got values in 0\.\.10"),
    (torch.tensor([0, 1, 2, 3, 4, -1]), r"got values in -1\.\.4"),
    (torch.ones(6, dtype=torch.bool), r"must be an integer tensor of shape \(6,\)"),
    (torch.zeros(5, dtype=torch.long), r"must be an integer tensor of shape \(6,\) .* of shape \(5,\)"),
    (torch.zeros(6, 3), r"a float y must have shape \(6, 10\)"),
    (torch.full((6, 10), math.nan), r"NaN or infinite"),
    ([0, 1, 2, 3, 4, 5], r"y must be a tensor"),
])
def test_bad_labels_get_one_clear_error(y, message):
    vae = cvae()
    with pytest.raises(InputError, match=message):
        Trace_ELBO().loss(vae.model, vae.guide, X, y)


def test_y_for_an_unconditional_vae_is_refused():
    encoder, decoder = nets.build("mlp", X_SHAPE, 4, hidden=16)
    vae = VAE(encoder, decoder, [4])
    with pytest.raises(InputError, match="without conditioning; build it with condition=K"):
        vae.sample(2, y=1)


# ------------------------------------------------------------------ exact check
D_X, D_Z, S = 5, 2, 0.4


class Features(nn.Module):
    out_features = D_X

    def forward(self, x):
        return x


class ExactPosterior(nn.Module):
    """q(z | x, y) = p(z | x, y) of the linear-Gaussian model below, from the features (x, one-hot y)."""

    def __init__(self, w, v, b):
        super().__init__()
        self.w, self.v, self.b = w, v, b
        self.cov = torch.linalg.inv(torch.eye(D_Z, dtype=torch.float64) + w.T @ w / S ** 2)

    def forward(self, h):
        x, y = h[..., :D_X], h[..., D_X:]
        loc = (x - y @ self.v.T - self.b) @ (self.cov @ self.w.T / S ** 2).T
        return dist.MultivariateNormal(loc, self.cov)


def test_a_conditional_linear_gaussian_vae_gives_the_exact_log_p_x_given_y():
    """z ~ N(0, I), x | z, y ~ N(W z + V onehot(y) + b, S^2 I): log p(x | y) = N(x; V y + b, W W^T + S^2 I).
    With the exact posterior as the guide, the ELBO and the IW estimate of every point equal it."""
    g = torch.Generator().manual_seed(0)
    w, v, b = (torch.randn(D_X, D_Z, generator=g, dtype=torch.float64),
               2 * torch.randn(D_X, K, generator=g, dtype=torch.float64), torch.randn(D_X, generator=g,
                                                                                    dtype=torch.float64))
    decoder = nn.Linear(D_Z + K, D_X).double()
    decoder.weight.data.copy_(torch.cat([w, v], 1))
    decoder.bias.data.copy_(b)
    vae = VAE(Features(), decoder, [D_Z], likelihood=likelihoods.Gaussian(S), x_shape=(D_X,), condition=K,
              posterior=ExactPosterior(w, v, b)).double()
    y = torch.randint(0, K, (40,), generator=g)
    x = (y_onehot := nn.functional.one_hot(y, K).double()) @ v.T + b + \
        torch.randn(40, D_X, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(w @ w.T + S ** 2 * torch.eye(
            D_X, dtype=torch.float64)).T
    exact = dist.MultivariateNormal(y_onehot @ v.T + b, w @ w.T + S ** 2 * torch.eye(D_X, dtype=torch.float64))
    exact = exact.log_prob(x)
    iw = evaluate.iw_log_likelihood(vae, x, num_samples=7, y=y)
    terms = evaluate.elbo_terms(vae, x, num_samples=3, y=y)
    torch.testing.assert_close(iw, exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(terms["elbo"], exact, rtol=0, atol=1e-8)
    wrong = evaluate.iw_log_likelihood(vae, x, num_samples=7, y=(y + 1) % K)
    assert (wrong < exact - 1).float().mean() > 0.9  # the label matters: another class explains x worse


def test_svi_learns_what_the_label_draws():
    """Two classes, each a fixed pattern with noise: after training, sample(y=k) looks like pattern k."""
    g = torch.Generator().manual_seed(0)
    patterns = (torch.rand(2, *X_SHAPE, generator=g) < 0.5).float()
    y = torch.randint(0, 2, (256,), generator=g)
    x = (patterns[y] - (torch.rand(256, *X_SHAPE, generator=g) < 0.05).float()).abs()
    torch.manual_seed(0)
    encoder, decoder = nets.build("mlp", X_SHAPE, 2 + 2, hidden=64)
    vae = VAE(encoder, decoder, [2], condition=2)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for step in range(300):
        i = torch.randint(0, 256, (64,), generator=g)
        svi.step(x[i], y[i])
    for k in (0, 1):
        drawn = vae.sample(16, y=k)
        errors = [(drawn - patterns[j]).abs().mean().item() for j in (0, 1)]
        assert errors[k] < 0.12 and errors[1 - k] > 0.3, (k, errors)  # the patterns differ in half the pixels
