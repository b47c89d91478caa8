"""The one validation of training settings, for every way a run is built.

:func:`check` is called by :class:`~pyro_vae.config.RunConfig` (the command
line, ``train``, ``--resume`` and checkpoint loading all go through it) and by
:func:`~pyro_vae.fit` for the keywords a Python user passes. A message names
the setting, the bad value and the fix, spelled the way the caller wrote it:
``--lr 1e-3`` on the command line, ``lr=1e-3`` in Python.
"""

import math

from .errors import InputError

ELBO_NAMES = ("trace", "meanfield", "jit")

MAX_FREE_BITS = 1e4

POSITIVE_INTEGERS = ("hidden", "epochs", "batch_size", "num_particles", "max_bad_steps")
# integers >= 0 where 0 switches the thing off: (what 0 means, an example value)
COUNTS = {"checkpoint_every": ("0: at epoch ends only", 500), "val_size": ("0: no validation split", 10000),
          "patience": ("0: no early stopping", 50), "kl_warmup_epochs": ("0: no warm-up", 100),
          "labels": ("0: no labels, an unsupervised VAE", 3000)}
ENUMERATE = ("parallel", "sequential")
# torch.optim.Adam, or Adam on each parameter tensor's gradient scaled to unit L2 norm first (the VampPrior
# paper's AdamNormGrad; pyro_vae.svi.NormalizedGradAdam)
OPTIMIZERS = ("adam", "adam-normgrad")


# settings that a Python user gives as a part of the loop rather than a keyword of fit
PARTS = {"ema": "WeightAverage", "skip_grad_norm": "GradientSkip"}


def spell(name, value, cli):
    """How a user sets ``name`` to ``value``: ``--batch-size 64`` (``cli``) or ``batch_size=64``
    (``callbacks.WeightAverage(0.999)`` for the settings that are parts in Python, see ``PARTS``)."""
    if cli:
        return f"--{name.replace('_', '-')} {value}"
    return f"callbacks.{PARTS[name]}({value})" if name in PARTS else f"{name}={value}"


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_integer(name, value, cli):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise InputError(f"{name} must be a positive integer, got {value!r}; use {spell(name, 1, cli)} or more")


def _check_one(name, value, cli):
    if name in POSITIVE_INTEGERS:
        _positive_integer(name, value, cli)
    elif name == "lr" and not (_number(value) and value > 0):
        raise InputError(f"lr must be a positive number, got {value!r}; use e.g. {spell('lr', '1e-3', cli)}")
    elif name == "beta" and not (_number(value) and value > 0):
        raise InputError(f"beta must be a number > 0, got {value!r}; use e.g. {spell('beta', '1.0', cli)}")
    elif name == "grad_clip" and not (value is None or (_number(value) and value >= 0)):
        raise InputError(f"grad_clip must be a number >= 0 (0: no clipping), got {value!r}; "
                         f"use e.g. {spell('grad_clip', '1.0', cli)}")
    elif name == "free_bits" and not (_number(value) and value >= 0):
        raise InputError(f"free_bits must be a number of nats >= 0 (0: off), got {value!r}; "
                         f"use e.g. {spell('free_bits', '0.5', cli)}")
    elif name == "kl_warmup" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise InputError(f"kl_warmup must be a number of steps >= 0 (0: off), got {value!r}; "
                         f"use e.g. {spell('kl_warmup', 10000, cli)}, or 0 for no warm-up")
    elif name in COUNTS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        meaning, example = COUNTS[name]
        raise InputError(f"{name} must be an integer >= 0 ({meaning}), got {value!r}; use e.g. {spell(name, example, cli)}")
    elif name == "seed" and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 32):
        raise InputError(f"seed must be an integer in [0, 2**32), got {value!r}; use e.g. {spell('seed', 0, cli)}")
    elif name == "squeeze" and not (_number(value) and 0 <= value < 0.5):
        raise InputError(f"squeeze must be a number in [0, 0.5) (0: off), got {value!r}; "
                         f"use e.g. {spell('squeeze', '1e-3', cli)}")
    elif name == "free_bits" and _number(value) and value > MAX_FREE_BITS:
        raise InputError(f"free_bits {value:g} nats per level is beyond any KL a level can hold; use a floor of "
                         f"at most {MAX_FREE_BITS:g}, e.g. {spell('free_bits', '0.5', cli)}")
    elif name == "ema" and not (_number(value) and 0 <= value < 1):
        raise InputError(f"ema (the weight average's decay) must be a number in [0, 1) (0: off), got {value!r}; "
                         f"use e.g. {spell('ema', 0.999, cli)}")
    elif name == "skip_grad_norm" and not (_number(value) and value >= 0):
        raise InputError(f"skip_grad_norm (skip updates whose gradient norm exceeds it) must be a number >= 0 "
                         f"(0: off), got {value!r}; use e.g. {spell('skip_grad_norm', 40000, cli)}")
    elif name == "aux_loss" and not (_number(value) and value >= 0):
        raise InputError(f"aux_loss (the weight alpha of M2's classification term) must be a number >= 0 "
                         f"(0: off), got {value!r}; use e.g. {spell('aux_loss', 46, cli)}")
    elif name == "enumerate" and value not in ENUMERATE:
        raise InputError(f"enumerate must be one of {', '.join(ENUMERATE)}, got {value!r}")
    elif name == "optimizer" and value not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {value!r}; choose one of: {', '.join(OPTIMIZERS)}")
    elif name == "elbo" and value not in ELBO_NAMES:
        raise InputError(f"unknown elbo {value!r}; choose one of: {', '.join(ELBO_NAMES)}")


def check(settings, cli=False):
    """Raise :class:`InputError` naming the first bad training setting in ``settings``.

    Args:
        settings: a dict of any of ``epochs``, ``batch_size``, ``num_particles``,
            ``max_bad_steps``, ``hidden``, ``lr``, ``beta``, ``grad_clip``,
            ``free_bits``, ``kl_warmup``, ``checkpoint_every``, ``elbo``,
            ``val_size``, ``patience``, ``kl_warmup_epochs``, ``seed``, ``squeeze``,
            ``ema``, ``skip_grad_norm``, ``kl_balance``, ``labels``, ``aux_loss``, ``enumerate``,
            ``optimizer``;
            other keys are left to their owners.
        cli: spell the fix as a command-line flag rather than a keyword.

    Returns:
        ``settings``, unchanged.
    """
    for name, value in settings.items():
        _check_one(name, value, cli)
    if settings.get("optimizer") == "adam-normgrad" and settings.get("grad_clip"):
        raise InputError("adam-normgrad scales every gradient to unit norm, so clipping the total norm first does "
                         f"nothing; use {spell('grad_clip', 0, cli)} with it, or {spell('optimizer', 'adam', cli)}")
    if settings.get("kl_warmup") and settings.get("kl_warmup_epochs"):
        raise InputError("give the KL warm-up in steps or in epochs, not both; use "
                         f"{spell('kl_warmup', 0, cli)} or {spell('kl_warmup_epochs', 0, cli)}")
    if settings.get("patience") and not settings.get("val_size"):
        raise InputError("early stopping reads the validation ELBO, but there is no validation split; use "
                         f"{spell('val_size', 10000, cli)} with {spell('patience', settings['patience'], cli)}")
    if settings.get("kl_balance") not in (None, False, True):
        raise InputError(f"kl_balance must be True or False, got {settings['kl_balance']!r}")
    if settings.get("kl_balance") and not (settings.get("kl_warmup") or settings.get("kl_warmup_epochs")):
        raise InputError("KL balancing acts during the KL warm-up only (as in NVAE); add a warm-up: "
                         f"{spell('kl_warmup', 10000, cli)} or {spell('kl_warmup_epochs', 10, cli)}")
    if settings.get("kl_balance") and settings.get("free_bits"):
        raise InputError("KL balancing and free bits are two objectives against collapse; choose one: "
                         f"{spell('free_bits', 0, cli)}, or drop the KL balancing")
    if settings.get("elbo") == "jit" and (settings.get("kl_warmup") or settings.get("kl_warmup_epochs")
                                          or settings.get("free_bits")):
        jit, fix = ("--elbo jit", "--elbo trace or meanfield") if cli else ("the jit ELBO", "elbo='trace' or 'meanfield'")
        raise InputError(f"{jit} compiles the loss once, so it cannot follow a KL warm-up or use free bits; "
                         f"use {fix}")
    if settings.get("aux_loss") and "labels" in settings and not settings["labels"]:
        raise InputError("the auxiliary loss trains M2's classifier on labelled data; give labelled data "
                         f"({spell('labels', 3000, cli)}) or drop it ({spell('aux_loss', 0, cli)})")
    if settings.get("labels") and (settings.get("free_bits") or settings.get("kl_balance")
                                   or settings.get("elbo") in ("meanfield", "jit")):
        raise InputError("a semi-supervised run sums the label out with TraceEnum_ELBO, which has no free bits, "
                         f"KL balancing, analytic KL or jit; use {spell('elbo', 'trace', cli)} without them")
    return settings
