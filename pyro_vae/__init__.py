"""pyro_vae: variational autoencoders written the Pyro way.

``VAE.model`` and ``VAE.guide`` are ordinary Pyro functions; hand them to
``pyro.infer.SVI``. Everything else (``fit``, ``evaluate``, the command line)
is a convenience built on exactly those two functions.
"""

from . import callbacks, chain, data, evaluate, likelihoods, nets, objectives, paper_hvae, posteriors, priors
from .errors import InputError
from .train import RunConfig, fit
from .vae import VAE

__all__ = ["VAE", "InputError", "RunConfig", "fit", "callbacks", "chain", "data", "evaluate", "likelihoods", "nets", "objectives",
           "paper_hvae", "posteriors", "priors"]
__version__ = "0.1.0"
