"""Evaluation against a closed form: a linear decoder with a Gaussian likelihood.

z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D)  =>  x ~ N(b, W W^T + s^2 I_D).
With orthogonal columns in W the exact posterior is diagonal:
Sigma = (I + W^T W / s^2)^-1 (diagonal), mean = Sigma W^T (x - b) / s^2,
so a linear encoder with the DiagonalGaussian head can represent it exactly.
"""

import math

import pytest
import torch
from torch import nn

from pyro_vae import VAE, InputError, evaluate, likelihoods, nets
from pyro_vae.posteriors import DiagonalGaussian

D, d, S = 6, 3, 0.5


class Identity(nn.Module):
    out_features = D

    def forward(self, x):
        return x


def linear_gaussian_vae(exact_guide=True):
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, d, dtype=torch.float64))
    w = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64) * 0.3
    decoder = nn.Linear(d, D).double()
    decoder.weight.data.copy_(w)
    decoder.bias.data.copy_(b)
    sigma = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + w.T @ w / S ** 2)
    head = DiagonalGaussian(D, d).double()
    gain = sigma @ w.T / S ** 2
    scale = sigma.diagonal().sqrt()
    if not exact_guide:  # a wrong mean and a too-wide scale: the IW estimate must fix it as K grows
        gain, scale = gain * 0.7, scale * 1.6
    head.mean_head.weight.data.copy_(gain)
    head.mean_head.bias.data.copy_(-gain @ b)
    head.scale_head.weight.data.zero_()
    head.scale_head.bias.data.copy_(torch.log(torch.expm1(scale - head.min_scale)))
    vae = VAE(Identity(), decoder, [d], likelihood=likelihoods.Gaussian(S), posterior=head, x_shape=(D,))
    vae.double()
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + S ** 2 * torch.eye(D, dtype=torch.float64))
    return vae, marginal


def test_exact_guide_gives_the_exact_marginal():
    vae, marginal = linear_gaussian_vae(exact_guide=True)
    x = marginal.sample((40,))
    exact = marginal.log_prob(x)
    # with the exact posterior every importance weight equals p(x): any K, any chunking
    iw = evaluate.iw_log_likelihood(vae, x, num_samples=50, batch_size=16, max_rows=70)
    assert torch.allclose(iw, exact, atol=1e-8)
    terms = evaluate.elbo_terms(vae, x, num_samples=5)
    assert torch.allclose(terms["elbo"], exact, atol=1e-8)
    assert torch.allclose(terms["elbo"], terms["reconstruction"] - terms["kl"])
    assert torch.equal(terms["kl"], terms["kl_z0"])


def test_iw_estimate_rises_to_log_px_as_k_grows():
    vae, marginal = linear_gaussian_vae(exact_guide=False)
    torch.manual_seed(1)
    x = marginal.sample((200,))
    exact = marginal.log_prob(x).mean().item()
    elbo = evaluate.elbo_terms(vae, x, num_samples=200)["elbo"].mean().item()
    estimates = {k: evaluate.iw_log_likelihood(vae, x, num_samples=k).mean().item() for k in (1, 10, 100, 5000)}
    assert elbo < estimates[10] < estimates[100] < estimates[5000]
    assert estimates[1] == pytest.approx(elbo, abs=0.5)  # K=1 is an unbiased ELBO estimate
    gap_elbo, gap_5000 = exact - elbo, exact - estimates[5000]
    assert gap_elbo > 1.0  # the guide is really wrong
    assert abs(gap_5000) < 0.03  # and K=5000 closes the gap (measured: 0.003 of a 1.9-nat gap)
    assert estimates[5000] < exact + 0.02  # never above log p(x) by more than Monte Carlo noise


def test_iw_is_per_data_point_not_per_batch():
    """A batch of duplicates gives each copy the same estimate as the point alone (up to MC noise)."""
    vae, marginal = linear_gaussian_vae(exact_guide=False)
    x = marginal.sample((1,))
    alone = evaluate.iw_log_likelihood(vae, x, num_samples=4000).item()
    batch = evaluate.iw_log_likelihood(vae, x.expand(8, D).contiguous(), num_samples=4000)
    assert torch.allclose(batch, torch.full_like(batch, alone), atol=0.05)
    assert marginal.log_prob(x).item() == pytest.approx(alone, abs=0.05)


def test_evaluate_summary_on_an_image_vae(images):
    enc, dec = nets.build("mlp", (1, 28, 28), 4, hidden=32)
    vae = VAE(enc, dec, [4])
    summary = evaluate.evaluate(vae, images[:20], iw_samples=20, elbo_samples=3, progress=False)
    for key in ("elbo", "reconstruction", "kl", "kl_z0", "iw_log_likelihood"):
        assert math.isfinite(summary[key])
    assert summary["elbo"] == pytest.approx(summary["reconstruction"] - summary["kl"], rel=1e-5)
    assert summary["iw_log_likelihood"] > summary["elbo"]
    assert summary["n"] == 20 and summary["iw_samples"] == 20


def test_evaluation_ignores_beta():
    vae, marginal = linear_gaussian_vae(exact_guide=True)
    vae.beta = 0.1
    x = marginal.sample((5,))
    assert torch.allclose(evaluate.elbo_terms(vae, x)["elbo"], marginal.log_prob(x), atol=1e-8)


def test_bad_sample_counts():
    vae, marginal = linear_gaussian_vae()
    with pytest.raises(InputError, match="importance samples"):
        evaluate.iw_log_likelihood(vae, marginal.sample((2,)), num_samples=0)


def test_the_iw_chunk_is_chosen_from_the_gpus_memory(monkeypatch):
    """On the CPU a fixed bound; on CUDA a quarter of the card's total memory (not the free memory, which
    would make the draws depend on how busy the card is) at 64 bytes a value, never less."""
    from types import SimpleNamespace

    x = torch.zeros(3, 1, 28, 28)
    assert evaluate.default_max_rows(x) == 20000

    class OnCuda:
        device = torch.device("cuda")

        def __getitem__(self, i):
            return x[i]

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1, 1))  # not read
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(total_memory=64 * 784 * 400_000))
    assert evaluate.default_max_rows(OnCuda()) == 100_000
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=1000))
    assert evaluate.default_max_rows(OnCuda()) == 20000


def _small(likelihood, shape=(1, 6, 6)):
    torch.manual_seed(0)
    encoder, decoder = nets.build("mlp", shape, 3, out_channels=likelihood.channels, hidden=16)
    return VAE(encoder, decoder, [3], likelihood=likelihood)


@pytest.mark.parametrize("likelihood, data, levels", [
    (likelihoods.Bernoulli(), lambda g: (torch.rand(40, 1, 6, 6, generator=g) < 0.3).float(), 2),
    (likelihoods.DiscretizedLogistic(), lambda g: torch.randint(0, 256, (40, 3, 6, 6), generator=g) / 255.0, 256),
])
def test_bits_per_dim_for_data_on_a_discrete_likelihoods_grid(likelihood, data, levels):
    x = data(torch.Generator().manual_seed(1))
    vae = _small(likelihood, tuple(x.shape[1:]))
    assert likelihood.levels == levels
    summary = evaluate.evaluate(vae, x, iw_samples=4, elbo_samples=2, progress=False, seed=0)
    dims = x[0].numel()  # 36 or 108: channels count
    assert summary["bits_per_dim"] == pytest.approx(-summary["iw_log_likelihood"] / (dims * math.log(2)), rel=1e-12)
    assert summary["elbo_bits_per_dim"] == pytest.approx(-summary["elbo"] / (dims * math.log(2)), rel=1e-12)
    assert summary["elbo_bits_per_dim"] > 0


@pytest.mark.parametrize("likelihood, data", [
    (likelihoods.Bernoulli(), lambda g: torch.rand(40, 1, 6, 6, generator=g)),  # grey values: not a mass
    (likelihoods.Gaussian(0.1), lambda g: (torch.rand(40, 1, 6, 6, generator=g) < 0.3).float()),  # a density
])
def test_no_bits_per_dim_where_the_log_likelihood_is_not_a_log_mass(likelihood, data):
    x = data(torch.Generator().manual_seed(1))
    summary = evaluate.evaluate(_small(likelihood), x, iw_samples=2, elbo_samples=1, progress=False, seed=0)
    assert "bits_per_dim" not in summary and "elbo_bits_per_dim" not in summary


def test_a_flow_priors_moments_are_drawn_once_per_evaluation_not_per_data_point(monkeypatch):
    """Active units standardise by the prior's moments; a flow has none in closed form, so they come from 256 draws
    of p(z0), which is one distribution for every data point: drawn once, not 256 per data point and batch."""
    from pyro_vae import priors

    torch.manual_seed(0)
    vae = VAE(*nets.build("mlp", (1, 6, 6), 3, hidden=16), [3], prior=priors.FlowPrior(2, hidden=(8,)))
    drawn = []
    sample = torch.distributions.TransformedDistribution.sample

    def counted(self, sample_shape=torch.Size()):
        value = sample(self, sample_shape)
        drawn.append(value.shape[:-1].numel())
        return value

    monkeypatch.setattr(torch.distributions.TransformedDistribution, "sample", counted)
    x = torch.rand(40, 1, 6, 6).round()
    terms = evaluate.elbo_terms(vae, x, batch_size=10, moments=True)
    assert sum(drawn) == 256  # one draw of 256 for the four batches of ten (it was 256 x 10 per batch)
    evaluate.active_units(vae, x, batch_size=10)
    assert sum(drawn) == 2 * 256
    mean, variance = evaluate._prior_moments(vae)["z0"]
    many = vae.prior().sample((20000,))
    standard_error = (many.var(0) / 256).sqrt()  # of the mean of 256 draws
    assert ((mean - many.mean(0)).abs() < 4 * standard_error).all()
    assert torch.allclose(variance, many.var(0), rtol=0.4)
    assert terms["residual_z0"].shape == (40, 3)
