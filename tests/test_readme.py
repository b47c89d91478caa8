"""The README's Pyro snippet runs as written (one epoch on the real data)."""

import re
from pathlib import Path

import pyro

from conftest import needs_fashion_mnist

README = Path(__file__).resolve().parents[1] / "README.md"


@needs_fashion_mnist
def test_readme_snippet_trains():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    pyro.clear_param_store()
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    x = scope["x_test"][:500].bernoulli()
    assert scope["svi"].evaluate_loss(x) / 500 < 400  # trained: an untrained net scores about 550


@needs_fashion_mnist
def test_readme_chain_snippet_trains_with_warmup():
    first, chain = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:2]
    pyro.clear_param_store()
    scope = {}
    exec(compile(first.split("vae = VAE(")[0], "README.md", "exec"), scope)  # the imports and the data
    scope["batches"] = list(scope["data"].Batches(scope["x_train"][:2048], 256, scope["torch"].Generator(),
                                                  dynamic_binarize=True))
    exec(compile(chain, "README.md", "exec"), scope)
    vae = scope["vae"]
    assert vae.latent_dims == [16, 50] and vae.guide_order == "top-down"
    assert vae.kl_weight == 8 / 2350  # the warm-up's weight at the last of the 8 steps


def test_readme_swap_snippet_builds_and_steps():
    first, _, swap = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:3]
    pyro.clear_param_store()
    scope = {}
    exec(compile(first.split("x_train, _, x_test, _")[0], "README.md", "exec"), scope)  # the imports only
    exec(compile(swap, "README.md", "exec"), scope)
    vae, torch = scope["vae"], scope["torch"]
    assert type(vae.prior).__name__ == "MixtureOfGaussians" and type(vae.posterior).__name__ == "IAF"
    x = torch.rand(8, 1, 28, 28)
    assert torch.isfinite(torch.tensor(scope["svi"].step(x)))
