"""The latent chain: a VAE's Pyro ``model`` and ``guide``.

Sites (one level, ``latent_dims=[D]``; ``B`` is the batch size, ``x_shape``
the shape of one data point, e.g. ``(1, 28, 28)``)::

    model:  "z0" ~ prior                 value (B, D),  event dims 1
            "x"  ~ likelihood(decoder(z0)) value (B, *x_shape), event dims len(x_shape)
    guide:  "z0" ~ q(z0 | encoder(x))    value (B, D),  event dims 1

Every site sits inside ``pyro.plate("data", B)`` (dim -1), so under
``Trace_ELBO(num_particles=K, vectorize_particles=True)`` values gain a leading
``K`` dim and everything still broadcasts.

Indexing follows ``docs/DESIGN.md``: ``z0`` is the top level (the prior's);
a chain of L+1 levels will add sites ``z1`` ... ``zL`` between ``z0`` and ``x``.
"""

import contextlib

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import is_validation_enabled
import torch
from torch import nn

from . import priors as priors_
from .errors import InputError
from .likelihoods import Bernoulli
from .posteriors import DiagonalGaussian


class VAE(nn.Module):
    """A variational autoencoder whose ``model`` and ``guide`` are plain Pyro functions.

    Args:
        encoder: ``nn.Module`` mapping x ``(*batch, *x_shape)`` to features
            ``(*batch, F)``; ``F`` is read from ``encoder.out_features`` unless
            a ``posterior`` is given.
        decoder: ``nn.Module`` mapping z ``(*batch, D)`` to the likelihood's
            parameters ``(*batch, k * x_shape[0], *x_shape[1:])``,
            ``k = likelihood.channels``.
        latent_dims: sizes of the latent levels, top to bottom. Only one level
            (``[D]``) is supported for now.
        prior: p(z0), a module from :mod:`pyro_vae.priors` (default standard normal).
        likelihood: p(x | decoder output), from :mod:`pyro_vae.likelihoods`
            (default Bernoulli).
        posterior: q(z0 | features) head (default
            :class:`~pyro_vae.posteriors.DiagonalGaussian` on ``F`` features).
        x_shape: shape of one data point; read from ``encoder.x_shape`` or
            ``decoder.x_shape`` when not given. Needed to sample without data.
        beta: weight of the KL term, applied as ``poutine.scale(scale=beta)``
            on the latent sites in both model and guide (1 = the ELBO).

    Example::

        vae = VAE(nets.MLPEncoder((1, 28, 28)), nets.MLPDecoder(50, (1, 28, 28)), [50])
        svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO())
        svi.step(x)   # x: (B, 1, 28, 28) in [0, 1]
    """

    def __init__(self, encoder, decoder, latent_dims=(50,), prior=None, likelihood=None,
                 posterior=None, x_shape=None, beta=1.0):
        super().__init__()
        latent_dims = [int(d) for d in latent_dims]
        if not latent_dims or any(d <= 0 for d in latent_dims):
            raise InputError(f"latent_dims must be a non-empty list of positive sizes, got {latent_dims}; "
                             "pass e.g. latent_dims=[50]")
        if len(latent_dims) > 1:
            raise NotImplementedError("multilevel latent chains are not implemented yet; use one level, e.g. [50]")
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise InputError(f"beta must be a number > 0 (poutine.scale needs a positive scale), got {beta!r}; "
                             "pass e.g. beta=1.0")
        self.latent_dims = latent_dims
        self.encoder = encoder
        self.decoder = decoder
        self.prior = (prior if prior is not None else priors_.StandardNormal()).setup(latent_dims[0])
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        if posterior is None:
            features = getattr(encoder, "out_features", None)
            if not isinstance(features, int):
                raise InputError(
                    "cannot tell the width of the encoder's output: give the encoder an integer "
                    "attribute out_features, or pass posterior=DiagonalGaussian(width, latent_dim)"
                )
            posterior = DiagonalGaussian(features, latent_dims[0])
        self.posterior = posterior
        x_shape = x_shape or getattr(encoder, "x_shape", None) or getattr(decoder, "x_shape", None)
        self.x_shape = tuple(x_shape) if x_shape is not None else None
        self.beta = float(beta)

    # ------------------------------------------------------------------ Pyro
    def model(self, x=None, batch_size=None):
        """The generative model p(x | z0) p(z0).

        Args:
            x: observed data ``(B, *x_shape)``, or ``None`` to sample x.
            batch_size: number of draws when ``x`` is ``None``.

        Returns:
            x: the observed or sampled data, ``(B, *x_shape)`` (with extra
            leading dims under vectorised particles).
        """
        pyro.module("vae", self)
        n, device = self._batch(x, batch_size)
        with pyro.plate("data", n, device=device):
            with self._kl_scale():
                z = pyro.sample("z0", self.prior())
            out = self.decoder(z)
            return pyro.sample("x", self.likelihood(out, len(self.x_shape)), obs=x)

    def guide(self, x, batch_size=None):
        """The recognition model q(z0 | x): encoder features, then the posterior head.

        Args:
            x: data ``(B, *x_shape)``.
            batch_size: ignored (accepted so that model and guide take the same arguments).

        Returns:
            z0: ``(B, D)`` (with extra leading dims under vectorised particles).
        """
        pyro.module("vae", self)
        n, device = self._batch(x, None)
        with pyro.plate("data", n, device=device):
            q = self.posterior(self.encoder(x))
            with self._kl_scale():
                return pyro.sample("z0", q)

    # ------------------------------------------------------------ helpers
    @torch.no_grad()
    def reconstruct(self, x):
        """E[x | z] at the posterior mean z = E_q[z0 | x]; ``(B, *x_shape) -> (B, *x_shape)``."""
        self.check_data(x)
        z = self.posterior(self.encoder(x)).mean
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def sample(self, n):
        """E[x | z] for ``n`` draws z0 ~ p(z0): ``(n, *x_shape)`` on the module's device."""
        z = self.prior().sample((n,))
        return self.likelihood.mean(self.decoder(z))

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
        inside the likelihood's support."""
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
            if self.x_shape is None:
                raise InputError("sampling x needs x_shape: pass x_shape=... to VAE")
            if batch_size is None or int(batch_size) <= 0:
                raise InputError("model(x=None) needs a positive batch_size")
            return int(batch_size), self.device
        if is_validation_enabled() and not torch.jit.is_tracing():
            self.check_data(x)  # off inside pyro_vae.fit, which checks the whole data set once
        return x.shape[0], x.device

    def _kl_scale(self):
        return contextlib.nullcontext() if self.beta == 1.0 else poutine.scale(scale=self.beta)
