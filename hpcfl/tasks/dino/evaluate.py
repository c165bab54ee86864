"""Label-free pretraining measured with labels that never reach the loss: k-NN and a linear probe
on frozen features.

k-NN is DINO's ``knn_classifier`` (cosine similarity, the k nearest training
features vote with weight exp(similarity / T)). The linear probe is multinomial
logistic regression with an L2 penalty, fitted full-batch by L-BFGS in float64
on the CPU from zero weights: deterministic, and well under a second for a few
thousand tiles.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def extract(encoder, batches: Iterable, prepare, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features float32 on CPU, labels int64) of every batch; (0, dim) when there is none."""
    feats, labels = [], []
    for x, y in batches:
        feats.append(encoder(prepare(x)).float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    if not feats:
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class predicted for each query: the k most cosine-similar bank features vote with weight
    ``exp(similarity / temperature)`` (DINO's eval_knn); ties go to the lower class id."""
    if len(queries) == 0 or len(bank) == 0:
        return torch.zeros(len(queries), dtype=torch.long)
    bank = F.normalize(bank.double(), dim=1)
    k = min(k, len(bank))
    preds = []
    for q in F.normalize(queries.double(), dim=1).split(chunk):
        sim, idx = (q @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[idx], torch.exp(sim / temperature))
        preds.append(votes.argmax(1))
    return torch.cat(preds)


class LinearProbe:
    """Multinomial logistic regression on standardized features (the bank's mean and std), fitted by
    L-BFGS written out here: torch.optim would import torch._dynamo on its first step (seconds per
    process) for a problem of a few thousand rows."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, iters: int = 100,
                 l2: float = 1e-3):
        x = features.double()
        d = x.shape[1]
        self.mean = x.mean(0, keepdim=True) if len(x) else torch.zeros(1, d, dtype=torch.float64)
        self.std = x.std(0, keepdim=True).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.mean)
        self.weight = torch.zeros(d, num_classes, dtype=torch.float64)
        self.bias = torch.zeros(num_classes, dtype=torch.float64)
        if len(x) == 0:
            return
        z = (x - self.mean) / self.std
        onehot = F.one_hot(labels.long(), num_classes).double()

        def loss_and_grad(theta: torch.Tensor):
            w, b = theta[:-num_classes].view(d, num_classes), theta[-num_classes:]
            logits = z @ w + b
            loss = (torch.logsumexp(logits, 1) - (logits * onehot).sum(1)).mean() + 0.5 * l2 * (w * w).sum()
            err = (torch.softmax(logits, 1) - onehot) / len(z)
            grad = torch.cat([(z.t() @ err + l2 * w).reshape(-1), err.sum(0)])
            return float(loss), grad

        theta = lbfgs(loss_and_grad, torch.zeros(d * num_classes + num_classes, dtype=torch.float64), iters)
        self.weight, self.bias = theta[:-num_classes].view(d, num_classes), theta[-num_classes:]

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.double() - self.mean) / self.std
        return (z @ self.weight + self.bias).argmax(1)


def lbfgs(loss_and_grad, x: torch.Tensor, iters: int, history: int = 10, tol: float = 1e-9) -> torch.Tensor:
    """Minimise a smooth function by L-BFGS (two-loop recursion, Armijo backtracking): deterministic."""
    f, g = loss_and_grad(x)
    pairs: list = []
    for _ in range(iters):
        if float(g.abs().max()) <= tol:
            break
        q, alphas = g.clone(), []
        for s, y, rho in reversed(pairs):
            a = rho * float(s @ q)
            q -= a * y
            alphas.append(a)
        if pairs:
            s, y, _ = pairs[-1]
            q *= float(s @ y) / float(y @ y)
        else:
            q /= max(1.0, float(g.norm()))
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            q += (a - rho * float(y @ q)) * s
        direction, slope = -q, -float(g @ q)
        if slope >= 0:  # not a descent direction (numerical trouble): steepest descent
            direction, slope, pairs = -g, -float(g @ g), []
        step = 1.0
        while True:
            x_new = x + step * direction
            f_new, g_new = loss_and_grad(x_new)
            if f_new <= f + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, y = x_new - x, g_new - g
        if float(s @ y) > 1e-12:
            pairs = (pairs + [(s, y, 1.0 / float(s @ y))])[-history:]
        done = abs(f - f_new) <= 1e-12 * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if done:
            break
    return x


def score(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(per-class sample counts, per-class correct predictions) as float64 arrays."""
    y = labels.long().numpy()
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)[:num_classes]
    correct = np.bincount(y[pred.numpy() == y], minlength=num_classes).astype(np.float64)[:num_classes]
    return counts, correct


def encoder_scores(encoder, dim: int, num_classes: int, data, group, device, e, batch_size: int) -> np.ndarray:
    """[validation samples per class, k-NN correct per class, probe correct per class] of a frozen
    encoder on this rank's validation share: the bank (and the probe's training set) is the site's
    labelled training split, this rank's share gathered from every rank of the site by ``group``.

    ``e``: a DinoEvalConfig (``size``: tiles are resized to it unless 0; k-NN and probe settings)."""
    from .augment import normalize
    from .networks import resize

    def prepare(x):
        x = x.to(device, non_blocking=True).float()
        return normalize(resize(x, e.size) if e.size and e.size != x.shape[-1] else x)

    bank, bank_y = extract(encoder, data.train_eval_batches(batch_size), prepare, dim)
    bank = group.allgather(bank.to(device)).cpu()  # on the training device: NCCL gathers GPU tensors only
    bank_y = group.allgather(bank_y.to(device)).cpu()
    queries, y = extract(encoder, data.val_batches(batch_size), prepare, dim)
    knn = knn_predict(bank, bank_y, queries, num_classes, e.knn_k, e.knn_temperature)
    probe = LinearProbe(bank, bank_y, num_classes, e.probe_iters, e.probe_l2).predict(queries)
    counts, knn_correct = score(knn, y, num_classes)
    _, probe_correct = score(probe, y, num_classes)
    return np.concatenate([counts, knn_correct, probe_correct])



class Encoded(torch.nn.Module):
    """A frozen encoder on tiles as the data gives them (in [0, 1]): resized to ``size`` unless 0 and
    normalised exactly as :func:`encoder_scores` prepares them (``hpcfl features``)."""

    def __init__(self, backbone, dim: int, size: int = 0):
        super().__init__()
        self.backbone, self.dim, self.size = backbone, dim, size

    def forward(self, x):
        from .augment import normalize
        from .networks import resize

        x = x.float()
        return self.backbone(normalize(resize(x, self.size) if self.size and self.size != x.shape[-1] else x))
