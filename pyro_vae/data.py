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

Any other images: a folder of image files (:func:`load_folder`, read with
:class:`torchvision.datasets.ImageFolder` when it has one sub-folder per
class), a ``.npy``/``.pt`` file holding an image tensor
(:func:`load_image_tensor`) and CIFAR-10 (:func:`load_cifar10`, torchvision's
``cifar-10-batches-py`` read by this module). All of them, and the IDX data
sets too, can be made grey or colour and resized to a square size
(:func:`fit_images`); they come back as ``(N, C, H, W)`` float32 in [0, 1].

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
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = ("fashion-mnist", "mnist", "cifar-10")  # load_images' names; "folder" and "tensor" are LOCAL_IMAGES
LOCAL_IMAGES = ("folder", "tensor")
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


def load_images(name="fashion-mnist", data_dir=None, download=True, image_size=0, channels=0):
    """Load an image data set with its own train and test split as floats in [0, 1].

    Args:
        name: ``"fashion-mnist"``, ``"mnist"`` (28x28 grey) or ``"cifar-10"``
            (32x32 colour, :func:`load_cifar10`).
        data_dir: directory to look in first (see the module docstring).
        download: try torchvision's downloader when no local copy is found.
        image_size, channels: as :func:`fit_images` (0: as the data set is).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images ``(N, C, H, W)``
        (``(N, 1, 28, 28)`` for the IDX data sets as they are) float32 in
        [0, 1] and labels ``(N,)`` int64, on the CPU.

    Raises:
        InputError: if no source works; the message lists every source tried.
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    _check_fit(image_size, channels)
    if name == "cifar-10":
        return load_cifar10(data_dir, download, image_size, channels)
    x_tr, y_tr, x_te, y_te = _load_idx(name, data_dir, download)
    return fit_images(x_tr.unsqueeze(1), image_size, channels), y_tr, fit_images(x_te.unsqueeze(1), image_size,
                                                                                 channels), y_te


def _load_idx(name, data_dir, download):
    """Fashion-MNIST or MNIST as uint8 ``(N, 28, 28)`` images and labels, from the first source that works."""
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
        return x_tr, y_tr, x_te, y_te
    if download and data_dir is None:
        root = cache_dir() / "download"
        try:
            ds_tr = cls(str(root), train=True, download=True)
            ds_te = cls(str(root), train=False, download=True)
            return ds_tr.data, ds_tr.targets, ds_te.data, ds_te.targets
        except Exception as err:
            tried.append(f"torchvision download into {root}: {type(err).__name__}: {err}")
    else:
        tried.append("torchvision download: not allowed (download=False)")
    raise InputError(f"could not find the {name} data set. Tried:\n  - " + "\n  - ".join(tried)
                     + f"\nTo fix: {_INSTALL_HINT[name]}.")


# ------------------------------------------------------------------ any images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
TENSOR_FORMATS = (".npy", ".pt", ".pth")
CHANNELS = (0, 1, 3)  # 0: as the images are
_GREY_MODES = ("1", "L", "LA", "La")  # PIL modes read as one channel
_LAYOUTS = "(N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 or 3"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def _check_fit(image_size, channels):
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 0:
        raise InputError(f"image_size must be a whole number >= 1 (or 0: the images' own size), got {image_size!r}; "
                         "use e.g. image_size=32")
    if isinstance(channels, bool) or channels not in CHANNELS:
        raise InputError(f"channels must be 1 (grey) or 3 (colour), or 0 (as the images are), got {channels!r}; "
                         "use e.g. channels=3")


def _luma(x):
    """ITU-R 601-2 luma (as PIL's ``convert("L")``) of ``(N, 3, H, W)``: uint8 rounded to uint8, floats as floats."""
    w = torch.tensor([299, 587, 114]).view(1, 3, 1, 1)
    if x.dtype == torch.uint8:
        return (x.to(torch.int32) * w).sum(1, keepdim=True).add_(500).div_(1000, rounding_mode="floor").to(torch.uint8)
    return (x * (w / 1000).to(x.dtype)).sum(1, keepdim=True).clamp_(0, 1)


def fit_images(x, image_size=0, channels=0):
    """Images ``(N, C, H, W)``, uint8 0..255 or floats in [0, 1], as float32 in [0, 1].

    Args:
        image_size: resize so that the shorter side is ``image_size`` (bilinear, antialiased) and crop the
            centre ``image_size x image_size`` (torchvision's ``Resize(n)`` then ``CenterCrop(n)``); 0: keep the
            size. uint8 images are resized as uint8, so they stay on the grid i/255.
        channels: 1: grey (colour by ITU-R 601-2 luma, PIL's ``convert("L")``); 3: colour (grey repeated);
            0: as they are.
    """
    _check_fit(image_size, channels)
    if channels == 1 and x.shape[1] == 3:
        x = _luma(x)
    elif channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
        from torchvision.transforms.v2 import functional as F

        x = F.center_crop(F.resize(x.contiguous(), [image_size], antialias=True), [image_size, image_size])
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32).clamp(0, 1)


def _image_files(root):
    """``(files, labels)``: the image files of a flat folder (label 0) or of one sub-folder per class
    (:class:`torchvision.datasets.ImageFolder`'s files and class indices)."""
    root = Path(root)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise InputError(f"image folder {root} {problem}; pass --data-dir DIR (data_dir) holding the images, "
                         "or one sub-folder of images per class")
    entries = sorted(root.iterdir())
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    subdirs = [p for p in entries if p.is_dir()]
    if loose and subdirs:
        raise InputError(f"image folder {root} holds both images ({loose[0].name}, ...) and sub-folders "
                         f"({subdirs[0].name}, ...); put all images directly in it, or each in its class's sub-folder")
    if loose:
        return loose, [0] * len(loose)
    empty = [d.name for d in subdirs if not any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                                                for p in d.rglob("*"))]
    if not subdirs or len(empty) == len(subdirs):
        others = [p.name for p in root.rglob("*") if p.is_file()]
        also = f" (only {len(others)} other files, e.g. {others[0]})" if others else ""
        raise InputError(f"image folder {root} holds no images{also}; put {', '.join(IMAGE_EXTENSIONS)} files in "
                         "it, or in one sub-folder per class")
    if empty:
        raise InputError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:3])} in {root} hold"
                         f"{'' if len(empty) > 1 else 's'} no images; put images in "
                         f"{'them' if len(empty) > 1 else 'it'} or remove {'them' if len(empty) > 1 else 'it'}")
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(root)).samples
    return [Path(f) for f, _ in samples], [label for _, label in samples]


def _unreadable(path, err):
    return InputError(f"could not read the image {path}: {_describe(err)}; remove or replace it")


def load_folder(path, image_size=0, channels=0):
    """Every image in a folder, as ``(x, y)``: ``(N, C, H, W)`` float32 in [0, 1] and labels ``(N,)`` int64.

    The folder holds the images directly (labels 0), or one sub-folder per class, as
    :class:`torchvision.datasets.ImageFolder` reads it (labels: the classes' indices in name order; images in
    deeper folders count too). Files are taken by extension (:data:`IMAGE_EXTENSIONS`); others are skipped.
    Images are read by PIL at 8 bits per value; an alpha channel is dropped.

    Args:
        path: the folder.
        image_size: resize each image so that its shorter side is this, then crop the centre square
            (0: keep the sizes, which must then all be the same).
        channels: 1 (grey), 3 (colour), or 0: grey if every image is stored grey (PIL modes 1, L, LA),
            else colour.

    Raises:
        InputError: a missing or empty folder, a file that is not a readable image, 16-bit or float pixels,
            images of different sizes without ``image_size``, fewer than 2 images.
    """
    _check_fit(image_size, channels)
    from PIL import Image
    from torchvision.transforms import functional as F

    files, labels = _image_files(path)
    if len(files) < 2:
        raise InputError(f"image folder {path} holds 1 image ({files[0].name}); training and a test set need 2 or "
                         "more")
    sizes, grey = [], True
    for f in files:  # headers only: modes and sizes
        try:
            with Image.open(f) as im:
                mode, size = im.mode, im.size
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
            raise _unreadable(f, err) from err
        if mode in ("I", "F") or mode.startswith("I;"):
            raise InputError(f"{f} has {mode} pixels (16-bit or float); images are read at 8 bits: convert it to "
                             "8 bits, e.g. Image.open(path).convert('L').save(path)")
        grey = grey and mode in _GREY_MODES
        sizes.append(size)
    c = channels or (1 if grey else 3)
    if not image_size and len(set(sizes)) > 1:
        j = next(i for i, s in enumerate(sizes) if s != sizes[0])
        raise InputError(f"the images in {path} have different sizes ({files[0].name} is {sizes[0][0]}x{sizes[0][1]}, "
                         f"{files[j].name} {sizes[j][0]}x{sizes[j][1]}); pass --image-size N (image_size=N) to "
                         "resize and crop them all to N x N")
    h, w = (image_size, image_size) if image_size else (sizes[0][1], sizes[0][0])
    x = torch.empty((len(files), c, h, w), dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
        except Exception as err:
            raise _unreadable(f, err) from err
        if image_size:
            im = F.center_crop(F.resize(im, image_size, antialias=True), [image_size, image_size])
        x[i] = F.pil_to_tensor(im)
    return x.to(torch.float32).div_(255.0), torch.tensor(labels, dtype=torch.int64)


def _tensor_in(obj, path):
    if isinstance(obj, dict):
        for key in ("images", "x", "data"):
            if torch.is_tensor(obj.get(key)):
                return obj[key]
        tensors = [v for v in obj.values() if torch.is_tensor(v)]
        if len(tensors) == 1:
            return tensors[0]
    if torch.is_tensor(obj):
        return obj
    raise InputError(f"{path} holds a {type(obj).__name__}, not an image tensor; torch.save one tensor {_LAYOUTS} "
                     "(or a dict holding it under 'images')")


def read_image_tensor(path):
    """The images in a ``.npy`` (``numpy.save``) or ``.pt`` (``torch.save``, read with ``weights_only=True``)
    file as ``(N, C, H, W)``: uint8 as saved, bool as 0/255, floats checked to lie in [0, 1].

    Accepted: ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` with ``C`` 1 or 3, of uint8 (0..255), bool or
    float (values in [0, 1]); a ``.pt`` file may hold a dict with the tensor under ``"images"``. Other integer
    dtypes are refused (0/1 masks and 0..255 pixels would be ambiguous).
    """
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise InputError(f"image tensor file {path} {problem}; pass --data-file (data_file) a .npy (numpy.save) or "
                         f".pt (torch.save) file of images {_LAYOUTS}")
    suffix = path.suffix.lower()
    if suffix not in TENSOR_FORMATS:
        raise InputError(f"unknown image-tensor format {path.name!r}; save the images with numpy.save (.npy) or "
                         "torch.save (.pt)")
    try:
        if suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        else:
            a = _tensor_in(torch.load(path, map_location="cpu", weights_only=True), path)
    except InputError:
        raise
    except Exception as err:  # numpy and torch raise assorted types for broken or foreign files
        writer = "numpy.save" if suffix == ".npy" else "torch.save"
        raise InputError(f"could not read {path} as a {suffix} file: {_describe(err).splitlines()[0]}; pass a file "
                         f"written by {writer} holding one image tensor {_LAYOUTS}") from err
    dtype = a.dtype
    if isinstance(a, np.ndarray):
        if a.dtype == np.uint8 or a.dtype == np.bool_ or a.dtype.kind == "f":
            a = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a))
        else:
            a = None
    elif not (a.dtype in (torch.uint8, torch.bool) or a.dtype.is_floating_point):
        a = None
    if a is None:
        raise InputError(f"{path} holds {dtype} values; save images as uint8 (0..255) or as floats in [0, 1] "
                         "(e.g. x.astype(np.uint8) for 8-bit pixels)")
    shape = tuple(a.shape)
    if a.dim() == 3:
        a = a.unsqueeze(1)
    elif a.dim() == 4 and a.shape[1] not in (1, 3) and a.shape[3] in (1, 3):
        a = a.permute(0, 3, 1, 2)
    if a.dim() != 4 or a.shape[1] not in (1, 3) or 0 in a.shape:
        raise InputError(f"{path} holds an array of shape {shape}, not images; save {_LAYOUTS}")
    if a.shape[0] < 2:
        raise InputError(f"{path} holds {a.shape[0]} image; training and a test set need 2 or more")
    if a.dtype == torch.bool:
        return a.to(torch.uint8).mul_(255)
    if a.dtype.is_floating_point:
        a = a.to(torch.float32)
        bad = ~torch.isfinite(a)
        if bool(bad.any()):
            raise InputError(f"{path} holds {int(bad.sum())} NaN or infinite values; images must be finite, in [0, 1]")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            raise InputError(f"{path} holds float values in [{lo:.4g}, {hi:.4g}], outside [0, 1]; divide 8-bit pixels "
                             "by 255 (or save them as uint8)")
    return a.contiguous()


def load_image_tensor(path, image_size=0, channels=0):
    """:func:`read_image_tensor` through :func:`fit_images`: ``(N, C, H, W)`` float32 in [0, 1]."""
    _check_fit(image_size, channels)
    return fit_images(read_image_tensor(path), image_size, channels)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch (a dict of numpy arrays, lists, strings) and nothing that runs other code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved numpy.core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _cifar_batch(path):
    """One batch of torchvision's ``cifar-10-batches-py``: uint8 ``(n, 3, 32, 32)`` and int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()  # torchvision's encoding
    except Exception as err:
        raise InputError(f"could not read the CIFAR-10 batch {path}: {_describe(err)}; extract "
                         "cifar-10-python.tar.gz again") from err
    get = (lambda k: batch.get(k, batch.get(k.encode()))) if isinstance(batch, dict) else (lambda k: None)
    data, labels = get("data"), get("labels")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and labels is not None and labels.shape == (data.shape[0],)):
        raise InputError(f"{path} is not a CIFAR-10 batch (a pickled dict of 'data', uint8 (N, 3072), and "
                         "'labels', N integers); extract cifar-10-python.tar.gz again")
    return torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32), torch.from_numpy(labels)


def _cifar_folder(root):
    """The folder holding the CIFAR-10 batches under ``root`` (``root/cifar-10-batches-py``, or ``root``
    itself), or ``None``."""
    if (root / CIFAR10_FOLDER).is_dir():
        return root / CIFAR10_FOLDER
    if any((root / b).is_file() for b in CIFAR10_BATCHES):
        return root
    return None


def load_cifar10(data_dir=None, download=True, image_size=0, channels=0):
    """CIFAR-10 (50 000 training and 10 000 test images, 32x32 colour) as floats in [0, 1].

    Looked for in ``data_dir`` (or, without it, in the cache's ``download`` folder): torchvision's
    ``cifar-10-batches-py`` folder (``data_batch_1`` .. ``data_batch_5``, ``test_batch``), or those files
    directly in it. Where there is none and ``download`` is on, torchvision's ``CIFAR10(download=True)``
    fetches and extracts it there first. The batches are read here, in torchvision's format (a pickle,
    ``encoding="latin1"``, with ``data`` uint8 ``(n, 3072)`` and ``labels``), by an unpickler that loads
    numpy arrays and nothing else; torchvision's md5 check of the archive's files is not made, so a copy
    of the batches of one's own (e.g. a small one for tests) reads too.

    Returns:
        ``(x_train, y_train, x_test, y_test)`` as :func:`load_images` (``image_size``, ``channels``: as
        :func:`fit_images`).
    """
    _check_fit(image_size, channels)
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            problem = "is not a directory" if root.exists() else "does not exist"
            raise InputError(f"data directory {root} {problem}; pass a directory holding {CIFAR10_FOLDER} (or "
                             "the one CIFAR-10 is to be downloaded into)")
    else:
        root = cache_dir() / "download"
    folder = _cifar_folder(root)
    where = f"{root} holds no CIFAR-10 ({CIFAR10_FOLDER}/ with data_batch_1..5 and test_batch)"
    if folder is None:
        if not download:
            raise InputError(f"{where} and download is off; put torchvision's extracted {CIFAR10_FOLDER} folder "
                             "in it, or allow the download")
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root), train=True, download=True)
        except Exception as err:  # no network, a full disk, a broken archive
            raise InputError(f"{where} and torchvision's download failed ({' '.join(_describe(err).split())}); "
                             f"extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {root}, or "
                             "allow network access") from err
        folder = root / CIFAR10_FOLDER
    missing = [b for b in CIFAR10_BATCHES if not (folder / b).is_file()]
    if missing:
        raise InputError(f"{folder}: no {', '.join(missing)}; CIFAR-10's python version holds data_batch_1 .. "
                         "data_batch_5 and test_batch: extract cifar-10-python.tar.gz again")
    train = [_cifar_batch(folder / b) for b in CIFAR10_BATCHES[:5]]
    x_tr, y_tr = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    x_te, y_te = _cifar_batch(folder / CIFAR10_BATCHES[5])
    if not len(x_tr) or not len(x_te):
        raise InputError(f"the CIFAR-10 batches in {folder} hold {len(x_tr)} training and {len(x_te)} test images; "
                         "both sets need images: extract cifar-10-python.tar.gz again")
    return fit_images(x_tr, image_size, channels), y_tr, fit_images(x_te, image_size, channels), y_te


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
    gzipped; 10x Genomics writes genes x cells, so pass ``transpose=True``), or a 10x folder
    (``matrix.mtx(.gz)``, ``barcodes.tsv(.gz)``, ``features.tsv(.gz)``), read as cells x genes.

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
    if path.is_dir():
        if transpose:
            raise InputError(f"{path} is a 10x folder, read as cells x genes already; drop --transpose")
        path = _10x_matrix(path)
        transpose = True  # 10x writes genes x cells
    if not path.is_file():
        raise InputError(f"count file {path} does not exist; pass a {', '.join(COUNT_FORMATS)} file or a 10x folder")
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
    check_counts(m, path)
    return m.astype(np.float32)


def _10x_matrix(folder):
    """The ``matrix.mtx(.gz)`` of a 10x Genomics folder, after checking that ``barcodes.tsv(.gz)`` and
    ``features.tsv(.gz)`` (or ``genes.tsv(.gz)``) sit beside it; a missing file is named."""
    def find(*names):
        return next((folder / n for n in names if (folder / n).is_file()), None)

    matrix = find("matrix.mtx", "matrix.mtx.gz")
    missing = [label for label, found in (("matrix.mtx(.gz)", matrix),
                                          ("barcodes.tsv(.gz)", find("barcodes.tsv", "barcodes.tsv.gz")),
                                          ("features.tsv(.gz) or genes.tsv(.gz)",
                                           find("features.tsv", "features.tsv.gz", "genes.tsv", "genes.tsv.gz")))
               if found is None]
    if missing:
        raise InputError(f"{folder} is not a complete 10x folder: {', '.join(missing)} missing; it needs "
                         "matrix.mtx(.gz), barcodes.tsv(.gz) and features.tsv(.gz)")
    return matrix


def side_table(path, names):
    """The first of the tab-separated files ``names`` (each may be gzipped, by its suffix) in the folder
    ``path`` (or beside the file ``path``), as 10x writes them beside a matrix: ``(file, rows)``, each row
    its fields, or ``(None, None)`` where there is none."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for name in names:
        file = folder / name
        if file.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(file, "rt") as f:
                return file, [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return None, None


def barcodes(path):
    """The cell names of a 10x ``barcodes.tsv(.gz)`` in the folder ``path`` (or beside the file ``path``):
    ``(file, names)``, or ``(None, None)`` where there is none."""
    file, rows = side_table(path, ("barcodes.tsv.gz", "barcodes.tsv"))
    return file, None if rows is None else [row[0].strip() for row in rows]


def orientation_hint(path, shape, transpose):
    """A one-line warning when a count matrix read as ``shape`` (rows = cells) looks transposed: a 10x
    ``barcodes.tsv(.gz)`` beside it lists as many cells as the matrix has columns; else ``None``."""
    path = Path(path)
    if path.is_dir():  # a 10x folder is read the right way round
        return None
    file, cells = barcodes(path)
    if file is not None and len(cells) == shape[1] != shape[0]:
        flag = "with --transpose" if transpose else "without --transpose"
        return (f"warning: {path} read {flag} gives {shape[0]} cells x {shape[1]} genes, but {file.name} "
                f"lists {len(cells)} cells: the matrix looks transposed ({'add' if not transpose else 'drop'} "
                "--transpose; 10x writes genes x cells)")
    return None


def read_labels(path, n=None):
    """One categorical label per line of a text file (a cell's batch, in the data's cell order; a first line
    ``batch``/``label`` or an empty last line is skipped): ``(codes, names)``, the codes ``(N,)`` int64
    indices into ``names``, the sorted distinct labels. With ``n``, the file must hold ``n`` labels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label file {path} does not exist; pass a text file with one label per line")
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"could not read the label file {path}: {_describe(err)}") from err
    while lines and not lines[-1]:
        lines.pop()
    if lines and lines[0].lower() in ("batch", "label", "labels", "batch_id", "sample"):
        lines = lines[1:]
    if n is not None and len(lines) != n:
        raise InputError(f"{path} holds {len(lines)} labels for {n} cells; give one label per cell, in the data's "
                         "cell order")
    if not lines or any(not line for line in lines):
        raise InputError(f"{path} has an empty label (line {lines.index('') + 2 if '' in lines else 1}); give "
                         "one label per line")
    names = sorted(set(lines))
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[line] for line in lines], dtype=torch.long), names


def check_counts(m, path):
    """Refuse a ``scipy.sparse.csr_matrix`` whose stored values are not counts (NaN/inf, negative,
    non-integer), naming ``path``, the first bad value's row and column, and how many there are."""
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
        y: optional labels or covariates ``(N, ...)`` (a tensor), one row per data point: each batch
            is then the pair ``(x_b, y_b)``, which :class:`~pyro_vae.loop.Loop` hands to
            ``svi.step(x_b, y_b)``, i.e. to ``vae.model(x_b, y_b)`` and ``vae.guide(x_b, y_b)``.

    Iterating yields tensors ``(batch_size, *x_shape)`` (pairs with ``y``). As the batch source
    of :class:`~pyro_vae.loop.Loop` it also has :meth:`epoch` (resume inside
    an epoch) and ``state_dict``/``load_state_dict`` (the generator's state at
    the start of the current epoch, or of the next one between epochs).
    """

    def __init__(self, x, batch_size, generator, dynamic_binarize=False, shuffle=True, y=None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool):
            raise InputError(f"batch size must be a whole number, got {batch_size!r}; use e.g. a batch size of 64")
        if int(batch_size) <= 0:
            raise InputError(f"batch size must be positive, got {batch_size}; use a batch size of 1 or more "
                             f"(at most the {x.shape[0]} data points)")
        if int(batch_size) > x.shape[0]:
            raise InputError(f"batch size {batch_size} is larger than the data ({x.shape[0]} points); "
                             "choose a smaller batch size")
        self.y = rows_of(y, x.shape[0], "y")
        self.sparse = is_sparse(x)
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
            yield self._batch(idx, self.y)
        self._epoch_start = None

    def _batch(self, idx, y):
        """The batch of the rows ``idx``: ``x_b`` (densified, binarised as set), or ``(x_b, y_b)``."""
        if self.sparse:
            rows = self.x[idx.cpu().numpy()].toarray()
            xb = torch.from_numpy(rows).to(self.device, torch.float32)
        else:
            xb = self.x[idx]
        xb = binarize(xb, self.generator) if self.dynamic_binarize else xb
        return xb if y is None else (xb, y[idx.to(y.device)])


def rows_of(y, n, name):
    """``y`` (labels ``(n,)`` or covariates ``(n, K)``, named ``name`` in errors) checked to be a tensor of ``n``
    rows, or ``None``; a one-line :class:`InputError` otherwise."""
    if y is None:
        return None
    if not torch.is_tensor(y):
        raise InputError(f"{name} must be a tensor with one row per data point, got {type(y).__name__}; "
                         "convert it with torch.as_tensor")
    if y.dim() == 0 or y.shape[0] != n:
        raise InputError(f"{name} has {y.shape[0] if y.dim() else 'no'} rows for {n} data points; give one "
                         "row per data point")
    return y


def is_sparse(x):
    """Whether ``x`` is a ``scipy.sparse`` matrix (not a tensor)."""
    return not torch.is_tensor(x) and hasattr(x, "tocsr")


def batch_points(batch):
    """The number of data points in a batch of a batch source: ``x_b`` ``(B, ...)`` or ``(x_b, y_b)``."""
    return (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]


UNLABELLED = -1


class SemiSupervised(Batches):
    """The batches of a partly labelled data set, for a semi-supervised VAE (M2, ``label_site=True``):
    every epoch is one pass over the unlabelled points, in batches ``x_b``, and one over the labelled
    ones, in pairs ``(x_b, y_b)``, the labelled batches spread evenly among the unlabelled ones (as
    Pyro's ``ss_vae_M2.py`` interleaves them), so an epoch's steps add up to the whole data's ELBO.

    Args:
        x: data ``(N, *x_shape)`` on the training device.
        y: integer labels ``(N,)``, :data:`UNLABELLED` (-1) where a point has none.
        batch_size, generator, dynamic_binarize: as in :class:`Batches`; one generator draws both
            orders and every binarisation, so a resume inside an epoch replays it bitwise.

    ``len`` is the batches of one epoch, labelled ones included.
    """

    def __init__(self, x, y, batch_size, generator, dynamic_binarize=False):
        y = rows_of(y, x.shape[0], "y")
        if y is None or y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
            raise InputError("semi-supervised batches need integer labels y (N,), -1 for an unlabelled point")
        super().__init__(x, batch_size, generator, dynamic_binarize=dynamic_binarize, y=y)
        labelled = y != UNLABELLED
        self.labelled = torch.nonzero(labelled).flatten().to(self.device)
        self.unlabelled = torch.nonzero(~labelled).flatten().to(self.device)

    def __len__(self):
        return sum(-(-len(part) // self.batch_size) for part in (self.labelled, self.unlabelled))

    def __iter__(self):
        self._epoch_start = self.generator.get_state()
        parts = [part[torch.randperm(len(part), generator=self.generator, device=self.device)].split(self.batch_size)
                 for part in (self.unlabelled, self.labelled)]
        # batch j of a part of n batches sits at (j + 1/2) / n of the epoch; an unlabelled one first on a tie
        places = sorted((min(1.0, (j + 0.5) / len(batches)), kind, j)
                        for kind, batches in enumerate(parts) for j in range(len(batches)))
        for _, kind, j in places:
            yield self._batch(parts[kind][j], self.y if kind else None)
        self._epoch_start = None


def balanced_labels(y, n, seed=0, classes=None):
    """Keep ``n`` of the labels ``y`` ``(N,)``, the same number of each class (``n // K``, the first
    ``n % K`` classes one more), chosen by a shuffle seeded by ``seed``; the rest become
    :data:`UNLABELLED`. Returns the new labels ``(N,)`` int64 (a copy); ``labels`` integers in
    ``0 .. K-1`` (``K``: ``classes``, else the largest label + 1)."""
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1 or not len(y):
        raise InputError(f"labels must be a non-empty integer tensor (N,), got {y.dtype} of shape {tuple(y.shape)}")
    y = y.long()
    k = int(classes if classes is not None else int(y.max()) + 1)
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise InputError(f"labels must lie in 0..{k - 1}, got values in {int(y.min())}..{int(y.max())}")
    if not isinstance(n, int) or isinstance(n, bool) or not k <= n <= y.shape[0]:
        raise InputError(f"the number of labelled points must be a whole number from {k} (one per class) to "
                         f"{y.shape[0]} (the training set), got {n!r}")
    sizes = torch.bincount(y, minlength=k)
    wants = [n // k + (c < n % k) for c in range(k)]
    if any(int(size) < want for size, want in zip(sizes, wants)):
        raise InputError(f"a balanced set of {n} labels needs {max(wants)} of each class, but the smallest class "
                         f"has {int(sizes.min())} points; ask for at most {int(sizes.min()) * k} labels")
    order = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    kept = [order[y[order] == c][:want] for c, want in enumerate(wants)]
    out = torch.full_like(y, UNLABELLED)
    kept = torch.cat(kept)
    out[kept] = y[kept]
    return out
