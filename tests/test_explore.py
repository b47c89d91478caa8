"""Traversals and interpolations (pyro_vae.explore): the latents they decode, the pictures, the command line."""

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import VAE, InputError, cli, explore, nets
from pyro_vae.explore import decode, interpolate, interpolate_latents, posterior_levels, traverse, traverse_latents

X_SHAPE = (1, 8, 8)
DIMS = [2, 3]
PNG = b"\x89PNG\r\n\x1a\n"


def chain(guide="top-down", transitions=None, prior=None, dims=DIMS):
    encoder, decoder = nets.build("mlp", X_SHAPE, dims[-1], hidden=16)
    return VAE(encoder, decoder, dims, guide=guide, hidden=16, transitions=transitions, prior=prior)


def data(n=12, seed=0):
    return torch.rand(n, *X_SHAPE, generator=torch.Generator().manual_seed(seed))


class ScaledTransition(nn.Module):
    """p(z1 | z0) = Normal(W z0, base * (1 + |z0|_1)): a scale that is set and depends on the parent."""

    def __init__(self, base, d_in=DIMS[0]):
        super().__init__()
        self.linear = nn.Linear(d_in, len(base))
        self.register_buffer("base", torch.as_tensor(base, dtype=torch.float32))

    def forward(self, z):
        return dist.Normal(self.linear(z), self.base * (1 + z.abs().sum(-1, keepdim=True))).to_event(1)


def _offsets(steps, span):
    return torch.linspace(-span, span, steps)


# ------------------------------------------------------------ the points
@pytest.mark.parametrize("guide", ["bottom-up", "top-down"])
def test_posterior_means_decode_to_the_reconstruction(guide):
    vae, x = chain(guide), data()
    zs = posterior_levels(vae, x)
    assert [tuple(z.shape) for z in zs] == [(12, 2), (12, 3)]
    assert torch.allclose(decode(vae, zs), vae.reconstruct(x), atol=1e-6)
    assert decode(vae, zs).shape == (12, *X_SHAPE)
    assert not torch.equal(posterior_levels(vae, x, at="sample")[0], zs[0])  # one draw of the guide
    assert vae.training  # the module's mode is left as it was


# ------------------------------------------------------------ traversals
@pytest.mark.parametrize("level", [0, 1])
def test_traversal_moves_only_the_traversed_unit_and_the_levels_below(level):
    vae, x = chain(), data()
    steps, span, units = 5, 2.0, [1, 0]
    zs = traverse_latents(vae, x[3], level, units=units, steps=steps, span=span)
    mean = posterior_levels(vae, x[3:4])
    assert [tuple(z.shape) for z in zs] == [(len(units) * steps, d) for d in DIMS]
    for above in range(level):  # levels above: the image's posterior means in every row
        assert torch.equal(zs[above], mean[above].expand_as(zs[above]))
    moved = zs[level] - mean[level]
    for row in range(len(units) * steps):
        others = [u for u in range(DIMS[level]) if u != units[row // steps]]
        assert torch.equal(moved[row, others], torch.zeros(len(others)))  # only the traversed unit changes
    scale = explore.model_scale(vae, mean, level)[0]
    for i, u in enumerate(units):
        assert torch.allclose(moved[i * steps:(i + 1) * steps, u], _offsets(steps, span) * scale[u], atol=1e-6)
    pictures = traverse(vae, x[3], level, units=units, steps=steps, span=span)
    assert pictures.shape == (len(units), steps, *X_SHAPE)
    if level < vae.levels:  # the level below follows the change (else the decoder, reading z1, would not)
        assert not torch.allclose(zs[level + 1][0], zs[level + 1][steps // 2])


@pytest.mark.parametrize("below", ["residual", "mean"])
def test_middle_step_is_the_reconstruction(below):
    vae, x = chain(), data()
    mean = posterior_levels(vae, x[5:6])
    recon = decode(vae, mean)[0]
    for level in (0, 1):
        zs = traverse_latents(vae, x[5], level, steps=7, below=below)
        middle = [z[3::7] for z in zs]  # offset 0 of each unit
        for z_row, m in zip(middle[:level + 1], mean):
            assert torch.equal(z_row, m.expand_as(z_row))
        pictures = traverse(vae, x[5], level, steps=7, below=below)
        if below == "residual" or level == vae.levels:
            for z_row, m in zip(middle, mean):
                assert torch.equal(z_row, m.expand_as(z_row))
            assert torch.allclose(pictures[:, 3], recon.expand_as(pictures[:, 3]), atol=1e-6)


def test_levels_below_follow_the_model():
    transition = ScaledTransition([0.3, 0.6, 1.2])
    vae, x = chain(transitions=[transition]), data()
    mean = posterior_levels(vae, x[2:3])
    for below in ("residual", "mean"):
        z0, z1 = traverse_latents(vae, x[2], 0, units=[0], steps=5, below=below)
        p_new = transition(z0)
        if below == "mean":  # the model's conditional mean E[z1 | z0']
            assert torch.allclose(z1, p_new.mean, atol=1e-6)
        else:  # the image's standardised residual of z1 kept: z1 = mu(z0') + s(z0') eps
            p_old = transition(mean[0])
            eps = (mean[1] - p_old.mean) / p_old.stddev
            assert torch.allclose(z1, p_new.mean + p_new.stddev * eps, atol=1e-5)


def test_conditional_level_spans_the_transitions_scale_at_the_parent():
    steps, span = 5, 3.0
    moves = {}
    for factor in (1.0, 4.0):
        pyro.clear_param_store()
        torch.manual_seed(0)
        transition = ScaledTransition([0.1 * factor, 0.5 * factor, 2.0 * factor])
        vae, x = chain(transitions=[transition]), data()
        mean = posterior_levels(vae, x[0:1])
        z1 = traverse_latents(vae, x[0], 1, steps=steps, span=span)[1]
        moved = z1 - mean[1]
        expected = transition.base * (1 + mean[0].abs().sum())  # the scale of p(z1 | z0) at this image's z0
        for u in range(3):
            assert torch.allclose(moved[u * steps:(u + 1) * steps, u], _offsets(steps, span) * expected[u],
                                  rtol=1e-5, atol=1e-6)
        moves[factor] = moved.abs().max(dim=0).values
    assert torch.allclose(moves[4.0], 4 * moves[1.0], rtol=1e-4)


def test_top_level_spans_the_priors_scale():
    prior = dist.Normal(torch.zeros(2), torch.tensor([0.5, 2.0])).to_event(1)
    vae, x = chain(prior=prior), data()
    mean = posterior_levels(vae, x[0:1])
    z0 = traverse_latents(vae, x[0], 0, steps=3, span=1.0)[0]
    assert torch.allclose(z0[[0, 2], 0] - mean[0][0, 0], torch.tensor([-0.5, 0.5]), atol=1e-6)
    assert torch.allclose(z0[[3, 5], 1] - mean[0][0, 1], torch.tensor([-2.0, 2.0]), atol=1e-6)


def test_a_prior_without_a_variance_is_spread_from_draws_and_leaves_the_rng():
    base = dist.Normal(torch.zeros(2), torch.ones(2))
    prior = dist.TransformedDistribution(base, [dist.transforms.AffineTransform(0.0, 3.0)]).to_event(1)
    vae = chain(prior=prior)
    state = torch.get_rng_state()
    scale = explore.model_scale(vae, posterior_levels(vae, data(2)), 0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(scale, torch.full((2, 2), 3.0), rtol=0.05)


def test_units_are_ordered_by_the_variance_of_the_posterior_mean():
    vae, x = chain(), data(40)
    order, variances = explore.unit_order(vae, x, 1)
    assert torch.equal(order, torch.argsort(posterior_levels(vae, x)[1].var(0), descending=True))
    assert variances.shape == (3,)
    zs = traverse_latents(vae, x[0], 1, units=2, steps=3, reference=x)
    moved = (zs[1] - posterior_levels(vae, x[0:1])[1]).abs().sum(0)
    assert set(torch.nonzero(moved).flatten().tolist()) == set(order[:2].tolist())
    assert traverse(vae, x[0], 1, steps=3).shape == (3, 3, *X_SHAPE)  # None: every unit, by index
    for bad in ({"units": 0}, {"units": [3]}, {"steps": 0}, {"span": -1.0}, {"below": "fixed"}):
        with pytest.raises(InputError):
            traverse(vae, x[0], 1, **bad)
    for level in (-1, 2, 1.0):
        with pytest.raises(InputError, match=r"outside 0\.\.1"):
            traverse(vae, x[0], level)
    with pytest.raises(InputError, match="one data point"):
        traverse(vae, x[:2], 0)


# -------------------------------------------------------- interpolations
@pytest.mark.parametrize("mode", explore.MODES)
def test_interpolation_endpoints_are_the_two_reconstructions(mode):
    vae, x = chain(), data()
    za, zb = posterior_levels(vae, x[0:1]), posterior_levels(vae, x[1:2])
    zs = interpolate_latents(vae, x[0], x[1], steps=6, mode=mode)
    for z, a, b in zip(zs, za, zb):
        assert z.shape == (6, a.shape[1])
        assert torch.equal(z[0], a[0]) and torch.equal(z[-1], b[0])  # exactly the posterior means
    pictures = interpolate(vae, x[0], x[1], steps=6, mode=mode)
    assert pictures.shape == (6, *X_SHAPE)
    assert torch.allclose(pictures[0], decode(vae, za)[0], atol=1e-6)  # up to batched matmul rounding
    assert torch.allclose(pictures[-1], decode(vae, zb)[0], atol=1e-6)


def test_linear_midpoint_is_the_average():
    vae, x = chain(), data()
    za, zb = posterior_levels(vae, x[0:1]), posterior_levels(vae, x[1:2])
    for z, a, b in zip(interpolate_latents(vae, x[0], x[1], steps=3, mode="linear"), za, zb):
        assert torch.allclose(z[1], (a[0] + b[0]) / 2, atol=1e-7)


def test_slerp_interpolates_the_norm_and_differs_from_linear():
    a, b = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([-1.0, 2.0, 0.5])
    t = torch.linspace(0, 1, 7)
    s, lin = explore.slerp(a, b, t), explore.lerp(a, b, t)
    assert torch.allclose(s.norm(dim=1), (1 - t) * a.norm() + t * b.norm(), atol=1e-5)
    assert (s[1:-1] - lin[1:-1]).norm(dim=1).min() > 0.1  # not parallel: off the chord
    angles = torch.acos(((s[:-1] * s[1:]).sum(1) / (s[:-1].norm(dim=1) * s[1:].norm(dim=1))).clamp(-1, 1))
    assert torch.allclose(angles, angles[0].expand(6), atol=1e-4)  # equal turns of the direction
    assert torch.allclose(angles.sum(), torch.acos(a @ b / (a.norm() * b.norm())), atol=1e-4)


def test_spherical_interpolation_slerps_every_level():
    vae, x = chain(), data()
    za, zb = posterior_levels(vae, x[0:1]), posterior_levels(vae, x[1:2])
    t = torch.arange(7) / 6
    for z, a, b in zip(interpolate_latents(vae, x[0], x[1], steps=7, mode="spherical"), za, zb):
        assert torch.equal(z, explore.slerp(a[0], b[0], t))
        assert torch.allclose(z.norm(dim=1), (1 - t) * a.norm() + t * b.norm(), atol=1e-5)


@pytest.mark.parametrize("b", [lambda a: 2.5 * a, lambda a: a.clone(), lambda a: -a, lambda a: -0.5 * a,
                               lambda a: torch.zeros_like(a)],
                         ids=["parallel", "equal", "opposite", "opposite-shorter", "zero"])
def test_slerp_of_parallel_opposite_or_zero_vectors_has_no_nan(b):
    t = torch.linspace(0, 1, 9)
    for a in (torch.tensor([0.3, -1.2, 0.7]), torch.tensor([1.5])):
        z = explore.slerp(a, b(a), t)
        assert torch.isfinite(z).all()
        assert torch.equal(z[0], a) and torch.equal(z[-1], b(a))
        if a.numel() > 1:
            assert torch.allclose(z.norm(dim=1), (1 - t) * a.norm() + t * b(a).norm(), atol=1e-5)
    assert torch.equal(explore.slerp(torch.zeros(3), torch.zeros(3), t), torch.zeros(9, 3))


def test_interpolating_an_image_with_itself_is_constant_and_finite():
    vae, x = chain(), data()
    pictures = interpolate(vae, x[4], x[4], steps=5, mode="spherical")
    assert torch.isfinite(pictures).all()
    assert torch.allclose(pictures, pictures[0].expand_as(pictures), atol=1e-6)


def test_interpolating_one_level_keeps_the_levels_above_from_a():
    vae, x = chain(), data()
    za, zb = posterior_levels(vae, x[0:1]), posterior_levels(vae, x[1:2])
    z0, z1 = interpolate_latents(vae, x[0], x[1], steps=4, level=1)
    assert torch.equal(z0, za[0].expand(4, -1)) and torch.equal(z1[-1], zb[1][0])
    z0, z1 = interpolate_latents(vae, x[0], x[1], steps=4, mode="spherical", level=0)
    assert torch.equal(z0[-1], zb[0][0]) and torch.equal(z1[0], za[1][0])
    assert not torch.allclose(z1[-1], za[1][0])  # z1 follows z0 through the model
    for bad in ({"mode": "curvy"}, {"steps": 1}, {"level": 2}):
        with pytest.raises(InputError):
            interpolate(vae, x[0], x[1], **bad)


# --------------------------------------------------------------- pictures
def _size(path):
    from PIL import Image

    assert Path(path).read_bytes()[:8] == PNG
    with Image.open(path) as png:
        return png.size


def test_pictures(tmp_path):
    vae, x = chain(), data()
    tile, pad = 8, 2
    explore.save_traversal(vae, x[0], tmp_path / "t.png", 1, units=2, steps=5)
    assert _size(tmp_path / "t.png") == (6 * (tile + pad) + pad, 2 * (tile + pad) + pad)  # 2 units, x + 5 steps
    explore.save_interpolation(vae, x[0], x[1], tmp_path / "i.png", steps=6)
    assert _size(tmp_path / "i.png") == (8 * (tile + pad) + pad, 2 * (tile + pad) + pad)  # linear, spherical
    explore.save_interpolation(vae, x[0], x[1], tmp_path / "l.png", mode="linear", steps=6)
    assert _size(tmp_path / "l.png")[1] == tile + 2 * pad
    with pytest.raises(InputError, match="picture format"):
        explore.save_traversal(vae, x[0], tmp_path / "t.gif", 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.png", "l.png", "t.png"]  # no temporary files left


# ---------------------------------------------------------- command line
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch two-level top-down run (latent dims 2,3) on small synthetic images."""
    from conftest import make_idx_dir

    base = tmp_path_factory.mktemp("explore")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYRO_VAE_CACHE", str(base / "cache"))
        idx = make_idx_dir(base / "idx", n_train=128, n_test=16)
        assert cli.main(["train", "--data-dir", str(idx), "--out", str(base / "run"), "--epochs", "1",
                         "--latent-dims", "2,3", "--guide", "top-down", "--hidden", "16", "--batch-size", "64",
                         "--no-progress"]) == 0
    return base / "run"


def test_cli_writes_traversals_and_interpolations(tiny_run, tmp_path, capsys):
    tile, pad = 28, 2
    assert cli.main(["explore", str(tiny_run), "--traverse", "0", "--traverse", "1", "--image", "3", "--units", "2",
                     "--steps", "5", "--interpolate", "0,7"]) == 0
    assert _size(tiny_run / "traversal_z0.png") == (6 * (tile + pad) + pad, 2 * (tile + pad) + pad)
    assert _size(tiny_run / "traversal_z1.png") == (6 * (tile + pad) + pad, 2 * (tile + pad) + pad)
    assert _size(tiny_run / "interpolation_0_7.png") == (7 * (tile + pad) + pad, 2 * (tile + pad) + pad)
    printed = capsys.readouterr().out
    assert "traversal_z0.png" in printed and "interpolation_0_7.png" in printed
    assert not (tiny_run / ".lock").exists()

    out = tmp_path / "pictures"
    out.mkdir()
    assert cli.main(["explore", str(tiny_run), "--interpolate", "1,2", "--mode", "spherical", "--level", "0",
                     "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["interpolation_1_2.png"]
    assert _size(out / "interpolation_1_2.png") == (11 * (tile + pad) + pad, tile + 2 * pad)  # default 9 steps


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explore", "--help"])
    text = capsys.readouterr().out
    for flag in ("--traverse", "--image", "--units", "--steps", "--span", "--interpolate", "--mode", "--level",
                 "--out", "--device"):
        assert flag in text
