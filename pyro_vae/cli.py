"""``pyro-vae train | evaluate | sample | explore``: the command line over train, evaluate, plots and explore."""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from . import distributed, settings
from .errors import InputError
from .config import PRESETS
from .checkpoints import write_text_atomic
from .rundir import describe_os_error
from .callbacks import Callback
from .train import ELBOS, RunConfig, TrainingDiverged, TrainingInterrupted

DEFAULTS = RunConfig()


def _sizes(text):
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 16,32,64, got {text!r}")


def _number_like(example):
    """An argparse type: a float, or an error that shows ``example``."""
    def parse(text):
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number such as {example}, got {text!r}") from None
    return parse


def _parser():
    p = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders the Pyro way.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VAE by SVI and write a run directory",
                       description="Train a VAE by SVI; writes config.json, metrics.jsonl, checkpoint.pt, "
                                   "curves.png and, for images, samples.png, reconstructions.png and levels.png into --out.")
    _add_model_flags(t)
    _add_training_flags(t)

    e = sub.add_parser("evaluate", help="test ELBO, its terms and the IW log-likelihood; writes DIR/eval.json")
    e.add_argument("run_dir", help="run directory made by pyro-vae train")
    e.add_argument("--iw-samples", type=int, default=1000, help="K importance samples per image (default 1000)")
    e.add_argument("--elbo-samples", type=int, default=10, help="draws of z per image for the ELBO (default 10)")
    e.add_argument("--mixture", type=int, default=32, metavar="M",
                   help="the bottom-up guide's per-level KL shares need q's marginals, estimated by mixtures of M "
                        "guide draws: raise M, and compare, to see their bias (default 32)")
    _add_device_flags(e)
    e.add_argument("--limit", type=int, help="evaluate only the first N test images")
    e.add_argument("--checkpoint", help="best (best.pt, the best validation epoch) or last (checkpoint.pt) "
                                        "(default: best where the run has a validation split and kept best.pt)")
    e.add_argument("--seed", type=int, default=0, help="random seed of the Monte Carlo draws (default 0)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="write a grid of samples: from the model, at temperatures, or from a test "
                                      "image with its top levels kept")
    s.add_argument("run_dir", help="run directory made by pyro-vae train")
    s.add_argument("--n", type=int, help="number of samples (default 64 in one grid; 8 per row with a list of "
                                         "temperatures or --from-image)")
    s.add_argument("--temperature", metavar="T[,T...]",
                   help="scale the spread of every level's p(z0) and p(z_l | z_l-1) by T (0: every level at its "
                        "mean; default 1); a comma list such as 0,0.5,0.8,1 draws one labelled row per temperature, "
                        "the same draws in each column")
    s.add_argument("--from-image", type=int, metavar="INDEX",
                   help="conditional generation: keep the top --keep-levels levels of test image INDEX (one draw "
                        "of the guide) and draw the rest from the model; writes the image then --n draws, one row "
                        "per temperature")
    s.add_argument("--keep-levels", type=int, metavar="K",
                   help="with --from-image: how many top levels to keep, 0..L+1 (default 1: z0)")
    s.add_argument("--out", help="PNG path (default RUN_DIR/samples.png; samples_tT.png with --temperature; "
                                 "fromINDEX_keepK.png, or fromINDEX_keepK_tT.png, with --from-image)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_device_flags(s)
    _add_explore_flags(sub)
    c = sub.add_parser("encode", help="write each data point's posterior mean (the latent) to a .csv or .npy file")
    c.add_argument("run_dir", help="run directory made by pyro-vae train")
    c.add_argument("--out", help="latent.csv (a name per row, then the D values) or latent.npy (N x D) "
                                 "(default RUN_DIR/latent.csv)")
    c.add_argument("--data-file", help="count data to encode instead of the run's (its genes in the run's order)")
    c.add_argument("--batch-file", help="with --data-file: the cells' batches (for a run trained with batches)")
    c.add_argument("--covariate-file", help="with --data-file: the cells' continuous covariates (for a run trained "
                                            "with covariates)")
    c.add_argument("--layer", help="with an AnnData --data-file: the layer of its counts (default: the run's, or .X)")
    c.add_argument("--batch-key", help="with an AnnData --data-file: its .obs column of batches (default: the run's)")
    c.add_argument("--covariate-keys", type=_names, metavar="A,B",
                   help="with an AnnData --data-file: its numeric .obs columns of covariates (default: the run's)")
    c.add_argument("--transpose", action="store_true", help="with --data-file: the file is genes x cells")
    c.add_argument("--level", type=int, help="which level of a chain (default: the one nearest the data)")
    c.add_argument("--expression", action="store_true",
                   help="write each cell's normalised expression (the decoder's proportions times 10 000 counts) "
                        "instead")
    c.add_argument("--as-batch", metavar="NAME",
                   help="with --expression: decode every cell as if of batch NAME (batch-corrected expression)")
    c.add_argument("--checkpoint", help="best or last (default as for evaluate)")
    _add_device_flags(c)
    _add_de_flags(sub)
    return p


def _add_de_flags(sub):
    """``de``: differential expression between two groups of a count run's cells."""
    d = sub.add_parser("de", help="differential expression between two groups of cells (scVI's change mode)")
    d.add_argument("run_dir", help="run directory made by pyro-vae train on count data")
    d.add_argument("--groups", metavar="FILE", help="one group label per cell (a line each, in the data's cell order)")
    d.add_argument("--groupby", metavar="COLUMN", help="for a run on an AnnData .h5ad file: the .obs column of groups")
    d.add_argument("--a", required=True, metavar="NAME", help="the group compared (log fold changes are A over B)")
    d.add_argument("--b", metavar="NAME", help="the group compared with (default: every other cell)")
    d.add_argument("--as-batch", metavar="NAME", help="decode every cell as of batch NAME (batch-corrected)")
    d.add_argument("--draws", type=int, default=5000, help="posterior draws per group (default 5000)")
    d.add_argument("--delta", type=float, default=0.25,
                   help="smallest |log2 fold change| that counts as a change (default 0.25)")
    d.add_argument("--fdr", type=float, default=0.05, help="posterior expected false discovery rate (default 0.05)")
    d.add_argument("--out", help="CSV, one row per gene (default RUN_DIR/de_A_vs_B.csv)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--checkpoint", help="best or last (default as for evaluate)")
    _add_device_flags(d)


def _add_explore_flags(sub):
    """``explore``: latent traversals and interpolations of test images (:mod:`pyro_vae.explore`)."""
    x = sub.add_parser("explore", help="latent traversals and interpolations of test images; writes PNGs",
                       description="Traversals (traversal_zL.png: one row per unit, the image then its decodes "
                                   "with the unit moved) and interpolations (interpolation_I_J.png: linear and "
                                   "spherical rows) of test images at their posterior means.")
    x.add_argument("run_dir", help="run directory made by pyro-vae train")
    x.add_argument("--traverse", type=int, action="append", metavar="LEVEL",
                   help="traverse level LEVEL (0 = z0, the top); repeat for several levels")
    x.add_argument("--image", type=int, default=0, help="test image to traverse (default 0)")
    x.add_argument("--units", type=int, default=8, help="units per level, those whose posterior mean varies most "
                                                        "over the first 1000 test images (default 8)")
    x.add_argument("--steps", type=int, default=9, help="pictures per row (default 9)")
    x.add_argument("--span", type=float, default=3.0,
                   help="traverse +-SPAN standard deviations of each unit under the model (default 3)")
    x.add_argument("--interpolate", metavar="I,J", help="interpolate between test images I and J")
    x.add_argument("--mode", default="both", help="linear, spherical or both (default both: one row each)")
    x.add_argument("--level", type=int, help="with --interpolate: only this level (default: every level)")
    x.add_argument("--out", help="directory for the pictures (default RUN_DIR)")
    _add_device_flags(x)


def _add_device_flags(p):
    p.add_argument("--device", default="auto",
                   help="auto (CUDA where PyTorch sees a GPU, else cpu; the default, and it says which), cpu, "
                        "cuda or cuda:K")
    p.add_argument("--cuda", dest="device", action="store_const", const="cuda",
                   help="the same as --device cuda (the flag of Pyro's own examples)")


def _chosen_device(asked):
    """``asked``, with ``auto`` resolved to ``cuda`` where PyTorch sees a GPU and to ``cpu`` elsewhere
    (saying which once the command's input has passed its checks: on stdout as work starts, in
    ``eval.json`` for ``evaluate``; once under torchrun)."""
    if asked != "auto":
        return asked
    from .config import auto_device

    chosen = auto_device()
    why = "PyTorch sees a CUDA GPU" if chosen == "cuda" else "PyTorch sees no CUDA GPU"
    _NEWS.append(f"device {chosen} (--device auto: {why}; --device cpu or cuda to choose)")
    return chosen


_NEWS = []  # what the command says on stdout once its input has passed every check (see _announce)


def _announce():
    """Print the news kept for the moment the work starts (rank 0 only) on stdout, with the command's
    other news: bad input, found before, stays one line on stderr and nothing on stdout."""
    if _rank() == 0:
        for line in _NEWS:
            print(line, flush=True)
    _NEWS.clear()


class _Announcement(Callback):
    """Says the kept news when training starts: every check of the input has passed by then."""

    def on_fit_start(self, loop):
        _announce()


def _add_model_flags(t):
    """``train``: the output, the data and the model."""
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--dataset", help="fashion-mnist, mnist, cifar-10, folder (the images in --data-dir), tensor "
                                     "(an image tensor in --data-file) or counts (a count matrix in --data-file) "
                                     f"(default {DEFAULTS.dataset})")
    t.add_argument("--data-dir", help="directory holding the IDX files (looked at before Debian's "
                                      "package and torchvision's download), CIFAR-10's cifar-10-batches-py, "
                                      "or with --dataset folder the images (or one sub-folder of them per class)")
    t.add_argument("--data-file", help="with --dataset counts: a cells x genes (documents x words) count matrix, "
                                       ".npz, .csv(.gz), .mtx(.gz), a 10x folder or an AnnData .h5ad; with "
                                       "--dataset tensor: images (N, H, W), (N, C, H, W) or (N, H, W, C), uint8 "
                                       "or floats in [0, 1], .npy or .pt")
    t.add_argument("--transpose", action="store_true", default=None,
                   help="with --data-file: the file is genes x cells, as 10x Genomics .mtx files are")
    t.add_argument("--batch-file", metavar="FILE",
                   help="with --dataset counts: one batch label per cell (a line each, in the matrix's cell order); "
                        "encoder and decoder read it one-hot, so the latent need not hold the batch")
    t.add_argument("--layer", metavar="NAME",
                   help="with an AnnData .h5ad --data-file: the layer holding the raw counts (default .X)")
    t.add_argument("--batch-key", metavar="COLUMN",
                   help="with an AnnData .h5ad --data-file: the .obs column of each cell's batch (as --batch-file)")
    t.add_argument("--covariate-file", metavar="FILE",
                   help="with --dataset counts: continuous covariates, a CSV of one row of numbers per cell (a header "
                        "row names them); standardised, then read by encoder and decoder beside the batch")
    t.add_argument("--covariate-keys", metavar="A,B", type=_names,
                   help="with an AnnData .h5ad --data-file: numeric .obs columns read as continuous covariates")
    t.add_argument("--count-input", metavar="log1p|raw",
                   help="with --dataset counts: what the encoder reads, log(1 + x) or the raw counts "
                        "(default log1p)")
    t.add_argument("--image-size", type=int, metavar="N",
                   help="resize images so that the shorter side is N, then crop the centre N x N (a multiple of "
                        "4 for --arch conv; default: the images' own size)")
    t.add_argument("--channels", type=int, metavar="1|3",
                   help="1: grey, 3: colour (default: as the images are; a folder is grey if every image is)")
    t.add_argument("--arch", help=f"mlp, conv, gated (the VampPrior paper's gated MLP), gated-conv (its gated "
                                  f"convolutions) or gated-hvae (its two-level HVAE, every network as its code "
                                  f"has it) (default {DEFAULTS.arch})")
    t.add_argument("--latent-dims", "--latent-dim", type=_sizes, metavar="D0[,D1,...]",
                   help="sizes of the latent levels, top (z0) to bottom, e.g. 16,32,64; one number is "
                        f"the one-level VAE (default {','.join(map(str, DEFAULTS.latent_dims))})")
    t.add_argument("--guide", help=f"bottom-up or top-down (default {DEFAULTS.guide})")
    t.add_argument("--skip", action="store_true", default=None,
                   help="skip connections (the VampPrior paper's HVAE): the decoder and every transition read all "
                        "levels above them, and the top-down guide draws each level given x and the levels above")
    t.add_argument("--prior", help="p(z0): standard, learned, mog:K, vamp:K, vamp-hardtanh:K (a VampPrior with the "
                                   "paper's code's pseudo-inputs), flow:K, or gmvae:K (a discrete level y "
                                   "of K values above z0, p(z0 | y) Gaussian, summed out by enumeration) "
                                   f"(default {DEFAULTS.prior})")
    t.add_argument("--posterior", help="the guide's family at every level: gaussian or iaf:K (K flow steps) "
                                       f"(default {DEFAULTS.posterior})")
    t.add_argument("--hidden", type=int, help=f"MLP hidden width, also of the chain's networks "
                                              f"(default {DEFAULTS.hidden})")
    t.add_argument("--likelihood", help="bernoulli, cbernoulli, gaussian[:fixed|learned|pixel], laplace, beta, "
                                        f"dlogistic[:K], poisson, nb or zinb (default {DEFAULTS.likelihood})")
    t.add_argument("--gaussian-scale", type=float,
                   help=f"fixed std of the gaussian likelihood (default {DEFAULTS.gaussian_scale})")
    t.add_argument("--binarize", help=f"dynamic, fixed or none (default {DEFAULTS.binarize})")


def _add_training_flags(t):
    """``train``: the objective, the optimisation, the protocol, checkpoints and resume."""
    t.add_argument("--elbo", help=f"{', '.join(ELBOS)} (default {DEFAULTS.elbo})")
    t.add_argument("--num-particles", type=int, help="particles per image, vectorised (default 1)")
    t.add_argument("--beta", type=float, help="KL weight via poutine.scale (default 1)")
    t.add_argument("--kl-warmup", type=int, metavar="STEPS",
                   help="KL weight min(1, (t+1)/STEPS) at step t (default 0: off)")
    t.add_argument("--free-bits", type=float, metavar="NATS",
                   help="KL floor per level per image; an objective, not a bound (default 0: off)")
    t.add_argument("--kl-balance", action="store_true", default=None,
                   help="NVAE's KL balancing during the KL warm-up: each level's KL weighted by its share, so "
                        "no level is switched off early; an objective, not a bound, until the warm-up ends")
    t.add_argument("--labels", type=int, metavar="N",
                   help="semi-supervised M2: keep the class labels of N training images (balanced over the classes, "
                        "seeded by --seed), the label a Pyro site summed out by TraceEnum_ELBO for the rest; evaluate "
                        "then reports the test accuracy of q(y | x) (default 0: unsupervised)")
    t.add_argument("--aux-loss", type=_number_like(46), metavar="ALPHA",
                   help="with --labels: add ALPHA * -log q(y | x) on the labelled images (Kingma et al.'s auxiliary "
                        "term; Pyro's ss_vae_M2.py uses 46) (default 0: off)")
    t.add_argument("--enumerate", help="with --labels: sum the label out in parallel (one pass over all classes) or "
                                       f"sequential (a pass per class) (default {DEFAULTS.enumerate})")
    t.add_argument("--epochs", type=int, help=f"epochs to train up to (default {DEFAULTS.epochs})")
    t.add_argument("--batch-size", type=int, help=f"minibatch size (default {DEFAULTS.batch_size})")
    t.add_argument("--lr", type=float, help=f"Adam learning rate (default {DEFAULTS.lr})")
    t.add_argument("--seed", type=int, help=f"random seed (default {DEFAULTS.seed})")
    _add_device_flags(t)
    t.add_argument("--grad-clip", type=float, help="clip the total gradient norm to this (default 0: off)")
    t.add_argument("--optimizer", help="adam, or adam-normgrad: Adam on each parameter's gradient scaled to unit "
                                       "norm first, the VampPrior paper's AdamNormGrad (default adam)")
    t.add_argument("--skip-grad-norm", type=_number_like(40000), metavar="THRESHOLD",
                   help="skip (count, log, do not apply) every update whose total gradient norm exceeds this "
                        "(default 0: off)")
    t.add_argument("--ema", type=_number_like(0.999), metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay, e.g. 0.999; "
                        "held-out ELBOs, best.pt, the pictures, evaluate, sample and explore use it (default 0: off)")
    t.add_argument("--max-bad-steps", type=int,
                   help="stop after this many consecutive steps with a non-finite loss or gradient, each "
                        f"skipped (default {DEFAULTS.max_bad_steps})")
    t.add_argument("--checkpoint-every", type=int,
                   help="also write checkpoint.pt every this many steps (default 0: at epoch ends)")
    t.add_argument("--keep-best", action="store_true", default=None,
                   help="also keep best.pt, the checkpoint with the best validation ELBO (test ELBO without "
                        "--val-size)")
    t.add_argument("--squeeze", type=float, metavar="EPS",
                   help="map the data from [0, 1] into [EPS, 1-EPS] (train, validation and test alike), e.g. for "
                        "--likelihood beta on images with exact 0 and 1; log-likelihoods are then of the squeezed "
                        "data, and eval.json gives the nats to add for the original ones (default 0: off)")
    t.add_argument("--val-size", type=int, metavar="N",
                   help="hold out the last N training points for validation, evaluated every epoch; early "
                        "stopping and best.pt then read it, and the test set waits for evaluate (default 0: none)")
    t.add_argument("--patience", type=int, metavar="EPOCHS",
                   help="with --val-size: stop after this many epochs without a better validation ELBO "
                        "(default 0: off)")
    t.add_argument("--kl-warmup-epochs", type=int, metavar="EPOCHS",
                   help="KL warm-up over this many epochs (instead of --kl-warmup STEPS) (default 0: off)")
    t.add_argument("--preset", help="named settings, under any flag given: " + "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in PRESETS.items()))
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--tensorboard", action="store_true",
                   help="log to TensorBoard in OUT/tensorboard (tensorboard --logdir OUT/tensorboard): per step the "
                        "loss, KL weight, gradient norm and learning rate, per epoch the metrics and pictures; give "
                        "it again with --resume to go on with the same stream (needs pip install "
                        "'pyro-vae[tensorboard]')")


def _given(args):
    """The settings that parsed ``train`` flags give (a dict), a ``--preset``'s under the flags given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    if args.preset and not args.resume:  # a resumed run keeps the settings it was started with
        given = {**RunConfig.from_preset(args.preset).to_dict(), **given}
    return given


def train_config(flags):
    """The :class:`~pyro_vae.RunConfig` that ``pyro-vae train FLAGS`` would start a new run with (``flags``: a
    list of its arguments, as on the command line); nothing is read or written."""
    return RunConfig.with_defaults(_given(_parser().parse_args(["train", *flags])))


def _train(args):
    from .train import is_image, load_checkpoint, train, unit_of

    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other; pass --resume to continue the run in "
                         "--out, or --overwrite to replace it")
    given = _given(args)
    if args.resume:
        path = Path(args.out) / "checkpoint.pt"
        base = RunConfig.from_checkpoint(load_checkpoint(path), path).to_dict()
        config = RunConfig.from_dict({**base, **given})
    else:
        config = RunConfig.with_defaults(given)  # --dataset counts: its own defaults; data paths made absolute
    import pyro

    # a resumed run that logged to TensorBoard goes on logging into the same stream, flag or not
    tensorboard = args.tensorboard or (args.resume and any((Path(args.out) / "tensorboard").glob("events.out.*")))
    with pyro.validation_enabled(False):  # the data are checked once; skip Pyro's per-step argument checks
        vae, history = train(config, args.out, resume=args.resume, overwrite=args.overwrite,
                             progress=not args.no_progress, tensorboard=tensorboard, callbacks=[_Announcement()])
    if not distributed.is_main():  # under torchrun rank 0 reports
        return
    out = Path(args.out)
    last = history[-1]
    unit = unit_of(vae)
    held_out, key = ("validation", "val_elbo") if "val_elbo" in last else ("test", "test_elbo")
    print(f"trained {last['epoch']} epochs: train loss {last['train_loss']:.2f}, "
          f"{held_out} ELBO {last[key]:.2f} nats/{unit}")
    pictures = "samples.png reconstructions.png levels.png curves.png" if is_image(vae) else "curves.png"
    pictures += " kl_levels.png" if len(vae.latent_dims) > 1 else ""
    pictures += " classes.png" if (out / "classes.png").exists() else ""
    pictures += " pseudo_inputs.png" if (out / "pseudo_inputs.png").exists() else ""
    kept = " best.pt" if (out / "best.pt").exists() else ""
    pictures += " model.png" if (out / "model.png").exists() else ""
    kept += " tensorboard/" if tensorboard else ""
    print(f"wrote {out}/: config.json metrics.jsonl checkpoint.pt{kept} {pictures}")


def _evaluate(args):
    from .evaluate import evaluate
    from .rundir import RunLock
    from .train import CLASS_NAMES, checkpoint_name, load_labelled_splits, load_run_checkpoint, run_from_checkpoint

    if args.checkpoint not in (None, "best", "last"):
        raise InputError(f"--checkpoint must be best or last, got {args.checkpoint!r}")
    if args.iw_samples < 0 or args.elbo_samples < 1:
        raise InputError("--iw-samples must be >= 0 and --elbo-samples >= 1; use e.g. --iw-samples 1000 "
                         "--elbo-samples 10")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be positive, got {args.limit}; use e.g. --limit 1000")
    settings.check({"seed": args.seed}, cli=True)
    if args.mixture < 1:
        raise InputError(f"--mixture must be a positive number of draws, got {args.mixture}; use e.g. --mixture 256")
    run_dir = Path(args.run_dir)
    config = RunConfig.from_checkpoint(load_run_checkpoint(run_dir / "checkpoint.pt"), run_dir / "checkpoint.pt")
    name = checkpoint_name(run_dir, config, args.checkpoint)  # the best validation epoch's where kept
    distributed.init(args.device or config.device)  # under torchrun: the IW estimate is sharded across ranks
    main = distributed.is_main()
    with contextlib.ExitStack() as lock:
        def load():
            if main:  # refused inside main_first, so every rank hears of it
                lock.enter_context(RunLock(run_dir))
            payload = load_run_checkpoint(run_dir / name)
            vae, run_config = run_from_checkpoint(payload, run_dir / name, device=args.device)
            return vae, run_config, int(payload["epoch"]), load_labelled_splits(run_config, vae.device)[2]

        vae, config, epoch, (x_test, y_test) = distributed.main_first(load)
        classes = y_test if vae.label_site and not config.labels else None  # a discrete level learnt unsupervised
        y_test = y_test if config.labels or config.cell_covariates else None  # M2's accuracy; the cells' covariates
        _NEWS.clear()  # stdout is the JSON alone: the device is in it
        if args.limit is not None:
            x_test, y_test = x_test[:args.limit], None if y_test is None else y_test[:args.limit]
        import pyro

        pyro.set_rng_seed(args.seed)  # the same run and settings give the same eval.json
        with pyro.validation_enabled(False):
            summary = evaluate(vae, x_test, iw_samples=args.iw_samples, elbo_samples=args.elbo_samples,
                               progress=not args.no_progress, mixture=args.mixture, seed=args.seed, y=y_test)
        if not main:
            return
        if classes is not None:
            from .evaluate import cluster_accuracy, predicted_classes

            summary["cluster_accuracy"] = cluster_accuracy(predicted_classes(vae, x_test), classes[:len(x_test)])
        if config.cell_covariates:
            summary["conditional_on"] = "the cells' " + " and ".join(
                what for what, given in (("batches", config.batch_names), ("covariates", config.covariate_names))
                if given)
        if getattr(vae.likelihood, "uses_library", False) and not getattr(vae.likelihood, "library_site", False):
            summary["conditional_on_library"] = True  # log p(x | observed library size), as scVI reports it
        if y_test is not None and config.labels:
            from .evaluate import predicted_classes
            from .plots import save_confusion

            save_confusion(predicted_classes(vae, x_test), y_test, run_dir / "confusion.png",
                           names=CLASS_NAMES.get(config.dataset))
            print(f"wrote {run_dir / 'confusion.png'}", file=sys.stderr)
        summary.update(dataset=config.dataset, binarize=config.binarize, checkpoint=name,
                       epoch=epoch, device=str(vae.device))
        if args.limit is not None:  # the first N test points only, not the whole test set
            summary["limit"] = args.limit
        if distributed.current() is not None:
            summary["processes"] = distributed.current().size
        if config.squeeze:
            summary.update(squeeze=config.squeeze, squeeze_log_jacobian=float(
                x_test[0].numel() * math.log(1 - 2 * config.squeeze)))  # add to any log-likelihood for unsqueezed x
        summary = _finite_json(summary)
        path = run_dir / "eval.json"
        write_text_atomic(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print(json.dumps(summary, indent=2))
    if summary.get("not_finite"):
        print(f"pyro-vae: warning: {', '.join(summary['not_finite'])} came out NaN or infinite (written as "
              "null); the weights may have diverged", file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)  # stdout is the JSON alone


def _encode(args):
    from .encode import encode_run

    path, shape = encode_run(args.run_dir, out=args.out, data_file=args.data_file, batch_file=args.batch_file,
                             transpose=args.transpose, level=args.level, checkpoint=args.checkpoint,
                             device=args.device, expression=args.expression, as_batch=args.as_batch,
                             covariate_file=args.covariate_file, layer=args.layer, batch_key=args.batch_key,
                             covariate_keys=args.covariate_keys)
    print(f"wrote {path}: {shape[0]} rows x {shape[1]} {'genes' if args.expression else 'latent dims'}")


def _de(args):
    from .differential import de_run

    path, result, (n_a, n_b) = de_run(args.run_dir, args.a, args.b, groups=args.groups, groupby=args.groupby,
                                      as_batch=args.as_batch, out=args.out, draws=args.draws, delta=args.delta,
                                      fdr=args.fdr, seed=args.seed, checkpoint=args.checkpoint, device=args.device)
    called = int(result["is_de"].sum())
    print(f"{n_a} cells of {args.a} against {n_b} of {args.b or 'the rest'}: {called} of {len(result['is_de'])} "
          f"genes DE at |LFC| >= {args.delta} and FDR {args.fdr}")
    print(f"wrote {path} and {path.with_suffix('.png')}")


def _names(text):
    """``"a,b"`` -> ``["a", "b"]`` (a flag's comma-separated names)."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, e.g. percent_mito,n_genes; got {text!r}")
    return names


def _finite_json(summary):
    """``summary`` with every non-finite number replaced by ``None`` and listed under ``not_finite``
    (strict JSON has no NaN or Infinity)."""
    def finite(v):
        return not (isinstance(v, float) and not math.isfinite(v))

    bad = [k for k, v in summary.items() if not (all(map(finite, v)) if isinstance(v, list) else finite(v))]
    out = {k: v for k, v in summary.items()}
    for k in bad:  # a list (per unit) keeps its finite entries
        out[k] = [u if finite(u) else None for u in out[k]] if isinstance(out[k], list) else None
    if bad:
        out["not_finite"] = bad
    return out


def _temperatures(text):
    """The floats of ``--temperature T[,T...]``, each finite and >= 0; ``[1.0]`` when not given."""
    if text is None:
        return [1.0]
    values = []
    for part in text.split(","):
        try:
            t = float(part)
        except ValueError:
            t = math.nan
        if not (math.isfinite(t) and t >= 0):
            raise InputError(f"--temperature takes finite numbers >= 0, got {part.strip()!r}; use e.g. "
                             "--temperature 0.8, or a list such as --temperature 0,0.5,0.8,1")
        values.append(t)
    return values


def _sample_path(args, temperatures):
    """The picture to write: ``--out``, else a name in the run directory that says what it holds."""
    if args.out:
        return Path(args.out)
    suffix = "" if args.temperature is None else "_t" + "_".join(f"{t:g}" for t in temperatures)
    if args.from_image is not None:
        keep = 1 if args.keep_levels is None else args.keep_levels
        return Path(args.run_dir) / f"from{args.from_image}_keep{keep}{suffix}.png"
    return Path(args.run_dir) / f"samples{suffix}.png"


def _source_image(args, vae, config):
    """``(x, K)``: test image ``--from-image`` ``(1, *x_shape)`` and ``--keep-levels``, checked against the run."""
    from .train import load_data

    keep = 1 if args.keep_levels is None else args.keep_levels
    if not 0 <= keep <= vae.levels + 1:
        names = f"z0..z{vae.levels}" if vae.levels else "z0"
        raise InputError(f"--keep-levels must be in 0..{vae.levels + 1} for this run's {vae.levels + 1} "
                         f"level{'s' if vae.levels else ''} ({names}), got {keep}; use e.g. --keep-levels 1")
    _, x_test = load_data(config, vae.device)
    if args.from_image >= x_test.shape[0]:
        raise InputError(f"--from-image {args.from_image} is outside the test set's 0..{x_test.shape[0] - 1}; use "
                         f"an index from 0 to {x_test.shape[0] - 1}")
    return x_test[args.from_image:args.from_image + 1], keep


def _sample(args):
    import pyro

    from . import plots
    from .rundir import RunLock
    from .train import is_image, load_run

    temperatures = _temperatures(args.temperature)
    if args.n is not None and args.n < 1:
        raise InputError(f"--n must be positive, got {args.n}; use e.g. --n 64")
    if args.from_image is None and args.keep_levels is not None:
        raise InputError("--keep-levels K goes with --from-image INDEX (the test image whose top K levels are "
                         "kept); pass both, e.g. --from-image 0 --keep-levels 1")
    if args.from_image is not None and args.from_image < 0:
        raise InputError(f"--from-image takes a test image's index >= 0, got {args.from_image}; use e.g. "
                         "--from-image 0")
    settings.check({"seed": args.seed}, cli=True)
    path = _sample_path(args, temperatures)
    plots.picture_format(path)  # a known picture format, before any work
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the directory {path.parent} does not exist; create it or choose "
                         "another --out")
    vae, config = load_run(args.run_dir, device=args.device)
    if not is_image(vae):
        raise InputError(f"{args.run_dir} was trained on {config.dataset} data of shape {vae.x_shape}, not images; "
                         "draw samples in Python with vae.sample(n) or pyro.infer.Predictive(vae.model, ...)")
    source = _source_image(args, vae, config) if args.from_image is not None else None
    _announce()
    pyro.set_rng_seed(args.seed)
    inside = path.parent.resolve() == Path(args.run_dir).resolve()
    with RunLock(args.run_dir) if inside else contextlib.nullcontext():  # a writer in the run directory
        if source is not None:
            plots.save_generated(vae, source[0], path, source[1], temperatures, n=args.n or 8, seed=args.seed)
        elif len(temperatures) > 1:
            plots.save_temperatures(vae, path, temperatures, n=args.n or 8, seed=args.seed)
        else:
            plots.save_samples(vae, path, n=args.n or 64, temperature=temperatures[0])
    print(f"wrote {path}")

def _explore_checks(args, levels, n_test):
    """Refuse bad ``explore`` input before any picture; returns the interpolation pair ``(I, J)`` or None."""
    from .explore import MODES

    if not args.traverse and args.interpolate is None:
        raise InputError("nothing to draw; pass --traverse LEVEL and/or --interpolate I,J")
    for level in [*(args.traverse or []), *([] if args.level is None else [args.level])]:
        if not 0 <= level <= levels:
            raise InputError(f"level {level} is outside 0..{levels} (the run's levels z0..z{levels}); use a level "
                             f"from 0 to {levels}")
    if args.mode not in (*MODES, "both"):
        raise InputError(f"unknown mode {args.mode!r}; choose one of: {', '.join(MODES)}, both")
    if args.steps < 2 or args.units < 1 or not 0 < args.span < math.inf:
        raise InputError("--steps must be >= 2, --units >= 1 and --span a positive number; use e.g. --steps 9 "
                         "--units 8 --span 3")
    pair = None
    if args.interpolate is not None:
        try:
            pair = tuple(int(i) for i in args.interpolate.split(","))
        except ValueError:
            pair = ()
        if len(pair) != 2:
            raise InputError(f"--interpolate takes two test-image indices I,J, got {args.interpolate!r}; use e.g. "
                             "--interpolate 0,1")
    for index in [*([args.image] if args.traverse else []), *(pair or ())]:
        if not 0 <= index < n_test:
            raise InputError(f"image {index} is outside the test set's 0..{n_test - 1}; use an index from 0 to "
                             f"{n_test - 1}")
    return pair


def _explore(args):
    from . import explore
    from .rundir import RunLock
    from .train import is_image, load_data, load_run

    out = Path(args.out) if args.out else Path(args.run_dir)
    if not out.is_dir():
        raise InputError(f"cannot write into {out}: it is not a directory; create it or choose another --out")
    vae, config = load_run(args.run_dir, device=args.device)
    if not is_image(vae):
        raise InputError(f"{args.run_dir} was trained on {config.dataset} data of shape {vae.x_shape}, not images; "
                         "use pyro_vae.explore.traverse and interpolate in Python")
    _, x_test = load_data(config, vae.device)
    pair = _explore_checks(args, vae.levels, x_test.shape[0])
    _announce()
    written = []
    with RunLock(args.run_dir) if out.resolve() == Path(args.run_dir).resolve() else contextlib.nullcontext():
        for level in dict.fromkeys(args.traverse or []):
            written.append(out / f"traversal_z{level}.png")
            explore.save_traversal(vae, x_test[args.image], written[-1], level, units=args.units, steps=args.steps,
                                   span=args.span, reference=x_test[:1000])
        if pair is not None:
            written.append(out / f"interpolation_{pair[0]}_{pair[1]}.png")
            explore.save_interpolation(vae, x_test[pair[0]], x_test[pair[1]], written[-1], mode=args.mode,
                                       steps=args.steps, level=args.level)
    print("wrote " + " ".join(map(str, written)))


def main(argv=None):
    """Entry point of ``pyro-vae``; returns the exit status.

    Under ``torchrun`` every process runs this; an error that every rank meets alike is printed once, by
    rank 0 (see :func:`pyro_vae.distributed.main_first`), one that a single rank meets by that rank.
    """
    args = _parser().parse_args(argv)
    try:
        if distributed.launched() and args.command in ("sample", "explore", "encode", "de"):
            raise InputError(f"pyro-vae {args.command} runs in one process; start it without torchrun")
        args.device = _chosen_device(args.device)
        {"train": _train, "evaluate": _evaluate, "sample": _sample, "explore": _explore,
         "encode": _encode, "de": _de}[args.command](args)
    except InputError as err:
        _say(f"error: {err}", err.rank_specific)
        return 2
    except TrainingDiverged as err:
        _say(f"training stopped: {err}")
        return 1
    except TrainingInterrupted as err:
        _say(f"interrupted by {err}; checkpoint written to {Path(args.out) / 'checkpoint.pt'}.\n"
             f"Continue with: {_command()} train --out {args.out} --resume")
        return 128 + err.signal
    except distributed.PeerLost as err:  # every surviving rank says so: which one saw what
        _say(f"error: {err}. Continue with: {_command()} train --out DIR --resume", True)
        return 1
    except OSError as err:  # the environment: a full disk, no permission, a path that is a file
        _say(f"error: {describe_os_error(err)}", True)
        return 1
    except KeyboardInterrupt:
        _say(f"interrupted; the last checkpoint written is kept. Continue with: {_command()} train --out DIR "
             "--resume")
        return 130
    finally:
        _NEWS.clear()
        distributed.shutdown()
    return 0


def _rank():
    return int(os.environ.get("RANK", "0")) if distributed.launched() else 0


def _say(message, this_rank_only=False):
    """Print ``pyro-vae: message`` to stderr: in one process always; under ``torchrun`` on rank 0, or on any
    rank (naming it) for what only that rank met."""
    rank = _rank()
    if rank == 0:
        print(f"pyro-vae: {message}", file=sys.stderr)
    elif this_rank_only:
        print(f"pyro-vae (rank {rank}): {message}", file=sys.stderr)


def _command():
    """How the user started this: ``pyro-vae``, or ``torchrun ... -m pyro_vae`` under torchrun."""
    if not distributed.launched():
        return "pyro-vae"
    return f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', 'N')} -m pyro_vae"


if __name__ == "__main__":
    sys.exit(main())
