"""Likelihoods p(x | decoder output).

A likelihood is an ``nn.Module`` with

* ``channels``: how many parameters per data value it reads from the decoder
  (the decoder's output has ``channels * x_shape[0]`` leading channels);
* ``forward(out, event_dims)``: the Pyro distribution over x, with the last
  ``event_dims`` dims declared as event dims by ``.to_event``;
* ``mean(out)`` or ``mean(out, event_dims)``: E[x | out], for pictures of
  samples and reconstructions (likelihoods with ``channels > 1`` split the
  decoder's output along the data's first dim, ``event_dims`` from the right);
  the VAE passes ``event_dims = len(x_shape)`` where ``mean`` takes it, and
  never sets anything on a likelihood (one object can serve VAEs of
  different data shapes);
* ``check(x)``: raises :class:`~pyro_vae.errors.InputError` if ``x`` lies
  outside the distribution's support.
"""

import math

import numpy as np
import pyro.distributions as dist
from pyro.distributions.torch_distribution import TorchDistributionMixin
import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError


class Likelihood(nn.Module):
    """Base class: ``channels = 1``; ``levels = None``.

    ``levels``: for a likelihood over a finite set of values per dimension, evenly spaced in [0, 1]
    (``i / (levels - 1)``), their number: 2 for :class:`Bernoulli` on {0, 1}, 256 for the 8-bit
    :class:`DiscretizedLogistic`. Its log-probabilities are then log masses, and
    :func:`pyro_vae.evaluate.evaluate` reports bits per dimension for data on that grid.
    """

    channels = 1
    levels = None

    def check(self, x):
        pass  # any finite value is in the support; finiteness is checked for every likelihood


class Bernoulli(Likelihood):
    """p(x | z) = prod_i Bernoulli(x_i; sigmoid(logit_i)).

    For binarised images. Grey values in [0, 1] are also accepted, as in
    Pyro's VAE tutorial: the log-density is then minus the binary cross-entropy
    (not a normalised density for non-binary x).
    """

    levels = 2

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


class Gaussian(Likelihood):
    """p(x | z) = prod_i N(x_i; mu_i, sigma_i^2).

    ``mode="fixed"`` (the seed's "mean squared error"): sigma = ``scale``. For
    D data values ``log p(x | z) = -||x - mu||^2 / (2 scale^2) - D log(scale) - (D/2) log(2 pi)``,
    so ``-log p = SSE / (2 scale^2) + const``: with ``scale = 1/sqrt(2)`` the
    negative log-likelihood is the summed squared error plus ``(D/2) log(pi)``,
    and MSE (the mean over values) equals ``(-log p - const) * 2 scale^2 / D``.
    ``mode="learned"``: one global sigma = softplus(raw), initialised at ``scale``
    and trained with the rest. ``mode="pixel"``: the decoder predicts
    sigma_i = softplus(.) + 1e-3 for every value (``channels = 2``: means first).
    """

    MODES = ("fixed", "learned", "pixel")

    def __init__(self, scale=1.0, mode="fixed"):
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise InputError(f"the Gaussian likelihood's scale must be a positive number, got {scale!r}; "
                             "pass a float > 0, e.g. Gaussian(scale=1.0) (--gaussian-scale 1.0 on the command line)")
        if mode not in self.MODES:
            raise InputError(f"unknown Gaussian mode {mode!r}; choose one of: {', '.join(self.MODES)}")
        self.scale, self.mode = float(scale), mode
        self.channels = 2 if mode == "pixel" else 1
        if mode == "learned":
            self.raw_scale = nn.Parameter(torch.tensor(math.log(math.expm1(self.scale))))

    def forward(self, out, event_dims):
        loc, scale = self._parts(out, event_dims)
        return dist.Normal(loc, scale).to_event(event_dims)

    def _parts(self, out, event_dims):
        if self.mode == "pixel":
            loc, raw = _split(out, 2, event_dims)
            return loc, F.softplus(raw) + 1e-3
        if self.mode == "learned":
            return out, F.softplus(self.raw_scale)
        return out, self.scale

    def mean(self, out, event_dims):
        return self._parts(out, event_dims)[0]


def _in_unit_interval(name, x, closed=True, fix="rescale the data to [0, 1]"):
    inside = ((x >= 0) & (x <= 1)) if closed else ((x > 0) & (x < 1))
    if not bool(inside.all()):
        bad = x[~inside]
        raise InputError(f"the {name} likelihood needs data in {'[0, 1]' if closed else '(0, 1)'}; got "
                         f"{bad.numel()} values outside, e.g. {bad.flatten()[:3].tolist()}; {fix}")


def _counts(name, x):
    if not bool((x >= 0).all()):
        bad = x[x < 0]
        raise InputError(f"the {name} likelihood needs counts >= 0; got {bad.numel()} negative values, "
                         f"e.g. {bad.flatten()[:3].tolist()}; pass raw counts, not normalised or log data")
    if not bool((x == x.round()).all()):
        bad = x[x != x.round()]
        raise InputError(f"the {name} likelihood needs whole-number counts; got {bad.numel()} non-integers, "
                         f"e.g. {bad.flatten()[:3].tolist()}; pass raw counts (as floats), not normalised data")


class ContinuousBernoulli(Likelihood):
    """p(x | z) = prod_i CB(x_i; sigmoid(logit_i)) (Loaiza-Ganem & Cunningham 2019): the
    normalised density on [0, 1] for grey values that are not binary."""

    def forward(self, out, event_dims):
        return dist.ContinuousBernoulli(logits=out).to_event(event_dims)

    def mean(self, out):
        return dist.ContinuousBernoulli(logits=out).mean

    def check(self, x):
        _in_unit_interval("ContinuousBernoulli", x)


class Laplace(Likelihood):
    """p(x | z) = prod_i Laplace(x_i; mu_i, b_i), b_i = softplus(.) + 1e-3 from the decoder
    (``channels = 2``: locations first): an L1 reconstruction term with a learned scale."""

    channels = 2

    def forward(self, out, event_dims):
        loc, raw = _split(out, 2, event_dims)
        return dist.Laplace(loc, F.softplus(raw) + 1e-3).to_event(event_dims)

    def mean(self, out, event_dims):
        return _split(out, 2, event_dims)[0]


class Beta(Likelihood):
    """p(x | z) = prod_i Beta(x_i; a_i, b_i), a, b = softplus(.) + 1e-3 from the decoder
    (``channels = 2``). Data must lie strictly inside (0, 1)."""

    channels = 2

    def _dist(self, out, event_dims):
        a, b = _split(out, 2, event_dims)
        return dist.Beta(F.softplus(a) + 1e-3, F.softplus(b) + 1e-3)

    def forward(self, out, event_dims):
        return self._dist(out, event_dims).to_event(event_dims)

    def mean(self, out, event_dims):
        return self._dist(out, event_dims).mean

    def check(self, x):
        _in_unit_interval("Beta", x, closed=False, fix="squeeze it inside, e.g. x.clamp(1e-3, 1 - 1e-3) in Python or --squeeze 1e-3 "
                          "on the command line")


class DiscretizedLogisticMixture(dist.TorchDistribution):
    """A mixture of ``K`` logistics discretised to the ``2**bits`` values ``i / (2**bits - 1)`` of [0, 1]
    (PixelCNN++, IAF, NVAE): each value's mass is the logistic CDF over its bin, the two end bins
    taking the tails. Parameters ``(*batch, K)``; values ``(*batch)`` on the grid."""

    arg_constraints = {}
    support = dist.constraints.unit_interval
    has_rsample = False

    def __init__(self, logits, loc, log_scale, bits=8, validate_args=None):
        self.logits, self.loc, self.log_scale, self.bits = logits, loc, log_scale.clamp(min=-7.0), bits
        super().__init__(logits.shape[:-1], validate_args=False)

    def log_prob(self, x):
        half = 0.5 / (2 ** self.bits - 1)
        x = x.unsqueeze(-1)
        inv_scale = torch.exp(-self.log_scale)
        upper = torch.where(x >= 1 - half, torch.full_like(x, math.inf), (x + half - self.loc) * inv_scale)
        lower = torch.where(x <= half, torch.full_like(x, -math.inf), (x - half - self.loc) * inv_scale)
        # log(sigmoid(upper) - sigmoid(lower)) without cancellation: from the CDF left of the mean and
        # from the survival function right of it (the end bins are then log CDF and log survival exactly)
        tiny = torch.finfo(x.dtype).tiny

        def log_difference(big, small):  # log(exp(big) - exp(small)), small <= big
            return big + torch.log(-torch.expm1((small - big).clamp(max=-tiny)))

        left = log_difference(F.logsigmoid(upper), F.logsigmoid(lower))
        right = log_difference(F.logsigmoid(-lower), F.logsigmoid(-upper))
        log_mass = torch.where(x < self.loc, left, right)
        return torch.logsumexp(torch.log_softmax(self.logits, -1) + log_mass, -1)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.batch_shape
            k = dist.Categorical(logits=self.logits).sample(sample_shape)
            pick = lambda t: t.expand(shape + t.shape[-1:]).gather(-1, k.unsqueeze(-1)).squeeze(-1)  # noqa: E731
            u = torch.rand(shape, device=self.loc.device, dtype=self.loc.dtype).clamp(1e-5, 1 - 1e-5)
            x = pick(self.loc) + torch.exp(pick(self.log_scale)) * (torch.log(u) - torch.log1p(-u))
            levels = 2 ** self.bits - 1
            return (x.clamp(0, 1) * levels).round() / levels

    @property
    def mean(self):
        return (torch.softmax(self.logits, -1) * self.loc).sum(-1).clamp(0, 1)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return DiscretizedLogisticMixture(self.logits.expand(shape + self.logits.shape[-1:]),
                                          self.loc.expand(shape + self.loc.shape[-1:]),
                                          self.log_scale.expand(shape + self.log_scale.shape[-1:]), self.bits)


class DiscretizedLogistic(Likelihood):
    """p(x | z) = prod_i of a ``k``-component discretised logistic mixture over the 256 values of
    an 8-bit pixel (``x`` in [0, 1] on the grid i/255). ``channels = 3k``: mixture logits, means
    and log-scales per value (``k = 1``: a single discretised logistic)."""

    def __init__(self, k=1, bits=8):
        super().__init__()
        if int(k) < 1:
            raise InputError(f"DiscretizedLogistic needs k >= 1 components, got {k}; use e.g. k=5")
        self.k, self.bits = int(k), int(bits)
        self.channels = 3 * self.k
        self.levels = 2 ** self.bits

    def _dist(self, out, event_dims):
        logits, loc, log_scale = (t.unflatten(out.dim() - event_dims, (self.k, -1)).movedim(
            out.dim() - event_dims, -1) for t in _split(out, 3, event_dims))
        return DiscretizedLogisticMixture(logits, torch.sigmoid(loc), log_scale, self.bits)

    def forward(self, out, event_dims):
        return self._dist(out, event_dims).to_event(event_dims)

    def mean(self, out, event_dims):
        return self._dist(out, event_dims).mean

    def check(self, x):
        _in_unit_interval("DiscretizedLogistic", x, fix="pass 8-bit images divided by 255")
        levels = 2 ** self.bits - 1
        off = (x * levels - (x * levels).round()).abs() > 1e-3
        if bool(off.any()):
            raise InputError(f"the DiscretizedLogistic likelihood needs values on the grid i/{levels}; got "
                             f"{int(off.sum())} values off it, e.g. {x[off].flatten()[:3].tolist()}; pass "
                             f"{self.bits}-bit images divided by {levels} (not dynamically binarised or "
                             "normalised data)")


class Poisson(Likelihood):
    """p(x | z) = prod_i Poisson(x_i; softplus(.) + 1e-6) for counts."""

    def forward(self, out, event_dims):
        return dist.Poisson(F.softplus(out) + 1e-6).to_event(event_dims)

    def mean(self, out):
        return F.softplus(out) + 1e-6

    def check(self, x):
        _counts("Poisson", x)


class NegativeBinomial(Likelihood):
    """p(x | z) = prod_i NB(x_i; r_i, logits_i), r = softplus(.) + 1e-4 (``channels = 2``:
    logits first, then the dispersion), mean r * exp(logits)."""

    channels = 2

    def _parts(self, out, event_dims):
        logits, raw = _split(out, 2, event_dims)
        return F.softplus(raw) + 1e-4, logits

    def forward(self, out, event_dims):
        r, logits = self._parts(out, event_dims)
        return dist.NegativeBinomial(total_count=r, logits=logits).to_event(event_dims)

    def mean(self, out, event_dims):
        r, logits = self._parts(out, event_dims)
        return r * torch.exp(logits)

    def check(self, x):
        _counts("NegativeBinomial", x)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """The NB above with a zero-inflation gate pi_i = sigmoid(.) (``channels = 3``: logits,
    dispersion, gate logits), as scVI uses for gene counts; mean (1 - pi) r exp(logits)."""

    channels = 3

    def _parts(self, out, event_dims):
        logits, raw, gate = _split(out, 3, event_dims)
        return F.softplus(raw) + 1e-4, logits, gate

    def forward(self, out, event_dims):
        r, logits, gate = self._parts(out, event_dims)
        return dist.ZeroInflatedNegativeBinomial(total_count=r, logits=logits, gate_logits=gate).to_event(event_dims)

    def mean(self, out, event_dims):
        r, logits, gate = self._parts(out, event_dims)
        return torch.sigmoid(-gate) * r * torch.exp(logits)

    def check(self, x):
        _counts("ZeroInflatedNegativeBinomial", x)


class ScaledCounts(Likelihood):
    """Counts the way scVI models them: the decoder gives each cell's expression **proportions**
    ``rho = softmax(out)`` over the G genes, scaled by the cell's **observed library size** ``l`` (its total
    count), so the mean is ``l * rho``; the dispersion of NB/ZINB is one learnt value per gene
    (``dispersion="gene"``, scVI's default) or read from the decoder per cell and gene
    (``"gene-cell"``). Held-out ELBOs and IW estimates are then of log p(x | l), conditional on the
    library (the library is an input, not modelled).

    ``uses_library = True``: :class:`~pyro_vae.VAE` passes the library of the observed ``x``
    (``x.sum(-1)``, ``(B, 1)``) as ``forward(out, event_dims, library=...)``; where no ``x`` is observed
    (:meth:`~pyro_vae.VAE.sample`) the library is ``library_size`` (default 10 000: expression per 10k
    counts, as normalised expression is usually shown). Data are vectors ``(G,)``.

    Args:
        family: ``"poisson"``, ``"nb"`` or ``"zinb"`` (a zero-inflation gate read from the decoder).
        library: ``"observed"`` (the default: the cell's total count, an input) or ``"latent"``: a site
            ``"l"``, the log library, in the model ~ N(mean, sd) of the training cells' log libraries (per
            batch for a VAE conditioned on batches; :meth:`library_prior_from` sets it) and in the guide
            q(log l | x) (:meth:`library_posterior`), as scVI's latent library; the ELBO and IW estimate are
            then of log p(x).
        dispersion: ``"gene"`` or ``"gene-cell"`` (NB/ZINB only).
        library_size: the library where none is observed.

    ``channels``: 1 (proportions) + 1 for a ``gene-cell`` dispersion + 1 for ZINB's gate. The per-gene
    dispersion is made for G genes by ``setup(x_shape)``, which the VAE calls (so, unlike the others,
    one object serves one data shape). ``library_groups``: how many batches the latent library's prior
    has (default ``None``: one per column of the VAE's conditioning, which is then a batch one-hot; set it
    where continuous covariates follow the batch's B columns).
    """

    library_groups = None

    uses_library = True
    FAMILIES = ("poisson", "nb", "zinb")
    DISPERSIONS = ("gene", "gene-cell")

    def __init__(self, family="nb", dispersion="gene", library_size=1e4, library="observed"):
        super().__init__()
        if library not in ("observed", "latent"):
            raise InputError(f"library must be 'observed' or 'latent', got {library!r}")
        self.library_site = library == "latent"
        if family not in self.FAMILIES:
            raise InputError(f"unknown count family {family!r}; choose one of: {', '.join(self.FAMILIES)}")
        if dispersion not in self.DISPERSIONS:
            raise InputError(f"unknown dispersion {dispersion!r}; choose one of: {', '.join(self.DISPERSIONS)}")
        if not (isinstance(library_size, (int, float)) and library_size > 0):
            raise InputError(f"library_size must be a positive number of counts, got {library_size!r}")
        self.family, self.dispersion, self.library_size = family, dispersion, float(library_size)
        per_cell = family != "poisson" and dispersion == "gene-cell"
        self.channels = 1 + per_cell + (family == "zinb")
        self.raw_dispersion = None

    def setup(self, x_shape, features=None, batches=0):
        """Make the per-gene dispersion for data ``(G,)`` and, for a latent library, the guide's head
        q(log l | h) on the ``features`` the guide reads and the prior's buffers (one per batch of
        ``batches``, or one); returns ``self``."""
        if len(x_shape) != 1:
            raise InputError(f"scaled counts are cells x genes vectors (G,), got data of shape {tuple(x_shape)}")
        if self.family != "poisson" and self.dispersion == "gene" and self.raw_dispersion is None:
            self.raw_dispersion = nn.Parameter(torch.zeros(x_shape[0]))  # softplus(0) + 1e-4 ~ 0.69
        if self.library_site and not hasattr(self, "library_head"):
            self.library_head = nn.Linear(features, 2)
            groups = max(1, batches if self.library_groups is None else self.library_groups)
            self.register_buffer("library_loc", torch.full((groups,), float("nan")))
            self.register_buffer("library_scale", torch.ones(groups))
        return self

    @torch.no_grad()
    def library_prior_from(self, x, batches=None):
        """Set the latent library's prior, scVI's: log l ~ N(mean, sd) of the log library sizes of the
        training cells ``x`` ``(N, G)`` (a tensor or a scipy sparse matrix), per batch with ``batches``
        ``(N,)`` (indices ``0 .. B-1``)."""
        sums = torch.as_tensor(np.asarray(x.sum(-1)).reshape(-1) if hasattr(x, "tocsr") else x.sum(-1).cpu(),
                               dtype=torch.float32)
        logs = sums.clamp(min=1.0).log()
        groups = torch.zeros_like(logs, dtype=torch.long) if batches is None else torch.as_tensor(batches).cpu()
        for b in range(len(self.library_loc)):
            mine = logs[groups == b]
            if len(mine):
                self.library_loc[b] = mine.mean()
                self.library_scale[b] = mine.std().clamp(min=1e-2) if len(mine) > 1 else 1.0
        return self

    def library_prior(self, c, n):
        """p(log l) for ``n`` cells: ``Normal(loc_b, sd_b)`` of each cell's batch (one-hot ``c``
        ``(..., n, B)``, or ``(..., n, B + C)`` with continuous covariates after the batch; ``None``: the one
        prior), batch ``(n,)``."""
        if bool(torch.isnan(self.library_loc).any()):
            raise InputError("the latent library's prior is not set: call likelihood.library_prior_from(x_train, "
                             "batches) before training (pyro-vae train does)")
        if c is None or len(self.library_loc) == 1:
            return dist.Normal(self.library_loc[0], self.library_scale[0]).expand([n])
        c = c[..., :len(self.library_loc)]  # the batch one-hot leads; continuous covariates follow it
        return dist.Normal(c @ self.library_loc, c @ self.library_scale)

    def library_posterior(self, h):
        """q(log l | h): ``Normal`` from the guide's features ``h`` ``(..., n, F)``, batch ``(..., n)``."""
        loc, raw = self.library_head(h).unbind(-1)
        return dist.Normal(loc + 8.0, F.softplus(raw) + 1e-4)  # + 8: about a log library of 3000 counts at init

    def _parts(self, out, library):
        parts = list(out.chunk(self.channels, dim=-1))
        log_rho = torch.log_softmax(parts.pop(0), -1)
        library = torch.full_like(out[..., :1], self.library_size) if library is None else library
        log_mean = log_rho + torch.log(library.clamp(min=1.0))
        if self.family == "poisson":
            return log_mean, None, None
        raw = parts.pop(0) if self.dispersion == "gene-cell" else self.raw_dispersion
        gate = parts.pop(0) if self.family == "zinb" else None
        return log_mean, F.softplus(raw) + 1e-4, gate

    def forward(self, out, event_dims, library=None):
        log_mean, r, gate = self._parts(out, library)
        if r is None:
            return dist.Poisson(log_mean.exp()).to_event(event_dims)
        logits = log_mean - torch.log(r)  # NB(r, p): mean r p / (1 - p) = r exp(logits)
        if gate is None:
            return dist.NegativeBinomial(total_count=r.expand_as(logits), logits=logits).to_event(event_dims)
        return dist.ZeroInflatedNegativeBinomial(total_count=r.expand_as(logits), logits=logits,
                                                 gate_logits=gate).to_event(event_dims)

    def mean(self, out, event_dims, library=None):
        """E[x | out] ``(*batch, G)`` at ``library`` (``(*batch, 1)``; default ``library_size``)."""
        log_mean, _, gate = self._parts(out, library)
        return log_mean.exp() * (1.0 if gate is None else torch.sigmoid(-gate))

    def proportions(self, out):
        """The decoder's expression proportions ``rho`` ``(*batch, G)``, each row summing to 1."""
        return torch.softmax(out.chunk(self.channels, dim=-1)[0], -1)

    def check(self, x):
        _counts(f"{self.family} (library-scaled)", x)


class UserLikelihood(Likelihood):
    """Wraps a user's callable ``fn(decoder_out) -> Pyro distribution`` (batch shape of x
    element-wise, or already with the data's event dims). ``mean`` is the distribution's
    ``mean``; the data are checked against its ``support``."""

    def __init__(self, fn, channels=1):
        super().__init__()
        self.fn, self.channels = fn, int(channels)

    def forward(self, out, event_dims):
        d = self.fn(out)
        if not isinstance(d, TorchDistributionMixin):
            raise InputError(f"the likelihood callable must return a Pyro distribution, got {type(d).__name__}; "
                             "use pyro.distributions")
        missing = event_dims - len(d.event_shape)
        return d.to_event(missing) if 0 < missing <= len(d.batch_shape) else d  # else the site check names it

    def mean(self, out):
        return self.fn(out).mean


def _split(out, k, event_dims):
    """Split the decoder's output ``(*batch, k*C, *rest)`` into ``k`` tensors ``(*batch, C, *rest)``
    along the data's first dim (``event_dims`` = ``len(x_shape)`` from the right)."""
    return out.chunk(k, dim=out.dim() - event_dims)


LIKELIHOODS = ("bernoulli", "cbernoulli", "gaussian[:fixed|learned|pixel]", "laplace", "beta", "dlogistic[:K]",
               "poisson", "nb", "zinb", "poisson:library", "nb:library[-cell]", "zinb:library[-cell]",
               "poisson|nb|zinb:latent-library")


def from_name(name, gaussian_scale=1.0):
    """A likelihood from its command-line name (see ``LIKELIHOODS``)."""
    kind, _, arg = str(name).partition(":")
    simple = {"bernoulli": Bernoulli, "cbernoulli": ContinuousBernoulli, "laplace": Laplace, "beta": Beta,
              "poisson": Poisson, "nb": NegativeBinomial, "zinb": ZeroInflatedNegativeBinomial}
    if kind in simple and not arg:
        return simple[kind]()
    if kind in ScaledCounts.FAMILIES and arg in ("library", "library-cell") and (kind != "poisson" or arg == "library"):
        return ScaledCounts(kind, "gene-cell" if arg == "library-cell" else "gene")
    if kind in ScaledCounts.FAMILIES and arg == "latent-library":
        return ScaledCounts(kind, library="latent")
    if kind == "gaussian" and arg in ("", *Gaussian.MODES):
        return Gaussian(gaussian_scale, mode=arg or "fixed")
    if kind == "dlogistic" and (not arg or arg.isdigit()):
        return DiscretizedLogistic(int(arg) if arg else 1)
    raise InputError(f"unknown likelihood {name!r}; choose one of: {', '.join(LIKELIHOODS)}")


def build(name, **kwargs):
    """The likelihood called ``name`` (kept for old callers; see :func:`from_name`)."""
    return from_name(name, **kwargs)


def wrap(likelihood):
    """A likelihood module: ``likelihood`` itself if it has ``channels``, else a :class:`UserLikelihood`."""
    if likelihood is None:
        return Bernoulli()
    if hasattr(likelihood, "channels") and hasattr(likelihood, "mean"):
        return likelihood
    if not callable(likelihood):
        raise InputError(f"likelihood must be a pyro_vae.likelihoods module or a callable returning a Pyro "
                         f"distribution, got {type(likelihood).__name__}; pass e.g. likelihoods.Bernoulli()")
    return UserLikelihood(likelihood)
