"""What tests/test_distributed.py and the processes it starts (tests/distributed_worker.py) share."""

import contextlib

import torch
from torch import nn

from pyro_vae import VAE
from pyro_vae.callbacks import Callback

N_POINTS = 599  # batches of 256, 256 and 87: the last one splits 44 / 43 between two ranks


def binary_data(n=N_POINTS, dim=20, seed=0, labels=False):
    """``(n, dim)`` fixed 0/1 data with some structure (two prototypes, bits flipped); with ``labels`` also
    each point's prototype ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(2, dim, generator=g) < 0.5).float()
    which = torch.randint(0, 2, (n,), generator=g)
    flip = (torch.rand(n, dim, generator=g) < 0.1).float()
    x = (prototypes[which] - flip).abs()
    return (x, which) if labels else x


def partly_labelled(y, every=5):
    """``y`` with all but every ``every``-th label replaced by -1 (unlabelled)."""
    y = y.clone()
    y[torch.arange(len(y)) % every != 0] = -1
    return y


def small_m2(dim=20, latent=3, seed=0):
    """:func:`small_vae` as an M2 VAE over the two prototypes (``condition=2, label_site=True``)."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(dim, 32), nn.Softplus())
    encoder.out_features = 32
    decoder = nn.Sequential(nn.Linear(latent + 2, 32), nn.Softplus(), nn.Linear(32, dim))
    return VAE(encoder, decoder, [latent], x_shape=(dim,), condition=2, label_site=True, hidden=16)


def small_vae(dim=20, latent=3, seed=0):
    """A small MLP VAE whose initial weights depend on ``seed`` alone."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(dim, 32), nn.Softplus())
    encoder.out_features = 32
    decoder = nn.Sequential(nn.Linear(latent, 32), nn.Softplus(), nn.Linear(32, dim))
    return VAE(encoder, decoder, [latent], x_shape=(dim,))


@contextlib.contextmanager
def noise_free():
    """Within: every Normal's ``rsample`` returns its mean, so an ELBO is a deterministic function of the
    weights and the data (what makes two process counts comparable step by step)."""
    original = torch.distributions.Normal.rsample

    def mean(self, sample_shape=torch.Size()):
        return self.loc.expand(self._extended_shape(sample_shape))

    torch.distributions.Normal.rsample = mean
    try:
        yield
    finally:
        torch.distributions.Normal.rsample = original


class StepLog(Callback):
    """A training part that records every step's loss and total gradient norm (before any update),
    through the same ``svi.skip_if`` seam as :class:`pyro_vae.callbacks.GradientSkip` (never skipping)."""

    def __init__(self):
        self.losses, self.norms = [], []

    def _norm(self, grad_norm):
        self.norms.append(float(grad_norm))
        return False

    def on_fit_start(self, loop):
        loop.svi.skip_if = self._norm

    def on_step_end(self, loop, batch, loss):
        self.losses.append(float(loss))
