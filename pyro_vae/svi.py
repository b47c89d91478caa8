"""One SVI step driven by a single ``torch.optim`` optimizer.

:class:`TorchOptimSVI` does what ``pyro.infer.SVI.step`` does — the ELBO's
``loss_and_grads(model, guide, *args)``, then an optimizer step on every
parameter the model and guide touched, then zeroed gradients — with two
differences that only change speed:

* the parameters are captured on the first step, and again only when Pyro's
  param store has grown (``pyro.infer.SVI`` re-captures them on every step);
* one ``torch.optim.Adam`` (fused on CUDA) updates them all, where
  ``pyro.optim.Adam`` keeps one optimizer per parameter.

Same math: Adam is applied per element either way. Every step also checks
that the loss and the total gradient norm are finite (and clips the norm if
asked); a step that fails the check changes nothing. A predicate
``skip_if(grad_norm)`` (set by :class:`~pyro_vae.callbacks.GradientSkip`) may
also veto a finite step: gradients are dropped, nothing else changes.
"""

import math

import pyro
import pyro.poutine as poutine
import torch

from . import registration


def make_optimizer(params, lr):
    """``torch.optim.Adam(params, lr)``, fused when every parameter is on a CUDA device."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


class NonFiniteStep(ArithmeticError):
    """The step's loss or gradients were NaN or infinite; no update was applied.

    ``args``: ``(loss, grad_norm)``.
    """


class TorchOptimSVI:
    """Stochastic variational inference on a Pyro ``model``/``guide`` pair.

    Args:
        model, guide: Pyro functions taking the same arguments.
        elbo: a Pyro ELBO (``Trace_ELBO``, ``TraceMeanField_ELBO``, ``JitTrace_ELBO``, ...).
        lr: Adam learning rate.
        grad_clip: clip the total gradient norm to this (``None``: no clipping).

    Attributes:
        skip_if: ``None`` or a predicate ``grad_norm -> bool`` asked on every
            finite step with the total gradient norm (before clipping); when it
            says ``True`` the update is skipped: no parameter and no optimizer
            state changes, and ``step`` still returns the loss.
        updated: whether the last :meth:`step` applied an update.
    """

    def __init__(self, model, guide, elbo, lr, grad_clip=None):
        self.model, self.guide, self.elbo, self.lr = model, guide, elbo, lr
        self.max_norm = float(grad_clip) if grad_clip else math.inf
        self.optimizer = None
        self._pending_state = None
        self._store_size = None
        self.skip_if, self.updated = None, False

    def step(self, *args, **kwargs):
        """One gradient step; returns the loss that ``elbo`` trains on, a float (the negative ELBO of the
        batch for ``Trace_ELBO``; with :class:`~pyro_vae.objectives.FreeBitsELBO` its objective).

        Parameters are captured on the first step, and again on any step at
        which Pyro's param store has grown (a parameter created after the
        first step, by a lazy module or a piece built on first use, joins the
        optimizer there).

        A finite step that ``skip_if`` vetoes returns its loss with
        ``updated`` False: gradients are dropped, nothing else changes.

        Raises:
            NonFiniteStep: the loss or the gradient norm was not finite;
                gradients are dropped and no parameter changes.
        """
        self.updated = False
        store = pyro.get_param_store()
        if self.optimizer is None or len(store) != self._store_size:
            with poutine.trace(param_only=True) as capture:
                loss = self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs)
            self._capture([site["value"].unconstrained() for site in capture.trace.nodes.values()])
            self._store_size = len(store)
        else:
            with registration.held_by_optimizer():  # nothing re-registers what the optimizer holds
                loss = self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs)
        if self.optimizer is None:  # nothing to train yet (no parameter has been created)
            return loss
        grad_norm = self._grad_norm() if math.isfinite(loss) else loss
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(loss, grad_norm)
        if self.skip_if is None or not self.skip_if(grad_norm):
            self.optimizer.step()
            self.updated = True
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _capture(self, params):
        """Create the optimizer over ``params``, or add those it does not hold yet."""
        params = list(dict.fromkeys(params))
        if self.optimizer is None and not params:
            return
        if self.optimizer is None:
            self.optimizer = make_optimizer(params, self.lr)
            if self._pending_state is not None:
                self.optimizer.load_state_dict(self._pending_state)
                self._pending_state = None
            return
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        new = [p for p in params if id(p) not in known]
        if new:
            self.optimizer.add_param_group({"params": new})

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _grad_norm(self):
        params = self._params()
        if math.isinf(self.max_norm):  # only measure: clip_grad_norm_ would also rescale every gradient by 1
            return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        return float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))

    def state_dict(self):
        """The optimizer's state (``{}`` before the first step)."""
        if self.optimizer is None:
            return self._pending_state or {}
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        """Restore an optimizer state; applied when the first step creates the optimizer."""
        if not state:
            return
        if self.optimizer is None:
            self._pending_state = state
        else:
            self.optimizer.load_state_dict(state)
