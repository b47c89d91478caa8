"""TorchOptimSVI takes the same steps as pyro.infer.SVI with pyro.optim.Adam."""

import copy

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, nets
from pyro_vae.svi import NonFiniteStep, TorchOptimSVI


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_same_steps_as_pyro_svi(elbo, images):
    torch.manual_seed(0)
    ours = VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=32), [4])
    theirs = copy.deepcopy(ours)
    x = images[:32]
    svi = TorchOptimSVI(ours.model, ours.guide, elbo(), lr=1e-2)
    pyro.set_rng_seed(1)
    our_losses = [svi.step(x) for _ in range(5)]
    pyro.clear_param_store()
    reference = SVI(theirs.model, theirs.guide, Adam({"lr": 1e-2}), loss=elbo())
    pyro.set_rng_seed(1)
    their_losses = [reference.step(x) for _ in range(5)]
    assert our_losses == pytest.approx(their_losses, rel=1e-5)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert len(svi.optimizer.param_groups[0]["params"]) == len(list(ours.parameters()))


def test_non_finite_loss_applies_no_update(images):
    vae = VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=16), [4])
    svi = TorchOptimSVI(vae.model, vae.guide, Trace_ELBO(), lr=1e-2)
    svi.step(images[:8])
    before = copy.deepcopy(vae.state_dict())
    with torch.no_grad():
        vae.decoder.net[-1].bias[0] = float("nan")
    before["decoder.net.2.bias"][0] = float("nan")
    with pyro.validation_enabled(False), pytest.raises(NonFiniteStep):
        svi.step(images[:8])
    for (name, a), b in zip(vae.state_dict().items(), before.values()):
        assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True), name
    assert all(p.grad is None for p in vae.parameters())
