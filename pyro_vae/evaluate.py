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

import math

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch

from .errors import InputError
from .posteriors import location


def particle_dim(vae, x):
    """The dim of the evaluation's particle plate: left of every plate of the model and guide
    (``-(max_plate_nesting + 1)``, found by tracing both once on one data point; -2 for a VAE alone)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the probe draws nothing from the caller's random stream
        guide_tr = poutine.trace(vae.guide).get_trace(x[:1])
        model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x[:1])
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
    return {"log_px_z": log_px_z, "log_pz": log_pz, "log_qz": log_qz}


def _batches(x, batch_size):
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}; use e.g. batch_size=100")
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


@torch.no_grad()
def elbo_terms(vae, x, num_samples=1, batch_size=500, max_rows=None):
    """The ELBO of each data point and its two terms, in nats.

    Args:
        vae: a :class:`pyro_vae.VAE`.
        x: data ``(N, *x_shape)`` on the VAE's device.
        num_samples: draws z ~ q(z | x) averaged per data point.
        batch_size: data points per forward pass.
        max_rows: bound on draws x data points at once (``None``: :func:`default_max_rows`).

    Returns:
        dict of tensors of shape ``(N,)``: ``elbo``, ``reconstruction``
        (E_q log p(x | z)), ``kl`` (total E_q[log q - log p]) and ``kl_<site>``
        for each latent site (e.g. ``kl_z0``).
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise InputError(f"num_samples must be a positive integer, got {num_samples!r}; use e.g. num_samples=10")
    vae.check_data(x)
    max_rows = default_max_rows(x) if max_rows is None else int(max_rows)
    parts = []
    with pyro.validation_enabled(False):
        dim = particle_dim(vae, x)
        for xb in _batches(x, batch_size):
            chunk = max(1, min(num_samples, max_rows // xb.shape[0]))
            sums, done = {}, 0
            while done < num_samples:  # draws in chunks: memory bounded for any num_samples
                k = min(chunk, num_samples - done)
                d = _log_densities(vae, xb, k, dim)
                terms = {"reconstruction": d["log_px_z"]}
                terms.update({"kl_" + name: d["log_qz"][name] - d["log_pz"][name] for name in d["log_pz"]})
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0) + value.sum(0)
                done += k
            out = {key: value / num_samples for key, value in sums.items()}
            out["kl"] = sum(out["kl_" + name] for name in d["log_pz"])
            out["elbo"] = out["reconstruction"] - out["kl"]
            parts.append(out)
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


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


@torch.no_grad()
def iw_log_likelihood(vae, x, num_samples=1000, batch_size=None, max_rows=None, progress=None):
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

    Returns:
        ``(N,)`` tensor of estimates.
    """
    if int(num_samples) < 1:
        raise InputError(f"the number of importance samples must be >= 1, got {num_samples}; use e.g. "
                         "num_samples=1000")
    vae.check_data(x)
    num_samples = int(num_samples)
    max_rows = default_max_rows(x) if max_rows is None else int(max_rows)
    if batch_size is None:
        batch_size = max(100, max_rows // num_samples) if x.device.type == "cuda" else 100
    out = []
    with pyro.validation_enabled(False):
        dim = particle_dim(vae, x)
        for xb in _batches(x, batch_size):
            chunk = max(1, min(num_samples, max_rows // xb.shape[0]))
            total = torch.full((xb.shape[0],), -math.inf, device=xb.device, dtype=xb.dtype)
            done = 0
            while done < num_samples:
                k = min(chunk, num_samples - done)
                d = _log_densities(vae, xb, k, dim)
                log_w = d["log_px_z"] + sum(d["log_pz"].values()) - sum(d["log_qz"].values())
                total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
                done += k
            out.append(total - math.log(num_samples))
            if progress is not None:
                progress(xb.shape[0])
    return torch.cat(out)


@torch.no_grad()
def active_units(vae, x, num_samples=10, threshold=0.01, batch_size=500):
    """Active units per latent site (Burda et al. 2016): dimensions u of z_l with
    ``Var_x(E_q[u | x]) > threshold``.

    ``E_q[z_l | x]`` is the mean of the guide's distribution at that site,
    averaged over ``num_samples`` draws of the levels the guide samples
    before it (exact for the first level the guide draws). For a flow (an
    IAF posterior), which has no closed-form mean, it is
    :func:`~pyro_vae.posteriors.location`, the image of its base Gaussian's
    mean: averaging a few draws instead would add their variance, and count
    collapsed units as active. Sites with neither use the average of the draws.

    Args:
        vae: a :class:`pyro_vae.VAE`.
        x: data ``(N, *x_shape)``, N >= 2.
        num_samples: draws per data point.
        threshold: the variance above which a unit counts as active.

    Returns:
        dict site -> ``(count, variances)``; ``variances`` has shape ``(D_l,)``.
    """
    vae.check_data(x)
    if x.shape[0] < 2:
        raise InputError("active units need at least 2 data points (a variance across data)")
    means = {}
    with pyro.validation_enabled(False):
        dim = particle_dim(vae, x)
        for xb in _batches(x, batch_size):
            with pyro.plate("eval_particles", num_samples, dim=dim):
                trace = poutine.trace(vae.guide).get_trace(xb)
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
                    continue
                try:
                    mean = location(site["fn"])
                except NotImplementedError:
                    mean = site["value"]
                means.setdefault(name, []).append(mean.expand(site["value"].shape).mean(0))
    out = {}
    for name, parts in means.items():
        variances = torch.cat(parts).var(dim=0, unbiased=False)
        out[name] = (int((variances > threshold).sum()), variances)
    return out


def evaluate(vae, x, iw_samples=1000, elbo_samples=10, batch_size=None, progress=True):
    """Test-set summary: mean per data point of the ELBO, its terms and the IW estimate.

    Args:
        vae: a :class:`pyro_vae.VAE` (in eval mode while evaluated, then back in its mode).
        x: test data ``(N, *x_shape)`` on the VAE's device.
        iw_samples: K for :func:`iw_log_likelihood` (0 skips it).
        batch_size: its data points per chunk (``None``: its default).
        elbo_samples: draws per data point for :func:`elbo_terms`.
        progress: show a tqdm bar over the IW estimate.

    Returns:
        dict of floats (nats per data point): ``elbo``, ``reconstruction``,
        ``kl``, ``kl_<site>`` per level, ``iw_log_likelihood`` (if
        computed); ints ``active_units_<site>`` per level (of
        ``latent_dims``), ``n``, ``iw_samples``, ``elbo_samples``; and the
        list ``latent_dims``.
    """
    was_training = vae.training
    vae.eval()
    try:
        return _summary(vae, x, iw_samples, elbo_samples, batch_size, progress)
    finally:
        vae.train(was_training)  # the VAE goes back in the mode it came in


def _summary(vae, x, iw_samples, elbo_samples, batch_size, progress):
    terms = elbo_terms(vae, x, num_samples=elbo_samples)
    summary = {key: float(value.mean()) for key, value in terms.items()}
    if x.shape[0] >= 2:
        summary.update({f"active_units_{name}": count for name, (count, _) in active_units(vae, x).items()})
    summary.update(n=int(x.shape[0]), elbo_samples=int(elbo_samples), iw_samples=int(iw_samples),
                   latent_dims=list(getattr(vae, "latent_dims", [])))
    if iw_samples:
        from tqdm.auto import tqdm

        with tqdm(total=x.shape[0], desc=f"IW log p(x), K={iw_samples}", unit="img",
                  disable=not progress) as bar:
            ll = iw_log_likelihood(vae, x, num_samples=iw_samples, batch_size=batch_size, progress=bar.update)
        summary["iw_log_likelihood"] = float(ll.mean())
    return summary
