"""pyro_vae beside a user's other Pyro code: no shared hidden state, nothing silently stale, the user's
objects left as they were."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO
from pyro.optim import Adam
from pyro.poutine.util import is_validation_enabled
from torch import nn

from pyro_vae import VAE, InputError, evaluate, fit, likelihoods, nets
from pyro_vae.callbacks import Callback
from pyro_vae.objectives import FreeBitsELBO
from pyro_vae.svi import TorchOptimSVI

X_SHAPE = (1, 28, 28)


def _vae(**kw):
    return VAE(*nets.build("mlp", X_SHAPE, 4, hidden=16), [4], **kw)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _moved(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("svi_kind", ["pyro", "torch"])
def test_two_vaes_in_one_process_each_train_their_own_parameters(svi_kind, images):
    first, second = _vae(), _vae()  # no clear_param_store between them
    assert first.name != second.name
    x = images[:32]
    SVI(first.model, first.guide, Adam({"lr": 1e-3}), Trace_ELBO()).step(x)
    before_first, before_second = _snapshot(first), _snapshot(second)
    if svi_kind == "pyro":
        svi = SVI(second.model, second.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    else:
        svi = TorchOptimSVI(second.model, second.guide, Trace_ELBO(), 1e-2)
    losses = [svi.step(x) for _ in range(30)]
    assert _moved(before_second, second), "the second VAE did not train"
    assert not _moved(before_first, first), "training the second VAE moved the first"
    assert losses[-1] < losses[0]


def test_a_name_already_used_by_another_module_is_refused(images):
    a = _vae(name="mine")
    a.guide(images[:4])
    b = _vae(name="mine")
    with pytest.raises(InputError, match=r"param store already holds 'mine\$\$\$.*give this VAE another name"):
        b.guide(images[:4])
    _vae(name="other").guide(images[:4])  # another name is fine


def test_fit_leaves_the_param_store_and_pyros_validation_as_they_were(images):
    pyro.param("users_own", torch.tensor(3.0))
    seen = []

    class Watch(Callback):
        def on_step_end(self, loop, batch, loss):
            seen.append(is_validation_enabled())

    with pyro.validation_enabled(True):
        fit(_vae(), images[:64], epochs=1, batch_size=32, progress=False, log=None, callbacks=[Watch()])
        assert is_validation_enabled()
    assert seen == [True, True]
    assert "users_own" in pyro.get_param_store() and pyro.param("users_own").item() == 3.0


def test_a_jit_compiled_loss_refuses_a_changing_kl_weight(images):
    vae = _vae()
    x = images[:16]
    vae.kl_weight = 0.01
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), JitTrace_ELBO(ignore_jit_warnings=True))
    svi.step(x)
    vae.kl_weight = 0.01  # the same weight: fine
    with pytest.raises(InputError, match=r"JitTrace_ELBO compiled this VAE's loss with the KL scale 0.01.*"
                                         r"cannot follow kl_weight = 1"):
        vae.kl_weight = 1.0
    assert vae.kl_weight == 0.01
    vae.forget_compiled_scale()
    vae.kl_weight = 1.0
    # with Trace_ELBO the weight is read at every step
    plain = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    pyro.set_rng_seed(0)
    full = plain.evaluate_loss(x)
    vae.kl_weight = 0.01
    pyro.set_rng_seed(0)
    assert plain.evaluate_loss(x) < full - 1.0


def test_one_likelihood_serves_vaes_of_different_data_shapes(images):
    lik = likelihoods.Gaussian(mode="pixel")
    image_vae = VAE(*nets.build("mlp", X_SHAPE, 3, out_channels=2, hidden=16), [3], likelihood=lik)
    vector_vae = VAE(*nets.build("mlp", (20,), 3, out_channels=2, hidden=16), [3], likelihood=lik)
    assert vars(lik).get("event_dims") is None  # nothing written into the user's object
    for vae, x in ((image_vae, images[:5]), (vector_vae, torch.rand(5, 20)), (image_vae, images[:5])):
        trace = poutine.trace(poutine.replay(vae.model, trace=poutine.trace(vae.guide).get_trace(x))).get_trace(x)
        assert trace.nodes["x"]["fn"].event_shape == x.shape[1:]
        assert vae.reconstruct(x).shape == x.shape


class Flat(nn.Module):
    """A user's encoder with a width but no x_shape."""

    out_features = 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Softplus())

    def forward(self, x):
        return self.net(x.reshape(-1, *x.shape[-3:])).reshape(*x.shape[:-3], 16)


class Unflat(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 784)

    def forward(self, z):
        return self.net(z).reshape(*z.shape[:-1], 1, 28, 28)


def test_no_x_shape_is_needed_when_x_is_given(images):
    vae = VAE(Flat(), Unflat(), [4])
    assert vae.x_shape is None
    x = images[:8]
    loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert loss == loss and vae.reconstruct(x).shape == x.shape
    with pytest.raises(InputError, match="drawing x without data needs the shape of one data point: pass x_shape"):
        vae.sample(2)


def test_a_float64_vae_with_a_users_prior_follows_the_module(images):
    prior = dist.Normal(torch.zeros(4), torch.ones(4)).to_event(1)
    vae = VAE(*nets.build("mlp", X_SHAPE, 4, hidden=16), [4], prior=prior).double()
    x = images[:8].double()
    loss = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO()).step(x)
    assert loss == loss
    assert vae.prior().base_dist.loc.dtype == torch.float64
    assert prior.base_dist.loc.dtype == torch.float64  # the user's distribution moved with the module
    assert vae.sample(2).dtype == torch.float64


def test_a_parameter_created_after_the_first_step_is_trained():
    calls = []

    def model(x):
        calls.append(1)
        loc = pyro.param("late_loc", torch.tensor(0.0)) if len(calls) > 2 else torch.tensor(0.0)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pass

    svi = TorchOptimSVI(model, guide, Trace_ELBO(), lr=0.1)
    x = torch.full((10,), 5.0)
    for _ in range(30):
        svi.step(x)
    assert pyro.param("late_loc").item() > 1.0


def test_free_bits_floor_each_particle_the_same_vectorised_or_not():
    """Per particle: max(floor, mean over data of the sampled KL). For the same draws, vectorised and
    one-at-a-time particles give the same objective (before: the floor was of the mean over K*B)."""
    x = torch.zeros(6)

    def model(x):
        with pyro.plate("data", 6, dim=-1):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    drawn = []

    def guide(x):
        with pyro.plate("data", 6, dim=-1):
            drawn.append(pyro.sample("z", dist.Normal(1.0, 0.5)))

    floor = 0.9
    vectorised = FreeBitsELBO(floor, num_particles=400, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    loss_vec = vectorised.loss(model, guide, x)
    z = drawn[-1]  # (400, 6)
    assert z.shape == (400, 6)
    kl = dist.Normal(1.0, 0.5).log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z)
    expected = (torch.clamp(kl.mean(-1), min=floor) * 6).mean().item()
    pooled = max(floor, kl.mean().item()) * 6  # what flooring over K*B gave
    assert loss_vec == pytest.approx(expected, rel=1e-5)
    assert abs(expected - pooled) > 0.01  # the two rules differ for these draws
    drawn.clear()
    one_at_a_time = FreeBitsELBO(floor, num_particles=3, vectorize_particles=False)
    loss_seq = one_at_a_time.loss(model, guide, x)
    kls = [dist.Normal(1.0, 0.5).log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z) for z in drawn]
    assert len(kls) == 3 and kls[0].shape == (6,)
    assert loss_seq == pytest.approx(sum((torch.clamp(k.mean(), min=floor) * 6).item() for k in kls) / 3, rel=1e-5)


def test_evaluate_returns_the_vae_in_its_mode_and_a_users_outer_plate_is_respected(images):
    vae = _vae()
    vae.train()
    evaluate.evaluate(vae, images[:8], iw_samples=3, elbo_samples=2, progress=False)
    assert vae.training
    vae.eval()
    evaluate.evaluate(vae, images[:8], iw_samples=3, elbo_samples=2, progress=False)
    assert not vae.training
    assert evaluate.particle_dim(vae, images[:8]) == -2


def test_the_posterior_predictive_the_pyro_way(images):
    vae = _vae()
    x = images[:6].bernoulli()
    replayed = Predictive(vae.model, guide=vae.guide, num_samples=2)(x)["x"]
    assert torch.equal(replayed[0], x)  # an observed site returns the data
    drawn = Predictive(poutine.uncondition(vae.model), guide=vae.guide, num_samples=2)(x)["x"]
    assert drawn.shape == (2, *x.shape) and not torch.equal(drawn[0], x)


def test_the_data_plate_scales_to_the_full_data_size(images):
    vae = _vae()
    x = images[:8]
    guide_tr = poutine.trace(vae.guide).get_trace(x, size=80)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, size=80)
    assert model_tr.nodes["x"]["scale"] == 10.0 and guide_tr.nodes["z0"]["scale"] == 10.0
    pyro.set_rng_seed(0)
    batch = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(0)
    assert Trace_ELBO().loss(vae.model, vae.guide, x, size=80) == pytest.approx(10 * batch, rel=1e-5)
    with pytest.raises(InputError, match="cannot be below the batch's 8"):
        vae.model(x, size=4)


def test_fit_frees_what_it_registered_so_a_deleted_vae_is_freed(images):
    import gc
    import weakref

    before = set(pyro.get_param_store().keys())
    vae = _vae()
    fit(vae, images[:64], epochs=1, batch_size=32, progress=False, log=None)
    assert set(pyro.get_param_store().keys()) == before
    gone = weakref.ref(vae.encoder)
    del vae
    gc.collect()
    assert gone() is None
