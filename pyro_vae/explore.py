"""Latent traversals and interpolations: what the levels of a chain z0 -> ... -> zL -> x control.

Shapes: ``x_shape`` is one data point's shape, e.g. ``(1, 28, 28)``; ``D_l``
the size of level l; ``L = vae.levels``. Every function works under
``torch.no_grad()``, with the VAE in eval mode (its mode is restored after),
on the VAE's device (data are moved there).

Choices, stated once:

* **Points in latent space** are the guide's means (:func:`posterior_levels`
  with ``at="mean"``): every level at the mean of q given the means drawn
  before it, as :meth:`pyro_vae.VAE.reconstruct` uses them. Decoding them
  (:func:`decode`) gives the reconstruction.
* **Traversal step size**: unit u of level l moves from the image's posterior
  mean by ``offset * s_u``, offsets evenly spaced in ``[-span, span]``, where
  ``s_u`` is the standard deviation of u under the model: for z0 the prior's
  (closed form where the distribution has a variance, as a Normal or a
  mixture has; else estimated from 4096 draws with a fixed seed, the global
  RNG untouched); for l >= 1 that of p(z_l | z_l-1) at the image's own parent
  (its posterior means above l), so the span is in units of the transition's
  scale, not the prior's.
* **Levels below a changed level** (``below``): a chain's decoder reads zL
  only (without skip connections), so keeping the lower levels fixed would
  show nothing. They are recomputed through the model's transitions:
  ``"residual"`` (default) keeps each lower level's standardised residual
  ``eps_k = (m_k - mu_k(parent)) / s_k(parent)`` of the image's posterior mean
  ``m_k`` and sets ``z_k = mu_k(parent') + s_k(parent') * eps_k`` at the
  changed parent (the counterfactual with the image's own "noise" held); an
  offset of 0 therefore gives the reconstruction exactly. ``"mean"`` sets
  ``z_k`` to the model's conditional mean E[z_k | parent'] (what the level
  controls through the chain on average; an offset of 0 then gives the
  image's levels down to l and the model's means below, not its
  reconstruction).
* **Units shown** (``units``): ``None`` every unit of the level, an int k
  the first k, a list those units. Units are ordered by the across-data
  variance of the posterior mean over ``reference`` images (the active-units
  statistic of Burda et al. 2016; most used first) when ``reference`` is
  given, else by index.
* **Interpolation**: ``"linear"`` is ``(1 - t) a + t b`` per level;
  ``"spherical"`` slerps each level's direction and interpolates its norm
  linearly, so ``|z(t)| = (1 - t)|a| + t|b|``. Parallel directions give the
  common direction; opposite ones turn through a fixed orthogonal direction
  (one-dimensional levels, which have none, fall back to linear). The
  endpoints are the two posterior means exactly.
"""

import contextlib
import math

import pyro
import torch

from .errors import InputError
from .posteriors import location

MODES = ("linear", "spherical")
BELOW = ("residual", "mean")


@contextlib.contextmanager
def _evaluating(vae):
    """``vae.eval()`` and ``torch.no_grad()`` within; the module's training flag is restored after."""
    training = vae.training
    vae.eval()
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            yield vae
    finally:
        vae.train(training)


def _images(vae, x, one=False):
    """``x`` on the VAE's device, checked, as ``(B, *x_shape)``; with ``one`` a single point, given as
    ``(*x_shape)`` or ``(1, *x_shape)``."""
    if torch.is_tensor(x) and vae.x_shape is not None and x.dim() == len(vae.x_shape):
        x = x.unsqueeze(0)
    if torch.is_tensor(x):
        x = x.to(vae.device)
    vae.check_data(x)
    if one and x.shape[0] != 1:
        raise InputError(f"expected one data point, shape {vae.x_shape} or (1, ...), got a batch of "
                         f"{x.shape[0]}; pass x[i]")
    return x


def _check_level(vae, level):
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= vae.levels:
        raise InputError(f"level {level!r} is outside 0..{vae.levels} (the chain's levels z0..z{vae.levels}); "
                         f"use a level from 0 to {vae.levels}")
    return level


def _check_choice(name, value, choices):
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value


def posterior_levels(vae, x, at="mean"):
    """The guide's z_0 .. z_L for data ``x`` ``(B, *x_shape)``: a list of ``(B, D_l)`` tensors.

    Args:
        at: ``"mean"``: every level at the mean of the guide's distribution
            given the means drawn before it (:func:`pyro_vae.posteriors.location`
            for a flow); ``"sample"``: one draw of the guide.
    """
    _check_choice("at", at, ("mean", "sample"))
    with _evaluating(vae):
        return vae._guide_levels(_images(vae, x), vae.levels + 1, kept="mean" if at == "mean" else "draw")


def decode(vae, zs):
    """E[x | levels] from a full list of levels ``zs`` (z_0 .. z_L, each ``(B, D_l)``): ``(B, *x_shape)``.

    The decoder reads z_L (every level with skip connections), as in the model.
    """
    if len(zs) != vae.levels + 1:
        raise InputError(f"decode needs all {vae.levels + 1} levels z0..z{vae.levels}, got {len(zs)}")
    for level, (z, dim) in enumerate(zip(zs, vae.latent_dims)):
        if z.dim() != 2 or z.shape[-1] != dim or z.shape[0] != zs[0].shape[0]:
            raise InputError(f"z{level} must have shape (B, {dim}) with one B for every level, got {tuple(z.shape)}")
    with _evaluating(vae):
        zs = [z.to(vae.device) for z in zs]
        return vae._mean(vae.decoder(vae._above(zs)), len(vae._need_x_shape()))


def stddev(d, device="cpu"):
    """Per-unit standard deviation of a distribution over vectors ``(D,)``: ``(*batch_shape, D)``.

    Closed form where the distribution has a variance (Normal, mixtures); else
    the spread of 4096 draws under a fixed seed, the global RNG (of the CPU and
    of ``device``, where the distribution lives) left as it was.
    """
    try:
        return _finite_spread(d.variance.sqrt(), d)
    except NotImplementedError:
        pass
    device = torch.device(device)
    forked = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(0)
        return d.sample((4096,)).std(dim=0)


def _finite_spread(std, d):
    """``std``, refusing a distribution whose variance is infinite or undefined (a Cauchy, a Student t
    with df <= 2): a traversal in its standard deviations has no finite step."""
    if not bool(torch.isfinite(std).all()):
        raise InputError(f"{type(d).__name__} has an infinite or undefined variance, so a traversal cannot step "
                         "in its standard deviations; traverse a level whose distribution has a finite variance")
    return std


def model_scale(vae, zs, level):
    """The model's per-unit standard deviation of z_level at the parent ``zs[:level]``: ``(B, D_level)``.

    z0: the prior's; l >= 1: that of p(z_l | z_l-1) at the parent levels
    ``zs`` (each ``(B, D_k)``; only those above ``level`` are read).
    """
    level = _check_level(vae, level)
    with _evaluating(vae):
        d = vae.prior() if level == 0 else vae.transitions[level - 1](vae._above(list(zs[:level])))
        return stddev(d, vae.device).expand(zs[level].shape)


def _propagate(vae, new, old, start, below):
    """Levels ``start+1 .. L`` recomputed after ``new[:start+1]`` changed (see the module's doc, ``below``);
    ``old`` are the unchanged levels, same batch. Returns the full list."""
    zs = list(new[:start + 1])
    for k in range(start + 1, vae.levels + 1):
        p_new = vae.transitions[k - 1](vae._above(zs))
        if below == "mean":
            zs.append(location(p_new))
            continue
        p_old = vae.transitions[k - 1](vae._above(list(old[:k])))
        mu_old, s_old = location(p_old), stddev(p_old, vae.device)
        mu_new, s_new = location(p_new), stddev(p_new, vae.device)
        eps = (old[k] - mu_old) / s_old
        zs.append(old[k] + (mu_new - mu_old) + (s_new - s_old) * eps)  # = mu_new + s_new * eps; old[k] at no change
    return zs


def unit_order(vae, x, level, batch_size=500):
    """The units of ``level`` ordered by the across-data variance of the posterior mean over ``x``
    ``(N, *x_shape)``, N >= 2, largest first: ``(order, variances)``, a ``(D_l,)`` long and float tensor."""
    level = _check_level(vae, level)
    x = _images(vae, x)
    if x.shape[0] < 2:
        raise InputError("ordering units needs at least 2 reference data points (a variance across data)")
    means = torch.cat([posterior_levels(vae, x[i:i + batch_size])[level] for i in range(0, x.shape[0], batch_size)])
    variances = means.var(dim=0, unbiased=False)
    return torch.argsort(variances, descending=True, stable=True), variances


def _units(vae, level, units, reference):
    """The unit indices shown (see the module's doc): a list of ints."""
    dim = vae.latent_dims[level]
    order = unit_order(vae, reference, level)[0].tolist() if reference is not None else list(range(dim))
    if units is None:
        return order
    if isinstance(units, int) and not isinstance(units, bool):
        if units < 1:
            raise InputError(f"units must be at least 1, got {units}; use e.g. units=8")
        return order[:units]
    units = [int(u) for u in units]
    if not units or any(not 0 <= u < dim for u in units):
        raise InputError(f"units {units} are not units of z{level}, which has {dim}; use indices from 0 to {dim - 1}")
    return units


def _offsets(steps, span, device):
    """``steps`` offsets evenly spaced in ``[-span, span]``; for odd ``steps`` the middle one is exactly 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}; use e.g. steps=7")
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise InputError(f"span must be a positive number of standard deviations, got {span!r}; use e.g. span=3.0")
    ticks = 2 * torch.arange(steps, device=device) - (steps - 1)  # integers: symmetric, 0 in the middle
    return span * ticks.float() / max(steps - 1, 1)


def traverse_latents(vae, x, level, units=None, steps=7, span=3.0, reference=None, below="residual"):
    """The latents of a traversal (see :func:`traverse`): a list of z_0 .. z_L, each ``(U * steps, D_l)``,
    rows unit-major (unit ``units[0]`` at every offset first)."""
    level = _check_level(vae, level)
    _check_choice("below", below, BELOW)
    x = _images(vae, x, one=True)
    shown = _units(vae, level, units, reference)
    zs = posterior_levels(vae, x)
    with _evaluating(vae):
        offsets = _offsets(steps, span, vae.device).to(zs[level].dtype)
        scale = model_scale(vae, zs, level)[0]                                      # (D_l,)
        n = len(shown) * len(offsets)
        old = [z.expand(n, -1) for z in zs]
        rows = [z.clone() for z in old]
        unit = torch.tensor(shown, device=vae.device).repeat_interleave(len(offsets))
        rows[level][torch.arange(n, device=vae.device), unit] += offsets.repeat(len(shown)) * scale[unit]
        return _propagate(vae, rows, old, level, below)


def traverse(vae, x, level, units=None, steps=7, span=3.0, reference=None, below="residual"):
    """A latent traversal of one data point: ``(U, steps, *x_shape)``.

    Every level at the image's posterior mean; unit u of ``level`` moved by
    ``steps`` offsets evenly spaced in ``[-span, span]`` model standard
    deviations (for odd ``steps`` the middle one is the reconstruction);
    the levels below recomputed through the model (``below``); the levels
    above and the other units of ``level`` fixed. See the module's doc.

    Args:
        x: one data point, ``(*x_shape)`` or ``(1, *x_shape)``.
        level: 0 .. L.
        units: ``None`` (all), an int k (the first k) or a list of unit indices.
        reference: data ``(N, *x_shape)`` whose posterior-mean variance orders the units (default: by index).
        below: ``"residual"`` or ``"mean"``.
    """
    zs = traverse_latents(vae, x, level, units, steps, span, reference, below)
    n_units = zs[0].shape[0] // steps
    return decode(vae, zs).reshape(n_units, steps, *vae.x_shape)


def lerp(a, b, t):
    """``(1 - t) a + t b``: ``a``, ``b`` ``(D,)``, ``t`` ``(T,)`` -> ``(T, D)``; exactly a at t=0, b at t=1."""
    t = t.to(a.dtype)[:, None]
    return (1 - t) * a + t * b


def _orthogonal(u):
    """A unit vector orthogonal to the unit vector ``u`` ``(D,)``, D >= 2 (from the axis ``u`` leans on least)."""
    e = torch.zeros_like(u)
    e[u.abs().argmin()] = 1
    p = e - (e @ u) * u
    return p / p.norm()


def slerp(a, b, t, eps=1e-6):
    """Spherical interpolation: the direction slerped, the norm linear: ``a``, ``b`` ``(D,)``, ``t`` ``(T,)``
    -> ``(T, D)`` with ``|z(t)| = (1 - t)|a| + t|b|``; exactly a at t=0 and b at t=1, never NaN.

    Parallel directions (angle below ``eps``) keep the common one; opposite ones turn through a fixed
    orthogonal direction; for D = 1 (no orthogonal direction) opposite signs fall back to :func:`lerp`.
    A zero endpoint takes the other's direction."""
    t = t.to(a.dtype)[:, None]
    na, nb = a.norm(), b.norm()
    if float(na) == 0 and float(nb) == 0:
        return lerp(a, b, t[:, 0])
    ua = a / na if float(na) > 0 else b / nb
    ub = b / nb if float(nb) > 0 else ua
    cos = (ua @ ub).clamp(-1, 1)
    theta = torch.acos(cos)
    if float(torch.sin(theta)) > eps:
        direction = (torch.sin((1 - t) * theta) * ua + torch.sin(t * theta) * ub) / torch.sin(theta)
    elif float(cos) > 0:
        direction = ua.expand(t.shape[0], -1)
    elif a.shape[-1] < 2:
        return lerp(a, b, t[:, 0])
    else:
        direction = torch.cos(math.pi * t) * ua + torch.sin(math.pi * t) * _orthogonal(ua)
    z = ((1 - t) * na + t * nb) * direction / direction.norm(dim=-1, keepdim=True)
    return torch.where(t == 0, a, torch.where(t == 1, b, z))


def interpolate_latents(vae, x_a, x_b, steps=8, mode="linear", level=None, below="residual"):
    """The latents of an interpolation (see :func:`interpolate`): a list of z_0 .. z_L, each ``(steps, D_l)``."""
    _check_choice("mode", mode, MODES)
    _check_choice("below", below, BELOW)
    if level is not None:
        level = _check_level(vae, level)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise InputError(f"steps must be an integer >= 2 (the two endpoints), got {steps!r}; use e.g. steps=8")
    za = posterior_levels(vae, _images(vae, x_a, one=True))
    zb = posterior_levels(vae, _images(vae, x_b, one=True))
    path = lerp if mode == "linear" else slerp
    with _evaluating(vae):
        t = torch.arange(steps, device=vae.device) / (steps - 1)
        if level is None:
            return [path(a[0], b[0], t) for a, b in zip(za, zb)]
        old = [a.expand(steps, -1) for a in za]
        rows = old[:level] + [path(za[level][0], zb[level][0], t)]
        return _propagate(vae, rows, old, level, below)


def interpolate(vae, x_a, x_b, steps=8, mode="linear", level=None, below="residual"):
    """Decodes along a path between two data points' posterior means: ``(steps, *x_shape)``.

    Args:
        x_a, x_b: one data point each, ``(*x_shape)`` or ``(1, *x_shape)``.
        steps: points on the path, >= 2; the first and last are the decodes
            of a's and b's posterior means (their reconstructions) exactly.
        mode: ``"linear"`` or ``"spherical"`` (see the module's doc), per level.
        level: ``None`` interpolates every level; a level l interpolates
            only z_l, with the levels above taken from ``x_a`` and those below
            recomputed through the model from x_a's (``below``), so the last
            step shows a's image with b's z_l.
    """
    return decode(vae, interpolate_latents(vae, x_a, x_b, steps, mode, level, below))


def save_traversal(vae, x, path, level, units=8, steps=7, span=3.0, reference=None, below="residual"):
    """Write a traversal of ``level`` (:func:`traverse`) as a picture (``.png``, ``.jpg``), atomically:
    one row per unit, the data point first and then the ``steps`` decodes (``U`` rows, ``steps + 1``
    columns of images ``(C, H, W)``)."""
    from .plots import save_grid

    x = _images(vae, x, one=True)
    pictures = traverse(vae, x, level, units, steps, span, reference, below).clamp(0, 1)
    rows = torch.cat([x.expand(pictures.shape[0], *x.shape).to(pictures.dtype), pictures], dim=1)
    save_grid(rows.reshape(-1, *x.shape[1:]).cpu(), path, nrow=steps + 1, padding=2, pad_value=1.0)


def save_interpolation(vae, x_a, x_b, path, mode="both", steps=8, level=None, below="residual"):
    """Write interpolations (:func:`interpolate`) as a picture, atomically: one row per mode (``"both"``:
    linear, then spherical), each ``x_a``, the ``steps`` decodes, ``x_b`` (``steps + 2`` columns)."""
    from .plots import save_grid

    modes = MODES if mode == "both" else (_check_choice("mode", mode, (*MODES, "both")),)
    x_a, x_b = _images(vae, x_a, one=True), _images(vae, x_b, one=True)
    rows = [torch.cat([x_a, interpolate(vae, x_a, x_b, steps, m, level, below).clamp(0, 1), x_b]) for m in modes]
    save_grid(torch.cat(rows).cpu(), path, nrow=steps + 2, padding=2, pad_value=1.0)
