"""Priors p(z0) over the top latent level.

A prior is an ``nn.Module`` that :class:`pyro_vae.VAE` builds for the top
level's size with ``setup(dim)`` and then calls with no argument to get a Pyro
distribution with ``event_shape == (dim,)`` and ``batch_shape == ()``; the
model's ``pyro.plate("data", ...)`` broadcasts it over the batch. Its tensors
are buffers or parameters, so they follow ``vae.to(device)``.
"""

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormal(nn.Module):
    """p(z0) = N(0, I): the seed's prior. Has an analytic KL to Gaussian guides."""

    def setup(self, dim):
        """Make the ``(dim,)`` mean and scale buffers; returns ``self``."""
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        return self

    def forward(self):
        """``Normal(0, 1).to_event(1)`` with event shape ``(dim,)``."""
        return dist.Normal(self.loc, self.scale).to_event(1)
