"""Posterior families: the diagonal Gaussian and the IAF at every level of a chain, with both
guides; log q by the change of variables; SVI; the IW evaluator with flows; names and errors."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from torch.nn import functional as F

from pyro_vae import VAE, InputError, evaluate, nets, posteriors, priors
from pyro_vae.chain import precision_weighted
from pyro_vae.train import RunConfig, build_vae
from conftest import check_svi_lowers_the_loss
from linear_gaussian import check_trained_guide_approaches_the_exact_log_px

X_SHAPE = (1, 28, 28)
FAMILIES = {"gaussian": posteriors.DiagonalGaussian, "iaf:2": posteriors.iaf(2)}


def make_vae(dims, guide, posterior, hidden=32):
    enc, dec = nets.build("mlp", X_SHAPE, dims[-1], hidden=hidden)
    return VAE(enc, dec, dims, guide=guide, posterior=posterior, hidden=hidden)


def latent_sites(trace):
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site) and not site["is_observed"]}


def test_iaf_log_q_is_the_change_of_variables():
    """log q(z) of a draw (from the transforms' cache) = log N(z_0; mu, sigma) - sum_t sum log s_t, computed
    here by hand from each step's MADE outputs, and = log q of the same z scored afresh (the inverse)."""
    torch.manual_seed(0)
    head = posteriors.IAF(6, 5, k=3)
    h = torch.randn(4, 6)
    base = head.gaussian(h)
    torch.manual_seed(1)
    q = head(h)
    z = q.rsample()
    torch.manual_seed(1)
    u = base.rsample()
    log_q = base.log_prob(u)
    for step in head.flows:
        mean, logit = step.nn(u, context=h)
        s = torch.sigmoid(logit + 2.0)  # Pyro's stable IAF, sigmoid_bias 2
        u = s * u + (1 - s) * mean
        log_q = log_q - torch.log(s).sum(-1)
    assert torch.allclose(u, z, atol=1e-5)
    assert torch.allclose(q.log_prob(z), log_q, atol=1e-4)
    assert torch.allclose(q.log_prob(z.clone()), log_q, atol=1e-3)  # a new tensor: the sequential inverse
    assert q.batch_shape == (4,) and q.event_shape == (5,)
    assert q.sample((7,)).shape == (7, 4, 5)


@pytest.mark.parametrize("dims", [[4], [3, 5], [2, 3, 4]], ids=["L0", "L1", "L2"])
@pytest.mark.parametrize("guide", ["bottom-up", "top-down"])
def test_iaf_at_every_level_with_vectorised_particles(dims, guide, images):
    vae = make_vae(dims, guide, posteriors.iaf(2))
    heads = [vae.posterior, *vae.guide_transitions, *vae.ladder_heads]
    assert sum(isinstance(getattr(m, "head", m), posteriors.IAF) for m in heads) == len(dims)
    x = images[:6]
    with pyro.plate("particles", 3, dim=-2):
        guide_tr = poutine.trace(vae.guide).get_trace(x)
    sites = latent_sites(guide_tr)
    assert list(sites) == [f"z{i}" for i in (range(len(dims)) if guide == "top-down" else reversed(range(len(dims))))]
    for i, d in enumerate(dims):
        site = sites[f"z{i}"]
        assert isinstance(site["fn"], dist.TransformedDistribution)
        assert site["value"].shape == (3, 6, d) and site["fn"].event_shape == (d,)
        assert site["fn"].log_prob(site["value"]).shape == (3, 6)
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert torch.isfinite(torch.tensor(loss))


def test_top_down_applies_the_flow_after_the_precision_weighted_merge(images):
    vae = make_vae([3, 5], "top-down", posteriors.iaf(2))
    x = images[:4]
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    q1 = guide_tr.nodes["z1"]["fn"]
    d1 = vae.encoder(x)
    merged = precision_weighted(vae.posterior.gaussian(d1), vae.transitions[0](guide_tr.nodes["z0"]["value"]))
    assert torch.allclose(q1.base_dist.base_dist.loc, merged.base_dist.loc, atol=1e-6)
    assert torch.allclose(q1.base_dist.base_dist.scale, merged.base_dist.scale, atol=1e-6)
    assert len(q1.transforms) == 2


@pytest.mark.parametrize("posterior", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("dims, guide, elbo", [
    ([4], "bottom-up", "trace"), ([4], "bottom-up", "meanfield"), ([4], "bottom-up", "vectorized"),
    ([3, 4], "bottom-up", "trace"), ([3, 4], "top-down", "trace"), ([3, 4], "top-down", "meanfield"),
    ([2, 3, 4], "top-down", "vectorized"), ([2, 3, 4], "bottom-up", "jit"),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else str(v))
def test_svi_lowers_the_loss_with_every_posterior(dims, guide, elbo, posterior, images):
    check_svi_lowers_the_loss(make_vae(dims, guide, posterior), elbo, images[:32])


def test_meanfield_with_an_iaf_falls_back_to_the_sampled_kl(images):
    """No analytic KL(IAF || Normal): TraceMeanField_ELBO takes log q - log p at the draw, so it is the
    same estimate as Trace_ELBO's (equal means over many particles)."""
    vae = make_vae([4], "bottom-up", posteriors.iaf(2))
    x = images[:4]
    pyro.set_rng_seed(0)
    meanfield = TraceMeanField_ELBO(num_particles=3000, vectorize_particles=True).loss(vae.model, vae.guide, x)
    trace = Trace_ELBO(num_particles=3000, vectorize_particles=True).loss(vae.model, vae.guide, x)
    assert abs(meanfield - trace) < 0.01 * abs(trace), (meanfield, trace)


@pytest.mark.parametrize("guide", ["bottom-up", "top-down"])
def test_iw_with_a_trained_iaf_guide_approaches_the_exact_log_px(guide):
    """The IAF at both levels of a linear-Gaussian chain, trained: ELBO < IW(K=10) < IW(K=2000) ~= log p(x)."""
    vae = check_trained_guide_approaches_the_exact_log_px([2, 3, 2], guide, posteriors.iaf(2))
    assert isinstance(vae.posterior, posteriors.IAF)
    assert all(isinstance(getattr(m, "head", m), posteriors.IAF) for m in [*vae.guide_transitions, *vae.ladder_heads])


@pytest.mark.parametrize("prior", [priors.StandardNormal(), priors.MixtureOfGaussians(3), priors.FlowPrior(2),
                                   priors.LearnedNormal()], ids=["standard", "mog", "flow", "learned"])
def test_evaluate_reconstruct_and_sample_with_an_iaf_posterior(prior, images):
    vae = VAE(*nets.build("mlp", X_SHAPE, 4, hidden=32), [3, 4], prior=prior, guide="top-down",
              posterior=posteriors.iaf(2), hidden=32)
    x = images[:8]
    summary = evaluate.evaluate(vae, x, iw_samples=20, elbo_samples=2, progress=False)
    assert summary["elbo"] <= summary["iw_log_likelihood"] + 1.0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary.items() if isinstance(v, float))
    assert set(summary) >= {"kl_z0", "kl_z1", "active_units_z0", "active_units_z1"}
    assert vae.reconstruct(x).shape == x.shape
    assert vae.sample(5).shape == (5, *X_SHAPE)


def test_reconstruct_uses_the_flows_image_of_the_base_mean(images):
    vae = make_vae([4], "bottom-up", posteriors.iaf(2))
    x = images[:3]
    q = vae.posterior(vae.encoder(x))
    z = q.base_dist.mean
    for t in q.transforms:
        z = t(z)
    assert torch.allclose(posteriors.location(q), z)
    expected = torch.sigmoid(vae.decoder(z))
    assert torch.allclose(vae.reconstruct(x), expected, atol=1e-6)


def test_a_users_family_is_used_at_every_level(images):
    built = []

    def family(in_features, latent_dim):
        built.append((in_features, latent_dim))
        return posteriors.DiagonalGaussian(in_features, latent_dim, min_scale=0.1)

    vae = make_vae([2, 3, 4], "top-down", family)
    assert sorted(built) == sorted([(32, 4), (32, 2), (32, 3)])
    z0 = poutine.trace(vae.guide).get_trace(images[:4]).nodes["z0"]["fn"]
    assert float(z0.base_dist.scale.min().detach()) >= 0.1  # the user's min_scale


def test_a_head_module_is_used_for_the_bottom_level_only(images):
    head = posteriors.IAF(32, 4, k=1)
    vae = make_vae([3, 4], "bottom-up", head)
    assert vae.posterior is head
    assert isinstance(vae.guide_transitions[0].head, posteriors.DiagonalGaussian)


def test_names_and_the_run_config():
    assert posteriors.from_name("gaussian") is posteriors.DiagonalGaussian
    assert posteriors.from_name("iaf:3")(8, 4).flows.__len__() == 3
    assert len(posteriors.from_name("iaf")(8, 4).flows) == 2
    for bad in ["iaf:0", "iaf:x", "flow", "gaussian:2", ""]:
        with pytest.raises(InputError, match="unknown posterior .*gaussian, iaf:K"):
            posteriors.from_name(bad)
    config = RunConfig(latent_dims=[3, 4], guide="top-down", posterior="iaf:2", hidden=32)
    config.validate()
    vae = build_vae(config, X_SHAPE)
    assert isinstance(vae.posterior, posteriors.IAF) and all(isinstance(h, posteriors.IAF) for h in vae.ladder_heads)
    assert "posterior" in RunConfig.MODEL_KEYS
    with pytest.raises(InputError, match="unknown posterior 'iaf:-1'"):
        RunConfig(posterior="iaf:-1").validate()
    with pytest.raises(InputError, match="VampPrior .* --posterior gaussian"):
        RunConfig(posterior="iaf:2", prior="vamp:5").validate()


def test_bad_families_get_clear_errors():
    with pytest.raises(InputError, match="VampPrior .*head for z0 is a flow.*--posterior gaussian"):
        VAE(*nets.build("mlp", X_SHAPE, 4, hidden=32), [4], prior=priors.VampPrior(3), posterior=posteriors.iaf(2))
    with pytest.raises(InputError, match="k >= 1 flow steps"):
        posteriors.iaf(0)
    with pytest.raises(InputError, match="2 or more dimensions.*gaussian posterior"):
        make_vae([1, 4], "bottom-up", posteriors.iaf(2))
    with pytest.raises(InputError, match="hidden widths >= the latent size 4"):
        posteriors.IAF(8, 4, hidden=(3,))
    with pytest.raises(InputError, match="a posterior family must be a callable .* got str"):
        make_vae([4], "bottom-up", "iaf:2")
    with pytest.raises(InputError, match="returned Tensor, not an nn.Module"):
        make_vae([4], "bottom-up", lambda f, d: torch.zeros(d))
    with pytest.raises(InputError, match="top-down guide merges Gaussians.*returned Independent\\(Laplace\\)"):
        class LaplaceHead(torch.nn.Module):
            def __init__(self, f, d):
                super().__init__()
                self.net = torch.nn.Linear(f, d)

            def forward(self, h):
                return dist.Laplace(self.net(h), F.softplus(self.net(h)) + 0.1).to_event(1)

        vae = make_vae([3, 4], "top-down", LaplaceHead)
        vae.guide(torch.rand(2, *X_SHAPE).round())


def test_active_units_with_an_iaf_ignore_the_spread_of_its_draws(images):
    """A collapsed IAF posterior (its Gaussian's mean and every flow output constant in x) has no active
    unit, though the average of 10 draws would vary by about sigma^2 / 10 = 0.1 > 0.01 across images."""
    vae = make_vae([4], "bottom-up", posteriors.iaf(2))
    with torch.no_grad():
        vae.posterior.gaussian.mean_head.weight.zero_()
        vae.posterior.gaussian.scale_head.weight.zero_()
        vae.posterior.gaussian.scale_head.bias.fill_(0.55)  # sigma = softplus(0.55) ~= 1
        for flow in vae.posterior.flows:
            flow.nn.layers[-1].weight.zero_()  # m and s of each step: constants
    x = images[:200]
    count, variances = evaluate.active_units(vae, x)["z0"]
    assert count == 0 and float(variances.max()) < 1e-10
    q = vae.posterior(vae.encoder(x))
    draws = q.sample((10,)).mean(0)
    assert int((draws.var(0, unbiased=False) > 0.01).sum()) >= 3  # what counting draws would have said
