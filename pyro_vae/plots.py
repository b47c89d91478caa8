"""Pictures a person can look at: sample, reconstruction and per-level grids, training curves."""

import io
import json
from pathlib import Path

import torch

from .checkpoints import write_bytes_atomic
from .errors import InputError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def _format(path):
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the picture format of {path}: name it .png, .jpg or .jpeg")
    return fmt


def save_grid(images, path, **grid):
    """Write ``images`` ``(N, C, H, W)`` (or one grid ``(C, H, W)``) as a picture grid to ``path`` atomically
    (``torchvision.utils.save_image`` into memory, then by replace: never through an existing link)."""
    from torchvision.utils import save_image

    fmt = _format(path)
    buffer = io.BytesIO()
    save_image(images, buffer, format=fmt, **grid)
    write_bytes_atomic(path, buffer.getvalue())


def save_samples(vae, path, n=64, nrow=8):
    """Save a grid of E[x | zL] for ``n`` draws of the whole chain from the model (images ``(n, C, H, W)``)."""
    vae.eval()
    save_grid(vae.sample(n).clamp(0, 1).cpu(), path, nrow=nrow, padding=2, pad_value=1.0)


def save_reconstructions(vae, x, path, n=32):
    """Save ``n`` test images (odd columns) beside their reconstructions (even columns).

    Args:
        x: images ``(N, C, H, W)`` on the VAE's device; the first ``n`` are used.
    """
    from torchvision.utils import make_grid

    vae.eval()
    x = x[:n]
    recon = vae.reconstruct(x).clamp(0, 1)
    pairs = torch.stack([x, recon], dim=1).reshape(-1, *x.shape[1:])  # x0, r0, x1, r1, ...
    save_grid(make_grid(pairs.cpu(), nrow=16, padding=2, pad_value=1.0), path)


def save_levels(vae, x, path, images=4, samples=8):
    """Save what each latent level controls, as ``levels.png``.

    For each of the first ``images`` data points a block of ``L + 2`` rows;
    row ``l`` (0 .. L+1) starts with the data point and then shows
    ``samples`` draws of E[x | zL] that keep the guide's z0 ... z_{l-1} for it
    and redraw z_l ... zL from the model (:meth:`pyro_vae.VAE.resample_below`):
    row 0 is pure prior samples, the last row keeps every level.

    Args:
        x: images ``(N, C, H, W)`` on the VAE's device.
    """
    vae.eval()
    x = x[:images]
    rows = []
    for i in range(x.shape[0]):
        for level in range(vae.levels + 2):
            draws = vae.resample_below(x[i:i + 1], level, samples)[0].clamp(0, 1)
            rows.append(torch.cat([x[i:i + 1], draws]))
    save_grid(torch.cat(rows).cpu(), path, nrow=samples + 1, padding=2, pad_value=1.0)


def save_curves(metrics_path, path):
    """Plot train loss and the validation and test negative ELBO, where recorded (nats per image), per
    epoch from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train loss (-ELBO)")
    for key, marker, label in (("val_elbo", "^-", "validation -ELBO"), ("test_elbo", "s-", "test -ELBO")):
        if all(key in r for r in records):
            ax.plot(epochs, [-r[key] for r in records], marker, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=_format(path).lower())
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
