"""Drawing from a trained chain: what ``resample_below`` keeps (one guide draw per data point),
temperature (``sample(n, temperature)``, ``chain.tempered``), conditional generation
(``generate_from``, the same as ``poutine.condition`` on the model) and the labelled pictures."""

import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_vae import VAE, InputError, nets, plots, priors
from pyro_vae.chain import tempered

X_SHAPE = (1, 28, 28)
GUIDES = ["bottom-up", "top-down"]


def make_chain(dims, guide="top-down", prior=None, hidden=16):
    pyro.set_rng_seed(0)
    enc, dec = nets.build("mlp", X_SHAPE, dims[-1], hidden=hidden)
    return VAE(enc, dec, dims, guide=guide, hidden=hidden, prior=prior)


# ------------------------------------------------------ resample_below
@pytest.mark.parametrize("guide", GUIDES)
def test_resample_below_keeps_one_guide_draw_per_data_point(guide, images):
    vae = make_chain([2, 3, 4], guide)
    x, n, last = images[:3], 5, 3  # L + 1 = 3: every level kept
    out = vae.resample_below(x, last, n)
    assert out.shape == (3, n, *X_SHAPE)
    # all kept: the n columns are one picture (to float rounding across the rows of one batch)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=1e-5)
    assert not torch.equal(out[0], out[1])  # ... which differs between data points
    for level in range(last):  # something is redrawn: the columns differ
        out = vae.resample_below(x, level, n)
        assert all(not torch.equal(out[i, 0], out[i, j]) for i in range(3) for j in range(1, n)), level


@pytest.mark.parametrize("guide", GUIDES)
def test_the_kept_levels_are_one_draw_of_the_guide_for_x(guide, images):
    """The guide runs once, on x itself ``(B, ...)``; the redrawn levels are the model's given the kept ones."""
    vae = make_chain([2, 3, 4], guide)
    x, n = images[:2], 4
    trace = poutine.trace(vae.resample_below).get_trace(x, 2, n, temperature=0)  # keep z0, z1; z2 at its mean
    guide_sites = {name: site["value"] for name, site in trace.nodes.items() if name.startswith("z")}
    assert sorted(guide_sites) == ["z0", "z1", "z2"] and guide_sites["z1"].shape == (2, 3)  # one draw per image
    with torch.no_grad():
        z2 = vae.transitions[1](guide_sites["z1"].repeat_interleave(n, 0)).mean  # p(z2 | the kept z1)'s mean
        expected = vae.likelihood.mean(vae.decoder(z2)).reshape(2, n, *X_SHAPE)
    assert torch.allclose(trace.nodes["_RETURN"]["value"], expected, atol=1e-6)


def test_kept_mean_is_the_reconstruction(images):
    vae = make_chain([3, 5])
    x = images[:4]
    out = vae.resample_below(x, 2, 3, kept="mean")
    assert torch.allclose(out, vae.reconstruct(x)[:, None].expand_as(out))
    with pytest.raises(InputError, match=r"kept must be one of: draw, mean .*got 'median'"):
        vae.resample_below(x, 1, kept="median")
    with pytest.raises(InputError, match=r"n must be a positive number of draws per data point, got 0"):
        vae.resample_below(x, 1, 0)


# ---------------------------------------------------------- temperature
@pytest.mark.parametrize("prior", ["standard", "learned", "mog:3", "vamp:4", "flow:2"])
def test_temperature_one_is_sample_bit_for_bit(prior):
    vae = make_chain([4, 6], prior=priors.from_name(prior))
    pyro.set_rng_seed(5)
    plain = vae.sample(6)
    pyro.set_rng_seed(5)
    assert torch.equal(vae.sample(6, temperature=1.0), plain)
    pyro.set_rng_seed(5)
    assert torch.equal(vae.sample(6, temperature=1), plain)


@pytest.mark.parametrize("prior", ["standard", "learned", "flow:2"])
def test_temperature_zero_puts_every_level_at_its_mean(prior):
    vae = make_chain([4, 6], prior=priors.from_name(prior))
    with torch.no_grad():
        vae.prior.loc.data += 0.3 if prior == "learned" else 0.0  # a learned prior away from 0
    out = vae.sample(5, temperature=0)
    # every draw the same picture (to float rounding: with several threads the rows of one batched
    # product may be summed in different orders)
    torch.testing.assert_close(out, out[:1].expand_as(out), rtol=0, atol=1e-5)
    z0, z1 = vae.sample_latents(5, temperature=0)
    location = {"flow:2": lambda: z0[:1]}.get(prior, lambda: vae.prior().mean.expand(1, 4))()
    assert torch.allclose(z0, location.expand_as(z0))
    assert torch.allclose(z1, vae.transitions[0](z0).mean)  # z1 at p(z1 | z0)'s mean


def test_temperature_zero_with_a_mixture_prior_draws_component_means():
    vae = make_chain([4, 6], prior=priors.MixtureOfGaussians(3))
    z0, _ = vae.sample_latents(200, temperature=0)
    locs = vae.prior.locs.detach()  # (3, 4)
    # exact distances: cdist's default for many rows (|a|^2 + |b|^2 - 2ab) leaves ~5e-4 of rounding on some CPUs
    nearest = torch.cdist(z0, locs, compute_mode="donot_use_mm_for_euclid_dist").min(-1).values
    assert torch.all(nearest < 1e-6)  # every draw is one component's mean, picked by weight
    assert len({tuple(z.tolist()) for z in z0}) > 1


@pytest.mark.parametrize("prior", ["standard", "learned", "mog:3"])
def test_temperature_scales_the_spread_of_every_level(prior):
    vae = make_chain([4, 6], prior=priors.from_name(prior))
    pyro.set_rng_seed(2)
    z0, z1 = vae.sample_latents(4000, temperature=1)
    for t in (0.25, 0.5, 2.0):
        pyro.set_rng_seed(2)  # the same noise: each level's deviation from its mean scales by t exactly
        zt0, zt1 = vae.sample_latents(4000, temperature=t)
        centre = _component_means(vae, 4000, seed=2) if prior == "mog:3" else vae.prior().mean
        assert torch.allclose(zt0 - centre, t * (z0 - centre), atol=1e-5)  # a mixture: the same component
        mean_1, mean_t = vae.transitions[0](z0).mean, vae.transitions[0](zt0).mean
        scale_1, scale_t = vae.transitions[0](z0).stddev, vae.transitions[0](zt0).stddev
        assert torch.allclose((zt1 - mean_t) / scale_t, t * (z1 - mean_1) / scale_1, atol=1e-4)
    if prior == "standard":
        pyro.set_rng_seed(3)
        assert vae.sample_latents(20000, temperature=0.5)[0].std().item() == pytest.approx(0.5, rel=0.02)


def _component_means(vae, n, seed):
    """The means of the MoG components that ``n`` draws from the RNG state ``seed`` pick ``(n, D)``:
    ``MixtureSameFamily.sample`` draws the components first."""
    pyro.set_rng_seed(seed)
    return vae.prior.locs.detach()[vae.prior().mixture_distribution.sample((n,))]


def test_tempered_distributions():
    loc, scale = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    for d in (dist.Normal(loc, scale), dist.Laplace(loc, scale), dist.Cauchy(loc, scale),
              dist.StudentT(4.0, loc, scale)):
        assert torch.allclose(tempered(d, 0.5).scale, 0.5 * scale) and torch.equal(tempered(d, 0.5).loc, loc)
    mvn = dist.MultivariateNormal(loc, scale_tril=torch.diag(scale))
    assert torch.allclose(tempered(mvn, 0.5).covariance_matrix, 0.25 * mvn.covariance_matrix)
    expanded = dist.Normal(loc, scale).to_event(1).expand((7,))
    assert tempered(expanded, 0).sample().equal(loc.expand(7, 2))
    d = dist.Uniform(torch.zeros(2), 1.0).to_event(1)
    assert tempered(d, 1) is d  # 1 works for every distribution
    for bad in (-1, math.nan, math.inf, "warm", True, None):
        with pytest.raises(InputError, match=r"temperature must be a finite number >= 0, got .*temperature=0\.8"):
            tempered(dist.Normal(loc, scale), bad)


def test_temperature_of_a_prior_where_it_is_undefined_is_refused():
    uniform = dist.Uniform(-torch.ones(4), torch.ones(4)).to_event(1)
    vae = make_chain([4, 6], prior=uniform)
    assert vae.sample(3, temperature=1).shape == (3, *X_SHAPE)
    with pytest.raises(InputError, match=r"temperature is not defined for the prior p\(z0\), a Uniform: .*"
                                         r"use temperature=1 with this one") as info:
        vae.sample(3, temperature=0.5)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"temperature must be a finite number >= 0, got -1"):
        vae.sample(3, temperature=-1)
    with pytest.raises(InputError, match=r"temperature must be a finite number >= 0, got nan"):
        make_chain([4]).sample(3, temperature=float("nan"))


# ------------------------------------------------- conditional generation
@pytest.mark.parametrize("guide", GUIDES)
def test_generate_from_is_poutine_condition_on_the_model(guide, images):
    """``generate_from(x, 1, n)`` = drawing from ``poutine.condition(vae.model, data={"z0": z0})`` with z0 one
    draw of the guide for x: the same z1 from the same RNG state, and E[x | z1]."""
    vae = make_chain([3, 5], guide)
    x, n = images[:2], 4
    pyro.set_rng_seed(7)
    out = vae.generate_from(x, keep_levels=1, n=n)
    pyro.set_rng_seed(7)
    z0 = poutine.trace(vae.guide).get_trace(x).nodes["z0"]["value"].repeat_interleave(n, 0)  # (B * n, D0)
    conditioned = poutine.condition(vae.model, data={"z0": z0})
    model_trace = poutine.trace(conditioned).get_trace(None, batch_size=2 * n)
    z1 = model_trace.nodes["z1"]["value"]
    with torch.no_grad():
        by_hand = vae.likelihood.mean(vae.decoder(z1)).reshape(2, n, *X_SHAPE)
    assert torch.allclose(out, by_hand, atol=1e-6)
    pyro.set_rng_seed(7)
    assert torch.equal(vae.resample_below(x, 1, n), out)
    with pytest.raises(InputError, match=r"keep_levels must be in 0\.\.2 for a chain of 2 levels, got 3"):
        vae.generate_from(x, keep_levels=3)


def test_generate_from_at_temperature_zero_is_deterministic_given_the_kept_levels(images):
    vae = make_chain([3, 5])
    out = vae.generate_from(images[:2], keep_levels=1, n=4, temperature=0)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=1e-5)


# ------------------------------------------------------------ pictures
def _tiles(path, left, top, rows, cols, zoom=2):
    """The ``rows x cols`` tiles of a labelled grid picture as a tensor ``(rows, cols, 28 * zoom, 28 * zoom)``."""
    from PIL import Image

    with Image.open(path) as png:
        grey = torch.tensor(list(png.convert("L").getdata()), dtype=torch.float).reshape(png.size[1], png.size[0])
    pitch = 30 * zoom
    return torch.stack([torch.stack([grey[top + zoom * 2 + r * pitch:top + (r + 1) * pitch,
                                          left + zoom * 2 + c * pitch:left + (c + 1) * pitch]
                                     for c in range(cols)]) for r in range(rows)])


def test_levels_picture_rows_hold_what_their_labels_say(images, tmp_path):
    vae = make_chain([3, 5])
    left, top = plots.save_levels(vae, images[:10], tmp_path / "levels.png", images=2, samples=4)
    tiles = _tiles(tmp_path / "levels.png", left, top, rows=2 * 3, cols=5)
    for block in range(2):
        prior, z0_kept, all_kept = tiles[3 * block:3 * block + 3]
        assert torch.equal(prior[0], z0_kept[0]) and torch.equal(prior[0], all_kept[0])  # the data point
        assert all(torch.equal(all_kept[1], t) for t in all_kept[2:])  # one guide draw, shared by the row
        assert not all(torch.equal(z0_kept[1], t) for t in z0_kept[2:])  # z1 redrawn
    assert plots._level_label(0, 2, "one draw of q") == "all from the prior"
    assert plots._level_label(1, 2, "one draw of q") == "z0 kept, z1-z2 redrawn"
    assert plots._level_label(2, 2, "one draw of q") == "z0-z1 kept, z2 redrawn"
    assert plots._level_label(3, 2, "q's mean") == "all kept (q's mean)"


def test_temperature_and_generation_pictures(images, tmp_path):
    vae = make_chain([3, 5])
    state = torch.get_rng_state()
    plots.save_temperatures(vae, tmp_path / "t.png", [0, 0.5, 1], n=4, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    from PIL import Image

    with Image.open(tmp_path / "t.png") as png:
        width, height = png.size
    left, top = width - 2 * (2 + 4 * 30), height - 2 * (2 + 3 * 30)
    tiles = _tiles(tmp_path / "t.png", left, top, rows=3, cols=4)
    assert all(torch.equal(tiles[0, 0], t) for t in tiles[0, 1:])  # t = 0: one picture
    assert not all(torch.equal(tiles[2, 0], t) for t in tiles[2, 1:])
    plots.save_generated(vae, images[:1], tmp_path / "g.jpg", 1, [0.5, 1], n=3)
    assert (tmp_path / "g.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG, as named


def test_readme_snippet_runs(images):
    """The README's temperature and conditional-generation snippet, on a tiny chain."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "generate_from(" in block)
    scope = {"vae": make_chain([3, 5]), "x": images[:2]}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["z1"].shape == (8, 5) and scope["x_new"].shape == (8, *X_SHAPE)
    assert scope["trace"].nodes["z0"]["is_observed"] and not scope["trace"].nodes["z1"]["is_observed"]
