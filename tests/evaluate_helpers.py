"""Exact linear-Gaussian chains whose guide is the exact posterior, in either order (for evaluate tests)."""

import torch

from linear_gaussian import exact_bottom_up_guide, exact_top_down_guide, linear_gaussian_chain


def exact_chain_data(dims, guide, n=64):
    """(vae, mean, cov, blocks, x): a linear-Gaussian chain with the exact posterior as its ``guide``
    (drawn top-down or bottom-up), and ``n`` data points from its marginal."""
    vae, mean, cov, blocks = linear_gaussian_chain(dims, guide)
    make = exact_top_down_guide if guide == "top-down" else exact_bottom_up_guide
    vae.guide = make(mean, cov, blocks)
    torch.manual_seed(3)
    marginal = torch.distributions.MultivariateNormal(mean[blocks[-1]], cov[blocks[-1], blocks[-1]])
    return vae, mean, cov, blocks, marginal.sample((n,))
