"""Local optimizers on the flat parameter buffer: SGD, Adam, AdamW with torch's exact arithmetic.

The trainable parameters of a :class:`hpcfl.model.FlatModel` are views into one
contiguous tensor, and so are their gradients. An optimizer step is then a
handful of elementwise ops on two tensors, whatever the number of parameters,
instead of torch.optim's loop over tensors; the op sequence is that of
``torch.optim``'s single-tensor implementations (``_single_tensor_sgd`` /
``_single_tensor_adam``), so the result is bit-identical to it (tested).

Two further reasons not to use torch.optim here: its ``step`` imports
``torch._dynamo`` on first use (1.5-2 s of every rank's start-up, for nothing
compiled), and the federation resets the optimizer state every round, which
is a ``zero_()`` of one buffer here.
"""
from __future__ import annotations

from typing import Any, List, Optional

KINDS = ("sgd", "adam", "adamw")


class FlatOptimizer:
    """One optimizer over a flat parameter tensor ``param`` and its gradient tensor ``grad`` (same shape)."""

    def __init__(self, param: Any, grad: Any, kind: str = "sgd", lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        if kind not in KINDS:
            raise ValueError(f"optimizer {kind!r} is not one of {', '.join(KINDS)}")
        self.param, self.grad, self.kind = param, grad, kind
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.steps = 0
        self._buf: Optional[Any] = None  # SGD momentum buffer, or Adam's first moment
        self._sq: Optional[Any] = None  # Adam's second moment
        self._fresh = True

    def reset(self) -> None:
        """Forget all state (a fresh optimizer, as every round of a stateless site starts with)."""
        self.steps = 0
        self._fresh = True

    def step(self, found_inf: Optional[Any] = None) -> None:
        """One step. ``found_inf`` (fp16's 0-dim device tensor, non-zero when the gradient held inf/NaN): the
        step is applied or skipped ON THE DEVICE, as GradScaler skips it but without reading the flag on the
        host every step; a skipped step changes nothing and does not count (Adam's bias correction)."""
        if found_inf is not None:
            self._masked_step(found_inf)
        elif self.kind == "sgd":
            self._sgd()
        else:
            self._adam()

    def _masked_step(self, found_inf: Any) -> None:
        """The unmasked step's own arithmetic on the live tensors, then the state before it put back where
        ``found_inf`` is set (torch.where: no host sync). Adam counts applied steps in a device tensor."""
        import torch

        p = self.param
        if self._fresh:  # fresh state BEFORE the snapshot: a skipped first step leaves zeros, not the last round's
            if self.kind != "sgd":
                self._applied = torch.zeros((), dtype=torch.float64, device=p.device)
            if self.kind != "sgd" or self.momentum != 0:
                self._buf = torch.zeros_like(p) if self._buf is None else self._buf.zero_()
            if self.kind != "sgd":
                self._sq = torch.zeros_like(p) if self._sq is None else self._sq.zero_()
        live = [t for t in (p, self._buf, self._sq) if t is not None]
        before = [t.clone() for t in live]
        if self.kind == "sgd":
            self._sgd()  # a skipped fresh step restores buf to zeros, and m * 0 + d = d at the next step
        else:
            ok = (found_inf == 0).to(torch.float64)
            self._applied.add_(ok)
            self._adam(step=self._applied + (1 - ok))  # this step's number as if applied
        skip = found_inf != 0
        for t, old in zip(live, before):
            t.copy_(torch.where(skip, old, t))

    # torch.optim.sgd._single_tensor_sgd, dampening 0, no nesterov, not maximize
    def _sgd(self) -> None:
        p, d = self.param, self.grad
        if self.weight_decay != 0:
            d = d.add(p, alpha=self.weight_decay)
        if self.momentum != 0:
            if self._fresh:
                if self._buf is None:
                    self._buf = d.detach().clone()
                else:
                    self._buf.copy_(d)
                self._fresh = False
            else:
                self._buf.mul_(self.momentum).add_(d, alpha=1)
            d = self._buf
        p.add_(d, alpha=-self.lr)
        self.steps += 1

    def sgd_part(self, params: List[Any], grads: List[Any], slices: List[Any]) -> None:
        """Some parameters' share of an SGD step (:meth:`_sgd`'s arithmetic, element by element) from their
        own gradients, without gathering them into the flat gradient: the trainer steps each parameter as
        soon as autograd has its gradient. ``params``: views of ``param``; ``slices``: their ``(offset, numel,
        shape)`` in it (the momentum buffer's views). For the CPU only: there torch's foreach ops run the
        single-tensor kernels tensor by tensor (tested bit-identical to :meth:`_sgd`); CUDA's fused foreach
        kernels are not assumed to round the same."""
        import torch

        with torch.no_grad():
            d = grads
            if self.weight_decay != 0:
                d = torch._foreach_add(grads, params, alpha=self.weight_decay)
            if self.momentum != 0:
                if self._buf is None:
                    self._buf = torch.empty_like(self.param)
                bufs = [self._buf[o:o + n].view(shape) for o, n, shape in slices]
                if self._fresh:
                    torch._foreach_copy_(bufs, d)
                else:
                    torch._foreach_mul_(bufs, self.momentum)
                    torch._foreach_add_(bufs, d, alpha=1)
                d = bufs
            torch._foreach_add_(params, d, alpha=-self.lr)

    def finish_sgd(self) -> None:
        """The step is complete: every parameter had its :meth:`sgd_part`."""
        if self.momentum != 0:
            self._fresh = False
        self.steps += 1

    # torch.optim.adam._single_tensor_adam (not capturable, not differentiable, no amsgrad); ``step``: the step
    # number as a float64 device tensor (fp16's masked steps), else the Python count
    def _adam(self, step: Optional[Any] = None) -> None:
        p, g = self.param, self.grad
        if self._fresh:
            if self._buf is None:
                self._buf, self._sq = p.new_zeros(p.shape), p.new_zeros(p.shape)
            else:
                self._buf.zero_()
                self._sq.zero_()
            self._fresh = False
        self.steps += 1
        if self.weight_decay != 0:
            if self.kind == "adamw":
                p.mul_(1 - self.lr * self.weight_decay)
            else:
                g = g.add(p, alpha=self.weight_decay)
        self._buf.lerp_(g, 1 - self.beta1)
        self._sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        if step is not None:  # the same arithmetic with device scalars (addcdiv's value cast to float first)
            import torch

            step_size = self.lr / (1 - torch.pow(self.beta1, step))
            denom = (self._sq.sqrt() / (1 - torch.pow(self.beta2, step)).sqrt().float()).add_(self.eps)
            p.addcdiv_(self._buf * (-step_size).float(), denom)
            return
        bias_correction1 = 1 - self.beta1 ** self.steps
        bias_correction2 = 1 - self.beta2 ** self.steps
        step_size = self.lr / bias_correction1
        denom = (self._sq.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
        p.addcdiv_(self._buf, denom, value=-step_size)


def clip_grad_norm_(grad: Any, max_norm: float) -> Any:
    """Scale ``grad`` in place so its L2 norm is at most ``max_norm`` (torch.nn.utils.clip_grad_norm_'s
    rule: coefficient max_norm / (norm + 1e-6), clamped at 1). Returns the norm before clipping, as a
    tensor on the gradient's device (no host sync)."""
    import torch

    norm = torch.linalg.vector_norm(grad)
    grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


__all__ = ["FlatOptimizer", "KINDS", "clip_grad_norm_"]
