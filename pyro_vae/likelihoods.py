"""Likelihoods p(x | decoder output).

A likelihood is an ``nn.Module`` with

* ``channels``: how many parameters per data value it reads from the decoder
  (the decoder's output has ``channels * x_shape[0]`` leading channels);
* ``forward(out, event_dims)``: the Pyro distribution over x, with the last
  ``event_dims`` dims declared as event dims by ``.to_event``;
* ``mean(out)``: E[x | out], for pictures of samples and reconstructions;
* ``check(x)``: raises :class:`~pyro_vae.errors.InputError` if ``x`` lies
  outside the distribution's support.
"""

import math

import pyro.distributions as dist
import torch
from torch import nn

from .errors import InputError


class Bernoulli(nn.Module):
    """p(x | z) = prod_i Bernoulli(x_i; sigmoid(logit_i)).

    For binarised images. Grey values in [0, 1] are also accepted, as in
    Pyro's VAE tutorial: the log-density is then minus the binary cross-entropy
    (not a normalised density for non-binary x).
    """

    channels = 1

    def forward(self, out, event_dims):
        return dist.Bernoulli(logits=out, validate_args=False).to_event(event_dims)

    def mean(self, out):
        return torch.sigmoid(out)

    def check(self, x):
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise InputError(
                f"the Bernoulli likelihood needs data in [0, 1]; got values in "
                f"[{x.min().item():.4g}, {x.max().item():.4g}]. Rescale the data or choose "
                "likelihood 'gaussian'"
            )


class Gaussian(nn.Module):
    """p(x | z) = prod_i N(x_i; mu_i, scale^2) with a fixed ``scale``.

    The seed's "mean squared error" term. For D data values,
    ``log p(x | z) = -||x - mu||^2 / (2 scale^2) - D log(scale) - (D/2) log(2 pi)``,
    so ``-log p = SSE / (2 scale^2) + const``: with ``scale = 1/sqrt(2)`` the
    negative log-likelihood is the summed squared error plus ``(D/2) log(pi)``,
    and MSE (the mean over values) equals ``(-log p - const) * 2 scale^2 / D``.
    """

    channels = 1

    def __init__(self, scale=1.0):
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise InputError(f"the Gaussian likelihood's scale must be a positive number, got {scale!r}; "
                             "pass a float > 0, e.g. Gaussian(scale=1.0) (--gaussian-scale 1.0 on the command line)")
        self.scale = float(scale)

    def forward(self, out, event_dims):
        return dist.Normal(out, self.scale).to_event(event_dims)

    def mean(self, out):
        return out

    def check(self, x):
        pass  # any finite value is in the support; finiteness is checked for every likelihood


LIKELIHOODS = {"bernoulli": Bernoulli, "gaussian": Gaussian}


def build(name, **kwargs):
    """The likelihood called ``name`` (``"bernoulli"`` or ``"gaussian"``)."""
    if name not in LIKELIHOODS:
        raise InputError(f"unknown likelihood {name!r}; choose one of: {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name](**kwargs)
