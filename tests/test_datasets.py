"""Any image data set: a folder of images, an image tensor file, CIFAR-10; the conv networks at 1 or 3 channels.

Every data set here is made in ``tmp_path`` by the test (PNG files by PIL, ``.npy``/``.pt`` files, a small
``cifar-10-batches-py`` in torchvision's pickle format); nothing is downloaded.
"""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_vae import InputError, RunConfig, data, nets
from pyro_vae.cli import main
from pyro_vae.train import load_splits

from conftest import make_idx_dir

TINY = ["--hidden", "16", "--latent-dims", "2", "--epochs", "1", "--batch-size", "8", "--no-progress",
        "--device", "cpu"]


def one_line(info):
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def rgb(rng, n, h=12, w=12):
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def class_folder(root, n_per_class=12, h=12, w=12, seed=0):
    """``root/a``, ``root/b``: colour PNGs; returns the images in ImageFolder's order and their labels."""
    rng = np.random.default_rng(seed)
    images = {c: rgb(rng, n_per_class, h, w) for c in ("a", "b")}
    for c, x in images.items():
        write_pngs(root / c, x)
    return np.concatenate([images["a"], images["b"]]), [0] * n_per_class + [1] * n_per_class


def make_cifar_dir(root, n_train=8, n_test=6, seed=0):
    """A ``cifar-10-batches-py`` as torchvision's archive holds it (pickles of ``data`` uint8 (n, 3072),
    ``labels``), with ``n_train`` images in each of the five training batches and ``n_test`` in the test batch."""
    folder = root / data.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in data.CIFAR10_BATCHES:
        n = n_test if name == "test_batch" else n_train
        batch = {"batch_label": name, "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, size=n).tolist(), "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_train,
                     "num_vis": 3072}, f, protocol=2)
    return root


# ------------------------------------------------------------------ networks
@pytest.mark.parametrize("arch", ["conv", "mlp"])
@pytest.mark.parametrize("x_shape", [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32)])
@pytest.mark.parametrize("k", [1, 3])
def test_networks_decode_the_input_shape(arch, x_shape, k):
    encoder, decoder = nets.build(arch, x_shape, 2, out_channels=k, hidden=16)
    x = torch.rand(5, *x_shape)
    assert encoder(x).shape == (5, encoder.out_features)
    assert decoder(torch.randn(4, 5, 2)).shape == (4, 5, k * x_shape[0], *x_shape[1:])


def test_conv_parameters_for_28x28_grey_are_unchanged():
    """Checkpoints of conv runs on Fashion-MNIST keep loading."""
    encoder, decoder = nets.build("conv", (1, 28, 28), 50)
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes == {"net.0.weight": (32, 1, 4, 4), "net.0.bias": (32,), "net.2.weight": (64, 32, 4, 4),
                      "net.2.bias": (64,), "net.4.weight": (256, 64, 7, 7), "net.4.bias": (256,)}
    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert shapes == {"net.0.weight": (50, 64, 7, 7), "net.0.bias": (64,), "net.2.weight": (64, 32, 4, 4),
                      "net.2.bias": (32,), "net.4.weight": (32, 1, 4, 4), "net.4.bias": (1,)}


@pytest.mark.parametrize("x_shape", [(3, 30, 30), (1, 2, 2), (3, 32)])
def test_conv_refuses_sizes_it_cannot_do(x_shape):
    with pytest.raises(InputError, match="multiples of 4.*--image-size N") as info:
        nets.build("conv", x_shape, 2)
    one_line(info)


# ------------------------------------------------------------------ folders
def test_folder_of_grey_images_reads_the_pixels(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(5, 8, 12), dtype=np.uint8)
    x, y = data.load_folder(write_pngs(tmp_path / "flat", grey))
    assert x.dtype == torch.float32 and x.shape == (5, 1, 8, 12)
    torch.testing.assert_close(x, torch.from_numpy(grey).unsqueeze(1).float() / 255, rtol=0, atol=1e-7)
    assert y.tolist() == [0] * 5
    x3, _ = data.load_folder(tmp_path / "flat", channels=3)
    assert x3.shape == (5, 3, 8, 12) and torch.equal(x3, x.expand(-1, 3, -1, -1))


def test_class_folders_are_read_as_image_folder(tmp_path):
    images, labels = class_folder(tmp_path / "classes", n_per_class=3)
    (tmp_path / "classes" / "a" / "notes.txt").write_text("not an image, skipped")
    x, y = data.load_folder(tmp_path / "classes")
    assert x.shape == (6, 3, 12, 12) and y.tolist() == labels
    torch.testing.assert_close(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, rtol=0, atol=1e-7)
    grey, _ = data.load_folder(tmp_path / "classes", channels=1)
    assert grey.shape == (6, 1, 12, 12)
    expected = torch.from_numpy(np.stack([np.asarray(Image.fromarray(i).convert("L")) for i in images]))
    assert (grey[:, 0] * 255 - expected.float()).abs().max() <= 1  # PIL's luma, to rounding


def test_folder_resizes_and_crops_images_of_different_sizes(tmp_path):
    rng = np.random.default_rng(2)
    write_pngs(tmp_path / "mixed", [rgb(rng, 1, 20, 40)[0]])
    Image.fromarray(rgb(rng, 1, 33, 17)[0]).save(tmp_path / "mixed" / "tall.jpg")
    Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8)).save(tmp_path / "mixed" / "grey.bmp")
    x, _ = data.load_folder(tmp_path / "mixed", image_size=16)
    assert x.shape == (3, 3, 16, 16)  # one colour image makes the set colour
    assert torch.equal((x * 255).round() / 255, x)  # still 8-bit values, as the discretised logistic needs


@pytest.mark.parametrize("case, match", [
    ("missing", r"image folder \S*nowhere does not exist; pass --data-dir DIR"),
    ("a-file", r"image folder \S*file\.png is not a directory"),
    ("empty", r"image folder \S*empty holds no images; put \.jpg"),
    ("no-images", r"holds no images \(only 1 other files, e\.g\. notes\.txt\)"),
    ("empty-classes", r"holds no images"),
    ("one-empty-class", r"class folder b in \S* holds no images"),
    ("images-and-classes", r"holds both images \(000\.png, \.\.\.\) and sub-folders \(a, \.\.\.\)"),
    ("broken", r"could not read the image \S*broken\.png: UnidentifiedImageError"),
    ("sizes", r"have different sizes \(000\.png is 12x12, 001\.png 10x8\); pass --image-size N"),
    ("one", r"holds 1 image \(000\.png\); training and a test set need 2"),
    ("16-bit", r"has I(;16)? pixels \(16-bit or float\); images are read at 8 bits"),
])
def test_bad_folders_are_refused(tmp_path, case, match):
    rng = np.random.default_rng(3)
    root = tmp_path / case
    if case == "a-file":
        root = write_pngs(tmp_path / "x", rgb(rng, 1)) / "000.png"
        root = root.rename(tmp_path / "file.png")
    elif case == "missing":
        root = tmp_path / "nowhere"
    elif case == "empty":
        root.mkdir()
    elif case == "no-images":
        root.mkdir()
        (root / "notes.txt").write_text("hi")
    elif case == "empty-classes":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    elif case == "one-empty-class":
        write_pngs(root / "a", rgb(rng, 2))
        (root / "b").mkdir()
    elif case == "images-and-classes":
        write_pngs(root, rgb(rng, 2))
        write_pngs(root / "a", rgb(rng, 2))
    elif case == "broken":
        write_pngs(root, rgb(rng, 2))
        (root / "broken.png").write_bytes(b"\x89PNG but not really")
    elif case == "sizes":
        write_pngs(root, rgb(rng, 1))
        Image.fromarray(rgb(rng, 1, 8, 10)[0]).save(root / "001.png")
    elif case == "one":
        write_pngs(root, rgb(rng, 1))
    elif case == "16-bit":
        write_pngs(root, rng.integers(0, 65536, size=(2, 8, 8), dtype=np.uint16))
    with pytest.raises(InputError, match=match) as info:
        data.load_folder(root)
    one_line(info)


# ------------------------------------------------------------------ tensor files
@pytest.mark.parametrize("suffix", [".npy", ".pt"])
@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC", "NCHW-rgb", "NHWC-rgb"])
@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_tensor_files_in_every_layout(tmp_path, suffix, layout, kind):
    rng = np.random.default_rng(4)
    c = 3 if layout.endswith("rgb") else 1
    nchw = rng.integers(0, 256, size=(6, c, 8, 12), dtype=np.uint8)
    a = {"NHW": nchw[:, 0], "NCHW": nchw, "NHWC": nchw.transpose(0, 2, 3, 1)}[layout.split("-")[0]]
    a = a if kind == "uint8" else a.astype(np.float32) / 255
    path = tmp_path / f"images{suffix}"
    np.save(path, a) if suffix == ".npy" else torch.save(torch.from_numpy(np.ascontiguousarray(a)), path)
    x = data.load_image_tensor(path)
    assert x.dtype == torch.float32 and x.shape == (6, c, 8, 12)
    torch.testing.assert_close(x, torch.from_numpy(nchw).float() / 255, rtol=0, atol=1e-6)
    assert data.load_image_tensor(path, image_size=4, channels=3).shape == (6, 3, 4, 4)


def test_tensor_file_may_be_a_dict_of_images(tmp_path):
    x = torch.rand(4, 3, 8, 8)
    torch.save({"images": x, "labels": torch.arange(4)}, tmp_path / "d.pt")
    torch.testing.assert_close(data.load_image_tensor(tmp_path / "d.pt"), x)


@pytest.mark.parametrize("case, match", [
    ("missing.npy", r"image tensor file \S*missing\.npy does not exist; pass --data-file"),
    ("images.txt", r"unknown image-tensor format 'images\.txt'; save the images with numpy\.save \(\.npy\) or torch"),
    ("garbage.npy", r"could not read \S*garbage\.npy as a \.npy file: ValueError"),
    ("garbage.pt", r"could not read \S*garbage\.pt as a \.pt file"),
    ("list.pt", r"holds a list, not an image tensor; torch\.save one tensor"),
    ("vector.npy", r"holds an array of shape \(10,\), not images; save \(N, H, W\), \(N, C, H, W\)"),
    ("rgba.npy", r"holds an array of shape \(3, 8, 8, 4\), not images"),
    ("int64.npy", r"holds int64 values; save images as uint8 \(0\.\.255\) or as floats in \[0, 1\]"),
    ("range.npy", r"holds float values in \[0, 255\], outside \[0, 1\]; divide 8-bit pixels by 255"),
    ("nan.pt", r"holds 1 NaN or infinite values"),
    ("one.npy", r"holds 1 image; training and a test set need 2"),
])
def test_bad_tensor_files_are_refused(tmp_path, case, match):
    path = tmp_path / case
    arrays = {"vector.npy": np.zeros(10, np.float32), "rgba.npy": np.zeros((3, 8, 8, 4), np.uint8),
              "int64.npy": np.zeros((3, 8, 8), np.int64), "range.npy": np.linspace(0, 255, 192).reshape(3, 8, 8),
              "one.npy": np.zeros((1, 8, 8), np.uint8)}
    if case in arrays:
        np.save(path, arrays[case])
    elif case == "garbage.npy" or case == "garbage.pt" or case == "images.txt":
        path.write_bytes(b"\x00 definitely not a tensor \xff" * 10)
    elif case == "list.pt":
        torch.save([1, 2, 3], path)
    elif case == "nan.pt":
        x = torch.rand(3, 8, 8)
        x[1, 2, 3] = float("nan")
        torch.save(x, path)
    with pytest.raises(InputError, match=match) as info:
        data.load_image_tensor(path)
    one_line(info)


# ------------------------------------------------------------------ CIFAR-10
def test_cifar10_reads_torchvisions_format_as_torchvision_does(tmp_path, monkeypatch):
    import torchvision.datasets
    import torchvision.datasets.cifar

    root = make_cifar_dir(tmp_path / "cifar")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download",
                        lambda self: pytest.fail("a CIFAR-10 that is present is not downloaded"))
    x_tr, y_tr, x_te, y_te = data.load_images("cifar-10", root)
    assert x_tr.shape == (40, 3, 32, 32) and x_te.shape == (6, 3, 32, 32) and x_tr.dtype == torch.float32
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)  # our copy's md5s
    for x, y, train in ((x_tr, y_tr, True), (x_te, y_te, False)):
        ds = torchvision.datasets.CIFAR10(str(root), train=train)
        torch.testing.assert_close(x, torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255, rtol=0, atol=1e-7)
        assert y.tolist() == list(ds.targets)
    # the batches folder itself, grey and resized
    x_tr, _, x_te, _ = data.load_cifar10(root / data.CIFAR10_FOLDER, download=False, image_size=16, channels=1)
    assert x_tr.shape == (40, 1, 16, 16) and x_te.shape == (6, 1, 16, 16)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("case, match", [
    ("missing-dir", r"data directory \S*nowhere does not exist"),
    ("no-cifar", r"\S*no-cifar holds no CIFAR-10 \(cifar-10-batches-py/ with data_batch_1\.\.5 and test_batch\) and "
                 r"download is off"),
    ("download-fails", r"holds no CIFAR-10 .* and torchvision's download failed \(URLError: <urlopen error no network here>\); "
                       r"extract https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz into"),
    ("incomplete", r"cifar-10-batches-py: no data_batch_3, test_batch; CIFAR-10's python version holds"),
    ("not-pickle", r"could not read the CIFAR-10 batch \S*data_batch_1: UnpicklingError"),
    ("code", r"could not read the CIFAR-10 batch \S*data_batch_1: UnpicklingError: \S*print is not part of "
             r"a CIFAR batch"),
    ("wrong-shape", r"data_batch_1 is not a CIFAR-10 batch \(a pickled dict of 'data', uint8 \(N, 3072\)"),
])
def test_bad_cifar10_is_refused(tmp_path, monkeypatch, capsys, case, match):
    import torchvision.datasets

    def no_network(self):
        import urllib.error

        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    root = tmp_path / case
    if case == "missing-dir":
        root = tmp_path / "nowhere"
    elif case in ("no-cifar", "download-fails"):
        root.mkdir()
    else:
        make_cifar_dir(root, n_train=2, n_test=2)
        batch = root / data.CIFAR10_FOLDER / "data_batch_1"
        if case == "incomplete":
            (root / data.CIFAR10_FOLDER / "data_batch_3").unlink()
            (root / data.CIFAR10_FOLDER / "test_batch").unlink()
        elif case == "not-pickle":
            batch.write_bytes(b"\x00garbage")
        elif case == "code":
            batch.write_bytes(pickle.dumps({"data": Exploit(), "labels": [0]}, protocol=2))
        elif case == "wrong-shape":
            batch.write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, protocol=2))
    with pytest.raises(InputError, match=match) as info:
        data.load_cifar10(root, download=case != "no-cifar")
    one_line(info)
    assert "must never run" not in capsys.readouterr().out


def test_idx_data_sets_resize_and_turn_colour_too(tmp_path):
    root = make_idx_dir(tmp_path / "idx", n_train=8, n_test=4)
    plain = data.load_images("mnist", root, download=False)[0]
    x_tr, _, x_te, _ = data.load_images("mnist", root, download=False, image_size=32, channels=3)
    assert plain.shape == (8, 1, 28, 28) and x_tr.shape == (8, 3, 32, 32) and x_te.shape == (4, 3, 32, 32)
    assert torch.equal(x_tr[:, 0], x_tr[:, 2]) and torch.equal((x_tr * 255).round() / 255, x_tr)


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("settings, match", [
    (dict(dataset="folder"), r"--dataset folder needs the images: pass --data-dir DIR"),
    (dict(dataset="tensor"), r"--dataset tensor needs the images: pass --data-file PATH \(\.npy or \.pt\)"),
    (dict(dataset="tensor", data_file="x.npy", data_dir="d"), r"--dataset tensor reads --data-file alone"),
    (dict(dataset="folder", data_dir="d", data_file="x.npy"), r"--data-file and --transpose are for --dataset counts"),
    (dict(dataset="folder", data_dir="d", image_size=-1), r"--image-size must be a whole number >= 1"),
    (dict(dataset="folder", data_dir="d", image_size=30, arch="conv"),
     r"--image-size 30 does not suit the conv networks, which need a multiple of 4 \(at least 4\); use e\.g\. "
     r"--image-size 32, or --arch mlp"),
    (dict(dataset="folder", data_dir="d", image_size=2, arch="conv"), r"--image-size 2 .*use e\.g\. --image-size 4"),
    (dict(dataset="folder", data_dir="d", channels=2), r"--channels must be 1 \(grey\) or 3 \(colour\)"),
    (dict(dataset="counts", data_file="c.npz", binarize="none", image_size=32),
     r"--image-size and --channels are for images"),
    (dict(dataset="cifar"), r"unknown dataset 'cifar'; choose one of: .*cifar-10, folder, tensor, counts"),
])
def test_bad_image_settings_are_refused(settings, match):
    with pytest.raises(InputError, match=match) as info:
        RunConfig(**settings).validate(device=False)
    one_line(info)


def test_configs_written_before_these_fields_still_load():
    config = RunConfig.from_dict({"dataset": "fashion-mnist", "latent_dim": 4})
    assert config.image_size == 0 and config.channels == 0
    config.validate(device=False)


def test_a_resume_keeps_the_image_size(tmp_path):
    saved = RunConfig(dataset="folder", data_dir="d", image_size=32)
    with pytest.raises(InputError, match="image_size: run has 32, asked 16"):
        RunConfig(dataset="folder", data_dir="d", image_size=16).check_resume(saved, False, tmp_path)


@pytest.mark.parametrize("dataset", ["folder", "tensor"])
def test_folder_and_tensor_hold_out_a_seeded_tenth(tmp_path, dataset):
    images, _ = class_folder(tmp_path / "classes", n_per_class=10)
    np.save(tmp_path / "images.npy", images)
    where = dict(data_dir=str(tmp_path / "classes")) if dataset == "folder" else \
        dict(data_file=str(tmp_path / "images.npy"))
    config = RunConfig(dataset=dataset, binarize="none", **where).validate(device=False)
    x_train, x_val, x_test = load_splits(config, "cpu")
    assert x_train.shape == (18, 3, 12, 12) and x_test.shape == (2, 3, 12, 12) and x_val is None
    everything = torch.cat([x_train, x_test]).flatten(1)
    assert torch.equal(everything.unique(dim=0), data.fit_images(torch.from_numpy(images).permute(0, 3, 1, 2))
                       .flatten(1).unique(dim=0))  # a split of the same images
    assert torch.equal(load_splits(config, "cpu")[2], x_test)  # the same split every time
    config.seed = 5
    assert not torch.equal(load_splits(config, "cpu")[2], x_test)


# ------------------------------------------------------------------ the command line, end to end
def test_cli_colour_folder_conv_32_dlogistic_train_evaluate_sample(tmp_path, capsys):
    class_folder(tmp_path / "classes", n_per_class=12, h=36, w=40)  # resized and cropped to 32 x 32
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--dataset", "folder", "--data-dir", str(tmp_path / "classes"),
                 "--image-size", "32", "--arch", "conv", "--likelihood", "dlogistic", "--binarize", "none",
                 *TINY]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["dataset"], config["image_size"], config["channels"]) == ("folder", 32, 0)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["x_shape"] == [3, 32, 32]
    assert main(["evaluate", str(run), "--iw-samples", "4", "--elbo-samples", "1", "--no-progress",
                 "--device", "cpu"]) == 0
    summary = json.loads((run / "eval.json").read_text())
    assert summary["n"] == 2 and np.isfinite(summary["iw_log_likelihood"])
    assert main(["sample", str(run), "--n", "4", "--device", "cpu"]) == 0
    with Image.open(run / "samples.png") as im:
        assert im.mode == "RGB" and im.size == (4 * 34 + 2, 34 + 2)  # 4 tiles of 32 with padding 2


def test_cli_tensor_file_grey_mlp(tmp_path):
    rng = np.random.default_rng(5)
    torch.save(torch.from_numpy(rng.random((30, 10, 10, 3), dtype=np.float32)), tmp_path / "x.pt")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--dataset", "tensor", "--data-file", str(tmp_path / "x.pt"),
                 "--channels", "1", "--image-size", "8", *TINY]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["x_shape"] == [1, 8, 8]
    assert main(["sample", str(run), "--n", "4", "--device", "cpu"]) == 0


def test_cli_cifar10_from_a_fake_directory(tmp_path):
    root = make_cifar_dir(tmp_path / "cifar", n_train=4)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--dataset", "cifar-10", "--data-dir", str(root), *TINY]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["x_shape"] == [3, 32, 32]
    assert main(["evaluate", str(run), "--iw-samples", "2", "--elbo-samples", "1", "--no-progress",
                 "--device", "cpu"]) == 0
    assert json.loads((run / "eval.json").read_text())["n"] == 6  # CIFAR-10's own test batch


def test_cli_refuses_bad_image_input_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--out", str(tmp_path / "run"), "--dataset", "folder", "--data-dir",
                 str(tmp_path / "empty"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no images" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    np.save(tmp_path / "small.npy", np.zeros((10, 6, 6), np.uint8))
    assert main(["train", "--out", str(tmp_path / "run"), "--dataset", "tensor", "--data-file",
                 str(tmp_path / "small.npy"), "--arch", "conv", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "multiples of 4, got (1, 6, 6)" in err and "--image-size N" in err
