"""The VampPrior paper's HVAE (--arch gated-hvae) and the VAE's ladder and ladder_heads arguments it is built from."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_vae import VAE, InputError, RunConfig, nets, paper_hvae
from pyro_vae.config import PRESETS
from pyro_vae.posteriors import ClampedGaussian
from pyro_vae.train import build_vae


def _paper(hidden=300, dims=(40, 40), prior="standard"):
    torch.manual_seed(0)
    config = RunConfig(**{**PRESETS["vampprior-hvae"], "arch": "gated-hvae", "hidden": hidden,
                          "latent_dims": list(dims), "prior": prior}).validate()
    return build_vae(config, (1, 28, 28))


def _gated(a, b):  # a GatedDense layer's parameters: two linear maps
    return 2 * (a * b + b)


def test_it_has_the_papers_networks_and_their_parameter_count():
    vae = _paper()
    x, h, d = 784, 300, 40
    paper = (_gated(x, h) + _gated(h, h) + 2 * (h * d + d)                       # q(z2 | x)
             + _gated(x, h) + _gated(d, h) + _gated(2 * h, h) + 2 * (h * d + d)   # q(z1 | x, z2)
             + _gated(d, h) + _gated(h, h) + 2 * (h * d + d)                      # p(z1 | z2)
             + 2 * _gated(d, h) + _gated(2 * h, h) + h * x + x)                   # p(x | z1, z2)
    assert sum(p.numel() for p in vae.parameters()) == paper == 2_431_024
    names = (type(vae.encoder), type(vae.decoder), type(vae.transitions[0]), type(vae.ladder[0]),
             type(vae.ladder_heads[0]), type(vae.posterior))
    assert names == (paper_hvae.TopEncoder, paper_hvae.JoinedDecoder, paper_hvae.GatedTransition,
                     paper_hvae.FirstHalf, ClampedGaussian, paper_hvae.LowerPosterior)
    trace = pyro.poutine.trace(vae.guide).get_trace(torch.rand(5, 1, 28, 28).round())
    model = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=trace)).get_trace(torch.rand(5, 1, 28, 28).round())
    for name in ("z0", "z1"):
        assert trace.nodes[name]["value"].shape == (5, 40) and model.nodes[name]["fn"].event_shape == (40,)
    assert model.nodes["x"]["fn"].event_shape == (1, 28, 28)


def test_each_posterior_reads_its_own_encoder_and_the_lower_one_reads_the_level_above_through_a_gated_layer():
    vae, x = _paper(hidden=32, dims=(3, 4)), torch.rand(6, 1, 28, 28).round()
    top = vae.q_top(x).base_dist.loc
    with torch.no_grad():
        vae.posterior.from_x.h.weight.add_(1.0)  # q(z1 | x, z0)'s own layer of x: q(z0 | x) does not read it
    assert torch.equal(vae.q_top(x).base_dist.loc, top)
    d = vae.encoder(x)
    z0 = torch.randn(6, 3)
    assert d.shape == (6, 32 + 784) and torch.equal(d[:, 32:], x.reshape(6, 784))  # x passed along
    q = vae.posterior(torch.cat([d, z0], -1)).base_dist.loc
    q2 = vae.posterior(torch.cat([d, 2 * z0], -1)).base_dist.loc
    q3 = vae.posterior(torch.cat([d, 3 * z0], -1)).base_dist.loc
    assert not torch.allclose(q, q2)
    assert not torch.allclose(q3 - q2, q2 - q, atol=1e-4)  # not linear in z0 (a gated layer reads it)
    with pytest.raises(InputError, match="build the VAE with guide='top-down', skip=True and no condition"):
        vae.posterior(d)
    # the decoder reads both levels
    z = torch.randn(6, 7)
    out = vae.decoder(z)
    for level in (slice(0, 3), slice(3, 7)):
        moved = z.clone()
        moved[:, level] += 1.0
        assert not torch.allclose(vae.decoder(moved), out)


def test_the_heads_clamp_the_log_variance_and_the_weights_are_he_initialised():
    head = ClampedGaussian(5, 3)
    with torch.no_grad():
        head.logvar_head.bias.fill_(50.0)
    assert torch.allclose(head(torch.zeros(2, 5)).base_dist.scale, torch.full((2, 3), math.exp(1.0)))
    with torch.no_grad():
        head.logvar_head.bias.fill_(-50.0)
    assert torch.allclose(head(torch.zeros(2, 5)).base_dist.scale, torch.full((2, 3), math.exp(-3.0)))
    with pytest.raises(InputError, match="min_logvar must be below max_logvar"):
        ClampedGaussian(5, 3, min_logvar=2, max_logvar=-6)
    vae = _paper()
    for linear in (vae.encoder.net[0].h, vae.posterior.from_x.g, vae.decoder.joint.g, vae.posterior.head.mean_head):
        assert linear.weight.std().item() == pytest.approx(math.sqrt(2 / linear.in_features), rel=0.03)


def test_svi_lowers_the_loss_with_the_vampprior():
    pyro.clear_param_store()
    vae = _paper(hidden=32, dims=(3, 4), prior="vamp:5")
    x = (torch.rand(64, 1, 28, 28) < torch.linspace(0.05, 0.6, 784).reshape(1, 1, 28, 28)).float()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), Trace_ELBO())
    first = sum(svi.step(x) for _ in range(5))
    for _ in range(60):
        svi.step(x)
    assert sum(svi.step(x) for _ in range(5)) < 0.8 * first


@pytest.mark.parametrize("change, message", [
    (dict(latent_dims=[4, 4, 4]), "two-level HVAE, got 3 level"),
    (dict(skip=False), "add --guide top-down --skip"),
    (dict(guide="bottom-up", skip=False), "add --guide top-down --skip"),
    (dict(posterior="iaf:2", prior="standard"), "use --posterior gaussian"),
    (dict(labels=True), "unconditioned"),
    (dict(dataset="counts", data_file="x.npz", binarize="none", latent_dims=[4, 4]), "of images; use --arch mlp"),
])
def test_the_command_line_refuses_what_the_papers_hvae_is_not(change, message):
    with pytest.raises(InputError, match=message):
        RunConfig(**{**PRESETS["vampprior-hvae"], "arch": "gated-hvae", **change}).validate()


def test_the_papers_hvae_in_python_has_two_levels_and_no_condition():
    with pytest.raises(InputError, match=r"two-level HVAE, got 1 level\(s\) \[40\]; pass latent_dims=\[D0, D1\]"):
        paper_hvae.networks((1, 28, 28), [40])
    vae = VAE(**paper_hvae.networks((1, 28, 28), [3, 4], hidden=8), latent_dims=[3, 4], guide="top-down", skip=True,
              condition=2)
    with pytest.raises(InputError, match="skip=True and no condition"):
        pyro.poutine.trace(vae.guide).get_trace(torch.rand(2, 1, 28, 28).round(), torch.tensor([0, 1]))


def test_a_vae_takes_its_own_ladder_and_heads_only_with_the_top_down_guide():
    enc, dec = nets.build("mlp", (1, 28, 28), 4, hidden=16)
    ladder, heads = [nn.Sequential(nn.Linear(16, 8), nn.Tanh())], [ClampedGaussian(8, 3)]
    vae = VAE(enc, dec, [3, 4], guide="top-down", hidden=16, ladder=ladder, ladder_heads=heads)
    assert vae.ladder[0] is ladder[0] and vae.ladder_heads[0] is heads[0]
    assert vae.q_top(torch.rand(2, 1, 28, 28)).base_dist.loc.shape == (2, 3)
    trace = pyro.poutine.trace(vae.guide).get_trace(torch.rand(2, 1, 28, 28))
    assert trace.nodes["z1"]["value"].shape == (2, 4)
    with pytest.raises(InputError, match="top-down guide's networks; use guide='top-down'"):
        VAE(enc, dec, [3, 4], hidden=16, ladder=ladder)
    with pytest.raises(InputError, match=r"ladder_heads must hold 1 module \(one per level below z0"):
        VAE(enc, dec, [3, 4], guide="top-down", hidden=16, ladder_heads=heads * 2)
    with pytest.raises(InputError, match="ladder must hold nn.Module instances, got function"):
        VAE(enc, dec, [3, 4], guide="top-down", hidden=16, ladder=[lambda d: d])
    one_level = VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=16), [4], ladder=[], ladder_heads=[])  # nothing to give
    assert len(one_level.ladder) == 0
    two = VAE(enc, dec, [3, 4], guide="top-down", hidden=16, transitions=nn.Sequential(vae.transitions[0]))
    assert two.transitions[0] is vae.transitions[0]  # an nn.Sequential of transitions is read as its modules
