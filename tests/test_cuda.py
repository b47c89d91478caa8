"""CUDA: everything follows the device of the data and the module. Skipped where no GPU exists."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, evaluate, fit, likelihoods, nets
from pyro_vae.train import RunConfig, load_run, train

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def make_vae(arch, likelihood="bernoulli"):
    lik = likelihoods.Gaussian(0.5) if likelihood == "gaussian" else likelihoods.Bernoulli()
    return VAE(*nets.build(arch, (1, 28, 28), 4, hidden=64), [4], likelihood=lik).to(CUDA)


def tensors_of(site):
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return [site["value"]] + [v for v in vars(fn).values() if torch.is_tensor(v)]


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_every_site_lives_on_the_gpu(arch, images):
    vae = make_vae(arch)
    x = images[:8].to(CUDA)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    for trace in (guide_tr, model_tr):
        for name, site in trace.nodes.items():
            if site["type"] == "sample":
                assert all(t.device.type == "cuda" for t in tensors_of(site)), name
    assert vae.model(None, batch_size=3).device.type == "cuda"
    assert vae.sample(3).device.type == "cuda"


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO,
                                  lambda: JitTrace_ELBO(ignore_jit_warnings=True),
                                  lambda: Trace_ELBO(num_particles=4, vectorize_particles=True,
                                                     max_plate_nesting=1)])
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_svi_on_the_gpu_lowers_the_loss(arch, elbo, images):
    pyro.set_rng_seed(0)
    vae = make_vae(arch, "gaussian")
    svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), loss=elbo())
    x = images[:64].to(CUDA)
    losses = [svi.step(x) for _ in range(40)]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_fit_and_evaluate_on_the_gpu(images):
    vae = make_vae("mlp")
    x = images.to(CUDA)
    history = fit(vae, x, x[:32], epochs=2, batch_size=32, dynamic_binarize=True, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    summary = evaluate.evaluate(vae, x[:16], iw_samples=50, progress=False)
    assert summary["iw_log_likelihood"] > summary["elbo"]


def test_train_run_on_the_gpu_and_reload(idx_dir, tmp_path):
    config = RunConfig(data_dir=str(idx_dir), hidden=64, latent_dims=[4], batch_size=64, epochs=1, device="cuda")
    train(config, tmp_path / "run", progress=False)
    vae, _ = load_run(tmp_path / "run")
    assert vae.device.type == "cuda"
    cpu_vae, _ = load_run(tmp_path / "run", device="cpu")
    assert cpu_vae.device.type == "cpu"


@pytest.mark.parametrize("guide", ["bottom-up", "top-down"])
def test_a_chain_on_the_gpu(guide, images, tmp_path):
    from pyro_vae import plots

    pyro.set_rng_seed(0)
    vae = VAE(*nets.build("mlp", (1, 28, 28), 6, hidden=64), [3, 4, 6], guide=guide, hidden=32).to(CUDA)
    x = images.to(CUDA)
    guide_tr = poutine.trace(vae.guide).get_trace(x[:8])
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x[:8])
    for trace in (guide_tr, model_tr):
        for name, site in trace.nodes.items():
            if site["type"] == "sample":
                assert all(t.device.type == "cuda" for t in tensors_of(site)), name
    history = fit(vae, x, x[:32], epochs=2, batch_size=32, dynamic_binarize=True, kl_warmup=3,
                  free_bits=0.1, progress=False, log=None)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    summary = evaluate.evaluate(vae, x[:16], iw_samples=20, progress=False)
    assert {"kl_z0", "kl_z1", "kl_z2", "active_units_z2"} <= set(summary)
    assert vae.resample_below(x[:2], 1, 3).device.type == "cuda"
    plots.save_levels(vae, x, tmp_path / "levels.png")


@pytest.mark.parametrize("prior, posterior", [("mog:3", "iaf:2"), ("vamp:5", "gaussian"), ("flow:2", "iaf:1"),
                                              ("learned", "gaussian")])
@pytest.mark.parametrize("guide", ["bottom-up", "top-down"])
def test_priors_and_posteriors_on_the_gpu(prior, posterior, guide, images):
    from pyro_vae import posteriors, priors

    if prior.startswith("vamp") and guide == "bottom-up":
        dims = [6]  # the VampPrior needs q(z0 | x) in closed form: one level with the bottom-up guide
    else:
        dims = [3, 6]
    pyro.set_rng_seed(0)
    vae = VAE(*nets.build("mlp", (1, 28, 28), 6, hidden=64), dims, guide=guide, hidden=32,
              prior=priors.from_name(prior), posterior=posteriors.from_name(posterior)).to(CUDA)
    x = images.to(CUDA)
    history = fit(vae, x, x[:32], epochs=2, batch_size=32, dynamic_binarize=True, progress=False, log=None)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    summary = evaluate.evaluate(vae, x[:16], iw_samples=20, progress=False)
    assert summary["iw_log_likelihood"] > summary["elbo"] - 1.0
    assert vae.reconstruct(x[:4]).device.type == "cuda" and vae.sample(3).device.type == "cuda"


@pytest.mark.parametrize("name", ["poisson", "nb", "zinb"])
def test_count_likelihoods_and_sparse_batches_on_the_gpu(name):
    import scipy.sparse

    from pyro_vae import data

    counts = torch.distributions.Poisson(torch.full((64, 20), 3.0)).sample()
    lik = likelihoods.from_name(name)
    vae = VAE(nets.MLPEncoder((20,), hidden=(32,)), nets.MLPDecoder(4, (20,), hidden=(32,), out_channels=lik.channels),
              [4], likelihood=lik).to(CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    batches = data.Batches(scipy.sparse.csr_matrix(counts.numpy()), 16, generator)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [sum(svi.step(xb) for xb in batches) for _ in range(10)]
    assert all(xb.device.type == "cuda" for xb in batches)
    assert losses[-1] < losses[0]
    assert evaluate.iw_log_likelihood(vae, counts.to(CUDA), num_samples=10).device.type == "cuda"
