"""Posterior (guide) families q(z | features).

A posterior head is an ``nn.Module`` mapping encoder features of shape
``(*batch, in_features)`` to a Pyro distribution with event shape
``(latent_dim,)`` and batch shape ``*batch``.
"""

import pyro.distributions as dist
from torch import nn
from torch.nn import functional as F

from .nets import _check_width


class DiagonalGaussian(nn.Module):
    """q(z | h) = N(mu(h), diag(sigma(h)^2)): the seed's Gaussian posterior.

    A fully connected **mean head** gives ``mu`` and a fully connected
    **variance head** gives ``sigma = softplus(.) + min_scale``, positive by
    construction (``min_scale`` keeps log q finite for saturated units).

    Args:
        in_features: width of the encoder's features.
        latent_dim: size of z.
        min_scale: lower bound added to the standard deviation.
    """

    def __init__(self, in_features, latent_dim, min_scale=1e-4):
        super().__init__()
        self.in_features = _check_width("in_features", in_features)
        self.latent_dim = _check_width("latent_dim", latent_dim)
        self.min_scale = float(min_scale)
        self.mean_head = nn.Linear(self.in_features, self.latent_dim)
        self.scale_head = nn.Linear(self.in_features, self.latent_dim)

    def forward(self, h):
        """``Normal(mu, sigma).to_event(1)`` with batch shape ``h.shape[:-1]``."""
        loc = self.mean_head(h)
        scale = F.softplus(self.scale_head(h)) + self.min_scale
        return dist.Normal(loc, scale).to_event(1)
