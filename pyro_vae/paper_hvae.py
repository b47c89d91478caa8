"""The VampPrior paper's two-level HVAE networks, as pieces of this library's chain.

Tomczak & Welling's HVAE (``models/HVAE_2level.py`` of ``jmtomczak/vae_vampprior``) is
p(x | z1, z2) p(z1 | z2) p(z2) with q(z2 | x) q(z1 | x, z2). In this library's indexing the
top level z2 is ``z0`` and z1 is ``z1``; :func:`networks` gives :class:`pyro_vae.VAE` (with
``guide="top-down"`` and ``skip=True``) every network of it, each as the paper's code builds it::

    q(z0 | x)      = ClampedGaussian(g(g(x)))                        two gated layers of x, its own
    q(z1 | x, z0)  = ClampedGaussian(g([g(x), g(z0)]))                one gated layer of x, its own; one of z0
    p(z1 | z0)     = ClampedGaussian(g(g(z0)))
    p(x | z0, z1)  = Linear(g([g(z0), g(z1)]))                        the likelihood's parameters (logits)

``g`` is a :class:`~pyro_vae.nets.GatedDense` layer of ``hidden`` units (the paper: 300), ``[a, b]`` a
concatenation (the joint layers read ``2 * hidden``), every head a
:class:`~pyro_vae.posteriors.ClampedGaussian` (log-variance in [-6, 2]), and every linear map's weights
drawn as the paper's ``he_init`` draws them, N(0, 2 / fan_in) (biases as PyTorch's default).

How they sit in the chain: the "encoder" is q(z0 | x)'s two layers with x passed along beside them
(``(*batch, hidden + pixels)``), the ladder's one step keeps the layers' half, its head is q(z0 | x), and the
posterior of z1 reads the encoder's output beside z0 (the top-down guide with skip connections hands it
``cat(d_1, z0)``) and runs its own gated layer on the x in it. The VampPrior's q(z0 | u_k) runs the
pseudo-inputs through the same path (:meth:`pyro_vae.VAE.q_top`), as the paper's ``q_z2(means)``, and so
through q(z0 | x)'s layers only.
"""

import math

import torch
from torch import nn

from .errors import InputError
from .nets import GatedDense, _check_input, _check_width, _check_x_shape, _gated
from .posteriors import ClampedGaussian

ARCHS = ("gated-hvae",)  # architectures this module builds whole chains for (see nets.ARCHS for the others)


def he_init(module):
    """Every ``nn.Linear`` weight in ``module`` redrawn from N(0, 2 / in_features), as the paper's ``he_init``;
    returns ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2.0 / m.in_features))
    return module


class TopEncoder(nn.Module):
    """q(z0 | x)'s encoder, with x passed along for q(z1 | x, z0): ``(*batch, *x_shape) -> (*batch, hidden +
    pixels)``, its two gated layers' features, then the flattened x."""

    def __init__(self, x_shape, hidden=300):
        super().__init__()
        self.x_shape = _check_x_shape(x_shape)
        self.hidden = _check_width("hidden", hidden)
        self.pixels = math.prod(self.x_shape)
        self.out_features = self.hidden + self.pixels
        self.net = _gated([self.pixels, self.hidden, self.hidden])

    def forward(self, x):
        _check_input(self, x, self.x_shape)
        flat = x.reshape(*x.shape[: x.dim() - len(self.x_shape)], -1)
        return torch.cat([self.net(flat), flat], dim=-1)


class FirstHalf(nn.Module):
    """The ladder's step from :class:`TopEncoder`'s output to q(z0 | x)'s features: ``(*batch, hidden + pixels)
    -> (*batch, hidden)``, the first ``hidden`` (no parameters)."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = _check_width("hidden", hidden)

    def forward(self, d):
        return d[..., : self.hidden]


class LowerPosterior(nn.Module):
    """q(z1 | x, z0): ``cat(d_1, z0)`` ``(*batch, hidden + pixels + D0)`` (the top-down guide with skip
    connections hands :class:`TopEncoder`'s output and the level above) -> ``Normal(...).to_event(1)`` over
    ``(D1,)``. Its own gated layer reads the x in d_1, another z0, and a joint gated layer both."""

    def __init__(self, hidden, pixels, top_dim, latent_dim):
        super().__init__()
        self.hidden = _check_width("hidden", hidden)
        self.pixels = _check_width("pixels", pixels)
        self.top_dim = _check_width("top_dim", top_dim)
        self.from_x = GatedDense(self.pixels, self.hidden)
        self.from_z = GatedDense(self.top_dim, self.hidden)
        self.joint = GatedDense(2 * self.hidden, self.hidden)
        self.head = ClampedGaussian(self.hidden, latent_dim)

    def forward(self, h):
        if h.shape[-1] != self.hidden + self.pixels + self.top_dim:
            raise InputError(f"LowerPosterior reads cat(features ({self.hidden}), x ({self.pixels}), z0 "
                             f"({self.top_dim})), got {h.shape[-1]} inputs; build the VAE with guide='top-down', "
                             "skip=True and no condition (the paper's HVAE reads nothing beside x)")
        x, z0 = h[..., self.hidden: self.hidden + self.pixels], h[..., self.hidden + self.pixels:]
        return self.head(self.joint(torch.cat([self.from_x(x), self.from_z(z0)], dim=-1)))


class GatedTransition(nn.Module):
    """p(z1 | z0): two gated layers and a :class:`~pyro_vae.posteriors.ClampedGaussian`, ``(*batch, D0) ->
    Normal(...).to_event(1)`` over ``(D1,)``."""

    def __init__(self, top_dim, latent_dim, hidden=300):
        super().__init__()
        self.net = _gated([_check_width("top_dim", top_dim), hidden, hidden])
        self.head = ClampedGaussian(hidden, latent_dim)

    def forward(self, z):
        return self.head(self.net(z))


class JoinedDecoder(nn.Module):
    """p(x | z0, z1)'s network: one gated layer per level, a joint gated layer of both, a linear map to the
    likelihood's parameters: ``(*batch, D0 + D1) -> (*batch, k*C, *x_shape[1:])``."""

    def __init__(self, latent_dims, x_shape, hidden=300, out_channels=1):
        super().__init__()
        self.dims = [_check_width("latent_dim", d) for d in latent_dims]
        self.latent_dim = sum(self.dims)
        self.x_shape = _check_x_shape(x_shape)
        self.out_channels = _check_width("out_channels", out_channels)
        self.out_shape = (self.out_channels * self.x_shape[0], *self.x_shape[1:])
        hidden = _check_width("hidden", hidden)
        self.levels = nn.ModuleList(GatedDense(d, hidden) for d in self.dims)
        self.joint = GatedDense(len(self.dims) * hidden, hidden)
        self.out = nn.Linear(hidden, math.prod(self.out_shape))

    def forward(self, z):
        _check_input(self, z, (self.latent_dim,))
        parts = torch.split(z, self.dims, dim=-1)
        h = self.joint(torch.cat([layer(part) for layer, part in zip(self.levels, parts)], dim=-1))
        return self.out(h).reshape(*z.shape[:-1], *self.out_shape)


def networks(x_shape, latent_dims, hidden=300, out_channels=1):
    """The paper's HVAE as :class:`pyro_vae.VAE` keyword arguments: ``encoder`` (:class:`TopEncoder`),
    ``decoder`` (:class:`JoinedDecoder`), ``transitions`` ([:class:`GatedTransition`]), ``ladder``
    ([:class:`FirstHalf`]), ``ladder_heads`` ([:class:`~pyro_vae.posteriors.ClampedGaussian`], q(z0 | x)) and
    ``posterior`` (:class:`LowerPosterior`, q(z1 | x, z0)), every linear weight He-initialised; to be used with
    ``guide="top-down", skip=True``.

    Args:
        x_shape: shape of one data point, e.g. ``(1, 28, 28)``.
        latent_dims: ``[D0, D1]`` (the paper: ``[40, 40]``), top level first.
        hidden: the gated layers' width (the paper: 300).
        out_channels: ``k = likelihood.channels``.

    Raises:
        InputError: unless ``latent_dims`` has two levels.
    """
    dims = [int(d) for d in latent_dims]
    if len(dims) != 2:
        raise InputError(f"paper_hvae.networks builds the VampPrior paper's two-level HVAE, got {len(dims)} level(s) "
                         f"{dims}; pass latent_dims=[D0, D1] (e.g. [40, 40])")
    hidden = _check_width("hidden", hidden)
    encoder = TopEncoder(x_shape, hidden)
    parts = dict(encoder=encoder, transitions=[GatedTransition(dims[0], dims[1], hidden)],
                 ladder=[FirstHalf(hidden)], ladder_heads=[ClampedGaussian(hidden, dims[0])],
                 posterior=LowerPosterior(hidden, encoder.pixels, dims[0], dims[1]),
                 decoder=JoinedDecoder(dims, x_shape, hidden, out_channels))
    for value in parts.values():
        for module in value if isinstance(value, list) else [value]:
            he_init(module)
    return parts
