"""The latent chain: a VAE's Pyro ``model`` and its two ``guide`` functions.

Sites for ``latent_dims=[D0, ..., DL]`` (top to bottom; ``B`` is the batch
size, ``x_shape`` the shape of one data point, e.g. ``(1, 28, 28)``)::

    model:  "z0" ~ prior                              value (B, D0), event dims 1
            "zl" ~ p(zl | zl-1) = transitions[l-1]     value (B, Dl), event dims 1   (l = 1..L)
            "x"  ~ likelihood(decoder(zL))            value (B, *x_shape), event dims len(x_shape)
    guide:  "z0" ... "zL", each (B, Dl), event dims 1:
      bottom-up (the seed's):  zL ~ q(zL | x) = posterior(encoder(x)),
                               zl ~ q(zl | zl+1) = guide_transitions[l]     for l = L-1 .. 0
      top-down (ladder):       d_L = encoder(x), d_l = ladder[l](d_l+1)     (deterministic, first)
                               z0 ~ ladder_heads[0](d_0)       (posterior(d_0) when L = 0)
                               zl ~ merge(head_l(d_l), p(zl | zl-1))      for l = 1 .. L
                               where head_L = posterior and merge is the Ladder VAE's
                               precision-weighted product of the two Gaussians.
      Every head comes from the posterior family (default diagonal Gaussian). With a
      flow family (``posteriors.iaf(k)``) each q above is pushed through the head's
      flow conditioned on the same features; top-down, after the merge.

A conditional VAE (``condition=K``) takes ``y`` as the second argument of both,
``model(x, y)``/``guide(x, y)``: not a site, an input, read (one-hot for labels,
``(B, K)``) by the guide's heads beside the encoder's features and by the decoder
beside the levels it reads.

Every site sits inside ``pyro.plate("data", B)`` (dim -1), so under
``Trace_ELBO(num_particles=K, vectorize_particles=True)`` values gain a leading
``K`` dim and everything still broadcasts. A one-level chain (``[D]``) has
sites ``z0`` and ``x`` only, and both guides are then the same function.

Which ELBOs: ``Trace_ELBO`` (and ``JitTrace_ELBO``) with either guide.
``TraceMeanField_ELBO`` (analytic KL per site) is valid with the top-down
guide, whose levels are drawn in the model's order so each analytic
KL(q(zl | zl-1, x) || p(zl | zl-1)) is taken at the same parent draw; with the
bottom-up guide of a chain it is not, and it raises an :class:`InputError`
(see :class:`pyro_vae.chain.BottomUpNormal`).
"""

import contextlib
import inspect
import itertools
import operator

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
import torch
from torch import nn

from . import priors as priors_
from . import registration
from .chain import (GaussianNet, MEANFIELD_BOTTOM_UP, TransitionMemo, check_temperature, mark_bottom_up,
                    mlp_features, precision_weighted, tempered)
from .errors import InputError
from .pieces import SiteShapes, check_distribution
from . import likelihoods as likelihoods_
from . import posteriors as posteriors_

GUIDES = ("bottom-up", "top-down")
KEPT = ("draw", "mean")  # what resample_below keeps of the guide: one draw per data point, or its means
_NAMES = itertools.count()


def encoder_width(encoder, x_shape):
    """The width ``F`` of the features ``(batch, F)`` that ``encoder`` makes of data ``(batch, *x_shape)``.

    ``encoder.out_features`` where it is an integer; otherwise one dry run on a batch of two zero data
    points of ``x_shape`` (no gradient, the encoder in eval mode for it, so BatchNorm statistics do not
    move; lazy modules are initialised by it). Raises :class:`InputError` where it cannot be known (no
    ``x_shape``) or the encoder's output is not ``(batch, F)``.
    """
    features = getattr(encoder, "out_features", None)
    if isinstance(features, int) and not isinstance(features, bool):
        return features
    if x_shape is None:
        raise InputError("cannot tell the width of the encoder's output: pass x_shape=(...) (the shape of one "
                         "data point; one dry run of the encoder then finds it), give the encoder an integer "
                         "attribute out_features, or pass posterior=DiagonalGaussian(width, latent_dim)")
    like = next(iter(encoder.parameters()), None)
    probe = torch.zeros(2, *x_shape, device=like.device if like is not None else None,
                        dtype=like.dtype if like is not None and like.is_floating_point() else None)
    if not isinstance(encoder, nn.Module):
        raise InputError(f"the encoder must be an nn.Module, got {type(encoder).__name__}; wrap a function in a "
                         "module (its forward calls it)")
    modes = {m: m.training for m in encoder.modules()}  # each module's own: a frozen backbone stays in eval
    encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(probe)
    except Exception as err:
        raise InputError(f"the encoder failed on a batch of data of shape {tuple(probe.shape)} (x_shape "
                         f"{tuple(x_shape)}): {type(err).__name__}: {err}; check x_shape, or give the encoder an "
                         "integer attribute out_features") from None
    finally:
        for module, training in modes.items():
            module.training = training
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise InputError(f"the encoder maps data {tuple(probe.shape)} to {got}, not features (batch, F); end "
                         "it with nn.Flatten() (or make it return one tensor of features per data point)")
    return int(out.shape[1])


def _checked_arguments(latent_dims, condition, label_site, enumerate, beta, guide, skip, ladder):
    """:class:`VAE`'s arguments checked, each refused with a one-line fix; returns ``latent_dims`` as a
    list of ints."""
    latent_dims = [int(d) for d in latent_dims]
    if not latent_dims or any(d <= 0 for d in latent_dims):
        raise InputError(f"latent_dims must be a non-empty list of positive sizes, got {latent_dims}; "
                         "pass e.g. latent_dims=[50]")
    if isinstance(condition, bool) or not isinstance(condition, int) or condition < 0:
        raise InputError(f"condition is the width K of the conditioning y (K classes, or K covariates), "
                         f"got {condition!r}; pass e.g. condition=10 (0: none)")
    if label_site and condition < 2:
        raise InputError(f"label_site=True makes the label y a site over condition=K classes; pass condition=K "
                         f"with K >= 2 (got {condition})")
    if enumerate not in ("parallel", "sequential"):
        raise InputError(f"enumerate must be 'parallel' or 'sequential', got {enumerate!r}")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise InputError(f"beta must be a number > 0 (poutine.scale needs a positive scale), got {beta!r}; "
                         "pass e.g. beta=1.0")
    if guide not in GUIDES:
        raise InputError(f"unknown guide {guide!r}; choose one of: {', '.join(GUIDES)}")
    if skip and len(latent_dims) > 1 and guide != "top-down":
        raise InputError("skip connections draw z_l given x and every level above it, which is the top-down "
                         "guide's order; use guide='top-down' with skip=True")
    if ladder and guide != "top-down" and len(latent_dims) > 1:
        raise InputError("ladder and ladder_heads are the top-down guide's networks; use guide='top-down' with them")
    return latent_dims


class VAE(nn.Module):
    """A VAE over a latent chain z0 -> z1 -> ... -> zL -> x whose ``model`` and
    ``guide`` are plain Pyro functions.

    Args:
        encoder: ``nn.Module`` mapping x ``(*batch, *x_shape)`` to features
            ``(*batch, F)``: any module (an ``nn.Sequential`` too). ``F`` is
            ``encoder.out_features`` where that is an integer, else found by
            one dry run on ``x_shape`` (:func:`encoder_width`); not needed
            when a ``posterior`` module is given (one level).
        decoder: ``nn.Module`` mapping z_L ``(*batch, D_L)`` to the likelihood's
            parameters ``(*batch, k * x_shape[0], *x_shape[1:])``,
            ``k = likelihood.channels``.
        latent_dims: sizes of the latent levels, top (z0) to bottom (zL), e.g.
            ``[16, 32, 64]``; ``[D]`` is the one-level VAE.
        prior: p(z0): a module from :mod:`pyro_vae.priors` (default standard
            normal), a Pyro distribution with event shape ``(D0,)``, or a
            callable (an ``nn.Module`` too) returning one.
        likelihood: p(x | decoder output), from :mod:`pyro_vae.likelihoods`
            (default Bernoulli).
        posterior: the guide's posterior family, used at every level: a
            callable ``(in_features, latent_dim) -> head`` such as
            :class:`~pyro_vae.posteriors.DiagonalGaussian` (default) or
            :func:`pyro_vae.posteriors.iaf` ``(k)`` (see
            :mod:`pyro_vae.posteriors`). Or one head module (an ``nn.Module``
            instance) for the level nearest the data only, zL, on the encoder's
            features ``(*batch, F)``; other levels then stay Gaussian. In the
            bottom-up guide the head at zL is q(zL | x); in the top-down guide
            its Gaussian is merged with p(zL | zL-1), then its flow (if any)
            applied.
        x_shape: shape of one data point; read from ``encoder.x_shape`` or
            ``decoder.x_shape`` when not given. Needed to sample without data.
        beta: weight of the KL term, applied as ``poutine.scale`` on the
            latent sites in both model and guide (1 = the ELBO). The scale
            used is ``beta * kl_weight``; ``kl_weight`` (default 1) is the
            attribute a KL warm-up schedule sets at each step.
        guide: ``"bottom-up"`` (the seed's, default) or ``"top-down"`` (ladder).
        transitions: optional list of L modules, ``transitions[l-1]`` mapping
            z_{l-1} ``(*batch, D_{l-1})`` to a Pyro distribution over z_l with
            event shape ``(D_l,)`` (default :class:`~pyro_vae.chain.GaussianNet`;
            the top-down guide needs ``Normal(...).to_event(1)``).
        ladder: optional list of L modules, the top-down guide's upward path:
            ``ladder[l]`` maps d_{l+1} ``(*batch, F_{l+1})`` (d_L is the
            encoder's features) to d_l ``(*batch, F_l)`` (default two softplus
            layers of ``hidden``). Needs ``guide="top-down"``.
        ladder_heads: optional list of L modules, ``ladder_heads[l]`` mapping d_l
            (for l >= 1 with ``skip``: ``cat(d_l, z_0, ..., z_l-1)``) to a Pyro
            distribution over z_l with event shape ``(D_l,)``; for l >= 1 without
            ``skip`` it must be ``Normal(...).to_event(1)``, merged by precision
            weighting with p(z_l | z_l-1). Default: the ``posterior`` family on
            ``hidden`` (+ the levels above) inputs, so a ``ladder`` of your own
            must then give d_l ``hidden`` wide. The head of zL is ``posterior``.
            Needs ``guide="top-down"``.
            :func:`pyro_vae.paper_hvae.networks` builds the VampPrior paper's
            HVAE from these pieces.
        hidden: width of the chain's own networks (transitions, bottom-up
            conditionals, ladder).
        skip: skip connections, as in the VampPrior paper's HVAE: every
            transition p(z_l | z_0 .. z_l-1) and the decoder read **every**
            level above them (concatenated, ``sum(latent_dims)`` wide for the
            decoder), and the top-down guide draws z_l ~ q(z_l | x, z_0 .. z_l-1)
            from its features of x and those levels (no precision-weighted
            merge). Needs ``guide="top-down"``; a decoder built for
            ``sum(latent_dims)`` inputs.
        name: the prefix of this VAE's parameters in Pyro's param store
            (``pyro.module(name, vae)``); by default ``"vae"``, ``"vae_1"``,
            ``"vae_2"``, ... in the order VAEs are built, so that any number of
            VAEs and a user's other Pyro models share one process and one param
            store. A name whose parameters in the store belong to another module
            is refused at the first call of ``model`` or ``guide``.
        condition: K > 0 makes a conditional VAE (Sohn et al. 2015; Kingma et al. 2014's M1+M2 family):
            ``model(x, y)`` and ``guide(x, y)`` take ``y``, class labels ``(B,)`` in ``0 .. K-1``
            (read one-hot) or any float conditioning ``(B, K)``; the guide's heads read the encoder's
            features beside it (F + K wide) and the decoder reads the levels beside it (so a decoder
            built for ``D_L + K`` inputs, ``sum(latent_dims) + K`` with ``skip``). The prior and the
            transitions do not read y: p(z) is shared, p(x | z, y) and q(z | x, y) are conditional.
            :meth:`sample` takes ``y=`` to draw a chosen class.

    The pieces passed in (networks, prior, likelihood, posterior) become
    submodules, so they move with ``.to()``/``.double()``; none is changed
    otherwise (a likelihood can be shared by VAEs of different data shapes).

    Example::

        vae = VAE(nets.MLPEncoder((1, 28, 28)), nets.MLPDecoder(64, (1, 28, 28)),
                  [16, 32, 64], guide="top-down")
        svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO())
        svi.step(x)   # x: (B, 1, 28, 28) in [0, 1]
    """

    def __init__(self, encoder, decoder, latent_dims=(50,), prior=None, likelihood=None,
                 posterior=None, x_shape=None, beta=1.0, guide="bottom-up", transitions=None, hidden=256,
                 name=None, skip=False, condition=0, label_site=False, enumerate="parallel", ladder=None,
                 ladder_heads=None):
        super().__init__()
        index = next(_NAMES)
        self.name = str(name) if name is not None else ("vae" if index == 0 else f"vae_{index}")
        latent_dims = _checked_arguments(latent_dims, condition, label_site, enumerate, beta, guide, skip,
                                         ladder is not None or ladder_heads is not None)
        self.condition = condition
        self.label_site, self.enumerate = bool(label_site), enumerate
        self.skip = bool(skip) and len(latent_dims) > 1
        above = [sum(latent_dims[:i]) if self.skip else 0 for i in range(len(latent_dims))]  # extra inputs per level
        self.latent_dims = latent_dims
        self.guide_order = guide
        self.encoder = encoder
        self.decoder = decoder
        self.prior = priors_.wrap(prior)  # set up at the end, once the guide's networks exist
        self.likelihood = likelihoods_.wrap(likelihood)
        x_shape = x_shape or getattr(encoder, "x_shape", None) or getattr(decoder, "x_shape", None)
        self.x_shape = tuple(x_shape) if x_shape is not None else None
        if hasattr(self.likelihood, "setup") and self.x_shape is None:
            raise InputError(f"{type(self.likelihood).__name__} makes parameters for each data value; give "
                             "the VAE x_shape (or an encoder with x_shape)")
        self._library_site = bool(getattr(self.likelihood, "library_site", False))  # a latent library "l"
        family = posteriors_.DiagonalGaussian if posterior is None or isinstance(posterior, nn.Module) else posterior
        needs_width = not isinstance(posterior, nn.Module) or len(latent_dims) > 1 and guide == "top-down"
        needs_width = needs_width or self.label_site or self._library_site  # classifier, q(l | x): features
        features = encoder_width(encoder, self.x_shape) + condition if needs_width else None  # h and y
        if hasattr(self.likelihood, "setup"):  # per-value parameters (a gene's dispersion), q(l | x)'s head
            self.likelihood.setup(self.x_shape, features=features, batches=condition)
        if not isinstance(posterior, nn.Module):
            posterior = posteriors_.build(family, features + above[-1], latent_dims[-1])
        self.posterior = posterior
        self._mean_takes_dims = len(inspect.signature(self.likelihood.mean).parameters) >= 2
        self.beta = float(beta)
        self._kl_weight, self._compiled_scale = 1.0, None
        self.check_each_call = True  # model/guide check x (finite, shape, support) at every call
        self._transitions_drawn = TransitionMemo()  # the top-down guide's p(z_l | z_l-1), for the model
        self._registered_in = None  # (id of the param store, trainable parameters) at the last pyro.module
        self._pieces_checked = set()  # "model", "guide": each piece's distribution checked at its first call
        self._given = None  # the y that model and guide read when called without one (see given)

        self._build_chain(dict(transitions=transitions, ladder=ladder, ladder_heads=ladder_heads), family, features,
                          above, hidden)
        # M2's q(y | x): a classifier on the encoder's features (Kingma et al. 2014)
        self.classifier = nn.Sequential(nn.Linear(features - condition, hidden), nn.Softplus(),
                                        nn.Linear(hidden, condition)) if self.label_site else None
        self.prior.setup(latent_dims[0], self)
        # a prior that reads the label (priors.PerClassGaussian) makes y a discrete level above z0 (a GMVAE):
        # the model draws z0 given y, and the decoder reads the levels alone
        self.label_in_prior = self.label_site and bool(getattr(self.prior, "reads_label", False))

    def _build_chain(self, given, family, features, above, hidden):
        """The chain's networks below z0, built in this order (which fixes their initial weights for a seed):
        the model's transitions p(z_l+1 | z_l) (``given["transitions"]``, else GaussianNets reading ``above[l+1]``
        inputs with skip connections), then the bottom-up guide's q(z_l | z_l+1) or the top-down guide's
        ladder d_l and its heads (``given["ladder"]``, ``given["ladder_heads"]``, else softplus layers and
        heads of the ``family`` of posterior on ``hidden + above[l]`` inputs). A one-level VAE gets empty
        module lists, which keep the foundation's parameter names."""
        latent_dims, levels = self.latent_dims, len(self.latent_dims) - 1  # L
        defaults = {
            "transitions": lambda: [GaussianNet(above[i + 1] or latent_dims[i], latent_dims[i + 1], hidden)
                                    for i in range(levels)],
            "ladder": lambda: [mlp_features(features if i == levels - 1 else hidden, hidden) for i in range(levels)],
            "ladder_heads": lambda: [posteriors_.build(family, hidden + above[i], latent_dims[i])
                                     for i in range(levels)]}
        modules = {key: _level_modules(key, given[key], levels) if given[key] is not None else None for key in given}
        self.transitions = nn.ModuleList(modules["transitions"] or defaults["transitions"]())
        self.guide_transitions = nn.ModuleList()  # bottom-up: q(z_l | z_l+1), index l
        self.ladder = nn.ModuleList()             # top-down: d_l = ladder[l](d_l+1), index l
        self.ladder_heads = nn.ModuleList()       # top-down: q(z_l | d_l (, z_0 .. z_l-1)), index l < L
        if levels and self.guide_order == "bottom-up":
            self.guide_transitions.extend(GaussianNet(latent_dims[i + 1], latent_dims[i], hidden, head=family)
                                          for i in range(levels))
        elif levels:
            self.ladder.extend(modules["ladder"] or defaults["ladder"]())
            self.ladder_heads.extend(modules["ladder_heads"] or defaults["ladder_heads"]())

    def q_top(self, x):
        """q(z0 | x) as a distribution, batch ``x.shape[:-len(x_shape)]``, event ``(D0,)``: a one-level
        VAE's posterior or the top-down guide's first level (used by :class:`~pyro_vae.priors.VampPrior`).

        Raises:
            InputError: for the bottom-up guide of a chain, where q(z0 | x) has no closed form.
        """
        if self.levels and self.guide_order == "bottom-up":
            raise InputError("q(z0 | x) has no closed form with the bottom-up guide of a chain (z0 is drawn "
                             "last, given z1); use guide='top-down'")
        blank = None if not self.condition else x.new_zeros(x.shape[0], self.condition)  # read with no y
        return self._ladder_head(0)(self._ladder_features(self._features(x, blank))[0])

    @property
    def kl_weight(self):
        """The warm-up's factor on the KL (the latent sites' scale is ``beta * kl_weight``); default 1.

        Raises:
            InputError: on a change after ``JitTrace_ELBO`` compiled this VAE's
                loss: the compiled loss keeps the weight it was traced with.
        """
        return self._kl_weight

    @kl_weight.setter
    def kl_weight(self, value):
        value = float(value)
        if self._compiled_scale is not None and self.beta * value != self._compiled_scale:
            raise InputError(f"JitTrace_ELBO compiled this VAE's loss with the KL scale {self._compiled_scale:g}, "
                             f"and a compiled loss cannot follow kl_weight = {value:g}; use Trace_ELBO or "
                             "TraceMeanField_ELBO with a KL warm-up (or call vae.forget_compiled_scale() once "
                             "no compiled loss of this VAE is used any more)")
        self._kl_weight = value

    @contextlib.contextmanager
    def data_checked(self):
        """Within: ``model``/``guide`` skip their per-call data check (the caller checked the whole data
        set once with :meth:`check_data`); Pyro's own validation is left as it is."""
        old, self.check_each_call = self.check_each_call, False
        try:
            yield self
        finally:
            self.check_each_call = old

    def forget_compiled_scale(self):
        """Allow ``kl_weight`` to change again after a ``JitTrace_ELBO`` compiled the loss (whose compiled
        function must then no longer be used)."""
        self._compiled_scale = None

    @property
    def levels(self):
        """L: the index of the level nearest the data (0 for a one-level VAE)."""
        return len(self.latent_dims) - 1

    def check_elbo(self, elbo):
        """Raise :class:`InputError` if the Pyro ELBO object ``elbo`` is invalid with this guide.

        ``TraceMeanField_ELBO`` (and subclasses) or any ELBO with
        ``analytic_kl`` set (:class:`~pyro_vae.objectives.FreeBitsELBO`), and
        :class:`~pyro_vae.objectives.BalancedKLELBO`, with the bottom-up guide
        of a chain are refused; everything else passes.
        """
        from pyro.infer import TraceMeanField_ELBO

        analytic = isinstance(elbo, TraceMeanField_ELBO) or getattr(elbo, "analytic_kl", False)
        if analytic and self.levels and self.guide_order == "bottom-up":
            raise InputError(MEANFIELD_BOTTOM_UP)
        if getattr(elbo, "balances_kl", False) and self.levels and self.guide_order == "bottom-up":
            raise InputError("KL balancing weighs each level's KL, but the bottom-up guide's per-level terms "
                             "are not KLs (it draws z_l before z_l-1); use guide='top-down' (--guide top-down) "
                             "with KL balancing")

    # ------------------------------------------------------------------ Pyro
    def model(self, x=None, y=None, batch_size=None, size=None):
        """The generative model p(x | zL, y) p(zL | zL-1) ... p(z1 | z0) p(z0).

        Args:
            x: observed data ``(B, *x_shape)``, or ``None`` to sample x.
            y: for a conditional VAE (``condition=K``), what x is conditioned on: class labels
                ``(B,)`` (integers ``0 .. K-1``, read one-hot) or a float tensor ``(B, K)``; the
                decoder reads it beside the levels (:meth:`conditioning`).
            batch_size: number of draws when ``x`` is ``None``.
            size: the full data set's size N when ``x`` is a minibatch of it:
                the ``"data"`` plate then scales every site by N / B, so that
                global latent variables a user adds get the full-data ELBO
                (default: the batch is the data).

        Returns:
            x: the observed or sampled data, ``(B, *x_shape)`` (with extra
            leading dims under vectorised particles).
        """
        self._register()
        y, batch_size = self._positional(y, batch_size)
        n, device = self._batch(x, batch_size)
        y = self._given if y is None else y
        c = None if self.label_site else self.conditioning(y, n, device)
        with self._data_plate(n, size, device), self._first_call_checked("model", n, x):
            if self.label_site:  # M2: y ~ Uniform{0..K-1}, observed where the labels are given
                prior = dist.Categorical(logits=torch.zeros(self.condition, device=device))
                c = self._one_hot(pyro.sample("y", prior, obs=self._labels(y, n, device)))
            with self._kl_scale():
                zs = [pyro.sample("z0", self._top_prior(c, n))]
                for level in range(1, self.levels + 1):
                    zs.append(pyro.sample(f"z{level}", self._transition(level, self._above(zs))))
            library = None
            if self._library_site:  # scVI's latent library: log l ~ N(the training cells' log libraries)
                library = pyro.sample("l", self.likelihood.library_prior(c, n)).exp().unsqueeze(-1)
            out = self.decoder(self._decoded(zs, c))
            return pyro.sample("x", self._likelihood(out, x, library), obs=x)

    def guide(self, x, y=None, batch_size=None, size=None):
        """The recognition model q(z0, ..., zL | x, y), bottom-up or top-down (see the module's doc).

        Args:
            x: data ``(B, *x_shape)``.
            y: the conditioning of a conditional VAE, as in :meth:`model`; the encoder's features are
                read beside it.
            batch_size: ignored (accepted so that model and guide take the same arguments).
            size: the full data set's size, as in :meth:`model`.

        Returns:
            z0: ``(B, D0)`` (with extra leading dims under vectorised particles).
        """
        self._register()
        n, device = self._batch(x, None)
        y = self._given if y is None else y
        c = None if self.label_site else self.conditioning(y, n, device)
        with self._data_plate(n, size, device), self._first_call_checked("guide", n, x):
            h = self.encoder(x)
            if self.label_site:  # M2: y ~ q(y | x) where no label is given, summed out by TraceEnum_ELBO
                labels = self._labels(y, n, device)
                if labels is None:
                    labels = pyro.sample("y", dist.Categorical(logits=self.classifier(h)),
                                         infer={"enumerate": self.enumerate})
                c = self._one_hot(labels)
            h = _beside(h, c)
            self._transitions_drawn.clear()  # nothing of an earlier call is kept alive
            z0 = self._top_down(h) if self.guide_order == "top-down" and self.levels else self._bottom_up(h)
            if self._library_site:
                pyro.sample("l", self.likelihood.library_posterior(h))
            return z0

    def _bottom_up(self, h):
        """zL ~ q(zL | h), then zl ~ q(zl | zl+1) for l = L-1 .. 0."""
        z = None
        for level in reversed(range(self.levels + 1)):
            q = self.posterior(h) if z is None else self.guide_transitions[level](z)
            if level > 0:
                q = mark_bottom_up(q)  # same numbers; refuses TraceMeanField_ELBO's analytic KL here
            with self._kl_scale():
                z = pyro.sample(f"z{level}", q)
        return z

    def _top_down(self, h):
        """Features d_L = h, d_l = ladder[l](d_l+1) upwards; then z0, z1, ..., zL downwards."""
        d = self._ladder_features(h)
        z = []
        for level in range(self.levels + 1):
            head = self._ladder_head(level)
            if self.skip and level > 0:  # q(z_l | x, z_0 .. z_l-1): the head reads both
                q = head(_cat([d[level], *z]))
            else:
                q = getattr(head, "gaussian", head)(d[level])  # a flow head's Gaussian half, else the whole head
                if level > 0:
                    p = self.transitions[level - 1](z[-1])
                    if "guide" not in self._pieces_checked:  # both, before the merge, which would fail less clearly
                        batch = z[-1].shape[-2] if z[-1].dim() > 1 else None
                        for piece, role in ((q, "guide"), (p, "model")):
                            check_distribution(piece, self._piece_name(role, level), (self.latent_dims[level],), batch)
                    self._transitions_drawn.put(level, z[-1], p, self.transitions[level - 1])  # for the model
                    q = precision_weighted(q, p)
                if hasattr(head, "flow"):
                    q = head.flow(q, d[level])  # the flow goes after the merge
            with self._kl_scale():
                z.append(pyro.sample(f"z{level}", q))
        return z[0]

    @contextlib.contextmanager
    def _first_call_checked(self, role, n, x):
        """At the first call of ``role`` (``"model"``, ``"guide"``) that gets this far: every piece's
        distribution checked at its site (:class:`~pyro_vae.pieces.SiteShapes`); later calls: nothing."""
        if role in self._pieces_checked:
            yield
            return
        sites = {f"z{level}": (self._piece_name(role, level), (dim,)) for level, dim in enumerate(self.latent_dims)}
        if role == "model":
            x_shape = tuple(x.shape[1:]) if x is not None else self.x_shape
            if x_shape is not None:
                sites["x"] = (f"the likelihood {type(self.likelihood).__name__}, on the decoder's output,", x_shape)
        with SiteShapes(sites, n):
            yield
        self._pieces_checked.add(role)

    def _piece_name(self, role, level):
        """The piece that makes site ``z<level>`` in ``role``, as an error message names it."""
        if role == "model":
            return "the prior p(z0)" if level == 0 else \
                f"transitions[{level - 1}], p(z{level} | z{level - 1}),"
        if level == self.levels:
            return f"the posterior head {type(self.posterior).__name__}, q(z{level} | x),"
        if self.guide_order == "top-down":
            return f"ladder_heads[{level}], q(z{level} | x{', z' + str(level - 1) if level else ''}),"
        return f"guide_transitions[{level}], q(z{level} | z{level + 1}),"

    def conditioning(self, y, n, device=None):
        """What the networks read of ``y`` for ``n`` data points: ``None`` for an unconditional VAE, else a
        float tensor ``(n, K)``: ``y`` one-hot for class labels (an integer tensor ``(n,)`` of
        ``0 .. K-1``, or one integer for all ``n``), ``y`` itself for a float tensor ``(n, K)`` (or
        ``(K,)`` for all ``n``). Anything else is refused with one line saying what is expected."""
        if not self.condition:
            if y is not None:
                raise InputError("y was given to a VAE without conditioning; build it with condition=K (K "
                                 "classes or K covariates), or leave y out")
            return None
        k = self.condition
        if y is None:
            raise InputError(f"this VAE is conditional (condition={k}): pass y, class labels (B,) in 0..{k - 1} "
                             f"or a float tensor (B, {k}), e.g. model(x, y) and guide(x, y)")
        if torch.is_tensor(y) and y.is_floating_point():
            y = y.expand(n, k) if y.shape == (k,) else y
            if y.dim() < 2 or tuple(y.shape[-2:]) != (n, k):
                raise InputError(f"a float y must have shape ({n}, {k}) (one row of {k} values per data point), "
                                 f"got {tuple(y.shape)}")
            if not bool(torch.isfinite(y).all()):
                raise InputError("y holds NaN or infinite values; pass finite covariates")
            return y.to(device) if device is not None else y
        return self._one_hot(self._class_labels(y, n, device))

    def _class_labels(self, y, n, device):
        """Class labels ``(n,)`` (integers ``0 .. K-1``) from ``y``: such a tensor, or one integer for all
        ``n``; anything else is refused with one line."""
        k = self.condition
        if isinstance(y, int) and not isinstance(y, bool):
            y = torch.full((n,), y, dtype=torch.long, device=device)
        if not torch.is_tensor(y):
            raise InputError(f"y must be a tensor (class labels (B,) or a float tensor (B, {k})), got "
                             f"{type(y).__name__}; convert it with torch.as_tensor")
        if y.dtype == torch.bool or y.is_floating_point() or y.dim() != 1 or y.shape[0] != n:
            raise InputError(f"class labels y must be an integer tensor of shape ({n},) (one per data point), got "
                             f"{y.dtype} of shape {tuple(y.shape)}")
        if n and (int(y.min()) < 0 or int(y.max()) >= k):
            raise InputError(f"class labels must lie in 0..{k - 1} (condition={k}), got values in "
                             f"{int(y.min())}..{int(y.max())}")
        return y.to(device) if device is not None else y

    def _positional(self, y, batch_size):
        """``(y, batch_size)``; for a VAE without conditioning, ``model(None, n)`` (an integer second argument,
        as ``Predictive(vae.model, ...)(None, n)`` passes it) keeps meaning ``batch_size=n``."""
        if not self.condition and batch_size is None and isinstance(y, int) and not isinstance(y, bool):
            return None, y
        return y, batch_size

    @contextlib.contextmanager
    def given(self, y):
        """Within: ``model`` and ``guide`` called without ``y`` read this ``y`` (what code that calls them
        with x alone, such as :mod:`pyro_vae.evaluate`'s per-batch traces, uses for a conditional VAE)."""
        old, self._given = self._given, y
        try:
            yield self
        finally:
            self._given = old

    def _labels(self, y, n, device):
        """M2's observed labels: ``None`` (unlabelled) or a checked integer tensor ``(n,)``."""
        if y is None:
            return None
        if torch.is_tensor(y) and y.is_floating_point():
            raise InputError("with label_site=True, y is the class label, a site: pass integer labels (B,), not "
                             "floats")
        return self._class_labels(y, n, device)

    def _one_hot(self, labels):
        """One-hot floats ``(*labels.shape, K)`` of labels of any shape (an enumerated site's too)."""
        return torch.nn.functional.one_hot(labels, self.condition).float()

    @torch.no_grad()
    def classify(self, x):
        """M2's q(y | x): class probabilities ``(B, K)`` of data ``(B, *x_shape)`` (``label_site=True``)."""
        if not self.label_site:
            raise InputError("classify needs an M2 VAE (label_site=True): it reads the guide's classifier q(y | x)")
        return torch.softmax(self.classifier(self.encoder(x)), -1)

    def model_classify(self, x, y, weight=1.0):
        """M2's auxiliary term as a Pyro model (Kingma et al. 2014; Pyro's ``ss_vae_M2.py``): ``weight *
        log q(y | x)`` of labelled data ``x`` ``(B, *x_shape)``, ``y`` ``(B,)``, as an observed site
        ``"y_aux"``; train it with :meth:`guide_classify` beside the ELBO's SVI."""
        self._register()
        n, device = self._batch(x, None)
        labels = self._labels(y, n, device)
        with self._data_plate(n, None, device), poutine.scale(scale=float(weight)):
            pyro.sample("y_aux", dist.Categorical(logits=self.classifier(self.encoder(x))), obs=labels)

    def guide_classify(self, x, y, weight=1.0):
        """The empty guide that goes with :meth:`model_classify`."""

    def _features(self, x, c):
        """The encoder's features of ``x`` ``(B, F)``, with the conditioning ``c`` ``(B, K)`` beside them."""
        return _beside(self.encoder(x), c)

    def _decoded(self, zs, c):
        """What the decoder reads: the levels it reads (:meth:`_above`), with the conditioning beside them
        (not where the label is a level above z0, ``label_in_prior``)."""
        return _beside(self._above(zs), None if self.label_in_prior else c)

    def _likelihood(self, out, x, library=None):
        """p(x | the decoder's output); a likelihood that scales by the library size (``uses_library``,
        :class:`~pyro_vae.likelihoods.ScaledCounts`) gets ``library`` (a latent one, ``(..., B, 1)``) or the
        observed ``x``'s, ``(B, 1)``."""
        if getattr(self.likelihood, "uses_library", False):
            if library is None and x is not None:
                library = x.sum(-1, keepdim=True)
            return self.likelihood(out, self._event_dims(x), library=library)
        return self.likelihood(out, self._event_dims(x))

    def _top_prior(self, c=None, n=None):
        """p(z0), or p(z0 | y) for the label's one-hot ``c`` ``(..., K)`` where the prior reads the label, its
        batch expanded to ``n`` data points (an enumerated label's ``(K, 1)`` to ``(K, n)``)."""
        if not (self.label_in_prior and c is not None):
            return self.prior()
        d = self.prior(c)
        return d if n is None else d.expand(d.batch_shape[:-1] + (n,))

    def _transition(self, level, parent):
        """p(z_level | parent): the one the top-down guide computed at this very ``parent`` tensor (the
        model replaying the guide's draw), else computed here; ``parent`` ``(*batch, D)``."""
        kept = self._transitions_drawn.take(level, parent, self.transitions[level - 1])
        return kept if kept is not None else self.transitions[level - 1](parent)

    def _ladder_features(self, h):
        """The top-down guide's deterministic path: ``[d_0, ..., d_L]`` with d_L = h, d_l = ladder[l](d_l+1)."""
        d = [h]
        for level in reversed(range(self.levels)):
            d.insert(0, self.ladder[level](d[0]))
        return d

    def _ladder_head(self, level):
        """The top-down guide's head on d_level: ``posterior`` for zL, ``ladder_heads[level]`` above."""
        return self.posterior if level == self.levels else self.ladder_heads[level]

    # ------------------------------------------------------------ helpers
    @torch.no_grad()
    def reconstruct(self, x, y=None):
        """E[x | zL] with every guide level at its mean given the mean above
        (one level: z0 = E_q[z0 | x]); ``(B, *x_shape) -> (B, *x_shape)``. ``y``: a conditional VAE's
        conditioning (see :meth:`model`); for an M2 VAE without ``y``, q(y | x)'s most probable class."""
        self.check_data(x)
        y = self._guessed(x, y)
        c = self.conditioning(y, x.shape[0], x.device)
        with pyro.validation_enabled(False), _AtMean():
            trace = poutine.trace(self.guide).get_trace(x, y)
        zs = [trace.nodes[f"z{level}"]["value"] for level in range(self.levels + 1)]
        return self._mean(self.decoder(self._decoded(zs, c)), x.dim() - 1)

    @torch.no_grad()
    def encode(self, x, y=None, level=None):
        """The guide's posterior means of ``x`` ``(B, *x_shape)``: level ``level`` ``(B, D_level)`` (default
        the level nearest the data, zL; for a one-level VAE z0), each level at q's mean given the means
        above it, as :meth:`reconstruct` reads them. ``y``: a conditional VAE's conditioning (the cells'
        batches, the labels); for an M2 VAE without it, q(y | x)'s most probable class."""
        self.check_data(x)
        level = self.levels if level is None else level
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= self.levels:
            raise InputError(f"level must be in 0..{self.levels} for a chain of {self.levels + 1} levels, got {level!r}")
        return self._guide_levels(x, level + 1, "mean", self._guessed(x, y))[level]

    @torch.no_grad()
    def expression(self, x, y=None, as_y=None, library=None, kept="mean"):
        """Normalised (and, with ``as_y``, batch-corrected) expression: each data point's latents
        (:meth:`encode`'s means, or with ``kept="draw"`` one draw of the guide, read with its own
        conditioning ``y``) decoded under the conditioning ``as_y`` (one batch for all: an ``int``, or
        ``(B,)`` / ``(B, K)``; default ``y`` itself): for a library-scaled likelihood the decoder's
        proportions times ``library`` counts (default the likelihood's ``library_size``; scVI's normalised
        expression, without ZINB's dropout), else the decoder's mean: ``(B, *x_shape)``."""
        if kept not in ("mean", "draw"):
            raise InputError(f"kept must be 'mean' or 'draw', got {kept!r}")
        zs = self._guide_levels(x, self.levels + 1, kept, self._guessed(x, y))
        c = self.conditioning(y if as_y is None else as_y, x.shape[0], x.device)
        out = self.decoder(self._decoded(zs, c))
        if getattr(self.likelihood, "uses_library", False):
            return self.likelihood.proportions(out) * (library if library is not None else self.likelihood.library_size)
        return self._mean(out, x.dim() - 1)

    @torch.no_grad()
    def sample(self, n, temperature=1.0, y=None):
        """E[x | zL] for ``n`` draws of the whole chain from the model: ``(n, *x_shape)``.

        Args:
            n: number of draws.
            y: a conditional VAE's conditioning: one class (an ``int``: all ``n`` draws of it), ``n``
                labels ``(n,)``, or floats ``(n, K)`` / ``(K,)`` (see :meth:`conditioning`).
            temperature: t >= 0; every level's p(z0) and p(z_l | z_l-1) is drawn with its
                spread scaled by t (:func:`pyro_vae.chain.tempered`), as NVAE and VDVAE
                sample. 1 (default) is the model itself, bit for bit; 0 puts every level at
                its location given the level above (a mixture prior: one component's mean).
        """
        n = _count(n)
        if self.label_site and y is None:  # M2: the label from its prior too
            y = torch.randint(0, self.condition, (n,), device=self.device)
        return self._generate([], n, check_temperature(temperature), self.conditioning(y, n, self.device))

    @torch.no_grad()
    def sample_latents(self, n, temperature=1.0):
        """The levels of ``n`` draws from the model at ``temperature`` (as in :meth:`sample`, which
        draws the same values from the same RNG state, except with a label site, whose label :meth:`sample`
        draws first; here z0 is drawn from the prior's marginal): ``[z0, ..., zL]``, each ``(n, D_l)``."""
        return self._draw_levels([], _count(n), check_temperature(temperature))

    @torch.no_grad()
    def resample_below(self, x, level, n=1, temperature=1.0, kept="draw", y=None):
        """Keep the guide's z0 ... z_{level-1} for each data point and redraw the levels below from the model.

        Shows what each level controls: ``level=0`` draws everything from the
        prior; ``level=L+1`` keeps every guide level. What is drawn, per data point:

        * kept levels z0 ... z_{level-1}: with ``kept="draw"`` (default) **one** draw of
          the guide, q(z0, ..., zL | x) (its levels from ``level`` on are dropped),
          shared by all ``n`` draws; with ``kept="mean"`` the guide's means (each level
          at q's mean given the means above, as in :meth:`reconstruct`). So along the
          ``n`` draws only the redrawn levels vary, and at ``level=L+1`` all n are equal.
        * redrawn levels z_level ... zL: ``n`` independent draws of p(z_l | z_l-1) (p(z0)
          when ``level=0``), with the spread scaled by ``temperature`` (see :meth:`sample`).

        Args:
            x: data ``(B, *x_shape)``.
            level: the first level redrawn, ``0 <= level <= L + 1``.
            n: draws per data point.
            temperature: t >= 0 for the redrawn levels (default 1: the model).
            kept: ``"draw"`` or ``"mean"``, as above.
            y: a conditional VAE's conditioning of ``x`` (see :meth:`model`), read by the guide and the decoder
                (for an M2 VAE without ``y``: q(y | x)'s most probable class).

        Returns:
            E[x | zL] ``(B, n, *x_shape)``.
        """
        return self._resample(x, level, n, temperature, kept, "level", y)

    @torch.no_grad()
    def generate_from(self, x, keep_levels, n=8, temperature=1.0, kept="draw", y=None):
        """Conditional generation: ``n`` new data points per data point with its top levels fixed.

        :meth:`resample_below` under the name of the task: z0 ... z_{keep_levels-1} from
        the guide for ``x`` (one draw, or q's means with ``kept="mean"``), the levels
        below drawn from the model at ``temperature``. The same as drawing from
        ``poutine.condition(vae.model, data={"z0": z0, ...})`` at those guide values.

        Args:
            x: data ``(B, *x_shape)``.
            keep_levels: how many top levels to keep, ``0 .. L + 1``.
            n: draws per data point.
            temperature: t >= 0 for the levels drawn from the model.
            kept: ``"draw"`` or ``"mean"``.
            y: a conditional VAE's conditioning of ``x`` (see :meth:`model`).

        Returns:
            E[x | zL] ``(B, n, *x_shape)``.
        """
        return self._resample(x, keep_levels, n, temperature, kept, "keep_levels", y)

    def _resample(self, x, level, n, temperature, kept, name, y=None):
        """:meth:`resample_below`, with ``name`` for the level argument in its errors."""
        self.check_data(x)
        if isinstance(level, bool) or not 0 <= int(level) <= self.levels + 1:
            raise InputError(f"{name} must be in 0..{self.levels + 1} for a chain of {self.levels + 1} levels, "
                             f"got {level}")
        if int(n) < 1:
            raise InputError(f"n must be a positive number of draws per data point, got {n}; use e.g. n=8")
        if kept not in KEPT:
            raise InputError(f"kept must be one of: {', '.join(KEPT)} (one guide draw per data point, or the "
                             f"guide's means), got {kept!r}")
        level, n, temperature = int(level), int(n), check_temperature(temperature)
        if self.label_in_prior and level == 0 and y is None:  # y is a level above z0: redrawn with the rest
            y = torch.randint(0, self.condition, (x.shape[0],), device=x.device)
        y = self._guessed(x, y)
        c = self.conditioning(y, x.shape[0], x.device)
        zs = [z.repeat_interleave(n, dim=0) for z in self._guide_levels(x, level, kept, y)]  # (B * n, D_l)
        c = None if c is None else c.repeat_interleave(n, dim=0)
        return self._generate(zs, x.shape[0] * n, temperature, c).reshape(x.shape[0], n, *x.shape[1:])

    def _guessed(self, x, y):
        """``y``, or for an M2 VAE given none, q(y | x)'s most probable class of each data point ``(B,)``."""
        return self.classify(x).argmax(-1) if self.label_site and y is None else y

    def _guide_levels(self, x, count, kept="draw", y=None):
        """The guide's top ``count`` levels for ``x`` ``(B, *x_shape)``: ``[z0, ..., z_{count-1}]``, each
        ``(B, D_l)``, from one draw of the guide (``kept="draw"``) or at its means (``"mean"``)."""
        if count == 0:
            return []
        with pyro.validation_enabled(False), (_AtMean() if kept == "mean" else contextlib.nullcontext()):
            trace = poutine.trace(self.guide).get_trace(x, y)
        return [trace.nodes[f"z{i}"]["value"] for i in range(count)]

    def _generate(self, zs, n, temperature=1.0, c=None):
        """Draw the levels after the kept ``zs`` (z_0 .. z_{start-1}, each ``(n, D_l)``) from the model at
        ``temperature``, then E[x | the levels the decoder reads, the conditioning ``c`` ``(n, K)``]
        ``(n, *x_shape)``."""
        zs = self._draw_levels(zs, n, temperature, c)
        return self._mean(self.decoder(self._decoded(zs, c)), len(self._need_x_shape()))

    def _draw_levels(self, zs, n, temperature=1.0, c=None):
        """The kept ``zs`` followed by the levels after them drawn from the model, each distribution
        tempered (:func:`~pyro_vae.chain.tempered`): ``[z0, ..., zL]``, each ``(n, D_l)`` (z0 given the
        label's one-hot ``c`` ``(n, K)`` where the prior reads it)."""
        zs = list(zs)
        for level in range(len(zs), self.levels + 1):
            if level == 0:
                top = tempered(self._top_prior(c), temperature, "the prior p(z0)")
                zs.append(top.sample() if self.label_in_prior and c is not None else top.sample((n,)))
            else:
                p = self.transitions[level - 1](self._above(zs))
                zs.append(tempered(p, temperature, f"the transition p(z{level} | z{level - 1})").sample())
        return zs

    def _above(self, zs):
        """What a transition or the decoder reads of the levels ``zs`` drawn so far: all of them
        (concatenated) with skip connections, else the last."""
        return _cat(zs) if self.skip else zs[-1]

    @property
    def device(self):
        """The device of the module's parameters and buffers."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def check_data(self, x):
        """Raise :class:`InputError` unless ``x`` is a finite float tensor ``(B, *x_shape)``
        inside the likelihood's support (or a ``scipy.sparse`` matrix ``(B, G)`` of such values, which
        is checked without densifying it)."""
        if hasattr(x, "tocsr") and not torch.is_tensor(x):  # sparse counts: the stored values are checked
            if self.x_shape is not None and tuple(x.shape[1:]) != self.x_shape:
                raise InputError(f"data has shape {tuple(x.shape)} but the networks expect (batch, "
                                 f"{', '.join(map(str, self.x_shape))}); build the VAE for this shape")
            if x.shape[0] == 0:
                raise InputError("data is empty (0 data points); pass at least one data point")
            values = torch.as_tensor(x.tocsr().data, dtype=torch.float32)
            if not bool(torch.isfinite(values).all()):
                raise InputError("data holds NaN or infinite values; clean or drop them before training")
            self.likelihood.check(values)
            return
        if not torch.is_tensor(x):
            raise InputError(f"data must be a torch.Tensor, got {type(x).__name__}; "
                             "convert it with torch.as_tensor(x, dtype=torch.float32)")
        if not x.is_floating_point():
            raise InputError(f"data must be a floating-point tensor, got dtype {x.dtype}; use x.float()")
        dtype = next((p.dtype for p in self.parameters()), x.dtype)
        if x.dtype != dtype:  # else the first layer fails with a RuntimeError deep inside the trace
            raise InputError(f"data has dtype {x.dtype} but the VAE's parameters are {dtype}; "
                             f"use x.to({dtype}) or vae.to({x.dtype})")
        if self.x_shape is not None and tuple(x.shape[1:]) != self.x_shape:
            raise InputError(
                f"data has shape {tuple(x.shape)} but the networks expect (batch, "
                f"{', '.join(map(str, self.x_shape))}); reshape the data or build the VAE for this shape"
            )
        if x.shape[0] == 0:
            raise InputError("data is empty (0 data points); pass at least one data point")
        if not bool(torch.isfinite(x).all()):
            raise InputError("data holds NaN or infinite values; clean or drop them before training")
        self.likelihood.check(x)

    def _batch(self, x, batch_size):
        if x is None:
            self._need_x_shape()
            if batch_size is None or int(batch_size) <= 0:
                raise InputError("model(x=None) needs a positive batch_size")
            return int(batch_size), self.device
        if self.check_each_call and not torch.jit.is_tracing():
            self.check_data(x)  # off inside pyro_vae.fit and evaluate, which check the whole data set once
        return x.shape[0], x.device

    def _kl_scale(self):
        scale = self.beta * self._kl_weight
        if torch.jit.is_tracing():  # JitTrace_ELBO compiles this scale in as a constant
            self._compiled_scale = scale
        return contextlib.nullcontext() if scale == 1.0 else poutine.scale(scale=scale)

    @staticmethod
    def _data_plate(n, size, device):
        """``pyro.plate("data")`` over the batch's ``n`` points, a subsample of ``size`` when given."""
        if size is None or int(size) == n:
            return pyro.plate("data", n, device=device)
        if int(size) < n:
            raise InputError(f"size is the full data set's size and cannot be below the batch's {n}, got {size}")
        return pyro.plate("data", int(size), subsample=torch.arange(n, device=device), device=device)

    def _register(self):
        """``pyro.module(self.name, self)``, refusing a name whose parameters in the store are another module's.

        Inside a step whose optimizer already holds the parameters (:mod:`pyro_vae.registration`), once
        this VAE registered them in this param store, and as long as as many of them are trainable as then
        (one unfrozen since registers them all again, and the optimizer takes it in at the next step),
        only the first goes through ``pyro.param``: one param site is what tells Pyro's ELBOs that the
        trace has something to train (they call ``backward`` only then), and the optimizer needs no more."""
        store = pyro.get_param_store()
        trainable = [(pname, p) for pname, p in self.named_parameters() if p.requires_grad]
        if trainable and registration.held() and self._registered_in == (id(store), len(trainable)):
            pyro.param(f"{self.name}$$${trainable[0][0]}", trainable[0][1])  # frozen ones stay out, as pyro.module
            return
        for pname, param in self.named_parameters():
            key = f"{self.name}$$${pname}"
            if key in store and store[key] is not param:
                raise InputError(f"the param store already holds {key!r} from another module, so this VAE "
                                 f"would train that module's tensors; give this VAE another name=..., or call "
                                 "pyro.clear_param_store() before building it")
            break  # one parameter tells: pyro.module registers them all together
        pyro.module(self.name, self)
        self._registered_in = (id(store), len(trainable))  # a parameter unfrozen later registers again

    def _event_dims(self, x):
        """``len(x_shape)``: from ``x`` when given (its dims after the batch dim), else from ``x_shape``."""
        if x is not None:
            return x.dim() - 1
        return len(self._need_x_shape())

    def _need_x_shape(self):
        if self.x_shape is None:
            raise InputError("drawing x without data needs the shape of one data point: pass x_shape=... to VAE "
                             "(or give the encoder or decoder an x_shape attribute)")
        return self.x_shape

    def _mean(self, out, event_dims):
        """E[x | decoder output] ``(*batch, *x_shape)`` (a user's likelihood may take ``mean(out)`` alone)."""
        return self.likelihood.mean(out, event_dims) if self._mean_takes_dims else self.likelihood.mean(out)


def _level_modules(name, modules, levels):
    """``modules`` (a user's ``transitions``, ``ladder`` or ``ladder_heads``) as a list of ``levels`` modules, or an
    :class:`InputError` that says what it must hold."""
    one = isinstance(modules, nn.Module) and not isinstance(modules, (nn.ModuleList, nn.Sequential))
    modules = [modules] if one else list(modules)
    if len(modules) != levels:
        raise InputError(f"{name} must hold {levels} module{'s' if levels != 1 else ''} (one per level below z0, "
                         f"len(latent_dims) - 1), got {len(modules)}; pass one module per level below z0, or "
                         f"{name}=None for the default networks")
    for module in modules:
        if not isinstance(module, nn.Module):
            raise InputError(f"{name} must hold nn.Module instances, got {type(module).__name__}; wrap a function "
                             "in an nn.Module")
    return modules


def _count(n):
    """``n`` as a number of draws: a positive integer (an integral tensor or NumPy number too)."""
    try:
        count = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        count = None
    if count is None or count < 1:
        raise InputError(f"the number of draws must be a positive integer, got {n!r}; pass e.g. n=64")
    return count


def _beside(t, c):
    """``t`` ``(*batch, D)`` with the conditioning ``c`` ``(*batch', K)`` concatenated after it (batch dims
    broadcast, ``c`` in ``t``'s dtype); ``t`` itself without conditioning (``c`` None)."""
    return t if c is None else _cat([t, c.to(t.dtype)])


def _cat(parts):
    """Concatenate ``(*batch_i, D_i)`` tensors along the last dim after broadcasting their batch dims
    (vectorised particles give the levels a leading dim that the encoder's features lack)."""
    batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*batch, p.shape[-1]) for p in parts], dim=-1)


class _AtMean(Messenger):
    """Set every unobserved sample site's value to its distribution's mean
    (:func:`pyro_vae.posteriors.location`: for a flow, the image of its base's mean)."""

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and msg["value"] is None and not site_is_subsample(msg):
            msg["value"] = posteriors_.location(msg["fn"])
