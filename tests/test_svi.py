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


def _adam_norm_grad(params, grads_per_step, lr, betas=(0.9, 0.999), eps=1e-8):
    """The VampPrior paper's AdamNormGrad (utils/optimizer.py), transcribed: each tensor's gradient scaled to unit
    L2 norm, then Adam; ``params`` updated in place for each step's gradients."""
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step, grads in enumerate(grads_per_step, start=1):
        for p, g, (m, v) in zip(params, grads, state):
            g = g / (torch.norm(g, 2) + 1e-7)
            m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
            v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            size = lr * (1 - betas[1] ** step) ** 0.5 / (1 - betas[0] ** step)
            p.addcdiv_(m, v.sqrt().add_(eps), value=-size)


def test_adam_normgrad_takes_the_papers_steps_and_not_adams(images):
    from pyro_vae.svi import NormalizedGradAdam

    torch.manual_seed(0)
    vae = VAE(*nets.build("mlp", (1, 28, 28), 4, hidden=32), [4])
    start = [p.detach().clone() for p in vae.parameters()]
    svi = TorchOptimSVI(vae.model, vae.guide, Trace_ELBO(), lr=1e-2, optimizer="adam-normgrad")
    grads = []
    for _ in range(4):  # record each step's gradients (before the optimizer scales them) as the step takes them
        loss = svi._loss_and_grads(images[:32])
        grads.append([p.grad.detach().clone() for p in vae.parameters()])
        svi.optimizer.step()
        svi.optimizer.zero_grad(set_to_none=True)
    assert isinstance(svi.optimizer, NormalizedGradAdam) and loss > 0
    expected = [p.clone() for p in start]
    _adam_norm_grad(expected, grads, lr=1e-2)
    for p, e in zip(vae.parameters(), expected):
        assert torch.allclose(p.detach(), e, atol=1e-7)
    adam = [p.clone() for p in start]  # plain Adam on the same gradients goes elsewhere
    optimizer = torch.optim.Adam([torch.nn.Parameter(p) for p in adam], lr=1e-2)
    for step_grads in grads:
        for p, g in zip(optimizer.param_groups[0]["params"], step_grads):
            p.grad = g.clone()
        optimizer.step()
    moved = optimizer.param_groups[0]["params"]
    assert not all(torch.allclose(a.detach(), e, atol=1e-4) for a, e in zip(moved, expected))


def test_an_unknown_optimizer_is_refused_in_python_and_on_the_command_line():
    from pyro_vae import InputError, RunConfig

    with pytest.raises(InputError, match="unknown optimizer 'sgd'; choose one of: adam, adam-normgrad"):
        TorchOptimSVI(None, None, Trace_ELBO(), lr=1e-2, optimizer="sgd")
    with pytest.raises(InputError, match="unknown optimizer 'sgd'"):
        RunConfig(optimizer="sgd").validate()
    from pyro_vae.cli import train_config

    assert train_config(["--out", "x", "--optimizer", "adam-normgrad"]).optimizer == "adam-normgrad"
    assert RunConfig.from_dict({k: v for k, v in RunConfig().to_dict().items() if k != "optimizer"}).optimizer == "adam"


def test_a_run_resumes_with_its_own_optimizer_and_adam_normgrad_refuses_clipping(idx_dir, tmp_path):
    from pyro_vae import InputError, RunConfig
    from pyro_vae.train import train

    from test_train import small_config

    train(small_config(idx_dir, epochs=1, optimizer="adam-normgrad"), tmp_path / "run", progress=False,
          pictures=False)
    with pytest.raises(InputError, match="optimizer: run has 'adam-normgrad', asked 'adam'"):
        train(small_config(idx_dir, epochs=2), tmp_path / "run", resume=True, progress=False, pictures=False)
    with pytest.raises(InputError, match="adam-normgrad scales every gradient to unit norm.*--grad-clip 0"):
        RunConfig(optimizer="adam-normgrad", grad_clip=5.0).validate()
