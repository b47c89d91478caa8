"""Networks of a multilevel latent chain, and the precision-weighted merge.

Plain ``torch.nn`` modules; :class:`pyro_vae.VAE` wires them into its model
and guides. Latent tensors have shape ``(*batch, D)``; ``*batch`` may be
several dims (vectorised particles add one), which ``nn.Linear`` broadcasts.
"""

import math
import weakref

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions.kl import register_kl

from .errors import InputError
from .nets import _check_width
from .posteriors import DiagonalGaussian, build


def mlp_features(in_features, hidden):
    """Two softplus layers ``(*batch, in_features) -> (*batch, hidden)``."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus())


class GaussianNet(nn.Module):
    """A conditional distribution ``(*batch, in_features) -> q`` over ``(latent_dim,)``: two
    softplus layers of width ``hidden``, then a posterior head built by ``head`` (default
    :class:`~pyro_vae.posteriors.DiagonalGaussian`: mean head and softplus scale head,
    giving ``Normal(loc, scale).to_event(1)``).

    Used for the model's p(z_l | z_{l-1}) (always Gaussian) and the bottom-up
    guide's q(z_{l-1} | z_l) (the VAE's posterior family, e.g. an IAF).
    """

    def __init__(self, in_features, latent_dim, hidden=256, head=DiagonalGaussian):
        super().__init__()
        self.in_features = _check_width("in_features", in_features)
        self.latent_dim = _check_width("latent_dim", latent_dim)
        self.trunk = mlp_features(self.in_features, _check_width("hidden", hidden))
        self.head = build(head, hidden, self.latent_dim)

    def forward(self, z):
        return self.head(self.trunk(z))


class TransitionMemo:
    """The model's transitions p(z_l | z_l-1) that the top-down guide computed, handed to the model once.

    The top-down guide merges each level's encoder term with p(z_l | z_l-1) at the parent it drew;
    the model, replaying that draw, needs the very same distribution. The guide :meth:`put` s it,
    keyed by the level and the identity of the parent tensor (held by a weak reference), and the model
    :meth:`take` s it: a different parent (a value a user conditions on, a fresh draw) is a miss, so is
    the same parent once the transition's weights changed in place (an optimizer step, a weight
    average swapped in) or under another grad mode (a guide run under ``no_grad``), and an entry is
    taken at most once.
    Copies and pickles of the owner start empty.
    """

    def __init__(self):
        self._entries = {}

    def put(self, level, parent, transition, module):
        """Keep ``transition`` (a distribution) computed by ``module`` at ``parent`` ``(*batch, D_l-1)``."""
        self._entries[level] = (weakref.ref(parent), transition, _state(module))

    def take(self, level, parent, module):
        """The distribution kept for ``level`` if it was computed at this very ``parent`` tensor, by
        ``module`` with the same weights (no in-place change since) and in the same grad mode; else None."""
        entry = self._entries.pop(level, None)
        if entry is None or entry[0]() is not parent or entry[2] != _state(module):
            return None
        return entry[1]

    def clear(self):
        self._entries.clear()

    def __deepcopy__(self, memo):
        return TransitionMemo()

    def __getstate__(self):
        return {"_entries": {}}


def _state(module):
    """What must not change for a kept transition to stand: grad mode and every weight's version."""
    return torch.is_grad_enabled(), tuple(t._version for t in module.parameters())


def gaussian_parts(d, who, why="the top-down guide merges Gaussians", fix=" or use guide='bottom-up'"):
    """``(loc, scale)`` of a ``Normal(...).to_event(1)``; for any other distribution an
    :class:`InputError` that says ``why`` a Gaussian is needed, what ``who`` returned, and the ``fix``."""
    base = getattr(d, "base_dist", None)
    if not isinstance(base, dist.Normal) or getattr(d, "reinterpreted_batch_ndims", None) != 1:
        raise InputError(f"{why}, but {who} returned {type(d).__name__}"
                         f"({type(base).__name__ if base is not None else ''}); return "
                         f"dist.Normal(loc, scale).to_event(1){fix}")
    return base.loc, base.scale


def precision_weighted(encoder_term, prior_term):
    """The Ladder VAE's merge (Sønderby et al. 2016, eq. 17-18) of two diagonal Gaussians.

    ``N(mu_e, s_e) * N(mu_p, s_p)`` renormalised: precision ``1/s_e^2 + 1/s_p^2``
    and mean ``(mu_e/s_e^2 + mu_p/s_p^2) / precision``; all ``(*batch, D)``.

    Returns:
        ``Normal(loc, scale).to_event(1)``.
    """
    loc_e, scale_e = gaussian_parts(encoder_term, "the ladder head")
    loc_p, scale_p = gaussian_parts(prior_term, "the model's transition p(z_l | z_l-1)")
    prec_e, prec_p = scale_e.pow(-2), scale_p.pow(-2)
    variance = 1.0 / (prec_e + prec_p)
    return dist.Normal((loc_e * prec_e + loc_p * prec_p) * variance, variance.sqrt()).to_event(1)


class BottomUpNormal(dist.Normal):
    """A ``Normal`` used by the bottom-up guide at levels z1 ... zL.

    Identical to ``dist.Normal`` except that ``kl_divergence`` to the model's
    ``Normal`` raises: there q(z_l | z_{l+1}) and p(z_l | z_{l-1}) condition on
    different draws, and z_{l-1} is drawn *after* z_l in the guide, so
    ``TraceMeanField_ELBO``'s analytic KL at the sampled parents is not an
    unbiased estimate of the ELBO. The error names the fix.
    """


MEANFIELD_BOTTOM_UP = (
    "TraceMeanField_ELBO is not valid with the bottom-up guide of a multilevel chain: its analytic KL at "
    "z1..zL conditions q and p on different draws (the guide samples z_l-1 after z_l), which biases the "
    "ELBO. Use Trace_ELBO (--elbo trace) with guide='bottom-up', or guide='top-down' (--guide top-down), "
    "whose levels are sampled in the model's order and keep the analytic KL valid"
)


def mark_bottom_up(q):
    """``q`` with its ``Normal`` base swapped for :class:`BottomUpNormal` (same numbers);
    any other distribution is returned as it is."""
    base = getattr(q, "base_dist", None)
    if type(base) is dist.Normal and getattr(q, "reinterpreted_batch_ndims", None) == 1:
        return BottomUpNormal(base.loc, base.scale).to_event(1)
    return q


@register_kl(BottomUpNormal, dist.Normal)
def _refuse_meanfield_bottom_up(q, p):
    raise InputError(MEANFIELD_BOTTOM_UP)


def check_temperature(t):
    """``float(t)``, or an :class:`InputError` unless ``t`` is a finite number >= 0."""
    try:
        value = float(t)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if isinstance(t, bool) or not (math.isfinite(value) and value >= 0):
        raise InputError(f"temperature must be a finite number >= 0, got {t!r}; use e.g. temperature=0.8 "
                         "(1 draws from the model as trained, 0 puts every level at its mean)")
    return value


_LOC_SCALE = ("Normal", "Laplace", "Cauchy")  # families whose spread is their scale parameter alone


def tempered(d, t, who="the distribution"):
    """``d`` with its spread multiplied by the temperature ``t`` (the sampling of NVAE and VDVAE).

    Shapes are ``d``'s. ``t = 1`` returns ``d`` itself, whatever it is. Otherwise:
    ``Normal``, ``Laplace``, ``Cauchy``, ``StudentT``: the scale times t;
    ``MultivariateNormal``: its Cholesky factor times t; ``Independent``,
    ``TransformedDistribution`` (a flow) and ``ExpandedDistribution``: their base
    tempered; ``MixtureSameFamily`` (MoG, VampPrior): each component tempered, the
    weights kept (so at ``t = 0`` a draw is one component's mean, picked by weight);
    ``Delta``: itself. ``t = 0`` gives a zero scale: draws are the location.
    Meant for drawing; the result does not validate its arguments.

    Raises:
        InputError: for ``t`` not a finite number >= 0, or, when ``t != 1``, for any
            other family, naming ``who`` (e.g. ``"the prior p(z0)"``).
    """
    t = check_temperature(t)
    return d if t == 1.0 else _tempered(d, t, who)


def _tempered(d, t, who):
    D = torch.distributions
    if isinstance(d, D.Independent):
        return dist.Independent(_tempered(d.base_dist, t, who), d.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(d, D.MixtureSameFamily):
        return dist.MixtureSameFamily(d.mixture_distribution, _tempered(d.component_distribution, t, who),
                                      validate_args=False)
    if isinstance(d, D.TransformedDistribution):
        return dist.TransformedDistribution(_tempered(d.base_dist, t, who), d.transforms, validate_args=False)
    if isinstance(d, dist.ExpandedDistribution):
        return _tempered(d.base_dist, t, who).expand(d.batch_shape)
    if isinstance(d, dist.Delta):
        return d
    for name in _LOC_SCALE:
        if isinstance(d, getattr(D, name)):
            return getattr(dist, name)(d.loc, d.scale * t, validate_args=False)
    if isinstance(d, D.StudentT):
        return dist.StudentT(d.df, d.loc, d.scale * t, validate_args=False)
    if isinstance(d, D.MultivariateNormal):
        return dist.MultivariateNormal(d.loc, scale_tril=d.scale_tril * t, validate_args=False)
    raise InputError(f"temperature is not defined for {who}, a {type(d).__name__}: it scales the spread of Normal, "
                     "Laplace, Cauchy, StudentT and MultivariateNormal distributions (also inside Independent, "
                     "MixtureSameFamily and TransformedDistribution); use temperature=1 with this one")
