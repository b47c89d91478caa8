"""Posterior (guide) families q(z | features).

A **posterior head** is an ``nn.Module`` mapping features ``(*batch, F)`` to
a Pyro distribution over z with event shape ``(D,)`` and batch shape
``*batch``. A **family** is anything that builds one,
``family(in_features, latent_dim) -> head``: the classes
:class:`DiagonalGaussian` (the default) and :class:`IAF` themselves, or
:func:`iaf` ``(k)``, or a user's own callable. :class:`pyro_vae.VAE` builds
one head per latent level from a family: for q(zL | x) on the encoder's
features, for each bottom-up q(z_l | z_l+1) on its network's features, and
for each top-down ladder level.

A head that is a Gaussian followed by a flow (:class:`IAF`) exposes the two
halves, ``gaussian(h)`` and ``flow(q, h)``: the top-down guide merges the
Gaussian with the model's p(z_l | z_l-1) (precision weighting) and then
applies the flow to the merged Gaussian, so the flow works at every level.
"""

import functools

import pyro.distributions as dist
from pyro.distributions.transforms import conditional_affine_autoregressive
import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError
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


class ClampedGaussian(nn.Module):
    """q(z | h) = N(mu(h), diag(exp(lv(h)))) with the log-variance clamped: the VampPrior paper's Gaussian heads.

    ``mu`` is a linear map of h; ``lv = hardtanh(linear(h), min_logvar, max_logvar)`` (the paper's code:
    ``NonLinear(F, D, activation=nn.Hardtanh(-6, 2))``), so the standard deviation lies in
    ``[exp(min_logvar / 2), exp(max_logvar / 2)]`` (0.05 to 2.7 by default).

    Args:
        in_features: width of the features h.
        latent_dim: size of z.
        min_logvar, max_logvar: the clamp on the log-variance.
    """

    def __init__(self, in_features, latent_dim, min_logvar=-6.0, max_logvar=2.0):
        super().__init__()
        self.in_features = _check_width("in_features", in_features)
        self.latent_dim = _check_width("latent_dim", latent_dim)
        if not float(min_logvar) < float(max_logvar):
            raise InputError(f"min_logvar must be below max_logvar, got {min_logvar} and {max_logvar}; "
                             "use e.g. -6 and 2")
        self.min_logvar, self.max_logvar = float(min_logvar), float(max_logvar)
        self.mean_head = nn.Linear(self.in_features, self.latent_dim)
        self.logvar_head = nn.Linear(self.in_features, self.latent_dim)

    def forward(self, h):
        """``Normal(mu, exp(lv / 2)).to_event(1)`` with batch shape ``h.shape[:-1]``."""
        logvar = F.hardtanh(self.logvar_head(h), self.min_logvar, self.max_logvar)
        return dist.Normal(self.mean_head(h), torch.exp(0.5 * logvar)).to_event(1)


class IAF(nn.Module):
    """q(z | h): a diagonal Gaussian pushed through ``k`` inverse autoregressive
    flow steps conditioned on h (Kingma et al. 2016).

    ``z_0 ~ N(mu(h), sigma(h)^2)`` (a :class:`DiagonalGaussian`), then for each
    step ``z_t = s_t * z_t-1 + (1 - s_t) * m_t`` with ``m_t, s_t = sigmoid(.)``
    from a MADE network of ``(z_t-1, h)``: Pyro's
    ``conditional_affine_autoregressive(D, F, stable=True)``, each step with
    its own random order of the D inputs. Drawing z is one parallel pass per
    step, and ``log q`` of that draw comes from the transforms' cache at no
    extra cost, which is all the ELBO and the IW estimate ever ask for; scoring
    an arbitrary z runs the inverse, D sequential passes per step.

    Args:
        in_features: width F of the features h (also the flows' context).
        latent_dim: size D of z, at least 2.
        k: number of flow steps.
        hidden: widths of each step's MADE network (default Pyro's ``[10 * D]``).
        min_scale: lower bound on the base Gaussian's standard deviation.
    """

    def __init__(self, in_features, latent_dim, k=2, hidden=None, min_scale=1e-4):
        super().__init__()
        k = _flow_steps(k)
        if int(latent_dim) < 2:
            raise InputError(f"the IAF posterior needs a latent level of 2 or more dimensions, got {latent_dim}; "
                             "use the gaussian posterior for a 1-dimensional level")
        if hidden is not None and any(int(w) < int(latent_dim) for w in hidden):
            raise InputError(f"the IAF's MADE networks need hidden widths >= the latent size {latent_dim}, got "
                             f"{list(hidden)}; use e.g. hidden=({10 * int(latent_dim)},) or hidden=None")
        self.gaussian = DiagonalGaussian(in_features, latent_dim, min_scale)
        self.flows = nn.ModuleList(
            conditional_affine_autoregressive(int(latent_dim), self.gaussian.in_features,
                                              None if hidden is None else [int(w) for w in hidden], stable=True)
            for _ in range(k))

    def flow(self, q, h):
        """``q`` (over z, ``Normal(...).to_event(1)``) pushed through the k steps conditioned on h
        ``(*batch, F)``: a ``TransformedDistribution`` with ``q``'s shapes."""
        return dist.TransformedDistribution(q, [flow.condition(h) for flow in self.flows])

    def forward(self, h):
        """q(z | h), batch shape ``h.shape[:-1]``, event shape ``(D,)``."""
        return self.flow(self.gaussian(h), h)


def iaf(k=2, hidden=None):
    """The family of :class:`IAF` heads with ``k`` steps: ``iaf(k)(in_features, latent_dim) -> IAF``."""
    return functools.partial(IAF, k=_flow_steps(k), hidden=hidden)


def _flow_steps(k):
    """``int(k)``, or an :class:`InputError` unless it is at least 1."""
    if int(k) < 1:
        raise InputError(f"the IAF posterior needs k >= 1 flow steps, got {k}; use e.g. k=2 (--posterior iaf:2)")
    return int(k)


def location(q):
    """A point summary of the guide's q at a site, shaped like a draw: ``q.mean`` where
    the distribution has one; for a flow (a ``TransformedDistribution``) the image of its
    base's mean under the transforms (for an IAF, where the Gaussian's mean goes)."""
    try:
        return q.mean
    except NotImplementedError:
        transforms = getattr(q, "transforms", None)
        if transforms is None:
            raise
        z = location(q.base_dist)
        for transform in transforms:
            z = transform(z)
        return z


POSTERIORS = ("gaussian", "iaf:K")


def from_name(name):
    """A posterior family from its command-line name: ``gaussian`` or ``iaf:K`` (``iaf`` is ``iaf:2``)."""
    kind, _, k = str(name).partition(":")
    if kind == "gaussian" and not k:
        return DiagonalGaussian
    if kind == "iaf":
        try:
            steps = int(k or 2)
        except ValueError:
            steps = 0
        if steps >= 1:
            return iaf(steps)
    raise InputError(f"unknown posterior {name!r}; choose one of: {', '.join(POSTERIORS)} (K a positive integer)")


def build(posterior, in_features, latent_dim):
    """A head from a family (see the module's doc); a clear error if the result is not an ``nn.Module``."""
    if isinstance(posterior, nn.Module) or not callable(posterior):
        raise InputError(f"a posterior family must be a callable (in_features, latent_dim) -> nn.Module, got "
                         f"{type(posterior).__name__}; pass e.g. posteriors.DiagonalGaussian or posteriors.iaf(2)")
    head = posterior(in_features, latent_dim)
    if not isinstance(head, nn.Module):
        raise InputError(f"the posterior family returned {type(head).__name__}, not an nn.Module; it must build a "
                         "head mapping features (*batch, F) to a Pyro distribution over (*batch, D)")
    return head
