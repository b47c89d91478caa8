"""The instruments of a hierarchical experiment (issue 20): the top-down guide's transitions computed
once per step, per-level KL shares comparable across guides, scale-free active units, and collapse
over training."""

import json
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, evaluate, nets
from pyro_vae import chain

X_SHAPE = (1, 28, 28)


def make_chain(dims, guide, hidden=32):
    enc, dec = nets.build("mlp", X_SHAPE, dims[-1], hidden=hidden)
    return VAE(enc, dec, dims, guide=guide, hidden=hidden)


def count_transition_calls(vae):
    calls = [0]
    for t in vae.transitions:
        t.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def loss_and_grads(vae, x, seed=1):
    vae.zero_grad()
    pyro.set_rng_seed(seed)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in vae.parameters()]


@pytest.mark.parametrize("particles", [1, 3])
def test_the_top_down_step_computes_each_transition_once(images, monkeypatch, particles):
    vae = make_chain([2, 3, 4, 5], "top-down")
    calls = count_transition_calls(vae)
    x = images[:8]
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert calls[0] == vae.levels  # once per level: the guide's merge, reused by the model
    loss.backward()
    grads = [p.grad.clone() for p in vae.parameters()]

    vae.zero_grad()
    monkeypatch.setattr(chain.TransitionMemo, "take", lambda self, level, parent, module: None)  # compute twice
    calls[0] = 0
    pyro.set_rng_seed(1)
    again = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert calls[0] == 2 * vae.levels
    again.backward()
    assert torch.equal(loss.detach(), again.detach())  # the same ELBO, the same gradients
    for g, h in zip(grads, (p.grad for p in vae.parameters())):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


def test_the_model_alone_or_conditioned_computes_its_own_transitions(images):
    vae = make_chain([2, 3, 4], "top-down")
    x = images[:5]
    calls = count_transition_calls(vae)
    tr = poutine.trace(vae.model).get_trace(x)  # no guide ran: nothing to reuse
    assert calls[0] == vae.levels
    vae.guide(x)  # the guide leaves its transitions for its own draws only
    z0 = torch.randn(5, 2)
    tr = poutine.trace(poutine.condition(vae.model, data={"z0": z0})).get_trace(x)
    expected = vae.transitions[0](z0)
    torch.testing.assert_close(tr.nodes["z1"]["fn"].base_dist.loc, expected.base_dist.loc)
    # an entry is taken once: replaying the same guide trace twice computes the second time
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    calls[0] = 0
    for _ in range(2):
        poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    assert calls[0] == vae.levels


def test_a_copy_of_a_vae_holds_no_kept_transition(images):
    import copy

    vae = make_chain([2, 3], "top-down")
    vae.guide(images[:3])
    assert vae._transitions_drawn._entries  # the guide kept p(z1 | z0) for the model
    twin = copy.deepcopy(vae)
    assert twin._transitions_drawn._entries == {}


# ---------------------------------------------------------------- per-level KL, comparable across guides
def exact_shares(mean, cov, blocks, x):
    """KL(p(z_0..z_l | x) || p(z_0..z_l)) - the same for l-1, per data point, in closed form."""
    from torch.distributions import MultivariateNormal, kl_divergence

    from linear_gaussian import conditional

    shares, previous = [], 0.0
    for level in range(len(blocks) - 1):
        top = slice(0, blocks[level].stop)
        joint = torch.distributions.MultivariateNormal(mean[top], cov[top, top])
        whole = [slice(0, blocks[level].stop), blocks[-1]]  # (z_0..z_l) given x, as one block
        post = conditional(mean, cov, [whole[0], blocks[-1]], 0, [(blocks[-1], x)])
        c = kl_divergence(MultivariateNormal(post.loc, post.covariance_matrix), joint)
        shares.append(c - previous)
        previous = c
    return torch.stack(shares, -1)  # (B, L + 1)


@pytest.mark.parametrize("guide", ["top-down", "bottom-up"])
def test_level_shares_of_the_kl_are_the_exact_ones_for_either_guide(guide):
    from evaluate_helpers import exact_chain_data

    vae, mean, cov, blocks, x = exact_chain_data([2, 3, 2], guide)
    exact = exact_shares(mean, cov, blocks, x).mean(0)
    pyro.set_rng_seed(0)
    terms = evaluate.elbo_terms(vae, x, num_samples=200, mixture=512)
    ours = torch.stack([terms[f"kl_z{level}"].mean() for level in range(3)])
    torch.testing.assert_close(ours, exact, rtol=0, atol=0.03)
    assert (exact > 0.05).all()  # every level carries information here
    torch.testing.assert_close(sum(terms[f"kl_z{level}"] for level in range(3)), terms["kl"], rtol=0, atol=1e-6)
    if guide == "bottom-up":  # its own per-site terms are not the shares (not KLs at all)
        raw = torch.stack([terms[f"logratio_z{level}"].mean() for level in range(3)])
        assert (raw - exact).abs().max() > 0.2
    else:
        assert not any(key.startswith("logratio_") for key in terms)


# ---------------------------------------------------------------- active units, scale-free
def rescale_level_one(vae, mean, cov, blocks, k):
    """The same model with z1 measured in units k times smaller (z1' = k z1): p(z1' | z0) and the
    decoder change, the data's distribution does not."""
    t = vae.transitions[0]
    t.a.mul_(k), t.c.mul_(k), t.s.mul_(k)
    vae.decoder.weight.data.div_(k)
    b = blocks[1]
    mean, cov = mean.clone(), cov.clone()
    mean[b] *= k
    cov[b, :] *= k
    cov[:, b] *= k
    return mean, cov


@pytest.mark.parametrize("guide", ["top-down", "bottom-up"])
def test_active_units_do_not_depend_on_the_scale_a_level_is_measured_in(guide):
    from linear_gaussian import exact_bottom_up_guide, exact_top_down_guide

    from evaluate_helpers import exact_chain_data

    vae, mean, cov, blocks, x = exact_chain_data([2, 3], guide, n=400)
    pyro.set_rng_seed(0)
    before = evaluate.active_units(vae, x, num_samples=20)
    mean, cov = rescale_level_one(vae, mean, cov, blocks, 0.01)
    vae.guide = (exact_top_down_guide if guide == "top-down" else exact_bottom_up_guide)(mean, cov, blocks)
    pyro.set_rng_seed(0)
    after = evaluate.active_units(vae, x, num_samples=20)
    for name in ("z0", "z1"):
        torch.testing.assert_close(after[name][1], before[name][1], rtol=0.05, atol=1e-3)
        assert after[name][0] == before[name][0]
    assert before["z1"][0] == 3  # every unit of z1 moves with x here
    # the variance of the posterior means alone (Burda et al.'s statistic) shrank 10 000-fold with the
    # units: a fixed threshold on it would call every unit of z1 inactive now
    from linear_gaussian import conditional

    raw = conditional(mean, cov, blocks, 1, [(blocks[-1], x)]).loc.var(0, unbiased=False)
    assert (raw < 0.01).all()


def test_a_level_that_only_follows_the_model_has_no_active_unit(monkeypatch):
    """q(z1 | z0, x) = p(z1 | z0): z1's posterior mean moves with x through z0 (Burda et al.'s
    statistic counts every unit), but the level adds nothing: activity 0, with either kind of draw."""
    from linear_gaussian import conditional

    from evaluate_helpers import exact_chain_data

    vae, mean, cov, blocks, x = exact_chain_data([2, 3], "top-down", n=3000)

    def collapsed(x, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            z0 = pyro.sample("z0", conditional(mean, cov, blocks, 0, [(blocks[-1], x)]))
            pyro.sample("z1", vae.transitions[0](z0))

    vae.guide = collapsed
    pyro.set_rng_seed(0)
    count, act = evaluate.active_units(vae, x, num_samples=10)["z1"]
    assert count == 0 and act.max() < 1e-3
    means = torch.stack([vae.transitions[0](conditional(mean, cov, blocks, 0, [(blocks[-1], x)]).sample()).base_dist.loc
                         for _ in range(10)]).mean(0)
    assert (means.var(0, unbiased=False) > 0.01).all()  # the old statistic: every unit "active"
    # read from the draws, as for a guide in another order: the draws' own noise is taken out
    monkeypatch.setattr(evaluate, "level_order", lambda vae, x, traces=None: "other")
    pyro.set_rng_seed(0)
    count, act = evaluate.active_units(vae, x, num_samples=10)["z1"]
    assert count == 0, act


def test_active_units_of_the_top_level_under_n01_are_burdas():
    from evaluate_helpers import exact_chain_data

    vae, mean, cov, blocks, x = exact_chain_data([3], "top-down", n=300)
    count, activity = evaluate.active_units(vae, x)["z0"]
    from linear_gaussian import conditional

    post_means = conditional(mean, cov, blocks, 0, [(blocks[-1], x)]).loc
    torch.testing.assert_close(activity, post_means.var(0, unbiased=False))
    assert count == int((post_means.var(0, unbiased=False) > 0.01).sum())


# ---------------------------------------------------------------- collapse over training
@pytest.mark.parametrize("guide", ["top-down", "bottom-up"])
def test_every_epoch_records_each_levels_kl_active_units_and_unit_kl(images, guide):
    from pyro_vae import fit

    vae = make_chain([2, 3], guide)
    history = fit(vae, images[:64], images[64:96], epochs=2, batch_size=32, progress=False, log=None)
    for record in history:
        assert all(math.isfinite(record[f"test_kl_{name}"]) for name in ("z0", "z1"))
        for name, d in (("z0", 2), ("z1", 3)):
            assert 0 <= record[f"test_active_units_{name}"] <= d
        if guide == "top-down":  # per unit where q and p are diagonal Gaussians drawn in the model's order
            assert len(record["test_unit_kl_z1"]) == 3
            assert sum(record["test_unit_kl_z1"]) == pytest.approx(record["test_kl_z1"], abs=1e-3)
        else:
            assert "test_unit_kl_z1" not in record


def test_the_per_epoch_active_units_are_those_of_active_units(images):
    """The epoch's count and evaluate.active_units agree where the guide's first level is exact."""
    vae = make_chain([3], "top-down")
    x = images[:50]
    pyro.set_rng_seed(0)
    terms = evaluate.elbo_terms(vae, x, num_samples=1, moments=True)
    record = evaluate.level_record(terms, "val", threshold=1e-4)
    count, activity = evaluate.active_units(vae, x, num_samples=1, threshold=1e-4)["z0"]
    assert record["val_active_units_z0"] == count
    torch.testing.assert_close(evaluate.activity(terms["residual_z0"], terms["within_z0"]), activity)


def test_a_chain_run_draws_its_levels_kl_over_epochs(tmp_path, idx_dir):
    from pyro_vae.train import RunConfig, train

    config = RunConfig(data_dir=str(idx_dir), latent_dims=[2, 3], guide="top-down", hidden=16, epochs=2,
                       batch_size=128)
    train(config, tmp_path / "run", progress=False)
    png = tmp_path / "run" / "kl_levels.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"test_kl_z0", "test_kl_z1", "test_active_units_z0", "test_active_units_z1"} <= set(last)


# ---------------------------------------------------------------- KL balancing (NVAE)
def test_balance_weights_levels_by_their_kl_per_unit_and_average_one():
    from pyro_vae.objectives import balance

    kls = {"z0": torch.full((4,), 2.0), "z1": torch.full((4,), 0.0), "z2": torch.full((4,), -8.0)}
    gammas = balance(kls, {"z0": 2, "z1": 2, "z2": 4})
    s = {"z0": 2.01 / 1, "z1": 0.01 / 1, "z2": 8.01 / 2}
    mean = sum(s.values()) / 3
    for name in kls:
        assert float(gammas[name]) == pytest.approx(s[name] / mean)
    assert float(sum(gammas.values())) == pytest.approx(3.0)


def _losses(vae, x, elbo, weight, seed=2):
    vae.kl_weight = weight
    vae.zero_grad()
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in vae.parameters()]


def test_balanced_kl_is_the_elbo_after_the_warm_up_and_reweights_during_it(images):
    from pyro_vae.objectives import BalancedKLELBO, balance

    vae = make_chain([2, 3, 4], "top-down")
    x = images[:16]
    plain, grads = _losses(vae, x, Trace_ELBO(), 1.0)
    balanced, grads_b = _losses(vae, x, BalancedKLELBO(vae), 1.0)
    assert torch.equal(plain, balanced)
    for g, h in zip(grads, grads_b):
        torch.testing.assert_close(g, h)
    # during the warm-up: -log p(x | z) + w * sum_l gamma_l KL_l at the same draws
    loss, _ = _losses(vae, x, BalancedKLELBO(vae), 0.1)
    vae.kl_weight = 0.1
    pyro.set_rng_seed(2)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    guide_tr.compute_log_prob(), model_tr.compute_log_prob()
    kls = {f"z{l}": guide_tr.nodes[f"z{l}"]["unscaled_log_prob"] - model_tr.nodes[f"z{l}"]["unscaled_log_prob"]
           for l in range(3)}
    gammas = balance(kls, {"z0": 2, "z1": 3, "z2": 4})
    expected = -model_tr.nodes["x"]["log_prob_sum"] + 0.1 * sum(gammas[n] * kls[n].sum() for n in kls)
    torch.testing.assert_close(loss, expected.detach())
    assert not torch.allclose(loss, _losses(vae, x, Trace_ELBO(), 0.1)[0])


def test_kl_balance_trains_and_its_settings_are_checked(tmp_path, idx_dir):
    from pyro_vae import InputError
    from pyro_vae.train import RunConfig, train

    config = RunConfig(data_dir=str(idx_dir), latent_dims=[2, 3], guide="top-down", hidden=16, epochs=2,
                       batch_size=128, kl_warmup=4, kl_balance=True)
    _, history = train(config, tmp_path / "run", progress=False, pictures=False)
    assert all(math.isfinite(r["train_loss"]) for r in history)
    with pytest.raises(InputError, match="KL balancing acts during the KL warm-up only"):
        RunConfig(data_dir=str(idx_dir), kl_balance=True).validate()
    with pytest.raises(InputError, match="choose one"):
        RunConfig(data_dir=str(idx_dir), kl_balance=True, kl_warmup=4, free_bits=1.0).validate()


def test_a_step_whose_optimizer_holds_the_parameters_does_not_register_them_again(images, monkeypatch):
    from pyro.infer import SVI
    from pyro.optim import Adam

    from pyro_vae.svi import TorchOptimSVI

    vae = make_chain([2, 3, 4], "top-down")
    x = images[:8]
    calls = []
    real = pyro.module
    monkeypatch.setattr(pyro, "module", lambda name, module, **kw: calls.append(name) or real(name, module, **kw))
    svi = TorchOptimSVI(vae.model, vae.guide, Trace_ELBO(), 1e-3)
    svi.step(x)
    assert calls == [vae.name, vae.name]  # the first step captures the parameters: guide and model register
    before = [p.detach().clone() for p in vae.parameters()]
    svi.step(x)
    svi.step(x)
    assert len(calls) == 2  # then the optimizer holds them: no pyro.param for each of them at every call
    assert all(not torch.equal(a, b) for a, b in zip(before, vae.parameters()) if b.requires_grad)
    # Pyro's own SVI records the parameters at every step: there the VAE registers at every call
    pyro_svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    before = [p.detach().clone() for p in vae.parameters()]
    pyro_svi.step(x)
    pyro_svi.step(x)
    assert len(calls) == 6
    assert all(not torch.equal(a, b) for a, b in zip(before, vae.parameters()))


def test_skipping_the_registration_leaves_frozen_parameters_frozen(images):
    from pyro_vae.svi import TorchOptimSVI

    vae = make_chain([2, 3], "top-down")
    vae.encoder.requires_grad_(False)  # the first parameters in named_parameters()
    frozen = [p.detach().clone() for p in vae.encoder.parameters()]
    svi = TorchOptimSVI(vae.model, vae.guide, Trace_ELBO(), 1e-2)
    with pytest.warns(UserWarning, match="requires_grad=False"):
        for _ in range(3):
            svi.step(images[:8])
    assert not any(p.requires_grad for p in vae.encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen, vae.encoder.parameters()))


def test_a_parameter_unfrozen_after_the_first_steps_is_trained(images):
    from pyro_vae.svi import TorchOptimSVI

    vae = make_chain([2, 3], "top-down")
    vae.decoder.requires_grad_(False)
    svi = TorchOptimSVI(vae.model, vae.guide, Trace_ELBO(), 1e-2)
    with pytest.warns(UserWarning, match="requires_grad=False"):
        for _ in range(3):
            svi.step(images[:8])
    vae.decoder.requires_grad_(True)  # fine-tuning: the decoder joins now
    before = [p.detach().clone() for p in vae.decoder.parameters()]
    for _ in range(3):
        svi.step(images[:8])
    assert all(not torch.equal(a, b) for a, b in zip(before, vae.decoder.parameters()))
    held = {id(p) for group in svi.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in vae.parameters())


def test_a_kept_transition_is_not_reused_under_other_weights_or_grad_mode(images):
    vae = make_chain([2, 3], "top-down")
    x = images[:5]
    with torch.no_grad():  # z drawn without gradients, then the model scored with them
        guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    model_tr.log_prob_sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.transitions.parameters())
    # weights changed in place between the guide and the model: the model computes p(z1 | z0) afresh
    z0 = poutine.trace(vae.guide).get_trace(x).nodes["z0"]["value"]
    with torch.no_grad():
        for p in vae.transitions.parameters():
            p.add_(0.5)
    tr = poutine.trace(poutine.condition(vae.model, data={"z0": z0})).get_trace(x)
    torch.testing.assert_close(tr.nodes["z1"]["fn"].base_dist.loc, vae.transitions[0](z0).base_dist.loc)


def test_kl_balancing_follows_the_warm_up_weight_alone(images):
    """Not the sites' scale, which also holds beta and a subsampled plate's N/B."""
    from pyro_vae.objectives import BalancedKLELBO

    x = images[:16]
    vae = make_chain([2, 3], "top-down")
    vae.beta = 0.5  # after the warm-up: the ELBO with beta, no balancing
    torch.testing.assert_close(_losses(vae, x, BalancedKLELBO(vae), 1.0)[0], _losses(vae, x, Trace_ELBO(), 1.0)[0])
    vae.beta = 1.0

    def scaled(elbo, weight):  # a minibatch of a data set ten times its size: every site scaled by 10
        vae.kl_weight = weight
        pyro.set_rng_seed(2)
        return elbo.differentiable_loss(vae.model, vae.guide, x, size=10 * x.shape[0]).detach()

    assert not torch.allclose(scaled(BalancedKLELBO(vae), 0.5), scaled(Trace_ELBO(), 0.5))  # still balancing
    torch.testing.assert_close(scaled(BalancedKLELBO(vae), 1.0), scaled(Trace_ELBO(), 1.0))


def test_kl_balancing_is_refused_for_the_bottom_up_guide_of_a_chain(images):
    from pyro_vae import InputError, fit

    vae = make_chain([2, 3], "bottom-up")
    with pytest.raises(InputError, match="bottom-up guide's per-level terms are not KLs"):
        fit(vae, images[:32], epochs=1, batch_size=16, kl_warmup=4, kl_balance=True, progress=False, log=None)


# ---------------------------------------------------------------- review fixes (items 5-7 and the CLI)
def test_pictures_leave_the_vaes_mode_and_the_callers_random_stream(images, tmp_path):
    from pyro_vae import plots

    vae = make_chain([2, 3], "top-down")
    for draw in (lambda: plots.save_samples(vae, tmp_path / "s.png", n=4),
                 lambda: plots.save_levels(vae, images[:2], tmp_path / "l.png", images=1, samples=2),
                 lambda: plots.save_reconstructions(vae, images[:4], tmp_path / "r.png", n=4)):
        vae.train()
        state = torch.get_rng_state()
        draw()
        assert vae.training and torch.equal(state, torch.get_rng_state())


def test_sample_counts_are_checked(images):
    from pyro_vae import InputError

    vae = make_chain([2, 3], "top-down")
    assert vae.sample(torch.tensor(2)).shape[0] == 2
    for n in (2.5, -1, 0, True):
        with pytest.raises(InputError, match="number of draws must be a positive integer"):
            vae.sample(n)


def test_a_weight_average_used_again_starts_again_and_refuses_another_decay(images):
    from pyro_vae import InputError, callbacks, fit

    ema = callbacks.WeightAverage(0.5)
    vae = make_chain([2, 3], "top-down")
    fit(vae, images[:32], epochs=1, batch_size=16, progress=False, log=None, callbacks=[ema])
    assert ema.updates == 2
    fresh = make_chain([2, 3], "top-down")
    start = {k: v.clone() for k, v in fresh.state_dict().items()}
    skip_all = callbacks.GradientSkip(1e-12)  # no update: the average must stay at this run's start
    fit(fresh, images[:32], epochs=1, batch_size=16, progress=False, log=None, callbacks=[skip_all, ema])
    assert ema.updates == 0  # counted from this run's start, not the last one's
    for k, v in start.items():
        torch.testing.assert_close(ema.weights[k], v)
    state = ema.state_dict()
    with pytest.raises(InputError, match="decay 0.5, this part 0.9"):
        callbacks.WeightAverage(0.9).load_state_dict(state)


def test_a_run_trained_on_cuda_is_read_on_a_cpu_only_machine(tmp_path, idx_dir, capsys):
    """The saved device is where the run trained, not a request: --device cpu (or auto, the default) reads
    it anywhere."""
    from pyro_vae import cli
    from pyro_vae.checkpoints import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--data-dir", str(idx_dir), "--latent-dims", "2,3",
                     "--guide", "top-down", "--hidden", "16", "--epochs", "1", "--batch-size", "128",
                     "--no-progress"]) in (0, None)
    payload = load_checkpoint(run / "checkpoint.pt")
    payload["config"]["device"] = "cuda"
    save_checkpoint(run / "checkpoint.pt", payload)
    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU reads it without --device")
    assert cli.main(["evaluate", str(run), "--device", "cpu", "--iw-samples", "2", "--limit", "8",
                     "--no-progress"]) in (0, None)
    assert cli.main(["sample", str(run), "--device", "cpu", "--n", "4", "--out", str(tmp_path / "s.png")]) in (0, None)
    assert (tmp_path / "s.png").exists()
    capsys.readouterr()  # without --device: auto, the CPU here (issue 17), not the run's CUDA
    assert cli.main(["evaluate", str(run), "--iw-samples", "2", "--limit", "8", "--no-progress"]) in (0, None)
    assert json.loads((run / "eval.json").read_text())["device"] == "cpu"  # auto chose the CPU
    assert cli.main(["evaluate", str(run), "--device", "cuda", "--iw-samples", "2", "--no-progress"]) == 2
    assert "use --device cpu" in capsys.readouterr().err
