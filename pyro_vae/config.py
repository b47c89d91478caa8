"""The settings of a run made by :func:`pyro_vae.train.train`, validated once.

:class:`RunConfig` is what ``config.json`` and every checkpoint hold; the
command line, ``train``, ``--resume`` and checkpoint loading all build one and
call :meth:`RunConfig.validate`, which checks the training settings with
:func:`pyro_vae.settings.check` (the same check :func:`pyro_vae.fit` uses).
"""

import dataclasses
import os

import torch

from . import cells
from . import data as data_
from . import distributed, likelihoods, nets, paper_hvae, posteriors, priors, settings
from .chain import MEANFIELD_BOTTOM_UP
from .errors import InputError
from .vae import GUIDES

BINARIZE = ("dynamic", "fixed", "none")
DATASETS = (*data_.DATASETS, *data_.LOCAL_IMAGES, "counts")
# named settings for the published protocols (applied under the user's own flags)
PRESETS = {
    # Tomczak & Welling 2018 (VampPrior), as Norouzi et al. 2020 (Exemplar VAE) ran it on Fashion-MNIST: gated
    # MLP 300-300, 40-d latent, Adam 5e-4, batch 100, 100 epochs of linear KL warm-up, the last 10 000 training
    # images for validation, early stopping with patience 50 on the validation ELBO, at most 2000 epochs
    "vampprior-vae": dict(arch="gated", hidden=300, latent_dims=[40], lr=5e-4, batch_size=100, val_size=10000,
                          patience=50, epochs=2000, kl_warmup_epochs=100, keep_best=True, binarize="dynamic"),
    # the same protocol for the two-level HVAE: p(x | z1, z2) p(z1 | z2) p(z2), q(z2 | x) q(z1 | x, z2)
    "vampprior-hvae": dict(arch="gated", hidden=300, latent_dims=[40, 40], guide="top-down", skip=True, lr=5e-4,
                           batch_size=100, val_size=10000, patience=50, epochs=2000, kl_warmup_epochs=100,
                           keep_best=True, binarize="dynamic"),
    # and with the paper's ConvHVAE networks: gated convolutions (see the README for what differs)
    "vampprior-convhvae": dict(arch="gated-conv", latent_dims=[40, 40], guide="top-down", skip=True, hidden=300,
                               lr=5e-4, batch_size=100, val_size=10000, patience=50, epochs=2000,
                               kl_warmup_epochs=100, keep_best=True, binarize="dynamic"),
}

TRAINING_KEYS = ("hidden", "epochs", "batch_size", "num_particles", "max_bad_steps", "lr", "beta", "grad_clip",
                 "optimizer", "free_bits", "kl_warmup", "checkpoint_every", "elbo", "val_size", "patience",
                 "kl_warmup_epochs", "seed", "squeeze", "ema", "skip_grad_norm", "kl_balance", "labels", "aux_loss",
                 "enumerate")
COUNT_INPUTS = ("log1p", "raw")
# what --dataset counts means when a flag is not given (applied under the user's flags, see with_defaults)
COUNT_DEFAULTS = dict(latent_dims=[10], hidden=128, binarize="none", likelihood="nb:library", epochs=300, batch_size=128)
ARCHS = (*nets.ARCHS, *paper_hvae.ARCHS)  # nets.build's encoder-decoder pairs, and whole chains
LABELLED_DATASETS = data_.DATASETS  # the data sets whose class labels pyro-vae reads (ten classes each)
CLASSES = 10


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run made by :func:`pyro_vae.train.train` (saved as ``config.json``).

    ``grad_clip`` 0 means no clipping; ``checkpoint_every`` 0 means a checkpoint
    at the end of every epoch only; ``keep_best`` also keeps ``best.pt``, the
    checkpoint of the epoch with the best validation ELBO (with ``val_size``;
    without a validation split, the best test ELBO).

    ``prior`` is a :func:`pyro_vae.priors.from_name` name (``standard``,
    ``learned``, ``mog:K``, ``vamp:K``, ``flow:K``, ``gmvae:K``,
    ``vamp-hardtanh:K``); ``posterior`` a
    :func:`pyro_vae.posteriors.from_name` name (``gaussian``, ``iaf:K``), the
    guide's family at every level. ``arch`` names the networks
    (:func:`pyro_vae.nets.build`'s, or ``gated-hvae``, the whole chain of
    :func:`pyro_vae.paper_hvae.networks`); ``optimizer`` is ``adam`` or
    ``adam-normgrad`` (:class:`pyro_vae.svi.NormalizedGradAdam`).
    ``latent_dims`` are the chain's level sizes, top (z0) to bottom; ``guide``
    is ``"bottom-up"`` or ``"top-down"``; ``kl_warmup`` is the number of steps
    of :class:`~pyro_vae.objectives.KLWarmup` (0: off); ``free_bits`` the KL
    floor per level in nats (0: off, the plain ELBO).

    ``dataset`` ``"counts"`` trains on the count matrix in ``data_file``
    (:func:`pyro_vae.data.load_counts`; ``transpose`` for genes x cells
    files), the last 10% of a seeded shuffle of its rows held out as the
    test set; it needs ``binarize="none"`` and the MLP.

    ``dataset`` ``"folder"`` reads the images in ``data_dir``
    (:func:`pyro_vae.data.load_folder`), ``"tensor"`` the image tensor in
    ``data_file`` (:func:`pyro_vae.data.load_image_tensor`), each split as
    count data are; ``"cifar-10"`` is :func:`pyro_vae.data.load_cifar10`
    (its own test set). ``image_size`` resizes every image data set to
    ``image_size x image_size`` (shorter side, then a centre crop; 0: as it
    is); ``channels`` makes it grey (1) or colour (3) (0: as it is).

    ``binarize``: ``"dynamic"`` redraws Bernoulli(x) for every training batch
    (a new binarisation each epoch) and binarises the test set once with a
    fixed seed; ``"fixed"`` binarises both once; ``"none"`` keeps grey values.

    ``ema`` is the decay of :class:`~pyro_vae.callbacks.WeightAverage` (0: off),
    whose averaged weights are then the ones evaluated, kept and drawn from;
    ``kl_balance`` trains on :class:`~pyro_vae.objectives.BalancedKLELBO` (NVAE's KL
    balancing during the warm-up);
    ``skip_grad_norm`` the threshold of :class:`~pyro_vae.callbacks.GradientSkip`
    (0: off): updates whose total gradient norm exceeds it are skipped.

    ``labels`` > 0 makes the run semi-supervised (Kingma et al.'s M2, ``VAE(condition=10,
    label_site=True)``): that many training images keep their class label (balanced over the ten
    classes, chosen by a shuffle seeded by ``seed``, :func:`pyro_vae.data.balanced_labels`), the rest
    are unlabelled and their label is summed out (``enumerate``: ``parallel`` or ``sequential``);
    ``aux_loss`` is the weight alpha of the classifier's extra term (0: off). For data sets with labels
    (``LABELLED_DATASETS``); the held-out records then add the accuracy of q(y | x).

    Count data: ``count_input`` is what the encoder reads, ``"log1p"`` (log(1 + x), the default) or
    ``"raw"`` (runs written before it existed); ``batch_file`` a text file of one batch label per cell
    (in the data's cell order), a categorical covariate that the encoder and decoder read one-hot (a
    conditional VAE, ``VAE(condition=B)``), whose distinct labels the run keeps in ``batch_names``.
    ``data_file`` may be an AnnData ``.h5ad`` file (:func:`pyro_vae.cells.read_anndata`): ``layer`` names
    the layer holding the counts (default ``.X``) and ``batch_key`` the ``.obs`` column of the batch.
    Continuous covariates (``covariate_file``, a CSV of one row per cell, or ``covariate_keys``, numeric
    ``.obs`` columns) are read beside the batch, standardised with the means and spreads the run keeps in
    ``covariate_names``, ``covariate_mean`` and ``covariate_std`` (:func:`pyro_vae.cells.conditioning`).
    ``genes`` keeps the genes' names where the data name them (a 10x ``features.tsv``, AnnData's
    ``var_names``), so that another file is read in the run's gene order (:func:`pyro_vae.cells.in_run_order`).
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    data_file: str | None = None
    transpose: bool = False
    image_size: int = 0
    channels: int = 0
    arch: str = "mlp"
    latent_dims: list = dataclasses.field(default_factory=lambda: [50])
    guide: str = "bottom-up"
    prior: str = "standard"
    posterior: str = "gaussian"
    hidden: int = 400
    likelihood: str = "bernoulli"
    gaussian_scale: float = 1.0
    binarize: str = "dynamic"
    elbo: str = "trace"
    num_particles: int = 1
    beta: float = 1.0
    kl_warmup: int = 0
    free_bits: float = 0.0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    grad_clip: float = 0.0
    optimizer: str = "adam"
    max_bad_steps: int = 10
    checkpoint_every: int = 0
    keep_best: bool = False
    val_size: int = 0
    patience: int = 0
    kl_warmup_epochs: int = 0
    squeeze: float = 0.0
    skip: bool = False
    ema: float = 0.0
    skip_grad_norm: float = 0.0
    kl_balance: bool = False
    labels: int = 0
    aux_loss: float = 0.0
    enumerate: str = "parallel"
    count_input: str = "log1p"
    batch_file: str | None = None
    batch_names: list = dataclasses.field(default_factory=list)
    layer: str | None = None
    batch_key: str | None = None
    covariate_file: str | None = None
    covariate_keys: list = dataclasses.field(default_factory=list)
    covariate_names: list = dataclasses.field(default_factory=list)
    covariate_mean: list = dataclasses.field(default_factory=list)
    covariate_std: list = dataclasses.field(default_factory=list)
    genes: list = dataclasses.field(default_factory=list)

    # settings that change the model or its data; a resume must not change them
    MODEL_KEYS = ("dataset", "data_file", "transpose", "arch", "latent_dims", "guide", "prior", "posterior",
                  "hidden", "likelihood", "gaussian_scale", "binarize", "squeeze", "skip", "image_size", "channels",
                  "labels", "count_input", "batch_names", "layer", "covariate_names", "covariate_mean",
                  "covariate_std")
    RESUME_KEYS = MODEL_KEYS + ("data_dir", "val_size", "seed", "ema", "optimizer")  # (Adam's state is not another's)

    def check_resume(self, saved, mid_epoch, where):
        """Raise :class:`InputError` unless this config can continue the run saved with ``saved``
        (a :class:`RunConfig`): the model, its data and their split are the run's, and inside an epoch
        the batch size too (the epoch's remaining batches are the saved order's)."""
        differing = [f"{k}: run has {getattr(saved, k)!r}, asked {getattr(self, k)!r}"
                     for k in self.RESUME_KEYS if getattr(saved, k) != getattr(self, k)]
        if mid_epoch and saved.batch_size != self.batch_size:
            differing.append(f"batch_size: run has {saved.batch_size}, asked {self.batch_size} (the run stopped "
                             "inside an epoch, whose remaining batches are cut at the run's size)")
        if differing:
            raise InputError(f"cannot resume {where}: the settings that define the run differ "
                             f"({'; '.join(differing)}); resume with the run's settings or train into a new "
                             "directory")

    def validate(self, device=True):
        """Raise :class:`InputError` naming the first bad setting (``device=False``: all but the device,
        for a saved run whose device is a record of where it trained, not a request)."""
        self._check_data()
        self._check_images()
        self._check_latents()
        settings.check({key: getattr(self, key) for key in TRAINING_KEYS}, cli=True)
        self._check_mixture()
        self._check_cells()
        self._check_conditioning()
        self._check_size()
        if device:
            resolve_device(self.device)
        return self

    def _check_data(self):
        """Where the data come from: each dataset with the files or folder it reads, and nothing else."""
        if self.dataset not in DATASETS:
            raise InputError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.dataset == "counts":
            if not self.data_file:
                raise InputError("--dataset counts needs the count matrix: pass --data-file PATH "
                                 f"({', '.join(data_.COUNT_FORMATS)}, a 10x folder or an AnnData .h5ad)")
            if self.binarize != "none":
                raise InputError(f"count data are not binarised, but binarize is {self.binarize!r}; "
                                 "pass --binarize none with --dataset counts")
            if self.arch in nets.IMAGE_ARCHS:
                raise InputError(f"--dataset counts holds vectors, which the {self.arch} networks cannot read; "
                                 "use --arch mlp")
            if self.image_size or self.channels:
                raise InputError("--image-size and --channels are for images; a count matrix is read as it is, "
                                 "leave them out with --dataset counts")
        elif self.dataset == "tensor":
            if not self.data_file:
                raise InputError("--dataset tensor needs the images: pass --data-file PATH (.npy or .pt) holding "
                                 "(N, H, W), (N, C, H, W) or (N, H, W, C)")
            if self.transpose or self.data_dir:
                raise InputError("--dataset tensor reads --data-file alone; leave out --transpose and --data-dir")
        elif self.data_file or self.transpose:
            raise InputError("--data-file and --transpose are for --dataset counts (and --data-file for --dataset "
                             "tensor); images are found with --data-dir")
        if self.dataset == "folder" and not self.data_dir:
            raise InputError("--dataset folder needs the images: pass --data-dir DIR holding them, or one sub-folder "
                             "of images per class")

    def _check_images(self):
        """The networks, the image size and channels, the likelihood and the binarisation."""
        if self.arch not in ARCHS:
            raise InputError(f"unknown arch {self.arch!r}; choose one of: {', '.join(ARCHS)}")
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 0:
            raise InputError(f"--image-size must be a whole number >= 1 (or 0: the images' own size), got "
                             f"{self.image_size!r}; use e.g. --image-size 32")
        if self.arch == "conv" and self.image_size % 4:
            raise InputError(f"--image-size {self.image_size} does not suit the conv networks, which need a multiple "
                             f"of 4 (at least 4); use e.g. --image-size {max(4, round(self.image_size / 4) * 4)}, "
                             "or --arch mlp")
        if isinstance(self.channels, bool) or self.channels not in data_.CHANNELS:
            raise InputError(f"--channels must be 1 (grey) or 3 (colour), or 0 (as the images are), got "
                             f"{self.channels!r}; use e.g. --channels 3")
        likelihoods.from_name(self.likelihood, self.gaussian_scale)
        if self.binarize not in BINARIZE:
            raise InputError(f"unknown binarize {self.binarize!r}; choose one of: {', '.join(BINARIZE)}")
        if self.likelihood.split(":")[0] == "dlogistic" and self.binarize != "none":
            raise InputError(f"--likelihood dlogistic is a mass over the 256 values of 8-bit pixels, but binarize "
                             f"is {self.binarize!r} (images of 0s and 1s); pass --binarize none")

    def _check_latents(self):
        """The latent levels, the prior, the posterior and the guide, and the pairs of them that do not go together."""
        dims = self.latent_dims
        if not (isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and d >= 1 for d in dims)):
            raise InputError(f"latent_dims must be a non-empty list of positive integers (top level first), "
                             f"got {dims!r}; use e.g. --latent-dims 16,32,64")
        self.latent_dims = list(dims)
        priors.from_name(self.prior)
        if self.prior.startswith("vamp") and self.guide == "bottom-up" and len(dims) > 1:
            raise InputError("the VampPrior needs q(z0 | x) in closed form, which the bottom-up guide of a chain "
                             "does not have; use --guide top-down or another --prior")
        posteriors.from_name(self.posterior)
        if self.prior.startswith("vamp") and self.posterior != "gaussian":
            raise InputError("the VampPrior is a mixture of Gaussian posteriors q(z0 | u_k), but an IAF posterior "
                             "makes q(z0 | x) a flow; use --posterior gaussian or another --prior")
        if self.guide not in GUIDES:
            raise InputError(f"unknown guide {self.guide!r}; choose one of: {', '.join(GUIDES)}")
        if self.skip and self.guide != "top-down" and len(dims) > 1:
            raise InputError("--skip draws each level given x and every level above it, the top-down guide's "
                             "order; add --guide top-down")
        if self.elbo == "meanfield" and self.guide == "bottom-up" and len(dims) > 1:
            raise InputError(MEANFIELD_BOTTOM_UP)
        if self.arch in paper_hvae.ARCHS:
            self._check_paper_hvae()

    def _check_paper_hvae(self):
        """``--arch gated-hvae`` is one model: two levels, the top-down guide with skip connections, its own
        Gaussian heads, nothing read beside x and the levels."""
        what = "--arch gated-hvae is the VampPrior paper's two-level HVAE"
        if len(self.latent_dims) != 2:
            raise InputError(f"{what}, got {len(self.latent_dims)} level(s) {self.latent_dims}; use --latent-dims "
                             "D0,D1 (e.g. 40,40), or --arch gated for other chains")
        if self.guide != "top-down" or not self.skip:
            raise InputError(f"{what}: q(z0 | x) q(z1 | x, z0), the top-down guide with skip connections; add "
                             "--guide top-down --skip (or use --preset vampprior-hvae)")
        if self.posterior != "gaussian":
            raise InputError(f"{what}, with the paper's Gaussian heads (log-variance in [-6, 2]); use --posterior "
                             "gaussian, or --arch gated for another posterior")
        if self.labels or self.cell_covariates or self.prior.startswith("gmvae"):
            raise InputError(f"{what}, unconditioned: its networks read x and the levels only; use --arch gated "
                             "with --labels, a gmvae prior or covariates")
        if self.dataset == "counts":
            raise InputError(f"{what} of images; use --arch mlp with --dataset counts")

    def _check_mixture(self):
        """The GMVAE prior's discrete level: the class when labels are given, summed out by TraceEnum_ELBO."""
        if self.prior.startswith("gmvae") and self.labels and priors.from_name(self.prior).k != CLASSES:
            raise InputError(f"--prior {self.prior} with --labels: the discrete level is the class, so it needs "
                             f"{CLASSES} values; use --prior gmvae:{CLASSES}")
        if self.prior.startswith("gmvae") and (self.free_bits or self.kl_balance or self.elbo != "trace"):
            raise InputError("--prior gmvae sums its discrete level out with TraceEnum_ELBO, which has no free bits, "
                             "KL balancing, analytic KL or jit; use --elbo trace without them")

    def _check_conditioning(self):
        """What the VAE is conditioned on: labels (with a dataset that has them, summed out where unseen) or the
        cells' covariates, not both."""
        if self.enumerate != "parallel" and not (self.labels or self.prior.startswith("gmvae")):
            raise InputError("--enumerate sums out a label site: use it with --labels N or --prior gmvae:K")
        if self.cell_covariates and self.labels:
            raise InputError("--labels and the cells' covariates (--batch-file, --batch-key, --covariate-file, "
                             "--covariate-keys) are two conditionings; use one of them")
        if self.labels and self.dataset not in LABELLED_DATASETS:
            raise InputError(f"--labels needs class labels, which --dataset {self.dataset} does not give; use one of: "
                             f"{', '.join(LABELLED_DATASETS)}")

    @property
    def cell_covariates(self):
        """Whether the run's VAE is conditioned on the cells' batch or continuous covariates."""
        return bool(self.batch_file or self.batch_key or self.covariate_file or self.covariate_keys)

    def _check_cells(self):
        """The single-cell inputs: a known count input, each input going with count data, AnnData's with an
        ``.h5ad`` file, and a batch or covariates from one place."""
        if self.count_input not in COUNT_INPUTS:
            raise InputError(f"unknown count input {self.count_input!r}; choose one of: {', '.join(COUNT_INPUTS)}")
        h5ad = cells.is_anndata(self.data_file or "")
        given = [flag for flag, value in (("--batch-file", self.batch_file), ("--batch-key", self.batch_key),
                                          ("--covariate-file", self.covariate_file),
                                          ("--covariate-keys", self.covariate_keys), ("--layer", self.layer))
                 if value]
        if given and self.dataset != "counts":
            raise InputError(f"{given[0]} describes the cells of a count matrix; use it with --dataset counts")
        for flag, value in (("--layer", self.layer), ("--batch-key", self.batch_key),
                            ("--covariate-keys", self.covariate_keys)):
            if value and not h5ad:
                raise InputError(f"{flag} reads an AnnData .h5ad file; --data-file {self.data_file} is not one "
                                 "(use --batch-file or --covariate-file for other files)")
        if self.batch_file and self.batch_key:
            raise InputError("--batch-file and --batch-key both give the batch; use one of them")
        if self.covariate_file and self.covariate_keys:
            raise InputError("--covariate-file and --covariate-keys both give the covariates; use one of them")
        if not isinstance(self.covariate_keys, list) or not all(isinstance(k, str) and k for k in
                                                                 self.covariate_keys):
            raise InputError(f"covariate_keys is a list of .obs column names, got {self.covariate_keys!r}; use e.g. "
                             "--covariate-keys percent_mito,n_genes")

    def _check_size(self):
        """Refuse networks whose parameters and Adam's state alone cannot fit in this machine's memory."""
        x_dim = 1 if self.dataset == "counts" else 3 * self.image_size ** 2 if self.image_size else \
            3072 if self.dataset == "cifar-10" else 784
        h, dims = self.hidden, self.latent_dims
        params = 2 * x_dim * h + 4 * h * h + 4 * h * sum(dims) + 3 * h * h * (len(dims) - 1)
        need = 16 * params  # float32 weights, gradients and two Adam moments
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        if need > have:
            raise InputError(f"hidden {h} with latent_dims {dims} needs about {need / 2 ** 30:,.0f} GiB for the "
                             f"weights and Adam's state alone, more than this machine's {have / 2 ** 30:,.0f} GiB; "
                             "use a smaller --hidden or --latent-dims")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name, **overrides):
        """A config from a named preset (see ``PRESETS``), with ``overrides`` on top."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_checkpoint(cls, payload, path):
        """The validated config of a loaded checkpoint ``payload``; a malformed one is refused naming ``path``."""
        config = payload.get("config") if isinstance(payload, dict) else None
        if not isinstance(config, dict):
            raise InputError(f"{path} holds no run configuration (no 'config' dict); it was not written by "
                             "pyro-vae train, or it is damaged: train again with --overwrite")
        if config.get("dataset") == "counts" and "count_input" not in config:  # a run from before log1p input
            config = {**config, "count_input": "raw"}
        try:
            return cls.from_dict(config).validate(device=False)  # a CUDA run is read on a CPU-only machine too
        except InputError as err:
            raise InputError(f"{path} holds a configuration that is not valid: {err}") from None
        except (TypeError, ValueError) as err:
            raise InputError(f"{path} holds a configuration that is not valid ({err}); train again with "
                             "--overwrite") from None

    @classmethod
    def with_defaults(cls, given):
        """A config from the settings ``given`` (a dict), with the data set's own defaults under them
        (``COUNT_DEFAULTS`` for ``dataset="counts"``) and data paths made absolute, so that the run's
        ``config.json`` works from any directory."""
        given = dict(given)
        for key in ("data_dir", "data_file", "batch_file", "covariate_file"):
            if given.get(key):
                given[key] = os.path.abspath(os.path.expanduser(given[key]))
        base = COUNT_DEFAULTS if given.get("dataset") == "counts" else {}
        return cls.from_dict({**base, **given})

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if "latent_dim" in d and "latent_dims" not in d:  # runs written before multilevel chains
            d["latent_dims"] = [d.pop("latent_dim")]
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown configuration keys: {', '.join(sorted(unknown))}; the configuration was "
                             "written by another version or edited: remove them, or train again with --overwrite")
        return cls(**d)


def auto_device():
    """What ``--device auto`` means here: ``"cuda"`` where PyTorch sees a GPU, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name):
    """``torch.device(name)``, refusing CUDA where no GPU exists; under ``torchrun`` a bare ``cuda`` is
    this process's GPU, ``cuda:LOCAL_RANK``."""
    name = auto_device() if name == "auto" else name
    try:
        device = torch.device(distributed.device_for(name))
    except RuntimeError as err:
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but PyTorch sees no CUDA GPU here "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}; use cpu or cuda")
    return device
