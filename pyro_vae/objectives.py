"""Tools against posterior collapse: a KL warm-up schedule and the free-bits objective.

* :class:`KLWarmup` gives the weight that :attr:`pyro_vae.VAE.kl_weight`
  takes at each step; the VAE applies ``beta * kl_weight`` through
  ``poutine.scale`` on every latent site of both model and guide, so the
  loss at a step is ``-E_q[log p(x | zL)] + beta * kl_weight * KL`` (each
  latent site's ``log q - log p`` scaled).
* :class:`FreeBitsELBO` is ``Trace_ELBO`` with a KL floor per latent site
  (per level). It is a training objective, **not** a bound on log p(x):
  report the ELBO and the IW estimate from :mod:`pyro_vae.evaluate`.
* :class:`BalancedKLELBO` is ``Trace_ELBO`` whose per-level KLs are reweighted
  during the KL warm-up (NVAE's KL balancing), so that no level is switched
  off early; after the warm-up it is ``Trace_ELBO`` exactly.
* :class:`SemiSupervisedELBO` is the semi-supervised M2 objective: ``TraceEnum_ELBO`` (the label summed
  out on unlabelled batches) plus, on labelled batches, Kingma et al.'s auxiliary classification term.
"""

import contextlib
import math
import warnings

import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .errors import InputError


class KLWarmup:
    """Linear KL warm-up: the weight at 0-based step ``t`` is ``min(1, (t + 1) / steps)``.

    It starts at ``1 / steps`` (small and positive, as ``poutine.scale``
    needs) and is 1 from step ``steps - 1`` on. ``steps=0`` means no warm-up
    (always 1).

    Example::

        warmup = KLWarmup(5000)
        for t, x in enumerate(batches):
            vae.kl_weight = warmup(t)
            svi.step(x)
        vae.kl_weight = 1.0
    """

    def __init__(self, steps):
        if int(steps) != steps or steps < 0:
            raise InputError(f"KL warm-up steps must be an integer >= 0 (0: off), got {steps}; "
                             "pass e.g. KLWarmup(10000), or 0 for no warm-up")
        self.steps = int(steps)

    def __call__(self, step):
        """The KL weight (a float in (0, 1]) for 0-based step ``step``."""
        if self.steps == 0:
            return 1.0
        return min(1.0, (int(step) + 1) / self.steps)


class FreeBitsELBO(Trace_ELBO):
    """``Trace_ELBO`` with free bits per latent site (Kingma et al. 2016, IAF paper, eq. 15).

    For each latent site (each level z_l) and each particle, the minibatch-mean KL
    ``k_l = mean over data points of log q(z_l | .) - log p(z_l | .)``
    enters the loss as ``max(free_bits, k_l)`` per data point, times the
    site's scale (β, KL warm-up). Above the floor the loss is exactly
    ``Trace_ELBO``'s; below it the level's KL is a constant, so nothing
    pushes that level's KL further down. The observed sites enter as in the
    ELBO. The loss is therefore a training objective, **not** a bound.

    Args:
        free_bits: the floor, in nats per data point per level (>= 0).
        analytic_kl: use ``kl_divergence(q, p)`` per site where one is
            registered (as ``TraceMeanField_ELBO`` does), else the sampled
            ``log q - log p``.
        **kwargs: passed to ``Trace_ELBO`` (``num_particles``,
            ``vectorize_particles``, ``max_plate_nesting``, ...).

    Latent sites must be reparameterised (every guide in :mod:`pyro_vae` is).
    The floor is taken per particle, so vectorised particles and particles
    drawn one at a time give the same objective for the same draws. (It
    overrides ``Trace_ELBO``'s per-particle loss, ``_differentiable_loss_particle``,
    the one place where Pyro combines a particle's model and guide traces.)
    """

    def __init__(self, free_bits, analytic_kl=False, **kwargs):
        if not (isinstance(free_bits, (int, float)) and math.isfinite(free_bits) and free_bits >= 0):
            raise InputError(f"free bits must be a number of nats >= 0, got {free_bits!r}")
        super().__init__(**kwargs)
        self.free_bits = float(free_bits)
        self.analytic_kl = bool(analytic_kl)

    def site_kls(self, model_trace, guide_trace):
        """Per latent site: the unscaled KL per data point ``(*particles, B)`` and the site's scale."""
        out = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            q_site = guide_trace.nodes.get(name)
            if q_site is None:
                raise InputError(f"latent site {name!r} of the model has no match in the guide; give the guide a "
                                 "sample site of the same name for every latent site of the model")
            if not q_site["fn"].has_rsample:
                raise InputError(f"free bits need reparameterised latent sites; {name!r} draws from "
                                 f"{type(q_site['fn']).__name__}, which has no rsample")
            kl = None
            if self.analytic_kl:
                try:
                    kl = kl_divergence(q_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
            if kl is None:
                kl = q_site["unscaled_log_prob"] - site["unscaled_log_prob"]
            scale = q_site["scale"]
            if torch.is_tensor(scale) and scale.numel() != 1:
                raise InputError(f"free bits need one scale per site; {name!r} has a scale of shape "
                                 f"{tuple(scale.shape)}")
            out[name] = (kl, float(scale))
        return out

    def loss(self, model, guide, *args, **kwargs):
        """The free-bits loss (a float), averaged over particles (``Trace_ELBO.loss`` would give the ELBO)."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        objective = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"]:
                objective = objective + site["log_prob_sum"]
        for name, (kl, scale) in self.site_kls(model_trace, guide_trace).items():
            per_particle = kl.reshape(-1, kl.shape[-1])  # (K, B) vectorised, (1, B) one particle at a time
            floored = torch.clamp(per_particle.mean(-1), min=self.free_bits).sum() * kl.shape[-1]
            objective = objective - scale * floored
        return -torch_item(objective), -objective


class BalancedKLELBO(FreeBitsELBO):
    """``Trace_ELBO`` with NVAE's KL balancing (Vahdat & Kautz 2020, section 3.2 and their
    ``kl_balancer``) during the KL warm-up.

    While the warm-up holds ``vae.kl_weight`` below 1, level l's KL enters the loss multiplied by
    ``gamma_l = s_l / mean(s)`` with ``s_l = (mean over the batch of |KL_l| + 0.01) / alpha_l`` and
    ``alpha_l`` the level's number of units over the smallest level's: a level that holds little KL
    gets a small weight, so the warm-up does not push it to collapse; the ``gamma`` are treated as
    constants (no gradient flows through them) and average to 1. The sites' own scales (β, the warm-up
    weight, a subsampled plate's N/B) apply as in ``Trace_ELBO``. Once ``kl_weight`` is 1 the loss is
    ``Trace_ELBO``'s. Like free bits, during the warm-up it is a training objective, **not** a bound.
    The per-level KLs are those of a guide that draws in the model's order (one level, or the top-down
    guide); :meth:`pyro_vae.VAE.check_elbo` refuses it for the bottom-up guide of a chain.

    Args:
        vae: the :class:`~pyro_vae.VAE` (anything with a ``kl_weight``) whose warm-up gates it.
        **kwargs: passed to ``Trace_ELBO`` (``num_particles``, ``vectorize_particles``, ...).
    """

    balances_kl = True

    def __init__(self, vae, analytic_kl=False, **kwargs):
        if not hasattr(vae, "kl_weight"):
            raise InputError(f"BalancedKLELBO needs the VAE whose KL warm-up it follows (an object with a "
                             f"kl_weight), got {type(vae).__name__}; pass BalancedKLELBO(vae)")
        super().__init__(0.0, analytic_kl=analytic_kl, **kwargs)
        self.vae = vae

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        objective = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"]:
                objective = objective + site["log_prob_sum"]
        kls = self.site_kls(model_trace, guide_trace)
        warming = self.vae.kl_weight < 1
        gammas = balance({name: kl for name, (kl, _) in kls.items()},
                         {name: model_trace.nodes[name]["fn"].event_shape.numel() for name in kls}) if warming else {}
        for name, (kl, scale) in kls.items():
            objective = objective - scale * gammas.get(name, 1.0) * kl.sum()
        return -torch_item(objective), -objective


def balance(kls, units):
    """NVAE's KL-balancing coefficients: ``{site: gamma}`` (detached scalars averaging 1) from the
    sites' KLs per data point ``{site: (*particles, B)}`` and their numbers of units ``{site: int}``."""
    smallest = min(units.values())
    s = {name: (kl.detach().abs().mean() + 0.01) / (units[name] / smallest) for name, kl in kls.items()}
    mean = sum(s.values()) / len(s)
    return {name: value / mean for name, value in s.items()}


class SemiSupervisedELBO(TraceEnum_ELBO):
    """The loss of a semi-supervised M2 VAE (``label_site=True``) for one batch, labelled or not.

    ``loss_and_grads(model, guide, x)`` on an unlabelled batch is ``TraceEnum_ELBO``'s (with
    ``max_plate_nesting=1``): the label, a site of the guide marked for enumeration, is summed out
    exactly. ``loss_and_grads(model, guide, x, y)`` on a labelled batch is the ELBO with y observed
    (nothing to enumerate) plus ``alpha * -log q(y | x)`` (Kingma et al. 2014's auxiliary term; Pyro's
    ``ss_vae_M2.py --aux-loss``, which trains it as a second SVI on ``vae.model_classify``), so that the
    classifier learns from the labels and not only through the ELBO.

    Args:
        vae: the M2 :class:`~pyro_vae.VAE` (its ``model_classify`` and ``guide_classify``).
        alpha: the auxiliary term's weight (0: off; Pyro's example uses 46 for 3000 labels).
        num_particles: as for ``TraceEnum_ELBO`` (vectorised when > 1).

    Returns (both methods): the loss of the batch, a float, nats (the aux term included).
    """

    def __init__(self, vae, alpha=0.0, num_particles=1):
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
                and alpha >= 0):
            raise InputError(f"the auxiliary loss weight alpha must be a finite number >= 0, got {alpha!r}; "
                             "use e.g. 0 (off) or 46 (Pyro's ss_vae_M2.py)")
        super().__init__(max_plate_nesting=1, num_particles=num_particles,
                         vectorize_particles=num_particles > 1)
        self.vae, self.alpha = vae, float(alpha)
        self._aux = Trace_ELBO()

    def loss(self, model, guide, *args, **kwargs):
        with _nothing_to_enumerate_is_fine():
            return self._with_aux("loss", super().loss(model, guide, *args, **kwargs), args)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        with _nothing_to_enumerate_is_fine():
            return self._with_aux("loss_and_grads", super().loss_and_grads(model, guide, *args, **kwargs), args)

    def _with_aux(self, method, loss, args):
        labels = args[1] if len(args) > 1 else None
        if labels is None or not self.alpha:
            return loss
        aux = getattr(self._aux, method)(self.vae.model_classify, self.vae.guide_classify, args[0], labels,
                                         weight=self.alpha)
        return loss + aux



@contextlib.contextmanager
def _nothing_to_enumerate_is_fine():
    """Within: TraceEnum_ELBO's warning that no site is enumerated (true of every labelled batch) is off."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites configured for enumeration")
        yield
