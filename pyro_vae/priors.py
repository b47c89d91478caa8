"""Priors p(z0) over the top latent level.

A prior is an ``nn.Module`` that :class:`pyro_vae.VAE` builds for the top
level's size with ``setup(dim, vae)`` and then calls with no argument to get a
Pyro distribution with ``event_shape == (dim,)`` and ``batch_shape == ()``;
the model's ``pyro.plate("data", ...)`` broadcasts it over the batch. Its
tensors are buffers or parameters, so they follow ``vae.to(device)`` and
learnable ones are trained by SVI with the rest (``pyro.module`` registers
the whole VAE).

Analytic KL: only :class:`StandardNormal` and :class:`LearnedNormal` have one
to the Gaussian guides. With the others ``TraceMeanField_ELBO`` falls back,
per site, to the sampled ``log q - log p`` (Pyro's own fallback when
``kl_divergence`` is not registered), which is still an unbiased ELBO.

A user's own prior: any Pyro distribution with event shape ``(dim,)``, or
any callable (an ``nn.Module`` too, whose parameters are then trained)
returning one; :func:`wrap` wraps it.
"""

import functools
import math

import pyro.distributions as dist
from pyro.distributions.torch_distribution import TorchDistributionMixin
import torch
from torch import nn
from torch.nn import functional as F

from .chain import gaussian_parts
from .errors import InputError


class StandardNormal(nn.Module):
    """p(z0) = N(0, I): the seed's prior. Has an analytic KL to Gaussian guides."""

    def setup(self, dim, vae=None):
        """Make the ``(dim,)`` mean and scale buffers; returns ``self``."""
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        return self

    def forward(self):
        """``Normal(0, 1).to_event(1)`` with event shape ``(dim,)``."""
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedNormal(nn.Module):
    """p(z0) = N(mu, diag(sigma^2)) with learnable ``mu`` (init 0) and
    ``sigma = softplus(raw)`` (init 1). Has an analytic KL to Gaussian guides."""

    def setup(self, dim, vae=None):
        self.loc = nn.Parameter(torch.zeros(dim))
        self.raw_scale = nn.Parameter(torch.full((dim,), math.log(math.expm1(1.0))))
        return self

    def forward(self):
        return dist.Normal(self.loc, F.softplus(self.raw_scale)).to_event(1)


class DiagonalNormalMixture(dist.MixtureSameFamily):
    """``MixtureSameFamily`` of k diagonal ``Normal(loc, scale).to_event(1)``
    components (``loc``, ``scale``: ``(k, D)``) whose ``log_prob`` needs no
    ``(*batch, k, D)`` tensor.

    Each component's log-density is a quadratic in z, so for z ``(*batch, D)``
    all k of them, with their mixture weights w, come from one matrix product,
    ``[z^2, z, 1] @ [-P / 2, mu P, log w - sum(mu^2 P) / 2 - sum(log sigma) - D log(2 pi) / 2]^T``
    with ``P = sigma^-2``, done in float64 (float32 on MPS, which has none) so that the cancellation
    between large terms (small sigma) costs no accuracy. Same values as
    ``MixtureSameFamily.log_prob`` (tested to 1e-4 nats), at a fraction of
    the memory: what makes a 500-component VampPrior affordable for the IW
    estimate's millions of particles. Sampling is ``MixtureSameFamily``'s.
    """

    def __init__(self, mixture_distribution, component_distribution, validate_args=None):
        super().__init__(mixture_distribution, component_distribution, validate_args)
        base = component_distribution.base_dist
        # the unbatched parameters, kept through the plate's .expand so the products stay (k, D)-sized
        self._parameters = (mixture_distribution.logits, base.loc, base.scale) if base.loc.dim() == 2 else None

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance or DiagonalNormalMixture.__new__(DiagonalNormalMixture))
        new._parameters = self._parameters
        return new

    def log_prob(self, z):
        """``(*batch, D) -> (*batch)``, the mixture's log-density in z's dtype."""
        if self._parameters is None:  # built with a batch shape of its own
            return super().log_prob(z)
        if self._validate_args:
            self._validate_sample(z)
        wide = torch.float32 if z.device.type == "mps" else torch.float64  # MPS has no float64
        logits, loc, scale = (t.to(wide) for t in self._parameters)  # (k,), (k, D), (k, D)
        precision = scale.pow(-2)
        log_norm = scale.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)  # (k,)
        const = torch.log_softmax(logits, -1) - log_norm - 0.5 * (loc * loc * precision).sum(-1)  # (k,)
        z64 = z.to(wide)
        # one product (the constant through a column of ones) and one pass over its (*batch, k) result, which
        # the IW estimate's particles make large
        features = torch.cat([z64 * z64, z64, torch.ones_like(z64[..., :1])], -1)  # (*batch, 2D + 1)
        weights = torch.cat([-0.5 * precision, loc * precision, const[:, None]], -1)  # (k, 2D + 1)
        log_p = torch.logsumexp(features @ weights.T, -1).to(z.dtype)
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))


def diagonal_normal_mixture(logits, loc, scale):
    """A :class:`DiagonalNormalMixture` with weights ``softmax(logits)`` ``(k,)`` and
    components ``Normal(loc, scale).to_event(1)``, ``loc`` and ``scale`` ``(k, D)``;
    batch shape ``()``, event shape ``(D,)``."""
    return DiagonalNormalMixture(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))


class MixtureOfGaussians(nn.Module):
    """p(z0) = sum_k w_k N(mu_k, diag(sigma_k^2)) with learnable weights (softmax of
    logits, init uniform), means (init N(0, 1)) and scales (softplus, init 1),
    a :class:`DiagonalNormalMixture` (a ``pyro.distributions.MixtureSameFamily``).

    Args:
        k: number of components.
    """

    def __init__(self, k=10):
        super().__init__()
        if int(k) < 1:
            raise InputError(f"MixtureOfGaussians needs k >= 1 components, got {k}; use e.g. k=10")
        self.k = int(k)

    def setup(self, dim, vae=None):
        self.logits = nn.Parameter(torch.zeros(self.k))
        self.locs = nn.Parameter(torch.randn(self.k, dim))
        self.raw_scales = nn.Parameter(torch.full((self.k, dim), math.log(math.expm1(1.0))))
        return self

    def forward(self):
        return diagonal_normal_mixture(self.logits, self.locs, F.softplus(self.raw_scales))


class PerClassGaussian(nn.Module):
    """A discrete top level: y ~ Categorical(uniform over k classes), then p(z0 | y) = N(mu_y,
    diag(sigma_y^2)) with learnable means (init N(0, 1)) and scales (softplus, init 1): the Gaussian-
    mixture VAE whose component is a Pyro site (``"y"``), rather than summed inside the prior's density
    as :class:`MixtureOfGaussians` does.

    Give it to an M2 VAE, ``VAE(condition=k, label_site=True, prior=PerClassGaussian(k))``: the model
    then draws ``"y"`` and z0 given it, and the decoder reads the levels alone (not y, as in M2); the
    guide's classifier q(y | x) draws y, enumerated by ``TraceEnum_ELBO`` (or observed, with labels), and
    z0 ~ q(z0 | x, y). Without labels, q(y | x) is a clustering of the data.

    Called with the label one-hot ``c`` ``(..., k)``: ``Normal(c @ mu, c @ sigma).to_event(1)``, batch
    ``c.shape[:-1]``; with nothing: the marginal, the uniform mixture of the k Gaussians.

    Args:
        k: number of classes.
    """

    reads_label = True

    def __init__(self, k=10):
        super().__init__()
        if isinstance(k, bool) or int(k) < 2:
            raise InputError(f"PerClassGaussian needs k >= 2 classes, got {k}; use e.g. k=10")
        self.k = int(k)

    def setup(self, dim, vae=None):
        if vae is not None and (not getattr(vae, "label_site", False) or vae.condition != self.k):
            raise InputError(f"PerClassGaussian({self.k}) is p(z0 | y) for a label site y over {self.k} classes; "
                             f"build the VAE with condition={self.k} and label_site=True")
        self.locs = nn.Parameter(torch.randn(self.k, dim))
        self.raw_scales = nn.Parameter(torch.full((self.k, dim), math.log(math.expm1(1.0))))
        return self

    def forward(self, c=None):
        scales = F.softplus(self.raw_scales)
        if c is None:
            return diagonal_normal_mixture(torch.zeros_like(self.locs[:, 0]), self.locs, scales)
        return dist.Normal(c @ self.locs, c @ scales).to_event(1)


class VampPrior(nn.Module):
    """The VampPrior (Tomczak & Welling 2018): p(z0) = (1/k) sum_k q(z0 | u_k), a
    mixture of the guide's own posteriors at ``k`` learnable pseudo-inputs u_k.

    The pseudo-inputs have the data's shape and live in [0, 1]: ``sigmoid`` of a
    learnable tensor initialised around 0.5 with small noise (``inputs="sigmoid"``,
    the default), or, as the paper's code has them, ``hardtanh(w, 0, 1)`` of a
    learnable ``w`` drawn from N(0.05, 0.01^2) (``inputs="hardtanh"``: dark images
    to start, and a pixel pushed out of [0, 1] stops learning).
    q(z0 | u) must be available in closed form: a one-level VAE or the
    top-down guide (where z0 is drawn first); the bottom-up guide of a chain
    draws z0 last, given z1, and is refused.

    Args:
        k: number of pseudo-inputs.
        inputs: ``"sigmoid"`` or ``"hardtanh"``, how the pseudo-inputs are parametrised.
    """

    INPUTS = ("sigmoid", "hardtanh")

    def __init__(self, k=500, inputs="sigmoid"):
        super().__init__()
        if int(k) < 1:
            raise InputError(f"VampPrior needs k >= 1 pseudo-inputs, got {k}; use e.g. k=500")
        if inputs not in self.INPUTS:
            raise InputError(f"VampPrior's inputs must be one of {', '.join(self.INPUTS)}, got {inputs!r}")
        self.k, self.inputs = int(k), inputs

    def setup(self, dim, vae=None):
        if vae is None or vae.x_shape is None:
            raise InputError("VampPrior needs the VAE's data shape: pass x_shape=... to VAE")
        if vae.levels and vae.guide_order == "bottom-up":
            raise InputError("VampPrior needs q(z0 | x) in closed form, but the bottom-up guide of a chain draws "
                             "z0 last, given z1; use guide='top-down' (--guide top-down) or another prior")
        if hasattr(vae._ladder_head(0), "flow"):
            raise InputError("the VampPrior is a mixture of Gaussian posteriors q(z0 | u_k), but the guide's head for "
                             "z0 is a flow (an IAF posterior); use the gaussian posterior (--posterior gaussian) "
                             "or another prior")
        noise = torch.randn(self.k, *vae.x_shape)
        self.pseudo_inputs = nn.Parameter(0.1 * noise if self.inputs == "sigmoid" else 0.05 + 0.01 * noise)
        self._q_top = vae.q_top  # a bound method, not a submodule: no cycle in the module tree
        return self

    def images(self):
        """The pseudo-inputs u_k in [0, 1], ``(k, *x_shape)``."""
        if self.inputs == "sigmoid":
            return torch.sigmoid(self.pseudo_inputs)
        return F.hardtanh(self.pseudo_inputs, 0.0, 1.0)

    def forward(self):
        q = self._q_top(self.images())  # batch (k,), event (dim,)
        loc, scale = gaussian_parts(q, "the guide's head for z0", why="the VampPrior is a mixture of Gaussian "
                                    "posteriors q(z0 | u_k)", fix=" or use another prior")
        return diagonal_normal_mixture(loc.new_zeros(self.k), loc, scale)


class FlowPrior(nn.Module):
    """p(z0): a standard normal pushed through ``k`` affine autoregressive flows
    (``pyro.distributions.transforms.affine_autoregressive``), used in the
    inverse (MAF) direction so that scoring z0, which every ELBO step does, is
    one parallel pass; sampling (only for pictures) is sequential.

    Args:
        k: number of flow steps.
        hidden: widths of each flow's autoregressive network.
    """

    def __init__(self, k=2, hidden=(64,)):
        super().__init__()
        if int(k) < 1:
            raise InputError(f"FlowPrior needs k >= 1 flow steps, got {k}; use e.g. k=2")
        self.k, self.hidden = int(k), [int(h) for h in hidden]

    def setup(self, dim, vae=None):
        if dim < 2:
            raise InputError(f"FlowPrior needs a top level of 2 or more dimensions, got {dim}")
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.flows = nn.ModuleList(dist.transforms.affine_autoregressive(dim, hidden_dims=self.hidden)
                                   for _ in range(self.k))
        return self

    def forward(self):
        base = dist.Normal(self.loc, self.scale).to_event(1)
        return dist.TransformedDistribution(base, [flow.inv for flow in self.flows])


class UserPrior(nn.Module):
    """Wraps a user's Pyro distribution or callable (see :func:`wrap`)."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior  # an nn.Module is registered as a submodule, so its parameters train

    def setup(self, dim, vae=None):
        self.dim = dim
        d = self()
        if not isinstance(d, TorchDistributionMixin):
            raise InputError(f"the prior must be a Pyro distribution or return one, got {type(d).__name__}; "
                             "use pyro.distributions (e.g. dist.Normal(loc, scale).to_event(1))")
        if tuple(d.event_shape) != (dim,) or tuple(d.batch_shape) != ():
            raise InputError(f"the prior must have event shape ({dim},) and batch shape (), got event shape "
                             f"{tuple(d.event_shape)} and batch shape {tuple(d.batch_shape)}; "
                             "use .to_event(1) on a distribution over a vector of the top level's size")
        return self

    def forward(self):
        if isinstance(self.prior, TorchDistributionMixin):  # a distribution is callable too: it samples
            return self.prior
        return self.prior()

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.double()``, ``.cuda()``: a plain distribution's tensors follow the module too."""
        if isinstance(self.prior, TorchDistributionMixin):
            _apply_to_distribution(self.prior, fn)
        return super()._apply(fn, *args, **kwargs)


def _apply_to_distribution(d, fn):
    """Replace every tensor held by distribution ``d`` (and its base distributions) by ``fn(tensor)``."""
    for key, value in list(vars(d).items()):
        if torch.is_tensor(value):
            setattr(d, key, fn(value))
        elif isinstance(value, torch.distributions.Distribution):
            _apply_to_distribution(value, fn)


def wrap(prior):
    """A prior module, not yet set up: ``prior`` itself if it has ``setup``,
    :class:`StandardNormal` for ``None``, else a :class:`UserPrior` around a
    Pyro distribution or a callable returning one."""
    if prior is None:
        prior = StandardNormal()
    if not hasattr(prior, "setup"):
        if not (isinstance(prior, TorchDistributionMixin) or callable(prior)):
            raise InputError(f"prior must be a pyro_vae.priors module, a Pyro distribution or a callable "
                             f"returning one, got {type(prior).__name__}; pass e.g. priors.MixtureOfGaussians(10) "
                             "or dist.Normal(torch.zeros(D), 1.0).to_event(1)")
        prior = UserPrior(prior)
    return prior


PRIORS = ("standard", "learned", "mog:K", "vamp:K", "flow:K", "gmvae:K", "vamp-hardtanh:K")


def from_name(name):
    """A prior from its command-line name: ``standard``, ``learned``, ``mog:K``, ``vamp:K``, ``vamp-hardtanh:K``
    (a :class:`VampPrior` with the paper's code's pseudo-inputs), ``flow:K``, ``gmvae:K``
    (:class:`PerClassGaussian`, the discrete top level)."""
    kind, _, k = str(name).partition(":")
    simple = {"standard": StandardNormal, "learned": LearnedNormal}
    counted = {"mog": MixtureOfGaussians, "vamp": VampPrior, "flow": FlowPrior, "gmvae": PerClassGaussian,
               "vamp-hardtanh": functools.partial(VampPrior, inputs="hardtanh")}
    if kind in simple and not k:
        return simple[kind]()
    if kind in counted:
        try:
            return counted[kind](int(k) if k else {"mog": 10, "vamp": 500, "flow": 2, "gmvae": 10,
                                                   "vamp-hardtanh": 500}[kind])
        except ValueError:
            pass
    raise InputError(f"unknown prior {name!r}; choose one of: {', '.join(PRIORS)} (K a positive integer)")
