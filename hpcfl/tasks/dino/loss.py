"""DINO's loss and schedules as pure functions (Caron et al. 2021, ``DINOLoss`` and ``utils.cosine_scheduler``).

Tested against hand-computed values; the task (``task.py``) only wires them to
the trainer's counters and the site's collectives.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def teacher_temperature(epoch: float, warmup_temp: float, temp: float, warmup_epochs: float) -> float:
    """Linear warm-up from ``warmup_temp`` at epoch 0 to ``temp`` at ``warmup_epochs``, then constant.

    ``epoch`` is fractional and counted across rounds (``StepContext.epoch``). DINO's schedule is
    the same line sampled once per whole epoch; per step it reaches ``temp`` without the jump."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * max(0.0, epoch) / warmup_epochs


def teacher_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Cosine schedule from ``base`` at step 0 towards ``final`` at ``total_steps``:
    ``final + (base - final) * (1 + cos(pi * step / total_steps)) / 2`` (DINO's ``cosine_scheduler``)."""
    if total_steps <= 0:
        return base
    t = min(max(step, 0), total_steps) / total_steps
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * t))


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_crops: int,
              student_temp: float, teacher_temp: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, teacher entropy, student-teacher KL) of one batch.

    ``student``: (n_crops B, K) head outputs, view-major (rows [v B, (v + 1) B) are crop v; the first
    two crops are the global ones); ``teacher``: (2 B, K), the global crops only. Each teacher view
    is centred (minus ``center``), sharpened (``teacher_temp``) and compared by cross-entropy with
    every student crop except the same view; the loss is the mean over those pairs and the batch.
    Entropy (of the teacher's distributions) and KL (teacher || student, over the same pairs) are
    batch means: both falling to 0 is collapse to one prototype, KL alone to 0 collapse to uniform."""
    s = F.log_softmax(student.float() / student_temp, dim=-1).chunk(n_crops)
    q = F.softmax((teacher.float() - center.float()) / teacher_temp, dim=-1)
    log_q = torch.log(q.clamp_min(1e-30))
    entropy = -(q * log_q).sum(-1).mean()
    qs = q.chunk(2)
    total, pairs = student.new_zeros((), dtype=torch.float32), 0
    for iq, qv in enumerate(qs):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-qv * s[v], dim=-1).mean()
            pairs += 1
    loss = total / pairs
    return loss, entropy.detach(), (loss - entropy).detach()


def batch_center_sums(teacher: torch.Tensor) -> torch.Tensor:
    """[sum of the teacher outputs over rows..., number of rows]: what the site's ranks add up."""
    t = teacher.detach().float()
    return torch.cat([t.sum(0), t.new_tensor([len(t)])])


def update_center(center: torch.Tensor, sums: torch.Tensor, momentum: float) -> None:
    """In place: ``center = momentum * center + (1 - momentum) * mean``, where ``sums`` is
    :func:`batch_center_sums` added up over the ranks (so ranks with unequal batches weigh by rows)."""
    n = sums[-1]  # stays on the device: no host read per step
    moved = center.mul(momentum).add_(sums[:-1].view_as(center) / n, alpha=1 - momentum)
    center.copy_(torch.where(n > 0, moved, center))  # no rows (an empty batch on every rank): unchanged


@torch.no_grad()
def ema_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """In place: ``teacher <- teacher + (1 - momentum) * (student - teacher)`` (torch's lerp; the same as
    ``momentum * teacher + (1 - momentum) * student`` up to rounding).

    Where the teacher's entries lie back to back in one buffer (a FlatModel: the teacher is one range of the
    flat buffer), ONE ``lerp_`` over that range against the student's entries gathered in the same order;
    elsewhere a multi-tensor ``lerp_``."""
    teacher, student = list(teacher), [s.detach() for s in student]
    flat = _contiguous_range(teacher)
    if flat is not None:
        flat.lerp_(torch.cat([s.reshape(-1) for s in student]), 1 - momentum)
    else:
        torch._foreach_lerp_(teacher, student, 1 - momentum)


def _contiguous_range(ts: Sequence[torch.Tensor]):
    """One 1-d view covering ``ts`` when they are contiguous tensors lying back to back in one storage."""
    if not ts or not all(t.is_contiguous() for t in ts):
        return None
    first = ts[0]
    base = first.untyped_storage().data_ptr()
    pos = first.storage_offset()
    for t in ts:
        if t.untyped_storage().data_ptr() != base or t.storage_offset() != pos:
            return None
        pos += t.numel()
    return first.as_strided((pos - first.storage_offset(),), (1,), first.storage_offset())
