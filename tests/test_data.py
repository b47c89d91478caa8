"""pyro_vae.data: finding and reading the IDX files, binarisation, on-device batches."""

import gzip

import numpy as np
import pytest
import torch

import pyro_vae.data
from pyro_vae.data import IDX_FILES, Batches, binarize, load_images
from pyro_vae.errors import InputError

from conftest import make_idx_dir, needs_fashion_mnist, write_idx


def _arrays(n_train=20, n_test=7, seed=0):
    """Random uint8 images (covering 0 and 255) and labels, in IDX_FILES order."""
    rng = np.random.default_rng(seed)
    x_tr = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    x_tr[0, 0, 0], x_tr[0, 0, 1] = 0, 255
    y_tr = rng.integers(0, 10, size=n_train).astype(np.uint8)
    y_te = rng.integers(0, 10, size=n_test).astype(np.uint8)
    return x_tr, y_tr, x_te, y_te


def _write(folder, arrays, gz):
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(IDX_FILES, arrays):
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz=gz)


def _check_loaded(loaded, arrays):
    x_tr, y_tr, x_te, y_te = loaded
    for x, y, (images, labels) in ((x_tr, y_tr, arrays[0:2]), (x_te, y_te, arrays[2:4])):
        n = images.shape[0]
        assert x.shape == (n, 1, 28, 28)
        assert x.dtype == torch.float32
        assert x.device.type == "cpu"
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        expected = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)
        assert y.shape == (n,)
        assert y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert float(x_tr.max()) == 1.0 and float(x_tr.min()) == 0.0


@pytest.fixture
def no_debian(monkeypatch):
    """Pretend Debian's package is not installed, so only the user's directory counts."""
    monkeypatch.setattr(pyro_vae.data, "DEBIAN_FASHION_MNIST", "/nonexistent")


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "unpacked"])
def test_load_from_user_directory(tmp_path, gz, no_debian):
    arrays = _arrays()
    _write(tmp_path / "data", arrays, gz)
    _check_loaded(load_images("fashion-mnist", tmp_path / "data", download=False), arrays)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "unpacked"])
def test_load_from_torchvision_layout(tmp_path, gz, no_debian):
    arrays = _arrays(seed=1)
    _write(tmp_path / "data" / "FashionMNIST" / "raw", arrays, gz)
    _check_loaded(load_images("fashion-mnist", tmp_path / "data", download=False), arrays)


def test_load_accepts_str_path_and_loads_twice(tmp_path, no_debian):
    arrays = _arrays(seed=2)
    _write(tmp_path / "data", arrays, gz=True)
    _check_loaded(load_images("fashion-mnist", str(tmp_path / "data"), download=False), arrays)
    _check_loaded(load_images("fashion-mnist", str(tmp_path / "data"), download=False), arrays)  # staged copy


def test_user_directory_comes_before_debian(tmp_path):
    arrays = _arrays(n_train=11, n_test=3, seed=3)
    _write(tmp_path / "data", arrays, gz=True)
    x_tr, _, x_te, _ = load_images("fashion-mnist", tmp_path / "data", download=False)
    assert (x_tr.shape[0], x_te.shape[0]) == (11, 3)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_mnist_from_user_directory(tmp_path, layout):
    arrays = _arrays(seed=4)
    folder = tmp_path / "mnist" if layout == "flat" else tmp_path / "mnist" / "MNIST" / "raw"
    _write(folder, arrays, gz=True)
    _check_loaded(load_images("mnist", tmp_path / "mnist", download=False), arrays)


def test_load_conftest_idx_dir(idx_dir, no_debian):
    x_tr, y_tr, x_te, y_te = load_images("fashion-mnist", idx_dir, download=False)
    assert x_tr.shape == (512, 1, 28, 28) and x_te.shape == (128, 1, 28, 28)
    assert y_tr.shape == (512,) and y_te.shape == (128,)


@needs_fashion_mnist
def test_load_debian_fashion_mnist():
    x_tr, y_tr, x_te, y_te = load_images("fashion-mnist", download=False)
    assert x_tr.shape == (60000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert y_tr.shape == (60000,) and y_te.shape == (10000,)
    for x in (x_tr, x_te):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y_tr.unique().tolist()) == set(range(10))
    assert 0.2 < float(x_tr.mean()) < 0.4  # Fashion-MNIST's mean pixel is about 0.286


# ------------------------------------------------------------ missing data
def test_missing_dataset_without_download(monkeypatch):
    monkeypatch.setattr(pyro_vae.data, "DEBIAN_FASHION_MNIST", "/nonexistent")
    with pytest.raises(InputError) as info:
        load_images("fashion-mnist", download=False)
    msg = str(info.value)
    assert "Tried" in msg
    assert "/nonexistent" in msg
    assert "download" in msg and "not allowed" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_missing_dataset_lists_user_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(pyro_vae.data, "DEBIAN_FASHION_MNIST", "/nonexistent")
    empty = tmp_path / "empty"
    empty.mkdir()
    # three of the four files are not enough
    for name, arr in list(zip(IDX_FILES, _arrays()))[:3]:
        write_idx(empty / (name + ".gz"), arr)
    with pytest.raises(InputError) as info:
        load_images("fashion-mnist", empty, download=False)
    msg = str(info.value)
    assert str(empty) in msg and "no t10k-labels-idx1-ubyte" in msg
    # a directory the user named is the only source: no fallback to the installed data was looked at
    assert "/nonexistent" not in msg and "only place looked in" in msg
    with pytest.raises(InputError, match="could not find the fashion-mnist data set"):  # named none: the chain
        load_images("fashion-mnist", None, download=False)


def test_missing_dataset_download_fails(monkeypatch, tmp_path):
    import torchvision.datasets

    monkeypatch.setattr(pyro_vae.data, "DEBIAN_FASHION_MNIST", "/nonexistent")
    calls = []

    def no_network(self):
        calls.append(self.root)
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_network)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    with pytest.raises(InputError) as info:
        load_images("fashion-mnist", download=True)
    assert calls, "torchvision's downloader was not tried"
    msg = str(info.value)
    assert "torchvision download" in msg
    assert "OSError" in msg and "network is unreachable (test)" in msg
    assert "/nonexistent" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "cache") in msg  # downloads go to the cache directory


def test_missing_mnist_without_download(tmp_path):
    with pytest.raises(InputError) as info:
        load_images("mnist", tmp_path, download=False)
    msg = str(info.value)
    assert "mnist" in msg and str(tmp_path) in msg and "--data-dir" in msg
    assert "fashion-mnist" not in msg  # Debian's Fashion-MNIST is not MNIST


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(InputError, match="unknown dataset 'cifar10'.*fashion-mnist.*mnist"):
        load_images("cifar10", tmp_path, download=False)


def test_data_dir_does_not_exist(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(InputError) as info:
        load_images("fashion-mnist", missing, download=False)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


@pytest.mark.parametrize("kind", ["unpacked", "gz_not_gzip", "gz_gzipped_garbage", "gz_truncated"])
def test_garbage_files_name_the_directory(tmp_path, kind):
    folder = tmp_path / "garbage"
    folder.mkdir()
    real = make_idx_dir(tmp_path / "real", n_train=8, n_test=4)
    for name in IDX_FILES:
        if kind == "unpacked":
            (folder / name).write_bytes(b"this is not an IDX file" * 40)
        elif kind == "gz_not_gzip":
            (folder / (name + ".gz")).write_bytes(b"this is not gzip" * 40)
        elif kind == "gz_gzipped_garbage":
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(b"gzipped, but not an IDX file" * 40)
        else:
            data = (real / (name + ".gz")).read_bytes()
            (folder / (name + ".gz")).write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError) as info:
        load_images("fashion-mnist", folder, download=False)
    assert str(folder) in str(info.value)


# ------------------------------------------------------------- binarize
def test_binarize_reproducible_binary_and_mean(images):
    a = binarize(images, torch.Generator().manual_seed(7))
    b = binarize(images, torch.Generator().manual_seed(7))
    c = binarize(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == images.shape and a.dtype == images.dtype and a.device == images.device
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(a.mean()) - float(images.mean())) < 0.01
    # exact 0 and 1 stay put
    assert bool((a[images == 0] == 0).all()) and bool((a[images == 1] == 1).all())


def test_binarize_mean_on_uniform_values():
    x = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    xb = binarize(x, torch.Generator().manual_seed(1))
    assert set(xb.unique().tolist()) == {0.0, 1.0}
    assert abs(float(xb.mean()) - float(x.mean())) < 0.005


# -------------------------------------------------------------- Batches
def _rows(n, width=5, seed=0):
    """``n`` distinct rows: row ``i`` starts with ``i``, then random grey values."""
    x = torch.rand(n, width, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = torch.arange(n, dtype=x.dtype)
    return x


def test_batches_cover_every_index_once_per_epoch():
    x = _rows(10)
    batches = Batches(x, 4, torch.Generator().manual_seed(0))
    assert len(batches) == 3
    orders = []
    for _ in range(3):
        out = list(batches)
        assert [b.shape[0] for b in out] == [4, 4, 2]
        idx = torch.cat(out)[:, 0].long()
        assert sorted(idx.tolist()) == list(range(10))
        orders.append(idx.tolist())
    assert len({tuple(o) for o in orders}) > 1, "the data are not reshuffled between epochs"


def test_batches_exact_division_and_no_shuffle():
    x = _rows(12)
    batches = Batches(x, 4, torch.Generator().manual_seed(0), shuffle=False)
    out = list(batches)
    assert len(batches) == len(out) == 3
    assert torch.equal(torch.cat(out), x)


def test_batches_fixed_data_returns_exact_rows():
    x = _rows(37)
    for xb in Batches(x, 8, torch.Generator().manual_seed(1), dynamic_binarize=False):
        assert torch.equal(xb, x[xb[:, 0].long()])


def test_batches_same_seed_same_batches():
    x = torch.rand(30, 5, generator=torch.Generator().manual_seed(0))
    a = [b.clone() for b in Batches(x, 7, torch.Generator().manual_seed(3), dynamic_binarize=True)]
    b = [b.clone() for b in Batches(x, 7, torch.Generator().manual_seed(3), dynamic_binarize=True)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == len(b) == 5


def test_batches_dynamic_binarize_redraws_every_epoch():
    x = torch.full((64, 1, 28, 28), 0.5)
    batches = Batches(x, 64, torch.Generator().manual_seed(0), dynamic_binarize=True, shuffle=False)
    (first,), (second,) = list(batches), list(batches)
    for xb in (first, second):
        assert xb.shape == x.shape
        assert set(xb.unique().tolist()) == {0.0, 1.0}
        assert abs(float(xb.mean()) - 0.5) < 0.02
    assert not torch.equal(first, second)


def test_batches_dynamic_binarize_follows_the_data(images):
    batches = Batches(images, 32, torch.Generator().manual_seed(0), dynamic_binarize=True, shuffle=False)
    out = torch.cat(list(batches))
    assert out.shape == images.shape
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert bool((out[images == 0] == 0).all())
    assert abs(float(out.mean()) - float(images.mean())) < 0.01


@pytest.mark.parametrize("batch_size", [0, -3, 11, 1000])
def test_batches_bad_batch_size(batch_size):
    with pytest.raises(InputError, match=str(batch_size)):
        Batches(_rows(10), batch_size, torch.Generator())


def test_batch_size_equal_to_data_is_fine():
    x = _rows(10)
    assert [b.shape[0] for b in Batches(x, 10, torch.Generator().manual_seed(0))] == [10]


def _check_device(device):
    x = torch.rand(20, 1, 28, 28, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    for dynamic in (False, True):
        for xb in Batches(x, 6, g, dynamic_binarize=dynamic):
            assert xb.device == x.device
    assert binarize(x, g).device == x.device


def test_batches_stay_on_cpu():
    _check_device("cpu")


@pytest.mark.cuda
def test_batches_stay_on_cuda():
    _check_device("cuda")
