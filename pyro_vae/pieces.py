"""The one check of what a VAE's pieces hand to Pyro: a distribution with the shape its site needs.

A prior, a transition p(z_l | parent), a posterior head q(z_l | features) and a likelihood p(x | decoder
output) each return a Pyro distribution for one sample site inside the ``"data"`` plate. A user's own
piece that returns something else, or a distribution of the wrong shape (a forgotten ``.to_event``, a
decoder whose output does not have the data's shape), would fail deep inside Pyro with a message about
plates and dims. :func:`check_distribution` says instead, in one line, which piece, what it returned
and what the site needs; :class:`~pyro_vae.VAE` runs it on every piece at its first ``model`` and
first ``guide`` call (and the wrappers of a user's prior and likelihood use it too).
"""

import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.poutine.messenger import Messenger

from .errors import InputError


def check_distribution(d, who, event_shape, batch=None):
    """Raise :class:`InputError` unless ``d`` is a Pyro distribution with ``event_shape`` whose batch shape
    fits a ``"data"`` plate of ``batch`` points (its last batch dim ``batch`` or 1; no batch dims is fine).

    Args:
        d: what the piece returned.
        who: the piece, as the message should name it (e.g. ``"transitions[0], p(z1 | z0),"``).
        event_shape: the event shape the site needs, e.g. ``(D,)`` or ``x_shape``.
        batch: the plate's size ``B``, or ``None`` for a piece outside the plate (a prior: batch shape ``()``).

    Returns:
        ``d``.
    """
    if not isinstance(d, TorchDistributionMixin):
        kind = "a torch.distributions object, not a Pyro one" if isinstance(d, torch.distributions.Distribution) \
            else type(d).__name__
        raise InputError(f"{who} must return a Pyro distribution, got {kind}; build it with pyro.distributions "
                         "(e.g. dist.Normal(loc, scale).to_event(1))")
    event, shape = tuple(d.event_shape), tuple(d.batch_shape)
    expected = tuple(event_shape)
    fits_batch = (shape == ()) if batch is None else (not shape or shape[-1] == batch or shape == (1,))
    if event == expected and fits_batch:
        return d
    needs = f"event shape {expected}" + (" and batch shape ()" if batch is None else f" (one per data point, "
                                                                                     f"batch shape ({batch},))")
    hint = ""
    if event != expected and (shape + event)[-len(expected):] == expected and len(event) < len(expected):
        hint = f"; add .to_event({len(expected) - len(event)})"
    elif event != expected:
        hint = "; check the network that makes its parameters (its output's shape)"
    raise InputError(f"{who} returned a distribution with event shape {event} and batch shape {shape}, but its "
                     f"site needs {needs}{hint}")


class SiteShapes(Messenger):
    """Within (entered inside the ``"data"`` plate, so that it sees each distribution before the plate
    broadcasts it): every sample site named in ``pieces`` has its distribution checked by
    :func:`check_distribution`.

    Args:
        pieces: ``{site name: (who, event shape)}``.
        batch: the plate's size.
    """

    def __init__(self, pieces, batch):
        super().__init__()
        self.pieces, self.batch = pieces, batch

    def _pyro_sample(self, msg):
        spec = self.pieces.get(msg["name"])
        if spec is not None:
            check_distribution(msg["fn"], spec[0], spec[1], self.batch)
