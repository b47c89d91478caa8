"""Data: Fashion-MNIST / MNIST through torchvision, count matrices from files,
binarisation, on-device batches.

Images come back as float tensors in [0, 1] of shape ``(N, 1, 28, 28)``.
Fashion-MNIST is looked for, in order, in

1. a directory the user names (``data_dir``): the four IDX files, gzipped or
   not, directly in it or in torchvision's layout ``DIR/FashionMNIST/raw``;
2. Debian's ``dataset-fashion-mnist`` package, ``/usr/share/datasets/fashion-mnist``;
3. torchvision's downloader (needs a network), into the cache directory.

The files are read by torchvision's own dataset class
(:class:`torchvision.datasets.FashionMNIST`); gzipped files are unpacked
once into the cache (``$PYRO_VAE_CACHE`` or ``~/.cache/pyro_vae``).

Count data (cells x genes, documents x words) come from ``.npz``, ``.csv``
or Matrix Market ``.mtx`` files (:func:`read_counts`, as a
``scipy.sparse`` matrix; :func:`load_counts`, as a dense tensor).
:class:`Batches` takes either, and densifies a sparse matrix one batch at a
time, so a matrix too large to hold densely still trains.
"""

import csv
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = ("fashion-mnist", "mnist")
_INSTALL_HINT = {
    "fashion-mnist": "install Debian's package (sudo apt-get install dataset-fashion-mnist), "
                     "or pass --data-dir DIR holding the four *-ubyte(.gz) files, or allow network access",
    "mnist": "pass --data-dir DIR holding the four MNIST *-ubyte(.gz) files, or allow network access",
}

_FILES_HINT = ("the directory must hold the four IDX files (*-ubyte, gzipped or not) of the data set: "
               "replace the broken files, or pass --data-dir DIR holding good ones")


def _idx_count(path):
    """The item count in an IDX file's header, or ``None`` if it has no IDX header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if len(head) < 8 or head[:2] != b"\0\0":
        return None
    return int.from_bytes(head[4:8], "big")


def _describe(err):
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def cache_dir():
    """Where unpacked and downloaded data go: ``$PYRO_VAE_CACHE`` or ``~/.cache/pyro_vae``."""
    return Path(os.environ.get("PYRO_VAE_CACHE", Path.home() / ".cache" / "pyro_vae"))


def _torchvision_class(name):
    from torchvision import datasets

    return {"fashion-mnist": datasets.FashionMNIST, "mnist": datasets.MNIST}[name]


def _stage(src, cls_name):
    """A torchvision root whose ``cls_name/raw`` holds the four unpacked IDX files
    found in ``src``, or ``None`` if ``src`` does not hold them all."""
    from torchvision.datasets.utils import extract_archive

    for folder in (src, src / cls_name / "raw"):
        if all((folder / f).is_file() for f in IDX_FILES):
            if folder == src / cls_name / "raw":
                return src
            files = [folder / f for f in IDX_FILES]
            break
        if all((folder / (f + ".gz")).is_file() for f in IDX_FILES):
            files = [folder / (f + ".gz") for f in IDX_FILES]
            break
    else:
        return None
    stamp = "".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files)
    root = cache_dir() / "staged" / hashlib.sha1(stamp.encode()).hexdigest()[:16]
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path, name in zip(files, IDX_FILES):
        target = raw / name
        if target.is_file():
            continue
        if path.suffix == ".gz":  # unpack beside the target, then rename: no half-written file is ever used
            tmp = raw / f".{name}.{os.getpid()}.part"
            tmp.mkdir(exist_ok=True)
            extract_archive(str(path), str(tmp), remove_finished=False)
            os.replace(tmp / name, target)
            tmp.rmdir()
        else:
            os.symlink(path.resolve(), target)
    return root


def _read(cls, root, train):
    ds = cls(str(root), train=train, download=False)
    return ds.data, ds.targets


def load_images(name="fashion-mnist", data_dir=None, download=True):
    """Load a 28x28 grey-image data set as floats in [0, 1].

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        data_dir: directory to look in first (see the module docstring).
        download: try torchvision's downloader when no local copy is found.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 28, 28)``
        float32 in [0, 1] and labels ``(N,)`` int64, on the CPU.

    Raises:
        InputError: if no source works; the message lists every source tried.
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    cls = _torchvision_class(name)
    tried = []
    sources = []
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            problem = "is not a directory" if Path(data_dir).exists() else "does not exist"
            raise InputError(f"data directory {data_dir} {problem}; pass a directory holding the four "
                             "*-ubyte(.gz) files, or leave out data_dir (--data-dir) to use the installed "
                             "or downloaded data")
        sources.append(Path(data_dir))  # a source the user named is the only source
    elif name == "fashion-mnist":
        sources.append(Path(DEBIAN_FASHION_MNIST))
    for src in sources:
        try:
            root = _stage(src, cls.__name__) if src.is_dir() else None
        except Exception as err:  # e.g. gzip.BadGzipFile, EOFError, zlib.error for broken .gz files
            raise InputError(f"could not unpack {name} files in {src}: {_describe(err)}; "
                             f"{_FILES_HINT}") from err
        if root is None:
            missing = [f for f in IDX_FILES if not (src / f).is_file() and not (src / (f + ".gz")).is_file()]
            if data_dir is not None:
                raise InputError(f"{src}: no {', '.join(missing or IDX_FILES)} (.gz or unpacked), and a data "
                                 "directory you name is the only place looked in; pass --data-dir DIR holding "
                                 "the four *-ubyte(.gz) files, or leave out --data-dir (data_dir) to use the "
                                 "installed or downloaded data")
            tried.append(f"{src}: no {', '.join(missing if 0 < len(missing) < 4 else IDX_FILES)} (.gz or unpacked)")
            continue
        try:
            x_tr, y_tr = _read(cls, root, True)
            x_te, y_te = _read(cls, root, False)
        except Exception as err:  # torchvision raises assorted types for bad files
            raw = root / cls.__name__ / "raw"
            empty = [f for f in (IDX_FILES[0], IDX_FILES[2]) if _idx_count(raw / f) == 0]
            if empty:
                raise InputError(f"the {name} files in {src} hold no images ({', '.join(empty)}: 0 images); "
                                 f"an empty data set cannot be trained on; {_FILES_HINT}") from err
            raise InputError(f"could not read {name} files in {src}: {_describe(err)}; "
                             f"{_FILES_HINT}") from err
        return _to_float(x_tr), y_tr, _to_float(x_te), y_te
    if download and data_dir is None:
        root = cache_dir() / "download"
        try:
            ds_tr = cls(str(root), train=True, download=True)
            ds_te = cls(str(root), train=False, download=True)
            return _to_float(ds_tr.data), ds_tr.targets, _to_float(ds_te.data), ds_te.targets
        except Exception as err:
            tried.append(f"torchvision download into {root}: {type(err).__name__}: {err}")
    else:
        tried.append("torchvision download: not allowed (download=False)")
    raise InputError(f"could not find the {name} data set. Tried:\n  - " + "\n  - ".join(tried)
                     + f"\nTo fix: {_INSTALL_HINT[name]}.")


def _to_float(images):
    return images.unsqueeze(1).float().div_(255.0)


# ------------------------------------------------------------------ count matrices
COUNT_FORMATS = (".npz", ".csv", ".csv.gz", ".mtx", ".mtx.gz")


def _csv_matrix(path):
    """A CSV of numbers; a header row and a first column of names are skipped if present."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise InputError(f"{path} holds no rows; a count matrix needs one row per cell or document")

    def numbers(row):
        try:
            return [float(v) for v in row]
        except ValueError:
            return None

    if numbers(rows[0]) is None and len(rows) > 1 and numbers(rows[0][1:]) is None:
        rows = rows[1:]  # a header of names
    if rows and numbers(rows[0]) is None and numbers(rows[0][1:]) is not None:
        rows = [row[1:] for row in rows]  # a first column of row names
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise InputError(f"{path}: rows have different numbers of columns ({sorted(widths)[:5]}); "
                         "every row must hold one count per gene or word")
    values = []
    for i, row in enumerate(rows):
        parsed = numbers(row)
        if parsed is None:
            bad = next(v for v in row if numbers([v]) is None)
            raise InputError(f"{path}: row {i + 1} holds {bad!r}, which is not a number; a count matrix "
                             "holds numbers, with at most one header row and one column of names")
        values.append(parsed)
    return np.asarray(values, dtype=np.float64)


def _npz_matrix(path):
    import scipy.sparse

    with np.load(path, allow_pickle=False) as f:
        keys = list(f.keys())
        if {"format", "shape", "data"} <= set(keys):  # written by scipy.sparse.save_npz
            return scipy.sparse.load_npz(path)
        for key in ("counts", "X", "x", "arr_0"):
            if key in keys:
                return f[key]
        if len(keys) == 1:
            return f[keys[0]]
    raise InputError(f"{path} holds arrays {keys}; name the count matrix 'counts' (np.savez(path, counts=m)) "
                     "or save it with scipy.sparse.save_npz")


def read_counts(path, transpose=False):
    """Read a count matrix: rows are observations (cells, documents), columns features (genes, words).

    Formats: ``.npz`` (``scipy.sparse.save_npz``, or ``numpy.savez`` with an
    array named ``counts``), ``.csv`` (optionally gzipped; a header row and
    a first column of names are skipped), Matrix Market ``.mtx`` (optionally
    gzipped; 10x Genomics writes genes x cells, so pass ``transpose=True``).

    Args:
        path: the file.
        transpose: read the file's columns as observations.

    Returns:
        ``scipy.sparse.csr_matrix`` of shape ``(N, G)``, float32.

    Raises:
        InputError: for a missing file, an unknown format, or values that
            are not counts (negative, non-integer, NaN/inf), naming the file,
            the position and the value.
    """
    import scipy.io
    import scipy.sparse

    path = Path(path)
    if not path.is_file():
        raise InputError(f"count file {path} does not exist; pass a {', '.join(COUNT_FORMATS)} file")
    name = path.name.lower()
    try:
        if name.endswith((".csv", ".csv.gz")):
            m = _csv_matrix(path)
        elif name.endswith(".npz"):
            m = _npz_matrix(path)
        elif name.endswith((".mtx", ".mtx.gz")):
            m = scipy.io.mmread(str(path))
        else:
            raise InputError(f"unknown count-file format {path.name!r}; use one of {', '.join(COUNT_FORMATS)}")
    except InputError:
        raise
    except Exception as err:  # zipfile, gzip, scipy.io and numpy raise assorted types for broken files
        raise InputError(f"could not read the count file {path}: {_describe(err)}; pass an intact .npz, "
                         ".csv(.gz) or .mtx(.gz) count matrix") from err
    if not scipy.sparse.issparse(m) and np.ndim(m) != 2:
        raise InputError(f"{path} holds an array of shape {np.shape(m)}; a count matrix has 2 dims "
                         "(observations x features)")
    m = scipy.sparse.csr_matrix(m, dtype=np.float64)
    if 0 in m.shape:
        raise InputError(f"{path} holds a matrix of shape {m.shape}; a count matrix needs at least one row "
                         "and one column")
    if transpose:
        m = m.T.tocsr()
    _check_counts(m, path)
    return m.astype(np.float32)


def _check_counts(m, path):
    data = m.data
    problems = [("not finite", ~np.isfinite(data)), ("negative", data < 0),
                ("not an integer", np.isfinite(data) & (data != np.round(data)))]
    for what, bad in problems:
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(m.indptr, k, side="right") - 1)
            raise InputError(f"{path} is not a count matrix: the value at row {row}, column {m.indices[k]} is "
                             f"{float(data[k])!r} ({what}; {int(bad.sum())} such values); counts are integers >= 0")


def load_counts(path, transpose=False, max_dense=2 ** 28):
    """:func:`read_counts` as a dense float32 tensor ``(N, G)`` on the CPU.

    Args:
        max_dense: the most entries N * G to densify (default 2^28, 1 GiB);
            larger matrices raise, pointing to :func:`read_counts` and
            :class:`Batches`, which densify one batch at a time.
    """
    m = read_counts(path, transpose)
    if m.shape[0] * m.shape[1] > max_dense:
        raise InputError(f"{path} is {m.shape[0]} x {m.shape[1]}, more than {max_dense} entries to hold densely; "
                         "use data.read_counts(path) and data.Batches(matrix, batch_size, generator), which "
                         "densify one batch at a time")
    return torch.from_numpy(m.toarray())


def binarize(x, generator=None):
    """Bernoulli(x) draws: ``(N, ...) in [0, 1] -> (N, ...)`` of 0./1., same device and dtype."""
    return torch.bernoulli(x, generator=generator)


class Batches:
    """Shuffled minibatches drawn from a tensor that already lives on the training device,
    or from a ``scipy.sparse`` matrix (e.g. from :func:`read_counts`).

    For a tensor, indexing, shuffling and (dynamic) binarisation all run on
    ``x.device``; there is no per-item Python work and no DataLoader. A
    sparse matrix stays on the CPU: each batch's rows are densified there
    (float32) and moved to ``generator.device``.

    Args:
        x: data ``(N, *x_shape)``, or a ``scipy.sparse`` matrix ``(N, G)``.
        batch_size: data points per batch (the last batch may be smaller).
        generator: ``torch.Generator`` on the training device driving
            shuffling and binarisation (seeded by the caller, saved in checkpoints).
        dynamic_binarize: draw Bernoulli(x) afresh every time a batch is made,
            i.e. a new binarisation every epoch.
        shuffle: permute the data every epoch.

    Iterating yields tensors ``(batch_size, *x_shape)``. As the batch source
    of :class:`~pyro_vae.loop.Loop` it also has :meth:`epoch` (resume inside
    an epoch) and ``state_dict``/``load_state_dict`` (the generator's state at
    the start of the current epoch, or of the next one between epochs).
    """

    def __init__(self, x, batch_size, generator, dynamic_binarize=False, shuffle=True):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool):
            raise InputError(f"batch size must be a whole number, got {batch_size!r}; use e.g. a batch size of 64")
        if int(batch_size) <= 0:
            raise InputError(f"batch size must be positive, got {batch_size}; use a batch size of 1 or more "
                             f"(at most the {x.shape[0]} data points)")
        if int(batch_size) > x.shape[0]:
            raise InputError(f"batch size {batch_size} is larger than the data ({x.shape[0]} points); "
                             "choose a smaller batch size")
        self.sparse = not torch.is_tensor(x) and hasattr(x, "tocsr")
        self.x = x.tocsr() if self.sparse else x
        self.device = generator.device if self.sparse else x.device
        self.batch_size = int(batch_size)
        self.generator = generator
        self.dynamic_binarize = dynamic_binarize
        self.shuffle = shuffle
        self._epoch_start = None

    def __len__(self):
        return -(-self.x.shape[0] // self.batch_size)

    def epoch(self, skip=0):
        """An iterator over one epoch's batches after the first ``skip`` (redrawn, so the order and the
        binarisation are those of an epoch never interrupted)."""
        batches = iter(self)
        for _ in range(skip):
            next(batches)
        return batches

    def state_dict(self):
        """``{"epoch_start": generator state, "device": its device type}``: where the current (or, between
        epochs, the next) epoch began."""
        start = self._epoch_start if self._epoch_start is not None else self.generator.get_state()
        return {"epoch_start": start, "device": self.generator.device.type}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`: the next :meth:`epoch` draws the order saved there.

        A state saved by a generator of another device type (a CUDA run resumed on the CPU, or the
        reverse) cannot be replayed: CPU and CUDA generators are different algorithms. The generator is
        then seeded from the saved state's bytes (deterministic, so two such resumes agree) and a warning
        says that the batch order from here on differs from the uninterrupted run's.
        """
        saved = state["epoch_start"]
        here = self.generator.get_state()
        if saved.numel() == here.numel() and state.get("device", self.generator.device.type) == \
                self.generator.device.type:
            self.generator.set_state(saved)
        else:
            import warnings

            warnings.warn(f"the batch order was saved by a {state.get('device', 'different')} generator and "
                          f"cannot be replayed on {self.generator.device.type}; training goes on with a new "
                          "order seeded from the saved one (no longer bitwise the uninterrupted run)",
                          stacklevel=2)
            self.generator.manual_seed(int.from_bytes(bytes(saved.flatten()[:8].tolist()), "little") & (2 ** 63 - 1))
        self._epoch_start = None

    def __iter__(self):
        self._epoch_start = self.generator.get_state()
        n = self.x.shape[0]
        order = (torch.randperm(n, generator=self.generator, device=self.device) if self.shuffle
                 else torch.arange(n, device=self.device))
        for idx in order.split(self.batch_size):
            if self.sparse:
                rows = self.x[idx.cpu().numpy()].toarray()
                xb = torch.from_numpy(rows).to(self.device, torch.float32)
            else:
                xb = self.x[idx]
            yield binarize(xb, self.generator) if self.dynamic_binarize else xb
        self._epoch_start = None
