"""The model and guide: sites, shapes, every ELBO, β, standalone and Predictive use."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from pyro.poutine.util import site_is_subsample

from pyro_vae import VAE, InputError, likelihoods, nets
from conftest import ELBOS, check_svi_lowers_the_loss

X_SHAPE = (1, 28, 28)


def make_vae(arch="mlp", likelihood="bernoulli", latent=4, beta=1.0):
    lik = likelihoods.Gaussian(0.5) if likelihood == "gaussian" else likelihoods.Bernoulli()
    enc, dec = nets.build(arch, X_SHAPE, latent, out_channels=lik.channels, hidden=64)
    return VAE(enc, dec, [latent], likelihood=lik, beta=beta)


def sample_sites(trace):
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


@pytest.mark.parametrize("arch", ["mlp", "conv", "gated", "gated-conv"])
def test_trace_has_exactly_the_documented_sites(arch, images):
    vae = make_vae(arch, latent=5)
    x = images[:7]
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    g, m = sample_sites(guide_tr), sample_sites(model_tr)
    assert set(g) == {"z0"}
    assert set(m) == {"z0", "x"}
    assert g["z0"]["value"].shape == (7, 5) and g["z0"]["fn"].event_shape == (5,)
    assert m["z0"]["fn"].batch_shape == (7,) and m["z0"]["fn"].event_shape == (5,)
    assert m["x"]["is_observed"] and m["x"]["value"] is x
    assert m["x"]["fn"].batch_shape == (7,) and m["x"]["fn"].event_shape == X_SHAPE
    for site in (g["z0"], m["z0"], m["x"]):
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
        assert site["cond_indep_stack"][0].dim == -1
    # the networks are registered with pyro.module
    assert any(name.startswith(f"{vae.name}$$$encoder") for name in pyro.get_param_store().keys())
    assert any(name.startswith(f"{vae.name}$$$decoder") for name in pyro.get_param_store().keys())


def test_model_runs_alone_and_under_predictive(images):
    vae = make_vae()
    x = vae.model(None, batch_size=6)
    assert x.shape == (6, *X_SHAPE) and set(x.unique().tolist()) <= {0.0, 1.0}
    prior_draws = Predictive(vae.model, num_samples=3)(None, 6)
    assert prior_draws["z0"].shape == (3, 6, 4) and prior_draws["x"].shape == (3, 6, *X_SHAPE)
    posterior = Predictive(vae.model, guide=vae.guide, num_samples=3, return_sites=["z0"])(images[:6])
    assert posterior["z0"].shape == (3, 6, 4)
    assert vae.sample(5).shape == (5, *X_SHAPE)
    recon = vae.reconstruct(images[:5])
    assert recon.shape == (5, *X_SHAPE) and recon.min() >= 0 and recon.max() <= 1


@pytest.mark.parametrize("elbo", list(ELBOS))
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("arch", ["mlp", "conv", "gated"])
def test_svi_lowers_the_loss(arch, likelihood, elbo, images):
    pyro.set_rng_seed(1)
    vae = make_vae(arch, likelihood)
    check_svi_lowers_the_loss(vae, elbo, images[:64])


def test_beta_scales_the_kl_term_in_model_and_guide(images):
    """With analytic KL, loss(β) = -E log p(x|z) + β KL for the same draw of z."""
    x = images[:16]
    vae = make_vae(latent=3)
    losses = {}
    for beta in (0.25, 0.5, 1.0):
        vae.beta = beta
        pyro.set_rng_seed(7)
        losses[beta] = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    kl = (losses[1.0] - losses[0.5]) / 0.5
    reconstruction = losses[1.0] - kl
    assert kl > 0
    assert losses[0.25] == pytest.approx(reconstruction + 0.25 * kl, rel=1e-5)
    # both sites carry the scale
    vae.beta = 0.25
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z0"]["scale"] == 0.25 and model_tr.nodes["z0"]["scale"] == 0.25
    assert model_tr.nodes["x"]["scale"] == 1.0


def test_gaussian_log_likelihood_is_scaled_squared_error():
    lik = likelihoods.Gaussian(scale=2 ** -0.5)
    x, mu = torch.rand(3, 10), torch.rand(3, 10)
    log_p = lik(mu, 1).log_prob(x)
    sse = ((x - mu) ** 2).sum(-1)
    assert torch.allclose(-log_p, sse + 0.5 * 10 * torch.log(torch.tensor(torch.pi)), atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (lambda x: x.clone().index_fill_(0, torch.tensor([0]), float("nan")), "NaN"),
    (lambda x: x * 2, "[0, 1]"),
    (lambda x: x[:, :, :20], "shape"),
    (lambda x: (x * 255).long(), "floating-point"),
])
def test_bad_data_gets_a_clear_error(bad, message, images):
    vae = make_vae()
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        svi.step(bad(images[:8]))


def test_bad_construction_gets_a_clear_error():
    with pytest.raises(InputError, match="latent_dims"):
        VAE(nets.MLPEncoder(X_SHAPE), nets.MLPDecoder(4, X_SHAPE), [0])
    with pytest.raises(InputError, match="pass x_shape=.*out_features"):  # no x_shape anywhere: truly unknown
        VAE(torch.nn.Flatten(), torch.nn.Linear(4, 784), [4])
    with pytest.raises(InputError, match="multiples of 4"):
        nets.ConvEncoder((1, 30, 30))
    with pytest.raises(InputError, match="unknown arch"):
        nets.build("resnet", X_SHAPE, 4)
    with pytest.raises(InputError, match="unknown likelihood"):
        likelihoods.build("gamma")
    with pytest.raises(InputError, match="scale"):
        likelihoods.Gaussian(scale=0.0)
    with pytest.raises(InputError, match="beta"):
        VAE(nets.MLPEncoder(X_SHAPE), nets.MLPDecoder(4, X_SHAPE), [4], beta=0.0)


def test_an_encoder_without_out_features_is_measured_by_one_dry_run():
    """The issue's example: a user's nn.Sequential, as it is."""
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Softplus(), torch.nn.Linear(64, 20))
    encoder = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Softplus())
    vae = VAE(encoder, decoder, [4], x_shape=(20,))
    assert vae.posterior.in_features == 64
    x = (torch.rand(8, 20) < 0.5).float()
    assert math.isfinite(Trace_ELBO().loss(vae.model, vae.guide, x))
    # images through a conv stack with a lazy head, and a top-down chain (whose ladder needs the width too)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.LazyLinear(24), torch.nn.Softplus())
    chain = VAE(conv, nets.MLPDecoder(6, X_SHAPE), [3, 6], guide="top-down")
    assert chain.ladder[0][0].in_features == 24
    x = (torch.rand(5, *X_SHAPE) < 0.5).float()
    assert math.isfinite(Trace_ELBO().loss(chain.model, chain.guide, x))
    bn = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.BatchNorm1d(8))
    VAE(bn, decoder, [4], x_shape=(20,))
    assert torch.equal(bn[1].running_mean, torch.zeros(8)) and bn.training  # the dry run changed nothing


@pytest.mark.parametrize("encoder, message", [
    (torch.nn.Identity(), r"maps data \(2, 1, 28, 28\) to \(2, 1, 28, 28\), not features \(batch, F\)"),
    (torch.nn.Sequential(torch.nn.Linear(20, 8)), r"the encoder failed on a batch of data of shape \(2, 1, 28, 28\)"),
])
def test_an_encoder_that_does_not_make_features_is_refused(encoder, message):
    with pytest.raises(InputError, match=message):
        VAE(encoder, nets.MLPDecoder(4, X_SHAPE), [4])


def test_a_users_own_networks_plug_in(images):
    class Encoder(torch.nn.Module):
        out_features = 32

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(-3), torch.nn.Linear(784, 32), torch.nn.Tanh())

        def forward(self, x):
            return self.net(x)

    decoder = torch.nn.Sequential(torch.nn.Linear(2, 784), torch.nn.Unflatten(-1, X_SHAPE))
    vae = VAE(Encoder(), decoder, [2], x_shape=X_SHAPE)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), loss=Trace_ELBO())
    losses = [svi.step(images[:32]) for _ in range(30)]
    assert losses[-1] < losses[0]
    assert vae.sample(3).shape == (3, *X_SHAPE)
