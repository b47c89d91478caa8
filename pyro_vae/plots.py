"""Pictures a person can look at: sample and reconstruction grids, training curves."""

import json
from pathlib import Path

import torch


def save_samples(vae, path, n=64, nrow=8):
    """Save a grid of E[x | z] for ``n`` prior draws z0 ~ p(z0) (images ``(n, C, H, W)``)."""
    from torchvision.utils import save_image

    vae.eval()
    save_image(vae.sample(n).clamp(0, 1).cpu(), path, nrow=nrow, padding=2, pad_value=1.0)


def save_reconstructions(vae, x, path, n=32):
    """Save ``n`` test images (odd columns) beside their reconstructions (even columns).

    Args:
        x: images ``(N, C, H, W)`` on the VAE's device; the first ``n`` are used.
    """
    from torchvision.utils import make_grid, save_image

    vae.eval()
    x = x[:n]
    recon = vae.reconstruct(x).clamp(0, 1)
    pairs = torch.stack([x, recon], dim=1).reshape(-1, *x.shape[1:])  # x0, r0, x1, r1, ...
    save_image(make_grid(pairs.cpu(), nrow=16, padding=2, pad_value=1.0), path)


def save_curves(metrics_path, path):
    """Plot train loss and test negative ELBO (nats per image) per epoch from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train loss (-ELBO)")
    if all("test_elbo" in r for r in records):
        ax.plot(epochs, [-r["test_elbo"] for r in records], "s-", label="test -ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
