"""One SVI step driven by a single ``torch.optim`` optimizer.

:class:`TorchOptimSVI` does what ``pyro.infer.SVI.step`` does — the ELBO's
``loss_and_grads(model, guide, *args)``, then an optimizer step on every
parameter the model and guide touched, then zeroed gradients — with two
differences that only change speed:

* the parameters are captured on the first step, and again only when Pyro's
  param store has grown (``pyro.infer.SVI`` re-captures them on every step);
* one ``torch.optim.Adam`` (fused on CUDA) updates them all, where
  ``pyro.optim.Adam`` keeps one optimizer per parameter.

``optimizer="adam-normgrad"`` takes :class:`NormalizedGradAdam` instead (the
VampPrior paper's optimizer).

Same math: Adam is applied per element either way. Every step also checks
that the loss and the total gradient norm are finite (and clips the norm if
asked); a step that fails the check changes nothing. A predicate
``skip_if(grad_norm)`` (set by :class:`~pyro_vae.callbacks.GradientSkip`) may
also veto a finite step: gradients are dropped, nothing else changes.
"""

import math
import signal

import pyro
import pyro.poutine as poutine
import torch

from . import distributed, registration, settings
from .errors import InputError


class NormalizedGradAdam(torch.optim.Optimizer):
    """The VampPrior paper's ``AdamNormGrad`` (``utils/optimizer.py`` of ``jmtomczak/vae_vampprior``), which all
    its models trained with: each parameter tensor's gradient ``g`` divided by ``||g||_2 + 1e-7``, then Adam as
    PyTorch had it then (``eps`` added to ``sqrt(v)`` before the bias correction, which ``torch.optim.Adam`` now
    applies first: it matters where a gradient's elements are tiny, as they are once scaled to unit norm).

    Args:
        params: the parameters (or groups).
        lr, betas, eps: Adam's.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns ``closure()`` where one is given."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            (beta1, beta2), eps = group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad / (torch.linalg.vector_norm(p.grad) + 1e-7)
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-size)
        return loss


def make_optimizer(params, lr, kind="adam"):
    """``torch.optim.Adam(params, lr)`` (``kind`` ``"adam"``; fused when every parameter is on a CUDA device) or
    :class:`NormalizedGradAdam` (``"adam-normgrad"``, never fused)."""
    settings.check({"optimizer": kind})
    params = list(params)
    if kind == "adam-normgrad":
        return NormalizedGradAdam(params, lr=lr)
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
        optimizer: ``"adam"`` or ``"adam-normgrad"`` (:class:`NormalizedGradAdam`).

    Attributes:
        skip_if: ``None`` or a predicate ``grad_norm -> bool`` asked on every
            finite step with the total gradient norm (before clipping); when it
            says ``True`` the update is skipped: no parameter and no optimizer
            state changes, and ``step`` still returns the loss.
        updated: whether the last :meth:`step` applied an update.
        grad_norm: the last step's total gradient norm (before clipping),
            ``None`` where the step measured none (a non-finite loss, or no
            parameter yet); what ``train/grad_norm`` logs
            (:class:`~pyro_vae.tensorboard.TensorBoard`).
    """

    def __init__(self, model, guide, elbo, lr, grad_clip=None, optimizer="adam"):
        self.model, self.guide, self.elbo, self.lr = model, guide, elbo, lr
        self.kind = settings.check({"optimizer": optimizer})["optimizer"]
        self.max_norm = float(grad_clip) if grad_clip else math.inf
        self.optimizer = None
        self._pending_state = None
        self._store_size = None
        self.skip_if, self.updated = None, False
        self.grad_norm = None

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
        self.updated, self.grad_norm = False, None
        loss = self._loss_and_grads(*args, **kwargs)
        if self.optimizer is None:  # nothing to train yet (no parameter has been created)
            return loss
        grad_norm = self._grad_norm() if math.isfinite(loss) else loss
        self.grad_norm = grad_norm if math.isfinite(loss) else None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(loss, grad_norm)
        if self.skip_if is None or not self.skip_if(grad_norm):
            self.optimizer.step()
            self.updated = True
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _loss_and_grads(self, *args, **kwargs):
        """The ELBO's ``loss_and_grads`` on the arguments (capturing the parameters where needed); the loss."""
        store = pyro.get_param_store()
        if self.optimizer is None or len(store) != self._store_size:
            with poutine.trace(param_only=True) as capture:
                loss = self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs)
            self._capture([site["value"].unconstrained() for site in capture.trace.nodes.values()])
            self._store_size = len(store)
            return loss
        with registration.held_by_optimizer():  # nothing re-registers what the optimizer holds
            return self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs)

    def _capture(self, params):
        """Create the optimizer over ``params``, or add those it does not hold yet."""
        params = list(dict.fromkeys(params))
        if self.optimizer is None and not params:
            return
        if self.optimizer is None:
            self.optimizer = make_optimizer(params, self.lr, self.kind)
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


class DataParallelSVI(TorchOptimSVI):
    """:class:`TorchOptimSVI` for one process of a data-parallel group (``torchrun``; see
    :mod:`pyro_vae.distributed`).

    ``step(batch)`` takes the **global** batch (the same on every rank); this rank runs the ELBO's
    ``loss_and_grads`` on its shard (``group.shard(batch)``), then one ``all_reduce`` sums, across the
    ranks, every gradient, the loss and each rank's stop request. The gradients are then those of the
    whole batch's loss (a sum over its data points, as in one process), so every rank applies the update
    one process would have applied, and the non-finite guard, gradient clipping and ``skip_if`` decide
    the same way everywhere. A gradient that is ``None`` on every rank stays ``None`` (Adam then leaves
    that parameter alone, as it would in one process). Parameters captured by a step are overwritten
    with rank 0's values (the part :class:`~pyro_vae.callbacks.DataParallel` broadcasts the rest of the
    model at the start).

    Attributes:
        group: the :class:`~pyro_vae.distributed.Group`.
        stop_requested: a signal number this rank wants to stop on (0: none), sent with the next step.
        stop_agreed: after a step, the largest such number of any rank (0: none): every rank stops
            after the same step.

    Returns from ``step``: the whole batch's loss, the same float on every rank.
    """

    def __init__(self, model, guide, elbo, lr, grad_clip=None, group=None, optimizer="adam"):
        super().__init__(model, guide, elbo, lr, grad_clip=grad_clip, optimizer=optimizer)
        self.group = group if group is not None else distributed.current()
        if self.group is None:
            raise InputError("DataParallelSVI needs a process group of two or more processes (run under "
                             "torchrun); in one process use TorchOptimSVI")
        self.stop_requested = self.stop_agreed = 0

    def _loss_and_grads(self, batch, *args, **kwargs):
        shard = self.group.shard(batch)
        rows = [torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == batch.shape[0] for a in args]
        if shard.shape[0]:  # labels or covariates (x_b, y_b) are cut as the batch is
            args = [self.group.shard(a) if row else a for a, row in zip(args, rows)]
            loss = super()._loss_and_grads(shard, *args, **kwargs)
        else:  # a last batch smaller than the group: one point, masked out, so every rank runs the same code
            args = [a[:1] if row else a for a, row in zip(args, rows)]
            with poutine.mask(mask=False):
                super()._loss_and_grads(batch[:1], *args, **kwargs)
            loss = 0.0
        return self._reduce(loss, batch)

    def _reduce(self, loss, batch):
        params = self._params() if self.optimizer is not None else []
        dtype = params[0].dtype if params else torch.get_default_dtype()
        device = params[0].device if params else batch.device
        had = [0.0 if p.grad is None else 1.0 for p in params]
        tail = torch.tensor(had + [float(loss), float(self.stop_requested)], dtype=dtype, device=device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                          for p in params] + [tail])
        distributed.all_reduce_sum(flat)
        grads, tail = flat.split([sum(p.numel() for p in params), tail.numel()])
        tail = tail.tolist()
        for p, g, count in zip(params, grads.split([p.numel() for p in params]), tail):
            p.grad = g.view_as(p).to(p.dtype) if count else None
        self.stop_agreed = (int(self.stop_requested) or int(signal.SIGTERM)) if tail[-1] > 0 else 0
        return tail[-2]

    def _capture(self, params):
        params = list(dict.fromkeys(params))
        known = set() if self.optimizer is None else {id(p) for p in self._params()}
        super()._capture(params)
        distributed.broadcast_tensors([p for p in params if id(p) not in known])
