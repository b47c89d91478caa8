"""A linear-Gaussian latent chain whose log p(x) and exact posterior are known in closed form,
built with the library's own VAE and a user's linear transitions (shared by several test files)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import VAE, evaluate, fit, likelihoods

D_X, S_X = 4, 0.5


class Identity(nn.Module):
    out_features = D_X

    def forward(self, x):
        return x


class LinearGaussian(nn.Module):
    """p(z_l | z_l-1) = N(A z + c, diag(s^2)): a user's own transition network."""

    def __init__(self, a, c, s):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("c", c)
        self.register_buffer("s", s)

    def forward(self, z):
        return dist.Normal(z @ self.a.T + self.c, self.s).to_event(1)


def linear_gaussian_chain(dims, guide="top-down", posterior=None, skip=False):
    """The VAE (with the library's guide of ``posterior`` family) and the joint Gaussian of
    (z0, ..., zL, x): mean, covariance and index blocks. With ``skip``, every transition and the
    decoder read all the levels above them (``VAE(skip=True)``)."""
    g = torch.Generator().manual_seed(len(dims))
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    reads = [sum(dims[:i + 1]) if skip else dims[i] for i in range(len(dims))]  # what level i+1 (or x) reads
    transitions = [LinearGaussian(0.8 * r(dims[i + 1], reads[i]) / reads[i] ** 0.5, 0.3 * r(dims[i + 1]),
                                  0.5 + 0.5 * torch.rand(dims[i + 1], generator=g, dtype=torch.float64))
                   for i in range(len(dims) - 1)]
    w, b = r(D_X, reads[-1]), 0.3 * r(D_X)
    decoder = nn.Linear(reads[-1], D_X).double()
    decoder.weight.data.copy_(w)
    decoder.bias.data.copy_(b)
    vae = VAE(Identity(), decoder, dims, likelihood=likelihoods.Gaussian(S_X), x_shape=(D_X,), guide=guide,
              posterior=posterior, transitions=transitions, hidden=16, skip=skip).double()
    # the joint of v = (z0, ..., zL, x): v_i = A_i u_i + c_i + noise, u_i = v_i-1 (a Markov chain) or, with
    # skip, (v_0, ..., v_i-1)
    steps = [(t.a, t.c, t.s ** 2) for t in transitions] + [(w, b, torch.full((D_X,), S_X ** 2, dtype=torch.float64))]
    sizes = list(dims) + [D_X]
    start = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    blocks = [slice(start[i], start[i + 1]) for i in range(len(sizes))]
    mean = torch.zeros(start[-1], dtype=torch.float64)
    cov = torch.zeros(start[-1], start[-1], dtype=torch.float64)
    cov[blocks[0], blocks[0]] = torch.eye(dims[0], dtype=torch.float64)
    for i, (a, c, var) in enumerate(steps, start=1):
        parents = slice(0, start[i]) if skip else blocks[i - 1]
        mean[blocks[i]] = a @ mean[parents] + c
        for j in range(i):  # Cov(v_i, v_j) = A_i Cov(u_i, v_j)
            cov[blocks[i], blocks[j]] = a @ cov[parents, blocks[j]]
            cov[blocks[j], blocks[i]] = cov[blocks[i], blocks[j]].T
        cov[blocks[i], blocks[i]] = a @ cov[parents, parents] @ a.T + torch.diag(var)
    return vae, mean, cov, blocks


def conditional(mean, cov, blocks, level, given):
    """The exact Gaussian of level ``level`` given ``given``, a list of (block, value (..., B, n))."""
    idx = torch.cat([torch.arange(bl.start, bl.stop) for bl, _ in given])
    values = torch.cat([v.expand(*torch.broadcast_shapes(*[u.shape[:-1] for _, u in given]), v.shape[-1])
                        for _, v in given], -1)
    own = torch.arange(blocks[level].start, blocks[level].stop)
    gain = torch.linalg.solve(cov[idx][:, idx], cov[idx][:, own]).T
    loc = mean[own] + (values - mean[idx]) @ gain.T
    scale = cov[own][:, own] - gain @ cov[idx][:, own]
    return dist.MultivariateNormal(loc, scale)


def exact_top_down_guide(mean, cov, blocks):
    """p(z0 | x) p(z1 | z0, x) ... p(zL | zL-1, x), by conditioning the joint Gaussian (full covariances)."""
    x_block = blocks[-1]

    def guide(x, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            z = None
            for level in range(len(blocks) - 1):
                given = [(x_block, x)] if z is None else [(blocks[level - 1], z), (x_block, x)]
                z = pyro.sample(f"z{level}", conditional(mean, cov, blocks, level, given))

    return guide


def exact_bottom_up_guide(mean, cov, blocks):
    """p(zL | x) p(zL-1 | zL, x) ... p(z0 | z1, x), the same exact posterior drawn from the bottom."""
    x_block, top = blocks[-1], len(blocks) - 2

    def guide(x, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            z = None
            for level in reversed(range(top + 1)):
                given = [(x_block, x)] if z is None else [(blocks[level + 1], z), (x_block, x)]
                z = pyro.sample(f"z{level}", conditional(mean, cov, blocks, level, given))

    return guide


def check_trained_guide_approaches_the_exact_log_px(dims, guide, posterior=None, skip=False, epochs=60):
    """Train the library's own guide (of ``posterior`` family) on data of the linear-Gaussian chain, the
    model fixed: ELBO < IW(K=10) < IW(K=2000) ~= the exact log p(x) (to 0.05 nats). Returns the VAE."""
    vae, mean, cov, blocks = linear_gaussian_chain(dims, guide, posterior, skip)
    vae.decoder.requires_grad_(False)
    marginal = torch.distributions.MultivariateNormal(mean[blocks[-1]], cov[blocks[-1], blocks[-1]])
    torch.manual_seed(1)
    x = marginal.sample((256,))
    exact = marginal.log_prob(x).mean().item()
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="requires_grad=False"):  # the fixed decoder is not a Pyro param
        fit(vae, x, epochs=epochs, batch_size=64, lr=1e-2, progress=False, log=None)
    elbo = evaluate.elbo_terms(vae, x, num_samples=50, mixture=2)["elbo"].mean().item()  # the ELBO alone
    iw10 = evaluate.iw_log_likelihood(vae, x, num_samples=10).mean().item()
    iw = evaluate.iw_log_likelihood(vae, x, num_samples=2000).mean().item()
    assert elbo < iw10 < iw + 0.01
    assert abs(iw - exact) < 0.05, (elbo, iw10, iw, exact)
    return vae
