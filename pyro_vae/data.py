"""Data: Fashion-MNIST / MNIST through torchvision, binarisation, on-device batches.

Images come back as float tensors in [0, 1] of shape ``(N, 1, 28, 28)``.
Fashion-MNIST is looked for, in order, in

1. a directory the user names (``data_dir``): the four IDX files, gzipped or
   not, directly in it or in torchvision's layout ``DIR/FashionMNIST/raw``;
2. Debian's ``dataset-fashion-mnist`` package, ``/usr/share/datasets/fashion-mnist``;
3. torchvision's downloader (needs a network), into the cache directory.

The files are read by torchvision's own dataset class
(:class:`torchvision.datasets.FashionMNIST`); gzipped files are unpacked
once into the cache (``$PYRO_VAE_CACHE`` or ``~/.cache/pyro_vae``).
"""

import hashlib
import os
from pathlib import Path

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
        sources.append(Path(data_dir))
    if name == "fashion-mnist":
        sources.append(Path(DEBIAN_FASHION_MNIST))
    for src in sources:
        try:
            root = _stage(src, cls.__name__) if src.is_dir() else None
        except Exception as err:  # e.g. gzip.BadGzipFile, EOFError, zlib.error for broken .gz files
            raise InputError(f"could not unpack {name} files in {src}: {_describe(err)}; "
                             f"{_FILES_HINT}") from err
        if root is None:
            missing = [f for f in IDX_FILES if not (src / f).is_file() and not (src / (f + ".gz")).is_file()]
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
    if download:
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


def binarize(x, generator=None):
    """Bernoulli(x) draws: ``(N, ...) in [0, 1] -> (N, ...)`` of 0./1., same device and dtype."""
    return torch.bernoulli(x, generator=generator)


class Batches:
    """Shuffled minibatches drawn from a tensor that already lives on the training device.

    Indexing, shuffling and (dynamic) binarisation all run on ``x.device``;
    there is no per-item Python work and no DataLoader.

    Args:
        x: data ``(N, *x_shape)``.
        batch_size: data points per batch (the last batch may be smaller).
        generator: ``torch.Generator`` on ``x.device`` driving shuffling and
            binarisation (seeded by the caller, saved in checkpoints).
        dynamic_binarize: draw Bernoulli(x) afresh every time a batch is made,
            i.e. a new binarisation every epoch.
        shuffle: permute the data every epoch.

    Iterating yields tensors ``(batch_size, *x_shape)``.
    """

    def __init__(self, x, batch_size, generator, dynamic_binarize=False, shuffle=True):
        if int(batch_size) <= 0:
            raise InputError(f"batch size must be positive, got {batch_size}; use a batch size of 1 or more "
                             f"(at most the {x.shape[0]} data points)")
        if int(batch_size) > x.shape[0]:
            raise InputError(f"batch size {batch_size} is larger than the data ({x.shape[0]} points); "
                             "choose a smaller batch size")
        self.x = x
        self.batch_size = int(batch_size)
        self.generator = generator
        self.dynamic_binarize = dynamic_binarize
        self.shuffle = shuffle

    def __len__(self):
        return -(-self.x.shape[0] // self.batch_size)

    def __iter__(self):
        n = self.x.shape[0]
        order = (torch.randperm(n, generator=self.generator, device=self.x.device) if self.shuffle
                 else torch.arange(n, device=self.x.device))
        for idx in order.split(self.batch_size):
            xb = self.x[idx]
            yield binarize(xb, self.generator) if self.dynamic_binarize else xb
