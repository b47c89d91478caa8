"""Pictures a person can look at: sample, reconstruction, per-level, temperature and conditional
generation grids (labelled with matplotlib), training curves."""

import contextlib
import functools
import io
from pathlib import Path

import torch

from .checkpoints import read_records, write_bytes_atomic
from .errors import InputError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def picture_format(path):
    """The picture format (``"PNG"`` or ``"JPEG"``) that ``path``'s suffix names; :class:`InputError` for another."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the picture format of {path}: name it .png, .jpg or .jpeg")
    return fmt


def save_grid(images, path, **grid):
    """Write ``images`` ``(N, C, H, W)`` (or one grid ``(C, H, W)``) as a picture grid to ``path`` atomically
    (``torchvision.utils.save_image`` into memory, then by replace: never through an existing link)."""
    from torchvision.utils import save_image

    fmt = picture_format(path)
    buffer = io.BytesIO()
    save_image(images, buffer, format=fmt, **grid)
    write_bytes_atomic(path, buffer.getvalue())


def drawing(fn):
    """A picture function that leaves the VAE's train/eval mode and the caller's random streams as they
    were: it draws in eval mode from a fork of torch's RNG (the CUDA one too on a CUDA VAE)."""
    @functools.wraps(fn)
    def wrapper(vae, *args, **kwargs):
        training, device = vae.training, vae.device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                            return fn(vae, *args, **kwargs)
        finally:
            vae.train(training)
    return wrapper


@drawing
def save_samples(vae, path, n=64, nrow=8, temperature=1.0):
    """Save a grid of E[x | zL] for ``n`` draws of the whole chain from the model (images ``(n, C, H, W)``),
    every level drawn at ``temperature`` (:meth:`pyro_vae.VAE.sample`)."""
    save_grid(vae.sample(n, temperature=temperature).clamp(0, 1).cpu(), path, nrow=nrow, padding=2, pad_value=1.0)


@drawing
def save_temperatures(vae, path, temperatures, n=8, seed=0):
    """Save one labelled row of ``n`` samples (images ``(n, C, H, W)``) per temperature in ``temperatures``.

    Every row is drawn from the same RNG state (``seed``; the global RNG is left as it
    was), so column j holds the same draw at each temperature: with Gaussian levels
    the same noise, scaled by t.
    """
    rows = []
    for t in temperatures:
        with seeded(seed, vae.device):
            rows.append(vae.sample(n, temperature=t).clamp(0, 1))
    save_labelled_grid(torch.cat(rows).cpu(), path, n, [f"t = {t:g}" for t in temperatures],
                       title=f"{n} samples per temperature (each column: one draw, at every temperature)")


@drawing
def save_generated(vae, x, path, keep_levels, temperatures=(1.0,), n=8, seed=0, kept="draw"):
    """Save conditional generation from one data point: per temperature a labelled row of ``x`` and then
    ``n`` draws of :meth:`pyro_vae.VAE.generate_from` (its ``keep_levels`` top levels kept from the guide,
    one draw or the means as ``kept`` says; the rest drawn at that temperature). Every row starts from the
    same RNG state (``seed``), so the kept draw is the same in all rows.

    Args:
        x: one image ``(1, C, H, W)`` on the VAE's device.
    """
    rows = []
    for t in temperatures:
        with seeded(seed, vae.device):
            rows.append(torch.cat([x, vae.generate_from(x, keep_levels, n, temperature=t, kept=kept)[0].clamp(0, 1)]))
    what = "one draw of q" if kept == "draw" else "q's mean"
    title = f"the image, then {n} draws: {_level_label(keep_levels, vae.levels, what)}"
    save_labelled_grid(torch.cat(rows).cpu(), path, n + 1, [f"t = {t:g}" for t in temperatures], title=title)


def save_pseudo_inputs(vae, path, n=100, nrow=10):
    """Save the VampPrior's first ``n`` pseudo-inputs u_k (images ``(n, C, H, W)`` in [0, 1]), the points whose
    posteriors q(z0 | u_k) make up the prior; a VAE whose prior has none (no ``images()``) is refused."""
    images = getattr(vae.prior, "images", None)
    if images is None:
        raise InputError(f"the prior {type(vae.prior).__name__} has no pseudo-inputs; only a VampPrior does")
    with torch.no_grad():
        save_grid(images()[:n].detach().cpu(), path, nrow=nrow, padding=2, pad_value=1.0)


@drawing
def save_reconstructions(vae, x, path, n=32):
    """Save ``n`` test images (odd columns) beside their reconstructions (even columns).

    Args:
        x: images ``(N, C, H, W)`` on the VAE's device; the first ``n`` are used.
    """
    from torchvision.utils import make_grid

    x = x[:n]
    recon = vae.reconstruct(x).clamp(0, 1)
    pairs = torch.stack([x, recon], dim=1).reshape(-1, *x.shape[1:])  # x0, r0, x1, r1, ...
    save_grid(make_grid(pairs.cpu(), nrow=16, padding=2, pad_value=1.0), path)


@drawing
def save_levels(vae, x, path, images=4, samples=8, kept="draw"):
    """Save what each latent level controls, as ``levels.png``, with each row labelled on its left.

    For each of the first ``images`` data points a block of ``L + 2`` rows;
    row ``l`` (0 .. L+1) starts with the data point and then shows ``samples``
    draws of E[x | zL] (:meth:`pyro_vae.VAE.resample_below`) that keep z0 ...
    z_{l-1} from the guide and redraw z_l ... zL from the model. The kept levels are
    **one** draw of q(z0, ..., zL | x) per row (``kept="mean"``: q's means), the
    same in every column, so a row varies only in the redrawn levels. Row 0
    ("all from the prior") is pure prior samples; the last ("all kept") repeats one
    sampled reconstruction.

    Args:
        x: images ``(N, C, H, W)`` on the VAE's device.
        kept: ``"draw"`` or ``"mean"`` (see :meth:`pyro_vae.VAE.resample_below`).

    Returns:
        ``(left, top)``: where the tile grid starts in the picture (see :func:`save_labelled_grid`).
    """
    x = x[:images]
    draws = [vae.resample_below(x, level, samples, kept=kept).clamp(0, 1) for level in range(vae.levels + 2)]
    rows = [torch.cat([x[i:i + 1], d[i]]) for i in range(x.shape[0]) for d in draws]
    what = "one draw of q" if kept == "draw" else "q's mean"
    labels = [_level_label(level, vae.levels, what) for _ in range(x.shape[0]) for level in range(vae.levels + 2)]
    title = f"the image, then {samples} draws; kept levels: {what} per row, shared by its {samples} draws"
    return save_labelled_grid(torch.cat(rows).cpu(), path, samples + 1, labels, title=title)


def _level_label(level, last, what):
    """What a row that redraws from ``level`` holds, in a chain whose last level is ``last`` (L)."""
    def span(a, b):
        return f"z{a}" if a == b else f"z{a}-z{b}"
    if level == 0:
        return "all from the prior"
    if level > last:
        return f"all kept ({what})"
    return f"{span(0, level - 1)} kept, {span(level, last)} redrawn"


def save_labelled_grid(images, path, nrow, labels, title=None, zoom=2, fontsize=9):
    """Write ``images`` ``(R * nrow, C, H, W)`` in [0, 1] as ``R`` rows of ``nrow`` tiles, ``labels[r]``
    written left of row ``r`` and ``title`` above, atomically (rendered into memory first).

    The tiles are ``make_grid``'s (padding 2, white), each pixel drawn as ``zoom x zoom``
    pixels, unresampled; the picture is that grid, at its right edge, with a text margin on
    its left (wider if the title needs it) and, with a title, a line on top:
    ``(left + zoom * grid_width)`` by ``(top + zoom * grid_height)`` pixels.

    Returns:
        ``(left, top)``: where the grid's top-left pixel lies in the picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fmt = picture_format(path)
    rows = -(-images.shape[0] // nrow)
    if len(labels) != rows:
        raise InputError(f"{rows} rows of pictures need {rows} labels, got {len(labels)}")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    grid = grid.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)  # (C, zoom * Hg, zoom * Wg)
    pixels = grid.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    dpi, gap = 100, 8
    label_width, title_width = _text_widths([labels, [title or ""]], fontsize, dpi)
    width = max(gap + label_width + pixels.shape[1], title_width + 2 * gap)
    margin = width - pixels.shape[1]  # the grid sits at the right edge, the labels left of it
    top = 2 * fontsize * dpi // 72 if title else 0
    height = top + pixels.shape[0]
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    fig.figimage(pixels, xo=margin, yo=0, origin="upper")
    pitch = (images.shape[-2] + 2) * zoom  # one row of tiles, with its padding
    for r, label in enumerate(labels):
        y = top + zoom * 2 + r * pitch + (pitch - 2 * zoom) / 2  # the row's middle, from the top
        fig.text((margin - gap / 2) / width, 1 - y / height, label, ha="right", va="center", fontsize=fontsize)
    if title:
        x = min(margin, width - gap - title_width)  # over the grid where it fits
        fig.text(x / width, 1 - (top / 2) / height, title, ha="left", va="center", fontsize=fontsize)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt.lower(), dpi=dpi, facecolor="white")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return margin, top


def _text_widths(groups, fontsize, dpi):
    """For each list of texts in ``groups``, the width in pixels of its widest, as matplotlib's Agg renderer
    sets it at ``fontsize`` points and ``dpi``."""
    import matplotlib.pyplot as plt

    fig = plt.figure(dpi=dpi)
    renderer = fig.canvas.get_renderer()
    widths = [max(int(fig.text(0, 0, t, fontsize=fontsize).get_window_extent(renderer).width) + 2 for t in texts)
              for texts in groups]
    plt.close(fig)
    return widths


@contextlib.contextmanager
def seeded(seed, device):
    """Within: torch's RNG (and the CUDA one of ``device``) seeded with ``seed``; restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _save_figure(fig, path):
    """Write a matplotlib figure to ``path`` (its format from the suffix) atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=picture_format(path).lower())
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def save_curves(metrics_path, path):
    """Plot train loss and the validation and test negative ELBO, where recorded (nats per image), per
    epoch from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
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
    _save_figure(fig, path)


def save_level_curves(metrics_path, path):
    """Per epoch from ``metrics.jsonl``, one line per level: its share of the KL (nats per image, left)
    and its active units (right), on the validation data where recorded, else the test data. Where a
    level's lines fall to zero and stay there, it has collapsed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    prefix = "val" if any("val_elbo" in r for r in records) else "test"
    levels = sorted({k[len(prefix) + 4:] for r in records for k in r if k.startswith(f"{prefix}_kl_z")},
                    key=lambda name: int(name[1:]))
    fig, (kl, units) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for name in levels:
        for ax, key in ((kl, f"{prefix}_kl_{name}"), (units, f"{prefix}_active_units_{name}")):
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), "o-", markersize=3, label=name)
    kl.set_ylabel(f"KL share per level, nats ({prefix})")
    units.set_ylabel(f"active units ({prefix})")
    for ax in (kl, units):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    _save_figure(fig, path)


GRAPHVIZ_HINT = ("pyro.render_model needs graphviz: the dot program (apt install graphviz, brew install graphviz, "
                 "conda install graphviz) and the Python package (pip install graphviz)")


def model_graph(vae, x, y=None):
    """The VAE's model p(x, z) and guide q(z | x) side by side as one ``graphviz.Digraph``: each as
    ``pyro.render_model`` draws it (sample sites, the ``data`` plate, site-to-site dependencies and each
    site's distribution), in clusters labelled "model" and "guide"; in the guide the data point x (grey)
    points at the levels that read it (every level in the top-down guide, zL in the bottom-up one).

    Args:
        vae: a :class:`~pyro_vae.VAE`.
        x: a few data points ``(N, *x_shape)`` on the VAE's device (traced once, with no gradient).
        y: a conditional VAE's conditioning of ``x`` (``(N,)`` or ``(N, K)``).

    Raises:
        InputError: the ``graphviz`` Python package is missing (:data:`GRAPHVIZ_HINT`).
    """
    try:
        import graphviz
    except ImportError:
        raise InputError(GRAPHVIZ_HINT) from None
    import pyro

    graph = graphviz.Digraph(graph_attr={"rankdir": "TB", "label": f"{type(vae).__name__}: model and guide",
                                         "labelloc": "t"})
    with torch.no_grad():
        parts = {"model": pyro.render_model(vae.model, model_args=(x, y), render_distributions=True),
                 "guide": pyro.render_model(vae.guide, model_args=(x, y), render_distributions=True)}
    levels = [f"z{i}" for i in range(len(vae.latent_dims))]
    readers = levels if getattr(vae, "guide_order", "bottom-up") == "top-down" else levels[-1:]
    for name, part in parts.items():
        body = [line.replace("cluster_data", f"cluster_{name}_data")
                .replace("distribution_description_node", f"{name}_distributions") for line in part.body]
        with graph.subgraph(name=f"cluster_{name}") as cluster:
            cluster.attr(label=f"{name}: {'p(x, z)' if name == 'model' else 'q(z | x)'}", style="rounded")
            body = _prefixed(body, name)
            if name == "guide":  # the guide's input, one per data point, which Pyro does not see as a site
                plate = next(i for i, line in enumerate(body) if "label=data" in line)
                body.insert(plate + 1, "\t\tguide_x [label=x fillcolor=gray shape=ellipse style=filled]\n")
            cluster.body.extend(body)
            if name == "guide":
                for level in readers:
                    cluster.edge("guide_x", f"guide_{level}", style="dashed")
    return graph


def _prefixed(body, name):
    """Graphviz statements whose site nodes (``z0``, ``x``, ...) are renamed ``name_z0``, ``name_x``."""
    import re

    site = re.compile(r"(^\s*|-> )(z\d+|x)(?=[\s\[]|$)")
    return [site.sub(lambda m: f"{m.group(1)}{name}_{m.group(2)}", line) for line in body]


@drawing
def save_model_graph(vae, x, path, y=None):
    """Write :func:`model_graph` (of ``x`` and a conditional VAE's ``y``) as a PNG to ``path`` atomically.

    Raises:
        InputError: graphviz (the Python package or the ``dot`` program) is missing, naming how to get it.
    """
    graph = model_graph(vae, x, y)
    try:
        data = graph.pipe(format="png")
    except Exception as err:  # graphviz.ExecutableNotFound when dot is not installed
        if type(err).__name__ == "ExecutableNotFound":
            raise InputError(GRAPHVIZ_HINT) from None
        raise
    write_bytes_atomic(path, data)


@drawing
def save_classes(vae, path, n=8, names=None, temperature=1.0, seed=0):
    """``classes.png``: one labelled row of ``n`` draws per class of a conditional VAE
    (``VAE(condition=K)``), ``vae.sample(n, y=k)`` for k = 0 .. K-1, every row from the same noise
    (``seed``), so a column is one draw of the levels under each label.

    Args:
        vae: a conditional :class:`~pyro_vae.VAE` of images.
        path: the picture (``.png``, ``.jpg``).
        n: draws per class.
        names: the classes' names for the row labels (default ``"y=0"``, ``"y=1"``, ...).
        temperature: of every level (see :meth:`~pyro_vae.VAE.sample`).
    """
    k = getattr(vae, "condition", 0)
    if not k:
        raise InputError("classes.png needs a conditional VAE (condition=K); this one has no conditioning")
    names = [f"y={i}" for i in range(k)] if names is None else [str(name) for name in names]
    if len(names) != k:
        raise InputError(f"names must hold one name per class ({k}), got {len(names)}")
    rows = []
    for label in range(k):
        with seeded(seed, vae.device):
            rows.append(vae.sample(n, temperature=temperature, y=label).clamp(0, 1).cpu())
    save_labelled_grid(torch.cat(rows), path, n, names, title=f"{n} draws per class")


def save_confusion(predicted, labels, path, names=None):
    """``confusion.png``: the confusion matrix of a classifier (M2's q(y | x)) on labelled data, one row per
    true class, one column per predicted class, each cell the fraction of its row (printed in the cell),
    the accuracy in the title.

    Args:
        predicted: predicted classes ``(N,)`` (integers ``0 .. K-1``).
        labels: the true classes ``(N,)``.
        path: the picture (``.png``).
        names: the classes' names (default ``0 .. K-1``).

    Returns:
        the counts ``(K, K)``, rows true and columns predicted.
    """
    predicted, labels = torch.as_tensor(predicted).cpu().long(), torch.as_tensor(labels).cpu().long()
    if predicted.shape != labels.shape or predicted.dim() != 1:
        raise InputError(f"predicted and labels must be two (N,) tensors of classes, got shapes "
                         f"{tuple(predicted.shape)} and {tuple(labels.shape)}")
    k = len(names) if names is not None else int(max(predicted.max(), labels.max())) + 1
    if len(labels) and (int(min(predicted.min(), labels.min())) < 0 or int(max(predicted.max(), labels.max())) >= k):
        raise InputError(f"classes must lie in 0..{k - 1} (one name each), got values in "
                         f"{int(min(predicted.min(), labels.min()))}..{int(max(predicted.max(), labels.max()))}")
    counts = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    share = counts.float() / counts.sum(1, keepdim=True).clamp(min=1)
    names = [str(i) for i in range(k)] if names is None else [str(n) for n in names]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{share[i, j]:.2f}".lstrip("0") if share[i, j] < 1 else "1",
                    ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = float(counts.diag().sum()) / max(1, int(counts.sum()))
    ax.set_title(f"accuracy {accuracy:.3f} on {int(counts.sum())} points", fontsize=9)
    _save_figure(fig, path)
    return counts


def save_volcano(result, genes, path, a="A", b="B", label=10):
    """``de_A_vs_B.png``: differential expression as a volcano plot, each gene at its posterior median log2
    fold change (x) and its log Bayes factor (y), the genes called DE in colour and, of them, the
    ``label // 2`` largest rises and falls named.

    Args:
        result: :func:`pyro_vae.differential.differential_expression`'s dict of ``(G,)`` arrays.
        genes: the G genes' names.
        path: the picture (``.png``).
        a, b: the groups' names, for the axis.
    """
    import numpy as np

    lfc, bayes, called = (np.asarray(result[k]) for k in ("lfc_median", "bayes_factor", "is_de"))
    if not len(lfc) == len(bayes) == len(called) == len(genes):
        raise InputError(f"the result holds {len(lfc)} genes but {len(genes)} names were given")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter(lfc[~called], bayes[~called], s=6, c="0.6", label="not called", linewidths=0)
    ax.scatter(lfc[called], bayes[called], s=8, c="tab:red", label=f"DE ({int(called.sum())})", linewidths=0)
    for sign in (1, -1):  # the largest rises and falls, each side's names in a column below its points
        side = np.flatnonzero(called & (sign * lfc > 0))
        for i, g in enumerate(side[np.argsort(-sign * lfc[side], kind="stable")[:label // 2]]):
            ax.annotate(str(genes[g]), (lfc[g], bayes[g]), fontsize=6, ha="right" if sign > 0 else "left",
                        xytext=(-sign * 25, -14 - 9 * i), textcoords="offset points",
                        arrowprops=dict(arrowstyle="-", lw=0.4, color="0.6"))
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlabel(f"log2 fold change, {a} over {b} (posterior median)")
    ax.set_ylabel("log Bayes factor of a change")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
