"""The density-estimation table (issue 12): run the published protocol's rows and collect them.

Each row is one ``pyro-vae train`` run with a preset of the protocol (``vampprior-vae``: gated MLP 300-300,
40-d latent, Adam 5e-4, batch 100, 100 epochs of KL warm-up, the last 10 000 training images for validation,
early stopping with patience 50 on the validation ELBO, at most 2000 epochs; ``vampprior-hvae`` and
``vampprior-convhvae`` the same for two levels), then ``pyro-vae evaluate`` of its
best validation epoch at K=5000 on the 10 000 test images. ``ROWS`` names every row and its flags. Start rows
in the background, niced, one thread each (``--threads 2`` gives one row both cores of a 2-core machine), each
evaluated at K=5000 when early stopping ends it; the same command resumes them (bitwise) after a stop, with the
code each row started with (kept in ``NAME.code``, whatever the repository has become since)::

    python benchmarks/density.py start vae-standard vae-vamp        # runs in ~/runs/density/NAME, logs NAME.log

Every row trains with seed 0; ``ROW-seedN`` names the row ROW with seed N (``hvae-standard-seed1``), which the
summary averages with ROW's.

Collect what the runs hold so far (finished or not) into ``benchmarks/results/density.json``, each row's
per-epoch record beside it, and a picture of the validation ELBO per epoch::

    python benchmarks/density.py collect ~/runs/density/vae-standard ~/runs/density/vae-vamp

and write the README's table of every collected row, and above it a summary against the issue's targets (the
test suite fails while the README and the JSON disagree)::

    python benchmarks/density.py table --readme

Rows trained elsewhere (``benchmarks/density_gpu.sh`` trains several side by side on one GPU for a fixed
time) are collected with their machine named; rows already in ``density.json`` under other names stay::

    python benchmarks/density.py collect ~/runs/density-gpu/hvae-standard ... --machine "NVIDIA H100 80GB"

Each row's configuration is kept beside its record (``density/NAME.config.json``), so that anyone can rerun
its first epochs on the CPU and compare them with the committed record (bitwise on the machine, torch and
thread count that trained it; elsewhere floating-point sums differ in their last digits, and the difference
grows over an epoch's steps)::

    OMP_NUM_THREADS=1 python benchmarks/density.py check vae-standard --epochs 2
"""

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from pyro_vae import InputError, RunConfig
from pyro_vae.checkpoints import read_records, write_bytes_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
TEST_IMAGES = 10_000  # Fashion-MNIST's test set, which the published numbers average over
PUBLISHED = {  # Norouzi et al. 2020 (Exemplar VAE), Table 1, dynamic Fashion-MNIST, test NLL at K=5000: mean, sd
    ("vae", "standard"): (228.70, 0.15), ("vae", "vamp"): (227.35, 0.05),
    ("hvae", "standard"): (227.37, 0.10), ("hvae", "vamp"): (226.72, 0.08),
    ("convhvae", "standard"): (225.38, 0.08), ("convhvae", "vamp"): (224.67, 0.03),
}

NETWORKS = {"vae": "VAE, gated MLP", "hvae": "HVAE, gated MLP", "convhvae": "ConvHVAE"}  # a row's model, in words
TARGETS = {  # the targets for the same rows (test NLL at K=5000): the published means to a tenth of a nat
    ("vae", "standard"): 228.7, ("vae", "vamp"): 227.4, ("hvae", "standard"): 227.4, ("hvae", "vamp"): 226.7,
    ("convhvae", "standard"): 225.4, ("convhvae", "vamp"): 224.7,
}


# every row's pyro-vae train flags (benchmarks/density_gpu.sh trains some of them on a GPU, with these flags:
# a test holds its list to this one)
ROWS = {
    "vae-standard": "--preset vampprior-vae",
    "vae-vamp": "--preset vampprior-vae --prior vamp:500",
    "hvae-standard": "--preset vampprior-hvae",
    "hvae-vamp": "--preset vampprior-hvae --prior vamp:500",
    "hvae3-vamp": "--preset vampprior-hvae --prior vamp:500 --latent-dims 40,40,40",
    "hvae-iaf": "--preset vampprior-hvae --posterior iaf:2",
    "vae-flow-iaf": "--preset vampprior-vae --prior flow:2 --posterior iaf:2",  # (a VampPrior over IAF is refused)
    "hvae3-standard": "--preset vampprior-hvae --latent-dims 40,40,40",
    # the HVAE with every network as the paper's code builds it (its own encoder per posterior, gated transitions,
    # a 600-wide joint decoder layer, He's initialisation, clamped log-variances: pyro_vae.paper_hvae), trained with
    # the paper's optimizer (AdamNormGrad: each gradient scaled to unit norm, then Adam) and pseudo-inputs
    "hvae-paper-standard": "--preset vampprior-hvae --arch gated-hvae --optimizer adam-normgrad",
    "hvae-paper-vamp": "--preset vampprior-hvae --prior vamp-hardtanh:500 --arch gated-hvae --optimizer adam-normgrad",
    # beyond: the paper's HVAE and optimizer with a flow prior on the top level (its networks take no IAF posterior)
    "hvae-paper-flow": "--preset vampprior-hvae --prior flow:2 --arch gated-hvae --optimizer adam-normgrad",
    "convhvae-standard": "--preset vampprior-convhvae",
    "convhvae-vamp": "--preset vampprior-convhvae --prior vamp:500",
}
# the settings that make a run the row's: its model, and its seed
ROW_SETTINGS = ("arch", "hidden", "latent_dims", "guide", "skip", "prior", "posterior", "optimizer", "seed")
SEEDED = re.compile(r"(?P<row>.+)-seed(?P<seed>[1-9][0-9]*)")  # ROW-seedN: the row ROW trained with seed N


def row_flags(name, rows=None):
    """``(flags, seed)`` of the row ``name``: a row of ``rows`` (default ``ROWS``), trained with seed 0, or
    ``ROW-seedN``, the row ROW trained with seed N from 1 (another run of the same configuration, which the
    summary averages with ROW's)."""
    rows = ROWS if rows is None else rows
    if name in rows:
        return rows[name], 0
    seeded = SEEDED.fullmatch(name)
    if seeded and seeded["row"] in rows:
        return rows[seeded["row"]], int(seeded["seed"])
    raise InputError(f"no row {name!r}; rows: {', '.join(rows)} (or ROW-seedN: the row ROW with seed N from 1)")


def configuration(name):
    """The row a run of ``name`` repeats: ``ROW`` for ``ROW-seedN``, else ``name`` itself."""
    seeded = SEEDED.fullmatch(name)
    return seeded["row"] if seeded else name


class RowDone(InputError):
    """A row that has nothing left to run: its training has finished and its best epoch is evaluated."""


def start_command(name, runs, threads=1, iw_samples=5000, rows=None, device=None):
    """How the row ``name`` goes on in ``runs/NAME``: ``(command, what)``, a shell command (a string) and one of
    "started from epoch 0", "resumed" (or, for a run from before copies were kept, "resumed with today's code")
    and "evaluated only". The command runs, niced, with ``threads`` threads, ``pyro-vae train`` with the row's
    flags and seed (:func:`row_flags`: ``rows``, default ``ROWS``, and seed 0, or ``ROW-seedN``'s), or
    ``--resume`` where ``runs/NAME/checkpoint.pt`` exists (refused if that run's model or seed is not the row's:
    a run left from before a preset changed); then, once early stopping or the epoch limit has ended the
    training, ``pyro-vae evaluate`` of its best epoch at K=``iw_samples``. A training that fails or is stopped
    by a signal (status 128 + the signal, its checkpoint written) ends it there. A row that has finished its
    training is only evaluated, and one evaluated at that K already is refused (:class:`RowDone`).

    ``device``: where a new row trains (default ``auto``: a CUDA GPU where PyTorch sees one, else the CPU); a
    run that exists goes on where it ran, so that its resume is bitwise, unless ``device`` names another (refused
    when it ran on a GPU this machine lacks). Every step runs the code in ``runs/NAME.code`` where
    :func:`keep_code` left one (the library as it was when the row started: the command runs in that folder and
    puts it on ``PYTHONPATH``, ahead of the installed one), so that a resume is bitwise and the evaluation reads
    the model that trained, whatever the library has become since."""
    flags, seed = row_flags(name, rows)
    run = Path(runs).expanduser().resolve() / name
    code = run.with_name(f"{name}.code")
    # python -m puts the working directory first on sys.path (but under PYTHONSAFEPATH), then PYTHONPATH
    within = f"cd {shlex.quote(str(code))} && PYTHONPATH={shlex.quote(str(code))} " \
        if (code / "pyro_vae").is_dir() else ""
    cli = f"{within}OMP_NUM_THREADS={int(threads)} nice {shlex.quote(sys.executable)} -m pyro_vae.cli"
    if not (run / "checkpoint.pt").exists():
        on = f"--device {shlex.quote(device or 'auto')} "
        return (f"{cli} train --out {shlex.quote(str(run))} {flags} --seed {seed} {on}--checkpoint-every 500 "
                f"--no-progress && {_evaluate(cli, run, iw_samples, on)}", "started from epoch 0")
    if not (run / "config.json").exists():
        raise InputError(f"{run} holds a checkpoint.pt but no config.json, so it is no run of pyro-vae train; "
                         "move it away to start the row afresh")
    kept = json.loads((run / "config.json").read_text())
    _check_same_row(name, run, kept, f"{flags} --seed {seed}")
    on = _device_flag(name, kept, device)
    state = _progress(kept, read_records(run / "metrics.jsonl")) \
        if (run / "metrics.jsonl").exists() else {"finished": False}  # (stopped in its first epoch)
    if not state["finished"]:
        return (f"{cli} train --out {shlex.quote(str(run))} --resume {on}--checkpoint-every 500 --no-progress && "
                f"{_evaluate(cli, run, iw_samples, on)}",
                "resumed" if within else f"resumed with today's code (it has no {code.name})")
    evaluation = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    if (evaluation.get("iw_samples") == int(iw_samples) and evaluation.get("epoch") == state["best_epoch"]
            and "limit" not in evaluation):  # (an evaluation of the first N test images only is done again)
        raise RowDone(f"{name} has finished ({state['epochs']} epochs) and its best epoch is evaluated at "
                      f"K={iw_samples}; collect it with: python benchmarks/density.py collect {run}")
    return _evaluate(cli, run, iw_samples, on), "evaluated only"


def _evaluate(cli, run, iw_samples, on):
    return f"{cli} evaluate {shlex.quote(str(run))} --iw-samples {int(iw_samples)} {on}--no-progress"


def _device_flag(name, kept, device):
    """``--device DEVICE `` where ``device`` names one, else "" (the run goes on where it ran, as its settings
    ``kept`` say), refused where it ran on a GPU and PyTorch sees none here."""
    if device:
        return f"--device {shlex.quote(device)} "
    ran_on = kept.get("device", "auto")
    if ran_on.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"{name} ran on {ran_on}, and PyTorch sees no GPU here; pass --device cpu to go on "
                             "on the CPU (not bitwise: other kernels and random numbers)")
    return ""


def keep_code(code):
    """Copy the ``pyro_vae`` package this script imports to ``code/pyro_vae`` (``code`` is ``runs/NAME.code``), with
    ``code/SOURCE`` naming its git commit (and whether it had uncommitted changes): the code a row started with,
    which :func:`start_command` runs its resumes and its evaluation with."""
    import shutil

    import pyro_vae

    package = Path(pyro_vae.__file__).resolve().parent
    shutil.rmtree(code, ignore_errors=True)  # a copy left by a start that failed before its first checkpoint
    shutil.copytree(package, code / "pyro_vae", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    git = ["git", "-C", str(package.parent)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", str(package)], capture_output=True, text=True,
                               check=True).stdout.strip()
        source = f"{commit}{' with uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        source = "not a git checkout"
    write_text_atomic(code / "SOURCE", f"pyro_vae from {package}, {source}\n")


def _check_same_row(name, run, kept, flags):
    """Refuse the run in ``run`` where its model or seed (``ROW_SETTINGS`` of its settings ``kept``) is not the one
    the row's ``flags`` give."""
    from pyro_vae.cli import train_config

    wanted = train_config(["--out", str(run), *shlex.split(flags)]).to_dict()
    kept = RunConfig.from_dict(kept).to_dict()  # a run from before a setting existed gets its default
    for key in ROW_SETTINGS:
        if kept[key] != wanted[key]:
            raise InputError(f"the run in {run} has {key}={kept[key]!r}, but the row {name} now has {wanted[key]!r}; "
                             "move that run away to start the row afresh")


def start(names, runs, threads=1, iw_samples=5000, device=None):
    """Start (or resume) the rows ``names`` in the background, each in ``runs/NAME`` with its output appended to
    ``runs/NAME.log`` and its process group in ``runs/NAME.pid`` (``kill -- -PID`` stops the training, which writes
    its checkpoint, and what would follow it): what a new session runs to go on with its rows, on the machine
    that ran them or, from epoch 0, on another. A row started from epoch 0 keeps a copy of today's code in
    ``runs/NAME.code`` (:func:`keep_code`), which its resumes and its evaluation run. A row with nothing left to
    run is passed over; any other refusal stops them all, before any starts. Returns ``[(name, pid, what)]``,
    ``what`` as :func:`start_command` says (``pid`` None and ``what`` the reason for a row passed over)."""
    runs = Path(runs).expanduser()
    runs.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(names))  # a row named twice is started once
    for name in names:
        group = _running(runs / f"{name}.pid")
        if group:
            raise InputError(f"{name} is still running (process group {group}); stop it first with kill -- -{group}, "
                             "or let it be")
    planned = []
    for name in names:  # all checked first
        try:
            planned.append((name, *start_command(name, runs, threads, iw_samples, device=device)))
        except RowDone as done:
            planned.append((name, None, str(done)))
    started = []
    for name, command, what in planned:
        if command is None:
            started.append((name, None, what))
            continue
        if what == "started from epoch 0":
            keep_code(runs / f"{name}.code")
            command, _ = start_command(name, runs, threads, iw_samples, device=device)  # now with that copy
        with open(runs / f"{name}.log", "a") as log:
            process = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        write_text_atomic(runs / f"{name}.pid", f"{process.pid}\n")
        started.append((name, process.pid, what))
    return started


def _running(pid_file):
    """The process group in ``pid_file`` (written by :func:`start`) while any of its processes lives, else None."""
    try:
        group = int(pid_file.read_text())
        os.killpg(group, 0)
    except PermissionError:  # alive, but another user's
        return group
    except (OSError, ValueError):  # no file, no such group, or not a number
        return None
    return group


def _progress(config, records):
    """How far a run has come, from its settings (``config.json``, a dict) and its epochs' ``records``:
    ``{"epochs", "finished", "best_epoch", "vals"}`` (``finished``: early stopping or the epoch limit has ended it)."""
    vals = [r.get("val_elbo") for r in records if r.get("val_elbo") is not None]
    best = max(range(len(vals)), key=vals.__getitem__) + 1 if vals else None
    finished = bool(records) and (len(records) >= config["epochs"] or
                                  (best is not None and len(records) - best >= config["patience"] > 0))
    return {"epochs": len(records), "finished": finished, "best_epoch": best, "vals": vals}


def _row(run, machine):
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text())).to_dict()  # defaults filled in
    records = read_records(run / "metrics.jsonl")
    evaluation = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    levels = len(config["latent_dims"])
    model = _model(config)
    state = _progress(config, records)
    vals, best, stopped = state["vals"], state["best_epoch"], state["finished"]
    iw = evaluation.get("iw_log_likelihood")
    return {
        "name": run.name, "model": model, "prior": config["prior"], "levels": levels, "guide": config["guide"],
        "arch": config["arch"], "latent_dims": config["latent_dims"], "posterior": config["posterior"],
        "optimizer": config["optimizer"], "epochs": len(records), "max_epochs": config["epochs"], "finished": stopped,
        "best_epoch": best, "best_val_elbo": vals[best - 1] if best else None,
        "last_val_elbo": vals[-1] if vals else None,
        "iw_samples": evaluation.get("iw_samples"), "evaluated_epoch": evaluation.get("epoch"),
        "test_images": evaluation.get("n"),
        "test_nll": -iw if iw is not None else None, "test_elbo": evaluation.get("elbo"),
        **published(config), "seed": config["seed"],
        "seconds": round(sum(r.get("seconds", 0.0) for r in records), 1), "machine": machine,
        "median_epoch_seconds": median_epoch_seconds(records),
        **({} if stopped else extrapolate(vals, config["patience"], config["epochs"],
                                          config["kl_warmup_epochs"])),
        **({"code": source.read_text().strip()} if (source := run.with_name(f"{run.name}.code") / "SOURCE").exists()
           else {}),
    }


def median_epoch_seconds(records):
    """The median wall time of the epochs in ``records`` (a run's ``metrics.jsonl`` records), in seconds: what an
    epoch costs, where the summed ``seconds`` also count the hours a run waited, paused or shared its core."""
    import statistics

    seconds = [r["seconds"] for r in records if "seconds" in r]
    return round(statistics.median(seconds), 1) if seconds else None


def _model(config):
    levels = len(config["latent_dims"])
    return ("conv" if config["arch"] in ("conv", "gated-conv") else "") + ("vae" if levels == 1 else "hvae")


def published(config):
    """``{"published_nll", "published_sd"}``: the published test NLL (mean and sd over runs) of the table's row that
    ``config`` (a run's settings, a dict) reproduces: the paper's depth (one level for the VAE, two for the HVAEs),
    40-d Gaussian posteriors, the gated MLP of 300 units (or conv networks: the paper's gated ones or this
    library's plain ones, which the label tells apart), the skip connections of its HVAE,
    and N(0, I) or a VampPrior of 500 pseudo-inputs. Both None for a row beyond the table (another depth, latent
    size, posterior, prior or network)."""
    model, dims = _model(config), config["latent_dims"]
    prior = {"standard": "standard", "vamp:500": "vamp", "vamp-hardtanh:500": "vamp"}.get(config["prior"])
    paper = (dims == [40] * (1 if model == "vae" else 2) and config["posterior"] == "gaussian"
             and (config["arch"] == "conv"
                  or (config["arch"] in ("gated", "gated-conv", "gated-hvae") and config["hidden"] == 300))
             and (model == "vae" or config.get("skip", False)))
    mean, sd = PUBLISHED.get((model, prior), (None, None)) if paper else (None, None)
    return {"published_nll": mean, "published_sd": sd}


def extrapolate(vals, patience=50, max_epochs=2000, warmup=0):
    """Where an unfinished row's validation curve is heading: a power law v(t) = a - b t^-c fitted (least
    squares, c on a grid) to the epochs after the warm-up's and the first half's end, then the first epoch
    at which the fitted gain over the next ``patience`` epochs falls below the curve's own noise (the sd of
    the fit's residuals), plus ``patience``, which is about where early stopping ends the run (``patience``
    epochs after the best so far where the curve has levelled off already; at ``max_epochs`` where ``patience``
    is 0, no early stopping): ``{"extrapolated_stop_epoch",
    "extrapolated_val_elbo", "fit_noise"}`` (empty where the curve is too short to fit)."""
    import numpy as np

    start = max(warmup, len(vals) // 2)
    t = np.arange(start + 1, len(vals) + 1, dtype=float)
    v = np.asarray(vals[start:], dtype=float)
    if len(v) < 50:
        return {}
    best = None
    for c in np.linspace(0.05, 3.0, 60):
        design = np.stack([np.ones_like(t), -t ** -c], 1)
        coef, *_ = np.linalg.lstsq(design, v, rcond=None)
        residual = v - design @ coef
        if coef[1] > 0 and (best is None or (residual ** 2).sum() < best[0]):
            best = ((residual ** 2).sum(), c, coef, residual.std())
    if best is None:  # the curve is not rising: nothing to extrapolate
        return {}
    _, c, (a, b), noise = best
    if b * (t[0] ** -c - t[-1] ** -c) <= max(noise, 1e-6):  # the fitted rise is lost in the noise
        return {}

    def fitted(x):
        return a - b * x ** -c

    if not patience:  # no early stopping: the run goes on to its epoch limit
        return {"extrapolated_stop_epoch": int(max_epochs),
                "extrapolated_val_elbo": round(float(fitted(max_epochs)), 2), "fit_noise": round(float(noise), 3)}
    stop = next((x for x in range(len(vals), max_epochs + 1) if fitted(x + patience) - fitted(x) < noise),
                max_epochs)
    if stop == len(vals):  # levelled off already: early stopping ends it patience epochs after its best, kept
        best = max(range(len(vals)), key=vals.__getitem__)
        ends, value = best + 1 + patience, vals[best]
    else:
        ends, value = stop + patience, fitted(stop)
    return {"extrapolated_stop_epoch": int(min(ends, max_epochs)), "extrapolated_val_elbo": round(float(value), 2),
            "fit_noise": round(float(noise), 3)}


def collect(runs, machine=None, note=None):
    """Rows for ``runs`` (run directories), merged by name into ``density.json``: rows of other runs,
    collected earlier (on another machine, say), are kept. A row collected again keeps its earlier ``machine``
    and ``note`` unless new ones are given (``note=""`` drops it; a new run's machine defaults to this machine's
    kind), and its evaluation (``eval.json``) beside its record, or none. Returns the new rows."""
    path = RESULTS / "density.json"
    by_name = {row["name"]: row for row in (json.loads(path.read_text()) if path.exists() else [])}
    (RESULTS / "density").mkdir(parents=True, exist_ok=True)
    rows = []
    for run in map(Path, runs):
        missing = [name for name in ("config.json", "metrics.jsonl") if not (run / name).exists()]
        if missing:
            raise InputError(f"{run} is not a run directory of pyro-vae train: it has no {' and no '.join(missing)}")
        earlier = by_name.get(run.name, {})
        remark = earlier.get("note") if note is None else note
        rows.append({**_row(run, machine or earlier.get("machine") or f"{platform.machine()}, "
                              f"{os.cpu_count()}-core CPU"), **({"note": remark} if remark else {})})
        by_name[run.name] = rows[-1]
        write_bytes_atomic(RESULTS / "density" / f"{run.name}.metrics.jsonl", (run / "metrics.jsonl").read_bytes())
        kept = RESULTS / "density" / f"{run.name}.eval.json"
        if (run / "eval.json").exists():
            write_bytes_atomic(kept, (run / "eval.json").read_bytes())
        else:  # (one kept from before is no longer the row's)
            kept.unlink(missing_ok=True)
        _keep_config(run / "config.json", RESULTS / "density" / f"{run.name}.config.json")
    write_text_atomic(path, json.dumps(list(by_name.values()), indent=2) + "\n")
    _plot(sorted((RESULTS / "density").glob("*.metrics.jsonl")))
    return rows


def _keep_config(config, kept):
    """Copy a run's ``config.json`` to ``kept``, unless ``kept`` differs from it only in the device: a run
    resumed on another device keeps the device its record's first epochs ran on (which ``check`` names)."""
    def settings(path):  # with the defaults of fields written by a later version filled in
        return {**RunConfig.from_dict(json.loads(path.read_text())).to_dict(), "device": None}

    if kept.exists() and settings(kept) == settings(config):
        return
    write_bytes_atomic(kept, config.read_bytes())


KEYS = ("train_loss", "val_elbo", "test_elbo")


def stored_config(name, results=None):
    """The configuration (a dict) kept for the collected row ``name`` (``density/NAME.config.json``)."""
    path = (results or RESULTS) / "density" / f"{name}.config.json"
    if not path.exists():
        known = sorted(p.name.removesuffix(".config.json") for p in path.parent.glob("*.config.json"))
        raise InputError(f"no collected row {name!r} with a stored configuration; rows: {', '.join(known) or 'none'}")
    return json.loads(path.read_text())


def check(name, epochs=2, results=None, device="cpu"):
    """Rerun the first ``epochs`` epochs of the collected row ``name`` on ``device``, from its stored configuration
    (``density/NAME.config.json``: same seed, data and settings), and set them beside its committed record
    (``density/NAME.metrics.jsonl``). Returns ``[(epoch, key, recorded, rerun)]`` for each epoch and each of
    ``train_loss``, ``val_elbo``, ``test_elbo`` the record holds."""
    from pyro_vae.train import train

    stored = stored_config(name, results)
    records = read_records((results or RESULTS) / "density" / f"{name}.metrics.jsonl")
    if not 1 <= epochs <= len(records):
        raise InputError(f"--epochs must be between 1 and the {len(records)} epochs {name} recorded, got {epochs}")
    config = RunConfig.from_dict({**stored, "epochs": epochs, "device": device})
    with tempfile.TemporaryDirectory() as tmp:
        _, history = train(config, Path(tmp) / name, progress=False, pictures=False)
    return [(r["epoch"], key, r[key], h[key]) for r, h in zip(records, history) for key in KEYS if key in r]


def _label(row):
    """What a row is, in words: "VAE, gated MLP, N(0, I)", "beyond: HVAE, gated MLP, IAF posterior (2 steps), ..."."""
    network = NETWORKS.get(row["model"], row["model"])
    if row.get("arch") == "gated-hvae":
        network += ", the paper's networks"
    if row.get("optimizer", "adam") != "adam":
        network += ", AdamNormGrad" if row["optimizer"] == "adam-normgrad" else f", {row['optimizer']}"
    if row["model"] == "convhvae":  # rows collected before the paper's gated convolutions existed have "conv"
        network += ", gated conv" if row.get("arch") == "gated-conv" else ", this library's plain conv nets"
    prior = row["prior"]
    if prior == "standard":
        prior = "N(0, I)"
    elif prior.startswith("vamp:"):
        prior = f"VampPrior({prior.removeprefix('vamp:')})"
    elif prior.startswith("vamp-hardtanh:"):
        prior = f"VampPrior({prior.removeprefix('vamp-hardtanh:')}, the paper's pseudo-inputs)"
    elif prior.startswith("flow:"):
        prior = f"flow prior ({prior.removeprefix('flow:')} steps)"
    parts = [network]
    if row["levels"] > 2:
        parts.append(f"{row['levels']} levels {'-'.join(map(str, row['latent_dims']))}")
    if row["posterior"].startswith("iaf:"):
        parts.append(f"IAF posterior ({row['posterior'].split(':')[1]} steps)")
    elif row["posterior"] != "gaussian":
        parts.append(f"{row['posterior']} posterior")
    return ("" if row["published_nll"] else "beyond: ") + ", ".join(parts + [prior])


def _nats(value):
    return "—" if value is None else f"{value:.2f}".replace("-", "−")


def is_final(row):
    """Whether ``row``'s test NLL is its result: early stopping (or the epoch limit) has ended it, and its best
    epoch is evaluated on the whole test set (``TEST_IMAGES``); anything else is an interim number."""
    return bool(row["finished"] and row["test_nll"] is not None and row["evaluated_epoch"] == row["best_epoch"]
                and row.get("test_images") == TEST_IMAGES)


def table(rows):
    """The README's density table (a markdown string) for ``rows`` (``density.json``'s rows): per row the published
    test NLL, the epochs trained, the best validation ELBO and its epoch, the test NLL at K=5000 and test ELBO with
    the epoch evaluated (an unfinished row's evaluation is of an earlier epoch, or none), where an unfinished
    row's early stopping is expected (``extrapolate``), the seed, the epochs' summed wall time, the median
    epoch's and the machine."""
    lines = ["| row | published test NLL | epochs | best validation ELBO (epoch) | test NLL, K=5000 (epoch) | "
             "test ELBO | expected stop, epoch (validation ELBO) | seed | hours | s/epoch | machine |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        epochs = f"{row['epochs']}, stopped early" if row["finished"] and row["epochs"] < row["max_epochs"] else \
            f"{row['epochs']}" if row["finished"] else f"{row['epochs']} so far"
        nll = "not yet" if row["test_nll"] is None else f"{_nats(row['test_nll'])} ({row['evaluated_epoch']})"
        if is_final(row):
            nll = f"**{_nats(row['test_nll'])}** ({row['evaluated_epoch']})"
        stop = "—" if "extrapolated_stop_epoch" not in row else \
            f"{row['extrapolated_stop_epoch']} ({_nats(row['extrapolated_val_elbo'])})"
        mean, sd = row["published_nll"], row.get("published_sd")
        lines.append(f"| {_label(row)} | {_nats(mean)}{f' ± {sd:.2f}' if mean and sd else ''} | {epochs} | "
                     f"{_nats(row['best_val_elbo'])} ({row['best_epoch']}) | {nll} | {_nats(row['test_elbo'])} | "
                     f"{stop} | {row['seed']} | {row['seconds'] / 3600:.2f} | "
                     f"{row.get('median_epoch_seconds') or '—'} | {row['machine']} |")
    return "\n".join(lines) + "\n"


def summary(rows):
    """The README's summary (a markdown string) of ``rows`` (``density.json``'s rows) against the targets: for each
    published row (``PUBLISHED``), the best final test NLL (``is_final``) of the rows that reproduce it (a row run
    with several seeds, ``ROW`` and ``ROW-seedN``, counts as the mean of its final seeds: never the best seed),
    its row's name and whether it meets ``TARGETS`` (and which rows are not final yet); then, for each network
    class with rows beyond the table (``published_nll`` None), its best final one against the best published
    number of that class (the VAE's, HVAE's or ConvHVAE's, whatever the prior): "better" is the issue's "beyond"
    target."""
    priors = {"standard": "N(0, I)", "vamp": "VampPrior(500)"}
    lines = ["| model | published | ours (row) | target | |", "| --- | --- | --- | --- | --- |"]
    for (model, prior), (mean, sd) in PUBLISHED.items():
        mine = [row for row in rows if row["model"] == model and row["published_nll"] == mean]
        lines.append(f"| {NETWORKS[model]}, {priors[prior]} | {_nats(mean)} ± {sd:.2f} | "
                     f"{_against(mine, TARGETS[model, prior], f'≤ {TARGETS[model, prior]}')}")
    for model, name in NETWORKS.items():
        beyond = [row for row in rows if row["model"] == model and row["published_nll"] is None]
        if beyond:
            best = min(mean for (kind, _), (mean, _) in PUBLISHED.items() if kind == model)
            lines.append(f"| beyond: {name}, anything the table lacks | — | "
                         f"{_against(beyond, best, f'< {_nats(best)}', strict=True)}")
    return "\n".join(lines) + "\n"


def _against(rows, bound, target, strict=False):
    """The last cells of a ``summary`` line: the best final test NLL of ``rows`` (and its row; for a row with
    several final seeds, their mean, each seed's number beside it), ``target`` (the words for ``bound``), and
    whether it is met (``<= bound``, or ``< bound`` where ``strict``), with the rows that are not final yet
    named: still training, or stopped and not yet evaluated on the whole test set."""
    import statistics

    final = [row for row in rows if is_final(row)]
    pending = ", ".join(f"`{row['name']}` " + (f"at epoch {row['epochs']}" if not row["finished"]
                                               else "stopped, not evaluated on the whole test set yet")
                        for row in rows if not is_final(row))
    if not final:
        return f"not finished | {target} | {pending or 'not run'} |"
    seeds = {}
    for row in sorted(final, key=lambda row: row["seed"]):
        seeds.setdefault(configuration(row["name"]), []).append(row)
    means = {name: statistics.fmean(row["test_nll"] for row in runs) for name, runs in seeds.items()}
    name = min(means, key=means.get)
    nll, runs = means[name], seeds[name]
    ours = f"`{runs[0]['name']}`" if len(runs) == 1 else (
        f"`{name}`, the mean of seeds {', '.join(str(row['seed']) for row in runs[:-1])} and {runs[-1]['seed']}: "
        f"{', '.join(_nats(row['test_nll']) for row in runs)}")
    met = nll < bound if strict else nll <= bound
    margin = abs(nll - bound)
    verdict = ("met" if met else "missed") + (f", by {margin:.2f}" if margin >= 0.005 else ", by less than 0.01")
    return f"**{_nats(nll)}** ({ours}) | {target} | {verdict}{f'; not final yet: {pending}' if pending else ''} |"


README_MARKS = ("<!-- density table: benchmarks/density.py table --readme -->\n", "<!-- end of density table -->\n")
SUMMARY_MARKS = ("<!-- density summary: benchmarks/density.py table --readme -->\n",
                 "<!-- end of density summary -->\n")


def write_readme_table(readme, rows):
    """Replace the parts of ``readme`` (a path) between ``SUMMARY_MARKS`` and between ``README_MARKS`` with
    ``summary(rows)`` and ``table(rows)``."""
    text = readme.read_text()
    for marks, what, part in ((SUMMARY_MARKS, "summary", summary(rows)), (README_MARKS, "table", table(rows))):
        start, end = (text.find(mark) for mark in marks)
        if start < 0 or end < start:
            raise InputError(f"{readme} has no density {what} between the lines {marks[0].strip()} and "
                             f"{marks[1].strip()}")
        start += len(marks[0])
        text = text[:start] + part + text[end:]
    write_text_atomic(readme, text)


def _plot(records_files, warmup=100, early=150, path=None):
    """docs/img/density_val.png: each row's validation -ELBO per epoch, all epochs (left; a dot at the best
    epoch; its y axis the last nats, below 250) and the first ``early`` epochs (right, from the 10th on, on its own
    y axis), where the short GPU rows' curves are; the dashed line is
    the end of the KL warm-up (``warmup`` epochs). Written to ``path`` where given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, first) = plt.subplots(1, 2, figsize=(10, 4), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    lowest, styles, early_values = float("inf"), ["-", "--", ":"], []
    for i, records in enumerate(records_files):
        points = [(r["epoch"], -r["val_elbo"]) for r in read_records(records) if "val_elbo" in r]
        if not points:
            continue
        style = {"color": f"C{i % 10}", "linestyle": styles[i // 10 % 3], "linewidth": 1}
        best = min(points, key=lambda p: p[1])
        whole.plot(*zip(*points), label=records.name.removesuffix(".metrics.jsonl"), **style)
        whole.plot(*best, "o", color=style["color"], markersize=3)
        first.plot(*zip(*[p for p in points if p[0] <= early]), **style)
        lowest = min(lowest, best[1])
        early_values += [v for e, v in points if 10 <= e <= early]
    for ax, title in ((whole, "all epochs (dot: best epoch)"), (first, f"first {early} epochs")):
        ax.axvline(warmup, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    first.set_xlim(0, early)
    whole.set_ylabel("validation -ELBO (nats per image)")
    whole.set_ylim(top=250, **({"bottom": lowest - 1.0} if lowest < 249 else {}))  # the last nats, where rows differ
    if early_values:  # from the 10th epoch on: the short rows' whole curves
        first.set_ylim(min(early_values) - 1.0, max(early_values) + 1.0)
    whole.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path or Path(__file__).resolve().parents[1] / "docs" / "img" / "density_val.png")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="collect run directories into benchmarks/results/density.json")
    c.add_argument("runs", nargs="+")
    c.add_argument("--machine", help="where the runs trained, as the table should say (default: what the row said "
                   "when last collected; for a new row, this machine's kind and cores)")
    c.add_argument("--note", help="a remark stored in each of these rows (how they were run, why they stopped; "
                   "default: a row's earlier note; \"\" drops it)")
    k = sub.add_parser("check", help="rerun a collected row's first epochs and compare them with its record")
    k.add_argument("name", help="a row of density.json, e.g. vae-standard")
    k.add_argument("--epochs", type=int, default=2, help="how many of its first epochs to rerun (default 2)")
    k.add_argument("--device", default="cpu", help="where to rerun it (default cpu)")
    k.add_argument("--tolerance", type=float, default=0.05,
                   help="largest difference in nats per image taken as agreement (default 0.05)")
    s = sub.add_parser("start", help="start or resume rows in the background, each evaluated at K=5000 when it stops")
    s.add_argument("names", nargs="+", metavar="NAME", help=f"rows: {', '.join(ROWS)}; ROW-seedN is ROW with seed N "
                   "(default seed 0)")
    s.add_argument("--runs", default="~/runs/density", help="the folder of the runs (default ~/runs/density)")
    s.add_argument("--threads", type=int, default=1, help="threads per row (default 1: one row per core)")
    s.add_argument("--iw-samples", type=int, default=5000, help="K of the evaluation at the end (default 5000)")
    s.add_argument("--device", help="cpu, cuda or auto (a GPU where PyTorch sees one): where the rows train and are "
                   "evaluated (default: a new row auto, a row that ran where it ran, so that it resumes bitwise)")
    t = sub.add_parser("table", help="print the README's summary against the targets and its table of the "
                       "collected rows (markdown)")
    t.add_argument("--readme", action="store_true",
                   help="write them into README.md, each between its marks")
    args = p.parse_args(argv)
    if args.command == "collect":
        for row in collect(args.runs, args.machine, args.note):
            print(json.dumps(row))
        return 0
    if args.command == "start":
        for name, pid, what in start(args.names, args.runs, args.threads, args.iw_samples, args.device):
            print(what if pid is None else f"{name}: {what}, log "
                  f"{Path(args.runs).expanduser() / name}.log; stop it with kill -- -{pid}")
        return 0
    if args.command == "table":
        rows = json.loads((RESULTS / "density.json").read_text())
        write_readme_table(README, rows) if args.readme else print(summary(rows), table(rows), sep="\n", end="")
        return 0
    rows = check(args.name, args.epochs, device=args.device)
    trained_on = stored_config(args.name)["device"]
    if trained_on.split(":")[0] != args.device.split(":")[0]:
        print(f"{args.name} trained on {trained_on}, rerun on {args.device}: their random number generators differ, "
              "so the rerun draws other noise and can agree with the record only roughly")
    for epoch, key, recorded, rerun in rows:
        print(f"epoch {epoch:4d} {key:10s} recorded {recorded:10.4f}  rerun {rerun:10.4f}  "
              f"difference {rerun - recorded:+.2e}")
    worst = max(abs(rerun - recorded) for _, _, recorded, rerun in rows)
    same = all(rerun == recorded for *_, recorded, rerun in rows)
    print("identical to the record" if same else f"largest difference {worst:.2e} nats per image "
          f"({'within' if worst <= args.tolerance else 'over'} the tolerance {args.tolerance})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as error:  # one line, status 2 (1 is a check that found a difference)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
