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

from typing import Any, Optional

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

    def zero_grad(self) -> None:
        self.grad.zero_()

    def step(self) -> None:
        if self.kind == "sgd":
            self._sgd()
        else:
            self._adam()

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

    # torch.optim.adam._single_tensor_adam (not capturable, not differentiable, no amsgrad)
    def _adam(self) -> None:
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
