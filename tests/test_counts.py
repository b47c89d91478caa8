"""Count matrices from .npz / .csv / .mtx files, their checks, and sparse batches."""

import gzip

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch

from pyro_vae import InputError, data


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    m = rng.negative_binomial(2, 0.4, size=(7, 5)).astype(np.float64)
    m[rng.random(m.shape) < 0.4] = 0  # sparse, as real counts are
    return m


def write_all(m, tmp_path):
    """The same matrix in every format the reader takes; name -> (path, transpose)."""
    files = {}
    p = tmp_path / "sparse.npz"
    scipy.sparse.save_npz(p, scipy.sparse.csr_matrix(m))
    files["scipy npz"] = (p, False)
    p = tmp_path / "dense.npz"
    np.savez(p, counts=m, genes=np.arange(m.shape[1]))
    files["numpy npz"] = (p, False)
    p = tmp_path / "plain.csv"
    np.savetxt(p, m, delimiter=",", fmt="%d")
    files["csv"] = (p, False)
    p = tmp_path / "named.csv"
    lines = ["cell," + ",".join(f"gene{j}" for j in range(m.shape[1]))]
    lines += [f"cell{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(m)]
    p.write_text("\n".join(lines) + "\n")
    files["csv with names"] = (p, False)
    p = tmp_path / "named.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write("\n".join(lines) + "\n")
    files["csv.gz"] = (p, False)
    p = tmp_path / "cells.mtx"
    scipy.io.mmwrite(str(p), scipy.sparse.coo_matrix(m))
    files["mtx"] = (p, False)
    p = tmp_path / "genes_by_cells.mtx"
    scipy.io.mmwrite(str(p), scipy.sparse.coo_matrix(m.T))
    with open(p, "rb") as src, gzip.open(tmp_path / "matrix.mtx.gz", "wb") as dst:
        dst.write(src.read())
    files["10x mtx.gz, genes x cells"] = (tmp_path / "matrix.mtx.gz", True)
    return files


def test_every_format_reads_the_same_matrix(counts, tmp_path):
    for name, (path, transpose) in write_all(counts, tmp_path).items():
        m = data.read_counts(path, transpose=transpose)
        assert scipy.sparse.isspmatrix_csr(m) and m.dtype == np.float32, name
        np.testing.assert_array_equal(m.toarray(), counts, err_msg=name)
        x = data.load_counts(path, transpose=transpose)
        assert x.dtype == torch.float32 and x.shape == counts.shape
        assert torch.equal(x, torch.from_numpy(counts).float()), name


@pytest.mark.parametrize("value, what", [(-1.0, "negative"), (2.5, "not an integer"), (np.nan, "not finite"),
                                         (np.inf, "not finite")])
def test_values_that_are_not_counts_are_refused_with_their_place(counts, tmp_path, value, what):
    counts[3, 2] = value
    for name, fmt in [("m.npz", lambda p: np.savez(p, counts=counts)),
                      ("m.csv", lambda p: np.savetxt(p, counts, delimiter=","))]:
        fmt(tmp_path / name)
        with pytest.raises(InputError, match=rf"{name} is not a count matrix: the value at row 3, column 2 is "
                                             rf".*\({what}; 1 such values\); counts are integers >= 0"):
            data.read_counts(tmp_path / name)


def test_bad_files_get_clear_errors(counts, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        data.read_counts(tmp_path / "none.csv")
    (tmp_path / "m.txt").write_text("1,2\n")
    with pytest.raises(InputError, match=r"unknown count-file format 'm\.txt'; use one of \.npz, \.csv"):
        data.read_counts(tmp_path / "m.txt")
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(InputError, match=r"different numbers of columns \(\[2, 3\]\)"):
        data.read_counts(tmp_path / "ragged.csv")
    (tmp_path / "word.csv").write_text("1,2,3\n4,x,6\n")
    with pytest.raises(InputError, match="row 2 holds 'x', which is not a number"):
        data.read_counts(tmp_path / "word.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="holds no rows"):
        data.read_counts(tmp_path / "empty.csv")
    np.savez(tmp_path / "two.npz", a=counts, b=counts)
    with pytest.raises(InputError, match=r"holds arrays \['a', 'b'\]; name the count matrix 'counts'"):
        data.read_counts(tmp_path / "two.npz")
    np.savez(tmp_path / "flat.npz", counts=counts[0])
    with pytest.raises(InputError, match=r"array of shape \(5,\); a count matrix has 2 dims"):
        data.read_counts(tmp_path / "flat.npz")
    (tmp_path / "broken.mtx").write_text("not a matrix market file\n")
    with pytest.raises(InputError, match="could not read the count file .*broken.mtx"):
        data.read_counts(tmp_path / "broken.mtx")
    np.savez(tmp_path / "m.npz", counts=counts)
    with pytest.raises(InputError, match=r"7 x 5, more than 20 entries .* data\.read_counts\(path\) and data\.Batches"):
        data.load_counts(tmp_path / "m.npz", max_dense=20)


def test_batches_densify_a_sparse_matrix_one_batch_at_a_time(counts):
    m = scipy.sparse.csr_matrix(counts.astype(np.float32))
    batches = data.Batches(m, 3, torch.Generator().manual_seed(0))
    seen = list(batches)
    assert len(batches) == 3 and [b.shape for b in seen] == [(3, 5), (3, 5), (1, 5)]
    assert all(b.dtype == torch.float32 for b in seen)
    rows = sorted(map(tuple, torch.cat(seen).tolist()))
    assert rows == sorted(map(tuple, counts.tolist()))  # every row once, in a shuffled order
    ordered = torch.cat(list(data.Batches(m, 3, torch.Generator(), shuffle=False)))
    assert torch.equal(ordered, torch.from_numpy(counts).float())
