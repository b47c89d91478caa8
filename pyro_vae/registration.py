"""Whether the modules' parameters must be registered in Pyro's param store at this call.

``pyro.module(name, module)`` inside a ``model``/``guide`` puts every parameter
through ``pyro.param`` at every call, so that whoever traces the call for its
parameters (``pyro.infer.SVI.step`` does at every step) finds them. For a deep
chain that is hundreds of ``pyro.param`` calls a step. Inside a step of
:class:`~pyro_vae.svi.TorchOptimSVI` whose optimizer already holds every
parameter it captured (its steady state: a step after the capturing one, the
param store no larger than then), nobody records them: a module that has
registered once in this param store, with as many trainable parameters as it
has now, may put just one of them through ``pyro.param`` (what Pyro's ELBOs
need to call ``backward`` at all).
"""

import contextlib
import contextvars

_HELD = contextvars.ContextVar("pyro_vae_parameters_held", default=False)


def held():
    """True inside :func:`held_by_optimizer`: the step's parameters are already in its optimizer."""
    return _HELD.get()


@contextlib.contextmanager
def held_by_optimizer():
    """Within: the running step's optimizer holds every parameter (see the module's doc)."""
    token = _HELD.set(True)
    try:
        yield
    finally:
        _HELD.reset(token)
