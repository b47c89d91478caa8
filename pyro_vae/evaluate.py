"""Honest evaluation from traces of the same ``model`` and ``guide`` that were trained.

For each data point x (per image, never jointly over a batch):

* ELBO(x) = E_q[log p(x | z)] - E_q[log q(z | x) - log p(z)]
  = reconstruction - KL, each a Monte Carlo mean over ``num_samples`` draws
  z ~ q(z | x);
* the importance-weighted estimate (Burda et al. 2016)
  log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x),  z_k ~ q(z | x),
  a lower bound in expectation that rises to log p(x) as K grows. K particles
  are drawn in chunks so that memory stays bounded for any K.

Everything works for any VAE whose model and guide follow the site
conventions of :mod:`pyro_vae.vae` (latent sites in the guide, observed sites
in the model, one ``"data"`` plate at dim -1), including users' own networks.
Scales such as β are ignored here: these are the unscaled log-densities.
"""

import contextlib
import math

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch

from . import distributed
from .errors import InputError
from .posteriors import location


def _given(vae, y):
    """Within: a conditional VAE's ``model``/``guide`` read ``y`` (:meth:`pyro_vae.VAE.given`); nothing
    for ``y=None``."""
    return contextlib.nullcontext() if y is None else vae.given(y)


def _probe(vae, x, y=None):
    """The guide's and the model's traces on one data point, drawn without touching the caller's
    random stream: what :func:`particle_dim` and :func:`level_order` read."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False), \
            _given(vae, None if y is None else y[:1]):
        guide_tr = poutine.trace(vae.guide).get_trace(x[:1])
        model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x[:1])
    return guide_tr, model_tr


def particle_dim(vae, x, traces=None):
    """The dim of the evaluation's particle plate: left of every plate of the model and guide
    (``-(max_plate_nesting + 1)``, found by tracing both once on one data point, or from ``traces``
    of ``_probe``; -2 for a VAE alone)."""
    guide_tr, model_tr = traces or _probe(vae, x)
    nesting = max((len(site["cond_indep_stack"]) for tr in (guide_tr, model_tr) for site in tr.nodes.values()
                   if site["type"] == "sample"), default=0)
    return -(nesting + 1)


def _log_densities(vae, x, k, dim=-2):
    """Log-densities of k joint draws per data point.

    Args:
        vae: a :class:`pyro_vae.VAE` (anything with ``model(x)`` and ``guide(x)``).
        x: data ``(B, *x_shape)``.
        k: number of particles.
        dim: the particle plate's dim (:func:`particle_dim`).

    Returns:
        dict with ``log_px_z`` (k, B): sum of the observed sites' log p;
        ``log_pz`` and ``log_qz``: dicts site -> (k, B) for each latent site.
    """
    with pyro.plate("eval_particles", k, dim=dim):
        guide_tr = poutine.trace(vae.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    shape = (k, x.shape[0])  # the particle dim first, the data plate's last
    log_px_z = x.new_zeros(shape)
    log_pz, log_qz = {}, {}
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["unscaled_log_prob"]
        lp = lp.reshape(k, -1, x.shape[0]).sum(1) if lp.dim() > 2 else lp.expand(shape)  # a user's inner plates summed
        if site["is_observed"]:
            log_px_z = log_px_z + lp
        else:
            log_pz[name] = lp
            if name not in guide_tr.nodes:
                raise InputError(f"latent site {name!r} of the model has no match in the guide; give the guide a "
                                 "sample site of the same name for every latent site of the model")
            lq = guide_tr.nodes[name]["unscaled_log_prob"]
            log_qz[name] = lq.reshape(k, -1, x.shape[0]).sum(1) if lq.dim() > 2 else lq.expand(shape)
    return {"log_px_z": log_px_z, "log_pz": log_pz, "log_qz": log_qz, "guide_trace": guide_tr,
            "model_trace": model_tr, "units": _unit_terms(guide_tr, model_tr, log_pz, shape)}


def _diagonal_normal(fn):
    """The ``Normal`` of a diagonal Gaussian site (``Normal(loc, scale).to_event(1)``), else None."""
    base = getattr(fn, "base_dist", None)
    return base if isinstance(base, torch.distributions.Normal) and fn.event_shape == base.batch_shape[-1:] else None


def _unit_terms(guide_tr, model_tr, sites, shape):
    """Per unit of each latent site where q and p are both diagonal Gaussians: log q - log p of each
    coordinate of the draw, ``(k, B, D_l)`` (their sum over units is the site's term)."""
    out = {}
    for name in sites:
        q, p = _diagonal_normal(guide_tr.nodes[name]["fn"]), _diagonal_normal(model_tr.nodes[name]["fn"])
        if q is None or p is None:
            continue
        z = guide_tr.nodes[name]["value"]
        terms = q.log_prob(z) - p.log_prob(z)
        if terms.shape[:-1] == shape:
            out[name] = terms
    return out


def level_order(vae, x, traces=None, y=None):
    """How the guide draws the latent sites, compared with the model: ``"model"`` (the same order: each
    site's E_q[log q - log p] is that level's share of the KL), ``"reversed"`` (a bottom-up chain: its
    shares are estimated, see :func:`elbo_terms`) or ``"other"``. Traced once on one data point (with
    a conditional VAE's ``y`` of ``x``), or read from ``traces`` of ``_probe``."""
    guide_tr, model_tr = traces or _probe(vae, x, y)
    latent = [n for n, s in model_tr.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    drawn = [n for n in guide_tr.nodes if n in latent]
    if drawn == latent:
        return "model"
    bottom_up = getattr(vae, "guide_order", None) == "bottom-up" and getattr(vae, "levels", 0) > 0
    return "reversed" if bottom_up and drawn == latent[::-1] else "other"


def _shares_reversed(vae, xb, d, mixture, dim):
    """Each level's share of the KL in the model's order for a bottom-up chain, ``{site: (k, B)}``.

    With C_l = log q(z_0..z_l | x) - log p(z_0..z_l) at the draw (the top l+1 levels' KL, in
    expectation), the share of z_l is C_l - C_{l-1}; they add up to the total exactly. The guide draws
    z_L first, so q(z_0..z_l | x) = q(z_l | x) prod_{j<l} q(z_j | z_j+1), and the marginal q(z_l | x)
    (l < L) is estimated by a mixture over ``mixture`` fresh guide draws of the levels below it:
    (1/M) sum_m q(z_l | z_l+1^(m)). That log-estimate is biased down, by an amount that falls with M
    and grows with how much sharper q(z_l | z_l+1) is than q(z_l | x).
    """
    names = [f"z{level}" for level in range(vae.levels + 1)]
    with pyro.plate("eval_mixture", mixture, dim=dim):
        fresh = poutine.trace(vae.guide).get_trace(xb)
    shares, previous = {}, 0.0
    for level, name in enumerate(names):
        if level == vae.levels:
            marginal = d["log_qz"][name]
        else:
            z = d["guide_trace"].nodes[name]["value"]  # (k, B, D)
            z = z.unsqueeze(1).expand(z.shape[0], mixture, *z.shape[1:])  # a flow's context needs it whole
            log_q = fresh.nodes[name]["fn"].log_prob(z)  # (k, M, B): under each mixture component
            marginal = torch.logsumexp(log_q, dim=1) - math.log(mixture)
        c = marginal + sum(d["log_qz"][n] for n in names[:level]) - sum(d["log_pz"][n] for n in names[:level + 1])
        shares[name], previous = c - previous, c
    return shares


def _batches(x, batch_size, y=None):
    """``(x_b, y_b)`` for batches of ``batch_size`` data points (``y_b`` None without ``y``)."""
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}; use e.g. batch_size=100")
    if y is not None and torch.is_tensor(y) and y.shape[0] != x.shape[0]:
        raise InputError(f"y has {y.shape[0]} rows for {x.shape[0]} data points; give one y per data point")
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size], None if y is None else y[i:i + batch_size]


@torch.no_grad()
def elbo_terms(vae, x, num_samples=1, batch_size=500, max_rows=None, mixture=32, moments=False, y=None):
    """The ELBO of each data point, its two terms, and each level's share of the KL, in nats.

    The KL per level is each level's **share of the total KL in the model's order** (z0 first):
    ``kl_z<l>`` = KL(q(z_0..z_l | x) || p(z_0..z_l)) - KL(q(z_0..z_l-1 | x) || p(z_0..z_l-1)),
    which is >= 0 (exactly; the bottom-up estimates below can dip under 0 by noise) and adds up to the
    total ``kl`` for every guide, so the numbers of a top-down and a bottom-up chain compare. Where the guide draws in the model's order (one level, the top-down guide)
    it is E_q[log q(z_l | x, z_<l) - log p(z_l | z_<l)], exact. The bottom-up guide draws z_L first: its
    shares need q's marginals and are estimated (see ``mixture``), and its per-site terms
    E_q[log q(z_l | z_l+1) - log p(z_l | z_l-1)], which are *not* KLs (they can be negative), are
    returned as ``logratio_z<l>``. A user's guide in another order gets ``logratio_`` terms only.

    Args:
        vae: a :class:`pyro_vae.VAE`.
        x: data ``(N, *x_shape)`` on the VAE's device.
        num_samples: draws z ~ q(z | x) averaged per data point.
        batch_size: data points per forward pass.
        max_rows: bound on draws x data points at once (``None``: :func:`default_max_rows`).
        mixture: for a bottom-up chain, M fresh guide draws per data point whose mixture
            (1/M) sum_m q(z_l | z_l+1^(m)) estimates the marginal q(z_l | x).
        y: a conditional VAE's conditioning of ``x`` (labels ``(N,)`` or floats ``(N, K)``).
        moments: also return, per latent site, ``residual_<site>`` ``(N, D_l)``, each unit's
            standardised residual against the model averaged over the draws, and ``within_<site>``
            ``(N, D_l)``, the variance of that average from the draws alone (0 for one draw):
            :func:`activity` of the two is what :func:`active_units` counts, from the same draws
            as the ELBO.

    Returns:
        dict of tensors of shape ``(N,)``: ``elbo``, ``reconstruction``
        (E_q log p(x | z)), ``kl`` (total E_q[log q - log p]), ``kl_<site>`` per
        latent site as above, ``logratio_<site>`` where the guide's order is not the
        model's; and ``unit_kl_<site>`` ``(N, D_l)`` per unit of a level whose q and p
        are diagonal Gaussians and drawn in the model's order (the level's share, unit by unit).
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise InputError(f"num_samples must be a positive integer, got {num_samples!r}; use e.g. num_samples=10")
    vae.check_data(x)
    max_rows = default_max_rows(x) if max_rows is None else int(max_rows)
    parts = []
    with pyro.validation_enabled(False):
        traces = _probe(vae, x, y)
        dim, order = particle_dim(vae, x, traces), level_order(vae, x, traces)
        prior = _prior_moments(vae) if moments else {}
        for xb, yb in _batches(x, batch_size, y):
            chunk = max(1, min(num_samples, max_rows // xb.shape[0]))
            sums, done = {}, 0
            while done < num_samples:  # draws in chunks: memory bounded for any num_samples
                k = min(chunk, num_samples - done)
                with _given(vae, yb):
                    d = _log_densities(vae, xb, k, dim)
                    terms = _chunk_terms(vae, xb, d, order, mixture, dim)
                continuous = [name for name in d["log_pz"]  # a label site has no residual
                              if d["model_trace"].nodes[name]["value"].is_floating_point()]
                if moments:
                    for name, r in _residuals(d["guide_trace"], d["model_trace"], continuous, order, prior).items():
                        terms.update({"residual_" + name: r, "residual_sq_" + name: r ** 2})
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0) + value.sum(0)
                done += k
            out = {key: value / num_samples for key, value in sums.items()}
            for name in (continuous if moments else ()):  # the variance of each point's average, from its draws
                spread = (out.pop("residual_sq_" + name) - out["residual_" + name] ** 2).clamp(min=0)
                out["within_" + name] = spread / (num_samples - 1) if num_samples > 1 else torch.zeros_like(spread)
            out["kl"] = sum(out[("kl_" if order == "model" else "logratio_") + name] for name in d["log_pz"])
            out["elbo"] = out["reconstruction"] - out["kl"]
            parts.append(out)
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _chunk_terms(vae, xb, d, order, mixture, dim):
    """The per-draw terms of one chunk, each ``(k, B)`` (``(k, B, D_l)`` per unit)."""
    sites = {name: d["log_qz"][name] - d["log_pz"][name] for name in d["log_pz"]}
    terms = {"reconstruction": d["log_px_z"]}
    if order == "model":
        terms.update({"kl_" + name: value for name, value in sites.items()})
        terms.update({"unit_kl_" + name: value for name, value in d["units"].items()})
        return terms
    terms.update({"logratio_" + name: value for name, value in sites.items()})
    if order == "reversed":
        terms.update({"kl_" + name: value for name, value in _shares_reversed(vae, xb, d, mixture, dim).items()})
    return terms


def default_max_rows(x, cpu_rows=20000, fraction=0.25, bytes_per_value=64):
    """How many (particle, data point) rows :func:`iw_log_likelihood` decodes at once.

    On the CPU ``cpu_rows``. On CUDA, chosen from the GPU's total memory
    (not the free memory, so that the chunks, and with them the draws and the
    numbers, are the same for a seed however busy the card is): ``fraction``
    of it, at an assumed
    ``bytes_per_value`` per value of a data point (the decoder's activations,
    the likelihood's parameters and log-densities, all in float32), at least
    ``cpu_rows``.
    """
    if x.device.type != "cuda":
        return cpu_rows
    total = torch.cuda.get_device_properties(x.device).total_memory
    per_row = bytes_per_value * max(1, x[0].numel())
    return max(cpu_rows, int(fraction * total // per_row))


def iw_batch_size(x, num_samples, max_rows=None):
    """:func:`iw_log_likelihood`'s default data points per batch: 100, or on CUDA as many as ``max_rows``
    (default :func:`default_max_rows`) holds with all ``num_samples`` particles at once."""
    if x.device.type != "cuda":
        return 100
    return max(100, (default_max_rows(x) if max_rows is None else int(max_rows)) // int(num_samples))


@torch.no_grad()
def iw_log_likelihood(vae, x, num_samples=1000, batch_size=None, max_rows=None, progress=None, seed=None,
                      offset=0, y=None):
    """Importance-weighted estimate of log p(x) for each data point, in nats.

    ``log (1/K) sum_k exp(log p(x, z_k) - log q(z_k | x))`` with z_k ~ q(z | x),
    a separate log-mean-exp for every data point. Particles are drawn in chunks
    of at most ``max_rows // batch`` so memory stays bounded for any K.

    Args:
        vae: a :class:`pyro_vae.VAE`.
        x: data ``(N, *x_shape)`` on the VAE's device.
        num_samples: K, the number of importance samples per data point.
        batch_size: data points per chunk (``None``: 100, or on CUDA as many
            as ``max_rows`` holds with all ``num_samples`` particles at once).
        max_rows: bound on particles x data points decoded at once
            (``None``: :func:`default_max_rows`, from the GPU's memory on CUDA).
        progress: optional callable ``progress(n_done)`` called after each batch.
        seed: ``None``: draw from the global RNG. An integer: the draws of the batch that starts at data
            point ``i`` come from an RNG seeded by ``(seed, offset + i)`` alone (the global RNG is left as
            it was), so that any split of the data into runs of whole batches (``offset`` the first
            point's index in the whole set) gives the same estimates: how :func:`evaluate` shards the
            estimate across ``torchrun`` processes.
        offset: see ``seed``.
        y: a conditional VAE's conditioning of ``x``: the estimate is then of log p(x | y). For an M2
            VAE (``label_site=True``) the label is a site: with ``y`` the estimate is of log p(x, y);
            without, of log p(x) = logsumexp over the K classes of those, the label summed out exactly.

    Returns:
        ``(N,)`` tensor of estimates.
    """
    if int(num_samples) < 1:
        raise InputError(f"the number of importance samples must be >= 1, got {num_samples}; use e.g. "
                         "num_samples=1000")
    vae.check_data(x)
    if getattr(vae, "label_site", False) and y is None:  # M2: log p(x) = logsumexp_y log p(x, y), y summed out
        labels = [torch.full((x.shape[0],), k, dtype=torch.long, device=x.device) for k in range(vae.condition)]
        share = None if progress is None else (lambda done: progress(done / vae.condition))  # K passes: one bar
        return torch.logsumexp(torch.stack([iw_log_likelihood(vae, x, num_samples, batch_size, max_rows, share,
                                                              seed, offset, y=k) for k in labels]), 0)
    num_samples = int(num_samples)
    max_rows = default_max_rows(x) if max_rows is None else int(max_rows)
    if batch_size is None:
        batch_size = iw_batch_size(x, num_samples, max_rows)
    out = []
    with pyro.validation_enabled(False):
        dim = particle_dim(vae, x, _probe(vae, x, y))
        for start, (xb, yb) in zip(range(0, x.shape[0], batch_size), _batches(x, batch_size, y)):
            with _seeded(seed, offset + start, xb.device), _given(vae, yb):
                out.append(_iw_batch(vae, xb, num_samples, max_rows, dim))
            if progress is not None:
                progress(xb.shape[0])
    return torch.cat(out) if out else x.new_zeros(0)


def _iw_batch(vae, xb, num_samples, max_rows, dim):
    """The IW estimates ``(B,)`` of one batch, its K particles drawn in chunks of at most ``max_rows // B``."""
    chunk = max(1, min(num_samples, max_rows // xb.shape[0]))
    total = torch.full((xb.shape[0],), -math.inf, device=xb.device, dtype=xb.dtype)
    done = 0
    while done < num_samples:
        k = min(chunk, num_samples - done)
        d = _log_densities(vae, xb, k, dim)
        log_w = d["log_px_z"] + sum(d["log_pz"].values()) - sum(d["log_qz"].values())
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += k
    return total - math.log(num_samples)


@contextlib.contextmanager
def _seeded(seed, index, device):
    """Within: the global torch RNG (and ``device``'s) seeded by ``(seed, index)``; restored after. ``seed``
    ``None``: nothing changes."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed((int(seed) * 0x9E3779B97F4A7C15 + int(index)) % 2 ** 63)
        yield


@torch.no_grad()
def active_units(vae, x, num_samples=10, threshold=0.01, batch_size=500, y=None):
    """Active units per latent site, measured against the model's own conditional: dimensions u of
    z_l whose **activity** ``Var_x(E_q[(u - mu_p(parents)) / sigma_p(parents) | x])`` exceeds ``threshold``.

    ``mu_p`` and ``sigma_p`` are the mean and standard deviation of the unit under the model at the
    guide's draws of its parents: p(z0) for the top level (0 and 1 under N(0, I), so there, for a
    guide that draws z0 first, this is Burda et al.'s (2016) count exactly: Var_x(E_q[u | x]) > 0.01),
    p(z_l | z_l-1) for a lower level. The standardised residual says what the posterior moves *beyond*
    what the model predicts from the level above, in the model's own units at that point: a unit that
    only copies or inherits the levels above (q = p there) has activity 0, and a level measured in
    units 100 times smaller has the same activity.

    The inner expectation is over ``num_samples`` joint draws of the guide per data point. Where the
    guide draws in the model's order (one level, the top-down guide) each draw contributes the guide's
    mean at the site (:func:`~pyro_vae.posteriors.location`; for an IAF the image of its base's mean),
    given the same parents the model conditions on; otherwise (the bottom-up guide) the drawn value.
    The spread of the draws' average within each data point is subtracted (an unbiased estimate of the
    variance across data of the exact expectation, needing ``num_samples >= 2``). A prior without a
    closed-form mean or variance (a flow) gets those of 256 of its draws.

    Args:
        vae: a :class:`pyro_vae.VAE`.
        x: data ``(N, *x_shape)``, N >= 2.
        num_samples: draws per data point.
        threshold: the activity above which a unit counts as active.

    Returns:
        dict site -> ``(count, activity)``; ``activity`` has shape ``(D_l,)``.
    """
    vae.check_data(x)
    if x.shape[0] < 2:
        raise InputError("active units need at least 2 data points (a variance across data)")
    means, within = {}, {}
    with pyro.validation_enabled(False):
        traces = _probe(vae, x, y)
        prior = _prior_moments(vae)
        dim, order = particle_dim(vae, x, traces), level_order(vae, x, traces)
        for xb, yb in _batches(x, batch_size, y):
            with pyro.plate("eval_particles", num_samples, dim=dim), _given(vae, yb):
                guide_tr = poutine.trace(vae.guide).get_trace(xb)
                model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(xb)
            names = [n for n, site in guide_tr.nodes.items() if site["type"] == "sample"  # continuous latents:
                     and not site_is_subsample(site) and not site["is_observed"]  # an M2 label has no units
                     and site["value"].is_floating_point()]
            for name, r in _residuals(guide_tr, model_tr, names, order, prior).items():
                means.setdefault(name, []).append(r.mean(0))
                within.setdefault(name, []).append(_within(r))
    out = {}
    for name, parts in means.items():
        a = activity(torch.cat(parts), torch.cat(within[name]))
        out[name] = (int((a > threshold).sum()), a)
    return out


def _residuals(guide_tr, model_tr, names, order, known=None):
    """Per latent site, ``(k, B, D)``: the guide's mean (order ``"model"``) or draw, minus the model's
    mean there, over the model's standard deviation there (see :func:`active_units`); ``known``: the
    model's ``(mean, variance)`` of sites measured once already (:func:`_prior_moments`)."""
    known = known or {}
    out = {}
    for name in names:
        site = guide_tr.nodes[name]
        value = site["value"]
        if order == "model":
            try:
                value = location(site["fn"]).expand(value.shape)
            except NotImplementedError:
                pass
        mean, variance = known[name] if name in known else _moments(model_tr.nodes[name]["fn"])
        out[name] = (value - mean) / variance.sqrt()
    return out


def _within(r):
    """The variance of the average of the ``k`` draws ``r`` ``(k, B, D)`` within each data point,
    ``(B, D)`` (0 for one draw, where it cannot be told)."""
    k = r.shape[0]
    return r.var(0, unbiased=True) / k if k > 1 else torch.zeros_like(r[0])


def activity(means, within):
    """Each unit's activity, ``(D,)``: the variance across data points of ``means`` ``(N, D)`` (the
    average standardised residual of each data point), less the average of ``within`` ``(N, D)``, the
    variance of those averages from the draws alone; at least 0."""
    return (means.var(dim=0, unbiased=False) - within.mean(0)).clamp(min=0)


def level_record(terms, prefix, threshold=0.01):
    """What an epoch records of each level from :func:`elbo_terms` ``terms`` (``moments=True``):
    ``{prefix}_kl_<site>`` (its share of the KL, nats per data point), ``{prefix}_active_units_<site>``
    (units of :func:`activity` above ``threshold``) and ``{prefix}_unit_kl_<site>`` (a list: nats per
    unit, where :func:`elbo_terms` defines it)."""
    record = {f"{prefix}_{key}": float(v.mean()) for key, v in terms.items() if key.startswith("kl_")}
    for key in terms:
        if key.startswith("residual_"):
            name = key[len("residual_"):]
            a = activity(terms[key], terms["within_" + name])
            record[f"{prefix}_active_units_{name}"] = int((a > threshold).sum())
        elif key.startswith("unit_kl_"):
            record[f"{prefix}_{key}"] = [round(float(v), 4) for v in terms[key].mean(0)]
    return record


def _prior_moments(vae):
    """``{"z0": (mean, variance)}`` of the prior p(z0) per unit ``(D0,)``, measured once for a whole evaluation
    (p(z0) is one distribution for every data point; a flow's moments come from draws, which drawn for every data
    point of every batch cost that many times more), or ``{}`` where the prior reads the label (a GMVAE)."""
    if getattr(vae, "label_in_prior", False) or getattr(getattr(vae, "prior", None), "reads_label", False):
        return {}
    with torch.no_grad():
        p = vae.prior()
        return {"z0": _moments(p)} if tuple(p.batch_shape) == () else {}


def _moments(fn):
    """The model's mean and variance of a latent site per unit (closed form, else from 256 draws)."""
    try:
        return fn.mean, fn.variance
    except NotImplementedError:
        draws = fn.sample((256,))
        return draws.mean(0), draws.var(0)


def evaluate(vae, x, iw_samples=1000, elbo_samples=10, batch_size=None, progress=True, mixture=32, seed=None,
             y=None):
    """Test-set summary: mean per data point of the ELBO, its terms and the IW estimate.

    Args:
        vae: a :class:`pyro_vae.VAE` (in eval mode while evaluated, then back in its mode).
        x: test data ``(N, *x_shape)`` on the VAE's device.
        iw_samples: K for :func:`iw_log_likelihood` (0 skips it).
        batch_size: its data points per chunk (``None``: its default).
        elbo_samples: draws per data point for :func:`elbo_terms`.
        progress: show a tqdm bar over the IW estimate.
        mixture: M for the bottom-up guide's KL shares (see :func:`elbo_terms`); its value is in
            the summary (``kl_mixture``) for such a guide.
        seed: seeds the IW estimate batch by batch (see :func:`iw_log_likelihood`; ``None``: the global RNG).
        y: a conditional VAE's conditioning of ``x`` (labels ``(N,)`` or floats ``(N, K)``); every number is
            then conditional on it (the IW estimate is of log p(x | y)). For an M2 VAE (``label_site=True``)
            the labels are what it classifies: the summary adds ``accuracy`` (q(y | x)'s most probable class
            against them), and its ELBO and IW estimate are of log p(x), the label summed out (the ELBO's
            ``kl_y`` is q(y | x)'s KL to the uniform prior, from sampled labels).

    Under ``torchrun`` (a process group of two or more, :mod:`pyro_vae.distributed`) every rank calls
    it with the whole ``x``: the IW estimate is sharded (each rank takes a run of whole batches, and the
    per-point estimates are gathered), which with a ``seed`` gives the one-process numbers; the ELBO, its
    terms and the active units are rank 0's. Every rank returns the same summary.

    Returns:
        dict of floats (nats per data point): ``elbo``, ``reconstruction``,
        ``kl``, ``kl_<site>`` per level (its share of the KL in the model's order,
        see :func:`elbo_terms`), ``logratio_<site>`` for a bottom-up chain,
        ``iw_log_likelihood`` (if computed); lists ``unit_kl_<site>`` (nats per
        unit, where defined) and ``activity_<site>`` (see :func:`active_units`);
        ints ``active_units_<site>`` per level (of ``latent_dims``), ``n``,
        ``iw_samples``, ``elbo_samples``; and the list ``latent_dims``; and ``bits_per_dim``,
        ``elbo_bits_per_dim`` for data on the grid of a discrete likelihood (see :func:`bits_per_dim`).
    """
    was_training = vae.training
    vae.eval()
    labels, y = (y, None) if getattr(vae, "label_site", False) else (None, y)  # M2: y is what it classifies
    try:
        summary = distributed.from_main(lambda: _summary(vae, x, elbo_samples, mixture, y))
        if labels is not None:
            summary["accuracy"] = accuracy(vae, x, labels)
        summary["iw_samples"] = int(iw_samples)
        if iw_samples:
            summary["iw_log_likelihood"] = float(_sharded_iw(vae, x, iw_samples, batch_size, progress, seed,
                                                             y).mean())
        summary.update(bits_per_dim(vae, x, summary))
        return summary
    finally:
        vae.train(was_training)  # the VAE goes back in the mode it came in


@torch.no_grad()
def predicted_classes(vae, x, batch_size=1000):
    """An M2 VAE's most probable class under q(y | x) for each data point: ``(N,)`` integers."""
    return torch.cat([vae.classify(xb).argmax(-1) for xb, _ in _batches(x, batch_size)])


def accuracy(vae, x, labels):
    """The fraction of data ``x`` ``(N, *x_shape)`` whose :func:`predicted_classes` equal ``labels`` ``(N,)``."""
    labels = torch.as_tensor(labels, device=x.device)
    if labels.shape != (x.shape[0],):
        raise InputError(f"labels must have shape ({x.shape[0]},) (one per data point), got {tuple(labels.shape)}")
    return float((predicted_classes(vae, x) == labels).float().mean())


def cluster_accuracy(clusters, labels):
    """How well clusters ``(N,)`` (e.g. an unsupervised discrete level's q(y | x) classes) match labels ``(N,)``:
    each cluster is mapped to its most frequent label (many clusters may map to one label, as GMVAE
    papers score it) and the fraction of points whose cluster maps to their label is returned."""
    clusters, labels = torch.as_tensor(clusters).cpu().long(), torch.as_tensor(labels).cpu().long()
    if clusters.shape != labels.shape or clusters.dim() != 1:
        raise InputError(f"clusters and labels must be two (N,) tensors, got shapes {tuple(clusters.shape)} and "
                         f"{tuple(labels.shape)}")
    k = int(labels.max()) + 1 if len(labels) else 1
    counts = torch.zeros(int(clusters.max()) + 1 if len(clusters) else 1, k, dtype=torch.long)
    counts.index_put_((clusters, labels), torch.ones_like(labels), accumulate=True)
    return float(counts.max(1).values.sum()) / max(1, len(labels))


def bits_per_dim(vae, x, summary):
    """``{"bits_per_dim": ..., "elbo_bits_per_dim": ...}`` from a summary's nats per data point, where the
    likelihood is discrete over ``levels`` values per dimension (``vae.likelihood.levels``: Bernoulli's 2,
    the 8-bit discretised logistic's 256) and every value of ``x`` ``(N, *x_shape)`` lies on that grid
    ``i / (levels - 1)``; else ``{}``.

    The conversion: a log-probability of ``log p`` nats for a data point of ``D = x[0].numel()``
    dimensions is ``-log p / (D ln 2)`` bits per dimension (``bits_per_dim`` from the IW estimate of
    log p(x), ``elbo_bits_per_dim`` from the ELBO, a bound: never lower).
    """
    levels = getattr(getattr(vae, "likelihood", None), "levels", None)
    if not levels or x.numel() == 0:
        return {}
    scaled = x * (levels - 1)
    if not bool(((scaled - scaled.round()).abs() <= 1e-3).all() and (x >= 0).all() and (x <= 1).all()):
        return {}
    per = x[0].numel() * math.log(2)
    out = {"bits_per_dim": -summary["iw_log_likelihood"] / per} if "iw_log_likelihood" in summary else {}
    return {**out, "elbo_bits_per_dim": -summary["elbo"] / per}


def _sharded_iw(vae, x, iw_samples, batch_size, progress, seed, y=None):
    """The IW estimates ``(N,)`` of :func:`iw_log_likelihood`; under ``torchrun`` each rank estimates a run
    of whole batches and the pieces are gathered."""
    from tqdm.auto import tqdm

    group = distributed.current()
    batch_size = batch_size or distributed.from_main(lambda: iw_batch_size(x, iw_samples))  # one cut for all
    part = group.shard_slice(x.shape[0], batch_size) if group is not None else slice(0, x.shape[0])
    ll = x.new_zeros(0)
    if part.stop > part.start:
        with tqdm(total=part.stop - part.start, desc=f"IW log p(x), K={iw_samples}", unit="img",
                  disable=not (progress and distributed.is_main())) as bar:
            ll = iw_log_likelihood(vae, x[part], num_samples=iw_samples, batch_size=batch_size,
                                   progress=bar.update, seed=seed, offset=part.start,
                                   y=None if y is None else y[part])
    return torch.cat([piece.to(x.device) for piece in distributed.gather(ll.cpu())])


def _summary(vae, x, elbo_samples, mixture, y=None):
    terms = elbo_terms(vae, x, num_samples=elbo_samples, mixture=mixture, y=y)
    summary = {key: float(value.mean()) for key, value in terms.items() if not key.startswith("unit_kl_")}
    summary.update({key: [round(float(v), 4) for v in value.mean(0)] for key, value in terms.items()
                    if key.startswith("unit_kl_")})
    if x.shape[0] >= 2:
        units = active_units(vae, x, y=y)
        summary.update({f"active_units_{name}": count for name, (count, _) in units.items()})
        summary.update({f"activity_{name}": [round(float(v), 4) for v in a.reshape(-1)]  # a scalar site: one
                        for name, (_, a) in units.items()})
    summary.update(n=int(x.shape[0]), elbo_samples=int(elbo_samples),
                   latent_dims=list(getattr(vae, "latent_dims", [])))
    if any(key.startswith("logratio_") for key in terms) and any(key.startswith("kl_z") for key in terms):
        summary["kl_mixture"] = int(mixture)  # the shares are estimated: say with how many draws
    return summary
