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
