"""Labels through the training loop: ``fit(y_train=...)`` for conditional and semi-supervised (M2) VAEs,
the batch sources that carry them, the M2 objective, and bitwise resume with labels."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch import nn

from distributed_common import noise_free
from pyro_vae import VAE, data, fit
from pyro_vae.callbacks import Callback
from pyro_vae.errors import InputError
from pyro_vae.objectives import SemiSupervisedELBO

D_X, K, N = 12, 3, 60
G = torch.Generator().manual_seed(0)
Y = torch.arange(N) % K
X = (torch.rand(N, D_X, generator=G) < 0.1 + 0.7 * (Y[:, None] == torch.arange(D_X)[None] % K)).float()


def net(latent=2, label_site=False, condition=K):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(D_X, 16), nn.Softplus())
    decoder = nn.Sequential(nn.Linear(latent + (condition or 0), 16), nn.Softplus(), nn.Linear(16, D_X))
    return VAE(encoder, decoder, [latent], x_shape=(D_X,), condition=condition, label_site=label_site, hidden=16)


class Seen(Callback):
    """Records what each step was handed: the batch size and the labels (or None)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, loop, batch, loss):
        self.steps.append((data.batch_points(batch), batch[1].clone() if isinstance(batch, tuple) else None))


# ---------------------------------------------------------------- batch sources
def test_labelled_batches_are_pairs_of_the_same_rows():
    index = torch.arange(N, dtype=torch.float32)[:, None]  # each row says which it is
    seen = list(data.Batches(index, 7, torch.Generator().manual_seed(0), y=3 * torch.arange(N)))
    assert all(isinstance(p, tuple) for p in seen)
    assert all(torch.equal(yb, 3 * xb[:, 0].long()) for xb, yb in seen)
    assert sorted(torch.cat([xb[:, 0] for xb, _ in seen]).long().tolist()) == list(range(N))


def test_semi_supervised_epoch_is_one_pass_over_each_part_with_labelled_batches_spread():
    y = torch.full((N,), data.UNLABELLED)
    y[:12] = Y[:12]
    source = data.SemiSupervised(X, y, 5, torch.Generator().manual_seed(0))
    batches = list(source)
    assert len(batches) == len(source) == 12 // 5 + 1 + 48 // 5 + 1
    kinds = [isinstance(b, tuple) for b in batches]
    assert sum(kinds) == 3 and not kinds[0] and kinds.index(True) > 1  # spread, not bunched at the start
    labelled = torch.cat([b[1] for b in batches if isinstance(b, tuple)])
    assert sorted(labelled.tolist()) == sorted(Y[:12].tolist())
    assert sum(b.shape[0] for b in batches if not isinstance(b, tuple)) == 48
    # resuming inside an epoch redraws the same batches
    source2 = data.SemiSupervised(X, y, 5, torch.Generator().manual_seed(0))
    again = list(source2.epoch(skip=4))
    for a, b in zip(batches[4:], again):
        assert isinstance(a, tuple) == isinstance(b, tuple)
        assert torch.equal(a[0] if isinstance(a, tuple) else a, b[0] if isinstance(b, tuple) else b)


def test_balanced_labels_are_balanced_seeded_and_checked():
    y = data.balanced_labels(Y, 9, seed=3)
    kept = y[y != data.UNLABELLED]
    assert len(kept) == 9 and torch.bincount(kept).tolist() == [3, 3, 3]
    assert torch.equal(y[y != -1], Y[y != -1])
    assert torch.equal(y, data.balanced_labels(Y, 9, seed=3))
    assert not torch.equal(y, data.balanced_labels(Y, 9, seed=4))
    assert torch.bincount(data.balanced_labels(Y, 10)[data.balanced_labels(Y, 10) >= 0]).tolist() == [4, 3, 3]
    for bad in (2, N + 1, 3.5):
        with pytest.raises(InputError, match="labelled points must be a whole number"):
            data.balanced_labels(Y, bad)


# ---------------------------------------------------------------- the M2 objective
def test_the_aux_term_is_alpha_times_the_classifier_log_loss_on_labelled_batches_only():
    vae = net(label_site=True)
    with noise_free():
        plain = TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, X[:8], Y[:8])
        with_aux = SemiSupervisedELBO(vae, alpha=5.0).loss(vae.model, vae.guide, X[:8], Y[:8])
        unlabelled = SemiSupervisedELBO(vae, alpha=5.0).loss(vae.model, vae.guide, X[:8])
        enumerated = TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, X[:8])
    log_q = torch.log(vae.classify(X[:8]))[torch.arange(8), Y[:8]].sum()
    assert with_aux == pytest.approx(plain - 5.0 * float(log_q), rel=1e-5)
    assert unlabelled == pytest.approx(enumerated, rel=1e-6)
    with pytest.raises(InputError, match="alpha must be a finite number >= 0"):
        SemiSupervisedELBO(vae, alpha=-1)


# ---------------------------------------------------------------- fit
def test_fit_hands_labels_to_model_and_guide_and_m2_mixes_labelled_and_unlabelled_steps():
    y = data.balanced_labels(Y, 12, seed=0, classes=K)
    seen = Seen()
    history = fit(net(label_site=True), X, X[:20], y_train=y, y_test=Y[:20], epochs=2, batch_size=10,
                  progress=False, log=None, callbacks=[seen], aux_loss=10.0)
    per_epoch = len(seen.steps) // 2
    assert per_epoch == 12 // 10 + 1 + 48 // 10 + 1
    labelled = [s for s in seen.steps[:per_epoch] if s[1] is not None]
    assert sum(n for n, _ in labelled) == 12 and all(int(v) >= 0 for _, lab in labelled for v in lab)
    assert {"test_elbo", "test_accuracy", "train_loss"} <= set(history[-1])
    assert 0.0 <= history[-1]["test_accuracy"] <= 1.0


def test_fit_with_all_labels_unlabelled_only_and_a_conditional_vae():
    seen = Seen()
    fit(net(label_site=True), X, epochs=1, batch_size=20, progress=False, log=None, callbacks=[seen], y_train=Y)
    assert all(lab is not None for _, lab in seen.steps)  # labelled only
    seen = Seen()
    fit(net(label_site=True), X, epochs=1, batch_size=20, progress=False, log=None, callbacks=[seen])
    assert all(lab is None for _, lab in seen.steps)  # unlabelled only: the label summed out
    seen = Seen()
    history = fit(net(), X, X[:10], y_train=Y, y_test=Y[:10], epochs=1, batch_size=20, progress=False, log=None,
                  callbacks=[seen])
    assert all(lab is not None for _, lab in seen.steps) and "test_accuracy" not in history[-1]
    covariates = torch.rand(N, K, generator=torch.Generator().manual_seed(1))
    fit(net(), X, y_train=covariates, epochs=1, batch_size=20, progress=False, log=None)


def test_m2_learns_to_classify_from_few_labels_through_fit():
    """12 labels of 60 points whose classes differ in which pixels are on: the aux loss and the summed-out
    label teach q(y | x) far above chance (1/3)."""
    y = data.balanced_labels(Y, 12, seed=0, classes=K)
    history = fit(net(label_site=True), X, X, y_train=y, y_test=Y, epochs=12, batch_size=10, lr=1e-2,
                  progress=False, log=None, aux_loss=20.0)
    assert history[-1]["test_accuracy"] >= 0.9, [h["test_accuracy"] for h in history]


@pytest.mark.parametrize("kwargs, message", [
    (dict(y_train=Y[:10]), "y_train has 10 rows for 60 data points"),
    (dict(y_train=Y.float()), "y_train of an M2 VAE holds class labels"),
    (dict(y_train=Y + 5), "y_train must hold labels in 0..2, or -1"),
    (dict(y_train=[0] * N), "y_train must be a tensor"),
    (dict(y_train=Y, x_test=X[:5], y_test=torch.full((5,), -1)), "y_test must label every test point"),
    (dict(y_train=Y, elbo="meanfield"), "sums the label out with TraceEnum_ELBO"),
    (dict(y_train=Y, free_bits=0.5), "sums the label out with TraceEnum_ELBO"),
    (dict(y_train=Y, aux_loss=-2.0), "aux_loss .* must be a number >= 0"),
])
def test_bad_labels_for_m2_get_one_clear_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        fit(net(label_site=True), X, epochs=1, batch_size=20, progress=False, log=None, **kwargs)


def test_labels_for_a_plain_vae_and_missing_labels_for_a_conditional_one_are_refused():
    with pytest.raises(InputError, match="y_train was given to a VAE without conditioning"):
        fit(net(condition=0), X, y_train=Y, epochs=1, batch_size=20, progress=False, log=None)
    with pytest.raises(InputError, match="this VAE is conditional .* give y_train"):
        fit(net(), X, epochs=1, batch_size=20, progress=False, log=None)
    with pytest.raises(InputError, match="aux_loss trains the classifier q\\(y \\| x\\) of an M2 VAE"):
        fit(net(), X, y_train=Y, aux_loss=1.0, epochs=1, batch_size=20, progress=False, log=None)
    with pytest.raises(InputError, match="class labels must lie in 0..2"):
        fit(net(), X, y_train=Y + 1, epochs=1, batch_size=20, progress=False, log=None)


def test_a_resume_with_labels_is_bitwise():
    y = data.balanced_labels(Y, 12, seed=0, classes=K)
    saved = []

    def run(**kwargs):
        pyro.clear_param_store()
        vae = net(label_site=True)
        fit(vae, X, y_train=y, epochs=2, batch_size=10, progress=False, log=None, aux_loss=3.0,
            dynamic_binarize=True, **kwargs)
        return vae

    full = run()

    class StopAt(Callback):
        def on_step_end(self, loop, batch, loss):
            if loop.step == 9:
                saved.append(loop.state_dict())
                loop.should_stop = True

    run(callbacks=[StopAt()])
    resumed = run(state=saved[0])
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- the command line
def test_cli_trains_m2_with_balanced_labels_and_evaluate_reports_accuracy(idx_dir, tmp_path, capsys):
    import json

    from pyro_vae import cli
    from pyro_vae.train import RunConfig, load_labelled_splits

    out = tmp_path / "m2"
    assert cli.main(["train", "--data-dir", str(idx_dir), "--out", str(out), "--epochs", "2", "--labels", "40",
                     "--aux-loss", "10", "--val-size", "100", "--batch-size", "64", "--latent-dims", "4",
                     "--hidden", "32", "--no-progress"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= m["val_accuracy"] <= 1.0 for m in metrics)
    assert (out / "classes.png").is_file()
    config = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    (_, y_train), _, _ = load_labelled_splits(config, "cpu")
    assert torch.bincount(y_train[y_train >= 0], minlength=10).tolist() == [4] * 10  # balanced, 40 kept
    assert "validation accuracy" in capsys.readouterr().out  # each epoch's line
    assert cli.main(["evaluate", str(out), "--iw-samples", "3", "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["n"] == 128
    assert (out / "confusion.png").is_file()
    assert cli.main(["train", "--data-dir", str(idx_dir), "--out", str(tmp_path / "bad"), "--epochs", "1",
                     "--labels", "5", "--no-progress"]) == 2
    assert "labelled points must be a whole number from 10" in capsys.readouterr().err


def test_the_confusion_matrix_counts_true_rows_and_predicted_columns(tmp_path):
    from pyro_vae.plots import save_confusion

    counts = save_confusion(torch.tensor([0, 1, 1, 2, 2, 0]), torch.tensor([0, 1, 2, 2, 2, 1]),
                            tmp_path / "c.png", names=["a", "b", "c"])
    assert counts.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(InputError, match="two \\(N,\\) tensors"):
        save_confusion(torch.tensor([0, 1]), torch.tensor([0]), tmp_path / "d.png")


def test_review_fixes_labels_checks_and_records():
    from pyro_vae.plots import save_confusion
    from pyro_vae.train import _batches_per_epoch

    with pytest.raises(InputError, match="labels must be a non-empty integer tensor"):
        data.balanced_labels(Y.float(), 6)
    with pytest.raises(InputError, match="smallest class has 2 points; ask for at most 6 labels"):
        data.balanced_labels(torch.tensor([0] * 10 + [1] * 2 + [2] * 10), 9)
    assert data.balanced_labels(Y.to(torch.uint8), 6).dtype == torch.long  # no 255 for "unlabelled"
    with pytest.raises(InputError, match="give labelled data"):
        fit(net(label_site=True), X, aux_loss=5.0, epochs=1, batch_size=20, progress=False, log=None)
    with pytest.raises(InputError, match="y_test labels x_test, which was not given"):
        fit(net(), X, y_train=Y, y_test=Y, epochs=1, batch_size=20, progress=False, log=None)
    with pytest.raises(InputError, match="classes must lie in 0..1"):
        save_confusion(torch.tensor([0, 2]), torch.tensor([0, 1]), "/tmp/never.png", names=["a", "b"])
    history = fit(net(label_site=True), X, X[:10], y_train=Y, y_test=Y[:10], epochs=1, batch_size=20,
                  progress=False, log=None)
    assert "test_kl_y" in history[-1] and not [k for k in history[-1] if "units_y" in k]  # a label has no units
    labels = torch.full((N,), -1)
    labels[:7] = 0
    assert _batches_per_epoch(N, 10, labels) == 1 + 6 and _batches_per_epoch(N, 10) == 6
