"""Networks of a multilevel latent chain, and the precision-weighted merge.

Plain ``torch.nn`` modules; :class:`pyro_vae.VAE` wires them into its model
and guides. Latent tensors have shape ``(*batch, D)``; ``*batch`` may be
several dims (vectorised particles add one), which ``nn.Linear`` broadcasts.
"""

import pyro.distributions as dist
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
