"""Multilevel latent chains: sites and shapes for every depth and both guides,
SVI, the ELBOs each guide allows, exact log p(x) of a linear-Gaussian chain,
KL warm-up, free bits, active units and resampling by level."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae import VAE, InputError, evaluate, fit, likelihoods, nets
from pyro_vae.objectives import FreeBitsELBO, KLWarmup
from conftest import ELBOS, check_svi_lowers_the_loss
from linear_gaussian import check_trained_guide_approaches_the_exact_log_px, exact_top_down_guide, linear_gaussian_chain

X_SHAPE = (1, 28, 28)
DEPTHS = [[4], [3, 5], [2, 3, 4], [2, 3, 4, 5]]  # L = 0, 1, 2, 3
GUIDES = ["bottom-up", "top-down"]


def make_chain(dims, guide, arch="mlp", hidden=32):
    enc, dec = nets.build(arch, X_SHAPE, dims[-1], hidden=hidden)
    return VAE(enc, dec, dims, guide=guide, hidden=hidden)


def sample_sites(trace):
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def traces(vae, x):
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    return guide_tr, model_tr


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("dims", DEPTHS, ids=lambda d: f"L{len(d) - 1}")
def test_sites_shapes_and_order(dims, guide, images):
    vae = make_chain(dims, guide)
    x = images[:7]
    guide_tr, model_tr = traces(vae, x)
    g, m = sample_sites(guide_tr), sample_sites(model_tr)
    names = [f"z{i}" for i in range(len(dims))]
    assert list(m) == names + ["x"]  # the model: z0, z1, ..., zL, x
    assert list(g) == (names[::-1] if guide == "bottom-up" else names)
    for name, d in zip(names, dims):
        for site in (g[name], m[name]):
            assert site["value"].shape == (7, d)
            assert site["fn"].batch_shape == (7,) and site["fn"].event_shape == (d,)
            assert [(f.name, f.dim) for f in site["cond_indep_stack"]] == [("data", -1)]
        assert m[name]["value"] is g[name]["value"]
    assert m["x"]["is_observed"] and m["x"]["fn"].event_shape == X_SHAPE
    assert vae.levels == len(dims) - 1
    params = set(pyro.get_param_store().keys())
    if len(dims) > 1:
        assert any(p.startswith(f"{vae.name}$$$transitions.") for p in params)
        own = "guide_transitions" if guide == "bottom-up" else "ladder"
        assert any(p.startswith(f"{vae.name}$$${own}.") for p in params)


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("dims", DEPTHS, ids=lambda d: f"L{len(d) - 1}")
def test_vectorised_particles(dims, guide, images):
    vae = make_chain(dims, guide)
    x = images[:5]
    with pyro.plate("particles", 3, dim=-2):
        guide_tr, model_tr = traces(vae, x)
    for i, d in enumerate(dims):
        assert guide_tr.nodes[f"z{i}"]["value"].shape == (3, 5, d)
    assert model_tr.nodes["x"]["fn"].batch_shape == (3, 5)
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("guide, elbo", [(g, e) for g in GUIDES for e in ELBOS
                                         if (g, e) != ("bottom-up", "meanfield")])  # refused: tested below
@pytest.mark.parametrize("dims", DEPTHS[1:], ids=lambda d: f"L{len(d) - 1}")
def test_svi_lowers_the_loss(dims, guide, elbo, images):
    pyro.set_rng_seed(1)
    vae = make_chain(dims, guide)
    check_svi_lowers_the_loss(vae, elbo, images[:64])


def test_conv_networks_work_in_a_chain(images):
    vae = make_chain([3, 6], "top-down", arch="conv")
    guide_tr, model_tr = traces(vae, images[:4])
    assert model_tr.nodes["x"]["fn"].batch_shape == (4,)
    assert vae.reconstruct(images[:4]).shape == (4, *X_SHAPE)


@pytest.mark.parametrize("dims", DEPTHS[1:], ids=lambda d: f"L{len(d) - 1}")
def test_meanfield_with_the_bottom_up_guide_is_refused(dims, images):
    vae = make_chain(dims, "bottom-up")
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=TraceMeanField_ELBO())
    with pytest.raises(InputError, match=r"TraceMeanField_ELBO is not valid with the bottom-up guide.*"
                                          r"Use Trace_ELBO.*guide='top-down'"):
        svi.step(images[:8])
    with pytest.raises(InputError, match="not valid with the bottom-up guide"):
        vae.check_elbo(TraceMeanField_ELBO())
    with pytest.raises(InputError, match="not valid with the bottom-up guide"):
        fit(vae, images[:64], epochs=1, batch_size=32, elbo="meanfield", progress=False, log=None)
    with pytest.raises(InputError, match="not valid with the bottom-up guide"):
        fit(vae, images[:64], epochs=1, batch_size=32, elbo="meanfield", free_bits=0.5, progress=False, log=None)
    vae.check_elbo(Trace_ELBO())  # the same guide with sampled KL is fine
    vae.check_elbo(FreeBitsELBO(0.5))
    make_chain(dims, "top-down").check_elbo(TraceMeanField_ELBO())
    make_chain([4], "bottom-up").check_elbo(TraceMeanField_ELBO())  # one level: the foundation's VAE


def test_top_down_analytic_and_sampled_kl_agree(images):
    """TraceMeanField_ELBO's analytic KL per level, at the sampled parents, has the same expectation
    as Trace_ELBO's sampled log q - log p: their mean losses over many particles agree."""
    pyro.set_rng_seed(0)
    vae = make_chain([2, 3, 4], "top-down")
    x = images[:8]
    n = 4000
    kw = dict(num_particles=n, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        sampled = Trace_ELBO(**kw).loss(vae.model, vae.guide, x)
        analytic = TraceMeanField_ELBO(**kw).loss(vae.model, vae.guide, x)
        # the Monte Carlo error of the difference: per-particle losses of both
        per_particle = []
        for elbo in (Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1),
                     TraceMeanField_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1)):
            per_particle.append(torch.tensor([elbo.loss(vae.model, vae.guide, x) for _ in range(10)]))
    spread = per_particle[0].std() * (200 / n) ** 0.5  # std of a mean over n particles of the sampled loss
    assert abs(sampled - analytic) < 4 * spread + 1e-3 * abs(sampled), (sampled, analytic, spread)
    assert per_particle[1].std() < per_particle[0].std()  # analytic KL: less noise


def test_one_level_is_the_foundation_vae(images):
    """One level: same parameters (names and initial values) and the same loss for both guides."""
    x = images[:8]
    losses, states = {}, {}
    for guide in GUIDES:
        pyro.set_rng_seed(3)
        vae = make_chain([4], guide)
        states[guide] = vae.state_dict()
        pyro.set_rng_seed(4)
        losses[guide] = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert list(states["bottom-up"]) == ["encoder.net.0.0.weight", "encoder.net.0.0.bias",
                                         "decoder.net.0.0.weight", "decoder.net.0.0.bias",
                                         "decoder.net.2.weight", "decoder.net.2.bias",
                                         "prior.loc", "prior.scale",
                                         "posterior.mean_head.weight", "posterior.mean_head.bias",
                                         "posterior.scale_head.weight", "posterior.scale_head.bias"]
    for key, value in states["bottom-up"].items():
        assert torch.equal(value, states["top-down"][key])
    assert losses["bottom-up"] == losses["top-down"]


# ------------------------------------------------ exact log p(x): a linear-Gaussian chain
@pytest.mark.parametrize("dims", [[2, 3, 2], [2, 2, 3, 2]], ids=["L2", "L3"])
def test_iw_estimate_is_exact_on_a_linear_gaussian_chain(dims):
    vae, mean, cov, blocks = linear_gaussian_chain(dims)
    x_block = blocks[-1]
    marginal = torch.distributions.MultivariateNormal(mean[x_block], cov[x_block, x_block])
    torch.manual_seed(1)
    x = marginal.sample((30,))
    exact = marginal.log_prob(x)
    vae.guide = exact_top_down_guide(mean, cov, blocks)  # the exact posterior: every weight is p(x)
    iw = evaluate.iw_log_likelihood(vae, x, num_samples=40, batch_size=16, max_rows=50)
    assert torch.allclose(iw, exact, atol=1e-8)
    terms = evaluate.elbo_terms(vae, x, num_samples=3)
    assert torch.allclose(terms["elbo"], exact, atol=1e-8)
    assert set(terms) == {"elbo", "reconstruction", "kl"} | {f"kl_z{i}" for i in range(len(dims))}


@pytest.mark.parametrize("guide", GUIDES)
def test_iw_estimate_of_a_trained_chain_guide_approaches_the_exact_log_px(guide):
    """The library's own guides, trained on a two-level linear-Gaussian chain (model fixed):
    ELBO < IW(K=10) < IW(K=2000) ~= exact log p(x)."""
    check_trained_guide_approaches_the_exact_log_px([2, 3, 2], guide)


# ------------------------------------------------ warm-up and free bits
def test_kl_warmup_schedule():
    w = KLWarmup(100)
    assert [w(t) for t in (0, 1, 49, 98, 99, 100, 10_000)] == [0.01, 0.02, 0.5, 0.99, 1.0, 1.0, 1.0]
    assert KLWarmup(0)(0) == 1.0
    with pytest.raises(InputError, match="warm-up steps"):
        KLWarmup(-1)


@pytest.mark.parametrize("guide", GUIDES)
def test_kl_weight_scales_every_latent_site_exactly(guide, images):
    """loss(w) = -E log p(x | zL) + w * sum_l (log q(z_l) - log p(z_l)) for the same draws."""
    x = images[:16]
    vae = make_chain([2, 3, 4], guide)
    losses = {}
    for w in (0.25, 1.0):
        vae.kl_weight = w
        pyro.set_rng_seed(7)
        losses[w] = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(7)
    vae.kl_weight = 1.0
    guide_tr, model_tr = traces(vae, x)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    reconstruction = model_tr.nodes["x"]["log_prob_sum"].item()
    kl = sum(guide_tr.nodes[f"z{i}"]["log_prob_sum"] - model_tr.nodes[f"z{i}"]["log_prob_sum"] for i in range(3))
    assert losses[1.0] == pytest.approx(-reconstruction + kl.item(), rel=1e-6)
    assert losses[0.25] == pytest.approx(-reconstruction + 0.25 * kl.item(), rel=1e-6)
    vae.kl_weight, vae.beta = 0.5, 0.5
    guide_tr, model_tr = traces(vae, x)
    for i in range(3):
        assert guide_tr.nodes[f"z{i}"]["scale"] == 0.25 and model_tr.nodes[f"z{i}"]["scale"] == 0.25
    assert model_tr.nodes["x"]["scale"] == 1.0


def test_fit_follows_the_warmup_schedule_step_by_step(images):
    vae = make_chain([2, 3], "top-down")
    seen = []
    model = vae.model

    def spy(*args, **kwargs):
        seen.append(vae.kl_weight)
        return model(*args, **kwargs)

    vae.model = spy
    history = fit(vae, images[:96], epochs=2, batch_size=32, kl_warmup=4, progress=False, log=None)
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # 3 steps per epoch, one model call per step
    assert [r["kl_weight"] for r in history] == [0.75, 1.0]
    assert vae.kl_weight == 1.0  # restored after training


def _site_kls(vae, x, seed):
    pyro.set_rng_seed(seed)
    guide_tr, model_tr = traces(vae, x)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    kls = {f"z{i}": (guide_tr.nodes[f"z{i}"]["unscaled_log_prob"] - model_tr.nodes[f"z{i}"]["unscaled_log_prob"])
           for i in range(vae.levels + 1)}
    return model_tr.nodes["x"]["log_prob_sum"], kls


@pytest.mark.parametrize("guide", GUIDES)
def test_free_bits_change_the_objective_only_below_the_floor(guide, images):
    x = images[:16]
    pyro.set_rng_seed(0)
    vae = make_chain([2, 3, 4], guide)
    reconstruction, kls = _site_kls(vae, x, seed=5)
    means = {name: kl.mean().item() for name, kl in kls.items()}
    elbo_loss = -(reconstruction - sum(kl.sum() for kl in kls.values())).item()

    def loss(floor):
        pyro.set_rng_seed(5)
        return FreeBitsELBO(floor).loss(vae.model, vae.guide, x)

    assert loss(0.0) == pytest.approx(elbo_loss, rel=1e-6)
    assert loss(0.5 * min(means.values())) == pytest.approx(elbo_loss, rel=1e-6)  # every level above the floor
    floor = sorted(means.values())[1] + 1e-3  # between the second and the third level's KL
    expected = -reconstruction.item() + sum(16 * max(floor, m) for m in means.values())
    assert loss(floor) == pytest.approx(expected, rel=1e-6)
    assert loss(floor) > elbo_loss

    # gradients: a level below the floor gets no push from its KL; above, the ELBO's gradient
    def grads(elbo):
        pyro.clear_param_store()
        vae.zero_grad()
        pyro.set_rng_seed(5)
        elbo.loss_and_grads(vae.model, vae.guide, x)
        return {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}

    high = max(means.values()) + 1.0  # every level below the floor: only the reconstruction term is left
    floored = grads(FreeBitsELBO(high))
    vae.zero_grad()
    pyro.set_rng_seed(5)
    guide_tr, model_tr = traces(vae, x)
    model_tr.compute_log_prob()
    (-model_tr.nodes["x"]["log_prob_sum"]).backward()
    reconstruction_only = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    assert floored.keys() >= reconstruction_only.keys()
    for n in floored:  # parameters that only reach a KL (the model's transitions) get zero gradients
        expected = reconstruction_only.get(n, torch.zeros_like(floored[n]))
        assert torch.allclose(floored[n], expected, rtol=1e-5, atol=1e-6), n
    plain = grads(Trace_ELBO())
    zero = grads(FreeBitsELBO(0.0))
    for n in plain:
        assert torch.allclose(plain[n], zero[n], rtol=1e-5, atol=1e-6), n


def test_free_bits_with_analytic_kl_and_particles(images):
    x = images[:8]
    vae = make_chain([2, 3], "top-down")
    elbo = FreeBitsELBO(0.1, analytic_kl=True, num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    assert torch.isfinite(torch.tensor(elbo.loss(vae.model, vae.guide, x)))
    with pytest.raises(InputError, match="not valid with the bottom-up guide"):
        FreeBitsELBO(0.1, analytic_kl=True).loss(make_chain([2, 3], "bottom-up").model,
                                                 make_chain([2, 3], "bottom-up").guide, x)
    with pytest.raises(InputError, match="free bits must be"):
        FreeBitsELBO(-1.0)


# ------------------------------------------------ diagnostics and pictures
def test_active_units_count_dimensions_whose_posterior_mean_varies():
    class Posterior(nn.Module):
        """q(z | x): mean (x0 * 3, x1 * 0.05, 0); only the first unit has variance > 0.01 across x."""

        def forward(self, h):
            loc = torch.stack([h[..., 0] * 3, h[..., 1] * 0.05, h[..., 0] * 0], -1)
            return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    class Encoder(nn.Module):
        out_features = 2

        def forward(self, x):
            return x

    vae = VAE(Encoder(), nn.Linear(3, 2), [3], likelihood=likelihoods.Gaussian(1.0), posterior=Posterior(),
              x_shape=(2,))
    x = torch.randn(500, 2)
    counts = evaluate.active_units(vae, x, num_samples=2)
    count, variances = counts["z0"]
    assert count == 1
    assert variances[0] == pytest.approx(9 * x[:, 0].var(unbiased=False).item(), rel=1e-4)
    assert variances[2] == 0
    assert evaluate.active_units(vae, x, threshold=1e-5)["z0"][0] == 2


def test_evaluate_reports_every_level(images):
    vae = make_chain([2, 3, 4], "top-down")
    summary = evaluate.evaluate(vae, images[:20], iw_samples=3, elbo_samples=2, progress=False)
    for i, d in enumerate([2, 3, 4]):
        assert 0 <= summary[f"active_units_z{i}"] <= d
    assert summary["kl"] == pytest.approx(sum(summary[f"kl_z{i}"] for i in range(3)), rel=1e-5)
    assert summary["latent_dims"] == [2, 3, 4]
    assert summary["iw_log_likelihood"] >= summary["elbo"] - 5


@pytest.mark.parametrize("guide", GUIDES)
def test_resample_below_keeps_the_guides_upper_levels(guide, images):
    vae = make_chain([2, 3, 4], guide)
    x = images[:2]
    for level in range(4):  # L + 2 = 4 choices: redraw from z0, z1, z2, or nothing
        pyro.set_rng_seed(11)
        out = vae.resample_below(x, level, n=3)
        assert out.shape == (2, 3, *X_SHAPE)
        # the same computation by hand: one guide draw of z_level-1 per image, repeated, then the transitions
        pyro.set_rng_seed(11)
        z = None
        if level > 0:
            z = poutine.trace(vae.guide).get_trace(x).nodes[f"z{level - 1}"]["value"].repeat_interleave(3, 0)
        for i in range(level, 3):
            z = vae.prior().sample((6,)) if i == 0 else vae.transitions[i - 1](z).sample()
        assert torch.equal(out.reshape(6, *X_SHAPE), vae.likelihood.mean(vae.decoder(z)))
    with pytest.raises(InputError, match=r"level must be in 0\.\.3"):
        vae.resample_below(x, 4)


def test_save_levels_writes_one_block_of_rows_per_image(images, tmp_path):
    from PIL import Image

    from pyro_vae import plots

    vae = make_chain([2, 3], "top-down")
    left, top = plots.save_levels(vae, images[:10], tmp_path / "levels.png", images=3, samples=5)
    width, height = Image.open(tmp_path / "levels.png").size
    zoom = 2  # each pixel drawn 2 x 2, a text margin on the left and a title on top
    assert height == top + zoom * (2 + 3 * (1 + 2) * (28 + 2)) and top > 0
    assert width >= left + zoom * (2 + 6 * (28 + 2)) and left > 50


def test_bad_chain_construction_gets_a_clear_error():
    enc, dec = nets.build("mlp", X_SHAPE, 4, hidden=8)
    with pytest.raises(InputError, match="unknown guide 'sideways'; choose one of: bottom-up, top-down"):
        VAE(enc, dec, [2, 4], guide="sideways")
    with pytest.raises(InputError, match=r"transitions must hold 2 modules .*transitions=None"):
        VAE(enc, dec, [2, 3, 4], transitions=[nn.Identity()])

    class Laplacian(nn.Module):
        def forward(self, z):
            return dist.Laplace(z.new_zeros(*z.shape[:-1], 4), 1.0).to_event(1)

    vae = VAE(enc, dec, [2, 4], guide="top-down", transitions=[Laplacian()])
    with pytest.raises(InputError, match="top-down guide merges Gaussians.*guide='bottom-up'"):
        poutine.trace(vae.guide).get_trace(torch.rand(3, *X_SHAPE).round())
