"""Priors p(z0): each trains by SVI, samples with the right shapes, scores as a direct
computation says, works with the IW evaluator, in a chain, and from the command line."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn
from torch.nn import functional as F

from pyro_vae import VAE, InputError, evaluate, nets, priors
from pyro_vae.train import RunConfig, build_vae

X_SHAPE = (1, 28, 28)
NAMES = ["standard", "learned", "mog:3", "vamp:5", "flow:2"]


def make_vae(prior, dims=(4,), guide="bottom-up"):
    enc, dec = nets.build("mlp", X_SHAPE, dims[-1], hidden=32)
    return VAE(enc, dec, list(dims), prior=prior, guide=guide, hidden=16)


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("dims, guide", [((4,), "bottom-up"), ((3, 4), "top-down")], ids=["one-level", "chain"])
@pytest.mark.parametrize("name", NAMES)
def test_every_prior_trains_samples_and_evaluates(name, dims, guide, elbo, images):
    pyro.set_rng_seed(0)
    vae = make_vae(priors.from_name(name), dims, guide)
    before = {n: p.detach().clone() for n, p in vae.prior.named_parameters()}
    svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), loss=elbo())
    x = images[:64]
    losses = [svi.step(x) for _ in range(30)]
    assert sum(losses[-5:]) < sum(losses[:5]) * 0.97, (losses[:5], losses[-5:])
    for n, p in vae.prior.named_parameters():  # the prior's own parameters are trained with the rest
        assert not torch.equal(p, before[n]), n
    p = vae.prior()
    assert p.event_shape == (dims[0],) and p.batch_shape == ()
    assert p.sample((7,)).shape == (7, dims[0])
    assert vae.sample(5).shape == (5, *X_SHAPE)
    summary = evaluate.evaluate(vae, x[:16], iw_samples=20, elbo_samples=2, progress=False)
    assert math.isfinite(summary["iw_log_likelihood"]) and summary["iw_log_likelihood"] > summary["elbo"] - 5


def test_learned_normal_scores_as_a_normal():
    prior = priors.LearnedNormal().setup(3)
    with torch.no_grad():
        prior.loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
        prior.raw_scale.copy_(torch.tensor([0.0, 1.0, -1.0]))
    z = torch.randn(6, 3)
    expected = torch.distributions.Normal(prior.loc, F.softplus(prior.raw_scale)).log_prob(z).sum(-1)
    assert torch.allclose(prior().log_prob(z), expected)
    assert torch.allclose(priors.LearnedNormal().setup(3)().log_prob(z),
                          torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))  # initialised at N(0, I)


def test_mixture_of_gaussians_is_a_hand_computed_log_sum_exp():
    torch.manual_seed(0)
    prior = priors.MixtureOfGaussians(4).setup(3)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(4))
        prior.raw_scales.copy_(torch.randn(4, 3))
    z = torch.randn(5, 3)
    scales = F.softplus(prior.raw_scales)
    log_w = torch.log_softmax(prior.logits, 0)
    per_component = torch.distributions.Normal(prior.locs, scales).log_prob(z[:, None, :]).sum(-1)  # (5, 4)
    assert torch.allclose(prior().log_prob(z), torch.logsumexp(log_w + per_component, -1), atol=1e-6)


def test_diagonal_normal_mixture_scores_like_mixture_same_family_without_the_big_tensor():
    """One matrix product in float64 gives MixtureSameFamily's numbers and gradients, also for narrow components
    (sigma down to 1e-3, where the expanded quadratic cancels large terms) and through the plate's expand."""
    torch.manual_seed(0)
    logits, loc = torch.randn(50), 2 * torch.randn(50, 8)
    scale = 1e-3 + 0.05 * torch.rand(50, 8)
    fast = priors.diagonal_normal_mixture(logits, loc, scale)
    reference = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    near = loc[:10] + scale[:10] * torch.randn(10, 8)  # where the narrow components matter
    far = torch.randn(3, 4, 8)
    for z in (near, far):
        assert torch.allclose(fast.log_prob(z), reference.log_prob(z), rtol=1e-6, atol=1e-4)
    expanded = fast.expand((3, 4))  # what pyro.plate does to the prior
    assert expanded.batch_shape == (3, 4) and expanded.log_prob(far).shape == (3, 4)
    assert torch.allclose(expanded.log_prob(far), reference.log_prob(far), rtol=1e-6, atol=1e-4)
    assert expanded.log_prob(far[0, 0]).shape == (3, 4)
    assert expanded.sample().shape == (3, 4, 8) and fast.sample((5,)).shape == (5, 8)
    parameters = [t.clone().requires_grad_() for t in (logits, loc, scale)]
    gradients = [torch.autograd.grad(make(*parameters).log_prob(near).sum(), parameters)
                 for make in (priors.diagonal_normal_mixture, lambda logits, loc, scale: dist.MixtureSameFamily(
                     dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)))]
    for fast_grad, reference_grad in zip(*gradients):
        assert torch.allclose(fast_grad, reference_grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dims, guide", [((4,), "bottom-up"), ((3, 4), "top-down")], ids=["one-level", "chain"])
def test_vamp_prior_is_the_mean_of_the_guides_posteriors_at_the_pseudo_inputs(dims, guide):
    torch.manual_seed(0)
    vae = make_vae(priors.VampPrior(6), dims, guide)
    z = torch.randn(5, dims[0])
    u = torch.sigmoid(vae.prior.pseudo_inputs)
    if len(dims) == 1:
        q = vae.posterior(vae.encoder(u))
    else:  # the top-down guide's first level: the ladder up from the encoder's features, then its head
        q = vae.ladder_heads[0](vae.ladder[0](vae.encoder(u)))
    per_input = torch.stack([q.base_dist.loc, q.base_dist.scale], 0)
    log_q = torch.distributions.Normal(per_input[0], per_input[1]).log_prob(z[:, None, :]).sum(-1)  # (5, 6)
    expected = torch.logsumexp(log_q, -1) - math.log(6)
    assert torch.allclose(vae.prior().log_prob(z), expected, atol=1e-5)
    assert vae.prior.pseudo_inputs.shape == (6, *X_SHAPE)


def test_vamp_prior_with_the_bottom_up_guide_of_a_chain_is_refused():
    with pytest.raises(InputError, match="VampPrior needs q\\(z0 \\| x\\) in closed form.*guide='top-down'"):
        make_vae(priors.VampPrior(3), (3, 4), "bottom-up")
    with pytest.raises(InputError, match="VampPrior needs q\\(z0 \\| x\\).*--guide top-down"):
        RunConfig(prior="vamp:3", latent_dims=[3, 4]).validate()


def test_flow_prior_scores_by_the_change_of_variables_in_one_pass():
    torch.manual_seed(0)
    prior = priors.FlowPrior(2, hidden=(8,)).setup(3)
    z = torch.randn(5, 3)
    # sampling is f2^-1(f1^-1(eps)), so scoring runs the flows forward, in one parallel pass each
    # (the MAF direction): y = f1(f2(z)), log p = log N(y) + log|det J|
    y, log_det = z, torch.zeros(5)
    for flow in reversed(prior.flows):
        out = flow(y)
        log_det = log_det + flow.log_abs_det_jacobian(y, out)
        y = out
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(y).sum(-1) + log_det
    assert torch.allclose(prior().log_prob(z), expected, atol=1e-5)
    # and it is a density: a Monte Carlo estimate of its normalising constant with a wide proposal is 1
    proposal = torch.distributions.Normal(torch.zeros(3), 3.0 * torch.ones(3))
    s = proposal.sample((200_000,))
    with torch.no_grad():
        mass = torch.exp(prior().log_prob(s) - proposal.log_prob(s).sum(-1)).mean()
    assert mass.item() == pytest.approx(1.0, abs=0.03)


def test_a_users_own_priors_plug_in(images):
    x = images[:32]
    laplace = dist.Laplace(torch.zeros(4), torch.ones(4)).to_event(1)

    class StudentT(nn.Module):
        """A callable module: its parameter is trained."""

        def __init__(self):
            super().__init__()
            self.raw_df = nn.Parameter(torch.tensor(1.0))

        def forward(self):
            return dist.StudentT(F.softplus(self.raw_df) + 1, torch.zeros(4), torch.ones(4)).to_event(1)

    for prior in (laplace, lambda: laplace, StudentT()):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = make_vae(prior)
        svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), loss=TraceMeanField_ELBO())  # no analytic KL: sampled
        losses = [svi.step(x) for _ in range(30)]
        assert sum(losses[-5:]) < sum(losses[:5])
        summary = evaluate.evaluate(vae, x[:8], iw_samples=10, elbo_samples=2, progress=False)
        assert math.isfinite(summary["iw_log_likelihood"])
    assert any(n.endswith("raw_df") for n in pyro.get_param_store().keys())


@pytest.mark.parametrize("bad, message", [
    (lambda: dist.Normal(torch.zeros(3), 1.0).to_event(1), r"event shape \(4,\) and batch shape \(\), got event shape \(3,\)"),
    (lambda: dist.Normal(torch.zeros(4), 1.0), r"got event shape \(\) and batch shape \(4,\); use \.to_event\(1\)"),
    (lambda: (lambda: 3), r"must be a Pyro distribution or return one, got int; use pyro\.distributions"),
    (lambda: 3, r"got int; pass e\.g\. priors\.MixtureOfGaussians\(10\)"),
])
def test_bad_priors_get_a_clear_error(bad, message):
    with pytest.raises(InputError, match=message):
        make_vae(bad())


@pytest.mark.parametrize("name, cls", [("standard", priors.StandardNormal), ("learned", priors.LearnedNormal),
                                       ("mog:7", priors.MixtureOfGaussians), ("vamp:9", priors.VampPrior),
                                       ("flow:3", priors.FlowPrior)])
def test_priors_by_name(name, cls):
    prior = priors.from_name(name)
    assert type(prior) is cls
    if ":" in name:
        assert prior.k == int(name.split(":")[1])
    vae = build_vae(RunConfig(prior=name, latent_dims=[4], hidden=16).validate(), X_SHAPE)
    assert type(vae.prior) is cls
    for bad in ("mog:x", "mog:0", "gamma", "standard:3"):
        with pytest.raises(InputError, match="unknown prior|k >= 1"):
            priors.from_name(bad)


@pytest.mark.parametrize("name", ["mog:3", "vamp:4", "flow:2"])
def test_meanfield_falls_back_to_the_sampled_kl_where_no_analytic_one_exists(name, images):
    """No kl_divergence(Normal, prior): TraceMeanField_ELBO uses log q - log p at the draw, i.e. Trace_ELBO."""
    vae = make_vae(priors.from_name(name))
    x = images[:16]
    pyro.set_rng_seed(3)
    sampled = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    meanfield = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    assert meanfield == pytest.approx(sampled, rel=1e-6)


def test_the_papers_pseudo_inputs_start_dark_and_stay_in_the_unit_interval():
    torch.manual_seed(0)
    vae = make_vae(priors.from_name("vamp-hardtanh:6"), (3, 4), "top-down")
    prior = vae.prior
    assert (prior.inputs, prior.k) == ("hardtanh", 6)
    assert prior.pseudo_inputs.mean().item() == pytest.approx(0.05, abs=0.005)
    assert prior.pseudo_inputs.std().item() == pytest.approx(0.01, rel=0.2)
    assert torch.equal(prior.images(), prior.pseudo_inputs)  # all inside [0, 1] to start
    with torch.no_grad():
        prior.pseudo_inputs[0, 0, 0, :3] = torch.tensor([-0.5, 0.5, 1.5])
    assert prior.images()[0, 0, 0, :3].tolist() == [0.0, 0.5, 1.0]
    z = torch.randn(5, 3)
    q = vae.q_top(prior.images())  # the mixture of q(z0 | u_k), as with the default pseudo-inputs
    log_q = torch.distributions.Normal(q.base_dist.loc, q.base_dist.scale).log_prob(z[:, None, :]).sum(-1)
    assert torch.allclose(prior().log_prob(z), torch.logsumexp(log_q, -1) - math.log(6), atol=1e-5)
    assert priors.from_name("vamp:6").inputs == "sigmoid" and priors.from_name("vamp-hardtanh").k == 500
    with pytest.raises(InputError, match="inputs must be one of sigmoid, hardtanh"):
        priors.VampPrior(3, inputs="tanh")
    RunConfig(prior="vamp-hardtanh:3", latent_dims=[3, 4], guide="top-down").validate()


def test_the_pseudo_inputs_picture_shows_the_pseudo_inputs(tmp_path):
    from PIL import Image

    from pyro_vae import plots

    torch.manual_seed(0)
    vae = make_vae(priors.from_name("vamp-hardtanh:3"), (3, 4), "top-down")
    with torch.no_grad():
        vae.prior.pseudo_inputs[1] = 1.0  # the second one all white, the others near black
    plots.save_pseudo_inputs(vae, tmp_path / "u.png")
    grid = torch.tensor(list(Image.open(tmp_path / "u.png").convert("L").getdata()), dtype=torch.float32)
    h, w = X_SHAPE[-2:]
    image = grid.reshape(2 + h + 2, -1)[2:2 + h]  # the one row of three, padded by 2
    first, second = image[:, 2:2 + w], image[:, 2 + w + 2:2 + 2 * w + 2]
    assert second.min() == 255 and first.max() < 30
    with pytest.raises(InputError, match="has no pseudo-inputs; only a VampPrior does"):
        plots.save_pseudo_inputs(make_vae(priors.StandardNormal(), (3, 4), "top-down"), tmp_path / "v.png")
