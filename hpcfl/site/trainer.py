"""Local training and evaluation of one site rank, backend-agnostic.

Sites are stateless between rounds, as in FedAvg: each round starts from the
global model with a fresh optimizer state, and all randomness (shuffling,
dropout) is seeded from (run seed, round, rank). So a round is a pure function
of the global weights, and resuming needs nothing from the sites.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..model import FlatModel, build_model
from . import SiteBackend
from .data import SiteData


@dataclass
class TrainStats:
    steps: int = 0
    samples: int = 0  # samples this rank trained on
    loss_sum: float = 0.0
    data_s: float = 0.0  # waiting for the next batch
    compute_s: float = 0.0  # forward, backward, optimizer step
    allreduce_s: float = 0.0  # waiting for the site's gradient averaging
    train_s: float = 0.0


def round_seed(seed: int, round_: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 23, round_, rank]).generate_state(1)[0])


class SiteTrainer:
    def __init__(self, cfg, topology, role, backend: SiteBackend, data: SiteData):
        import torch

        self.torch = torch
        self.cfg = cfg
        self.role = role
        self.backend = backend
        site = cfg.sites[role.site.index]
        ov = site.overrides
        self.epochs, self.steps = cfg.site_local(site)
        self.batch_size = ov.batch_size or cfg.train.batch_size
        self.lr = ov.lr or cfg.train.lr

        torch.manual_seed(cfg.run.seed)  # every site builds the same initial weights
        num_features = int(np.prod(data.input_shape))
        module = build_model(cfg, num_features, data.num_classes, data.input_shape)
        self.model = FlatModel(module)
        self.data = data
        self.num_train = data.num_train  # FedAvg weight of this site

        params = module.parameters()
        if cfg.train.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=cfg.train.weight_decay)
        self.optimizer = backend.distributed_optimizer(opt, module)  # once per process: it hooks the grads
        self.num_classes = data.num_classes
        # FedProx: the global model each round starts from, as views per parameter (for the proximal term).
        self.mu = cfg.fl.proximal_mu if cfg.fl.strategy == "fedprox" else 0.0
        self._prox = None
        if self.mu:
            self.global_flat = torch.zeros_like(self.model.flat)
            offsets = {e.name: e for e in self.model.entries}
            self._prox = [(p, self.global_flat[offsets[n].offset:offsets[n].offset + offsets[n].numel].view(p.shape))
                          for n, p in module.named_parameters() if n in offsets]

    def planned_steps(self) -> int:
        """Local steps per round (what simulated time and the straggler deadline are computed from)."""
        return self.steps if self.steps is not None else self.epochs * self.data.steps_per_epoch(self.batch_size)

    def receive_from_leader(self) -> float:
        """Copy the leader's weights (just received from rank 0) to every rank of the site."""
        t = time.perf_counter()
        self.backend.broadcast_(self.model.flat)
        return time.perf_counter() - t

    def train_round(self, round_: int) -> TrainStats:
        torch, F = self.torch, self.torch.nn.functional
        cfg, role = self.cfg, self.role
        st = TrainStats()
        t0 = time.perf_counter()
        torch.manual_seed(round_seed(cfg.run.seed, round_, role.rank))
        self.optimizer.state.clear()  # stateless sites: fresh optimizer state every round
        module = self.model.module
        if self._prox is not None:
            self.global_flat.copy_(self.model.flat)
        module.train()
        total = self.planned_steps()
        epoch = 0
        while st.steps < total:
            batches = self.data.epoch_batches(round_, epoch, self.batch_size)
            while st.steps < total:
                t = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                xb, yb = batch
                t1 = time.perf_counter()
                self.optimizer.zero_grad()
                loss = F.cross_entropy(module(xb), yb)
                if self._prox is not None:  # FedProx: mu/2 |w - w_global|^2 keeps local models near the global one
                    loss_total = loss + 0.5 * self.mu * sum(((p - g) ** 2).sum() for p, g in self._prox)
                    loss_total.backward()
                else:
                    loss.backward()
                t2 = time.perf_counter()
                self.backend.synchronize(self.optimizer)
                t3 = time.perf_counter()
                self.backend.step(self.optimizer)
                t4 = time.perf_counter()
                st.data_s += t1 - t
                st.compute_s += (t2 - t1) + (t4 - t3)
                st.allreduce_s += t3 - t2
                st.loss_sum += float(loss.detach()) * len(yb)
                st.samples += len(yb)
                st.steps += 1
            batches.close()
            epoch += 1
        st.train_s = time.perf_counter() - t0
        return st

    def evaluate(self, extra=()) -> np.ndarray:
        """The metric sums (hpcfl.metrics) of the current model on the site's validation data, then
        ``extra``, summed over the site's ranks in one collective."""
        from .. import metrics

        torch, F = self.torch, self.torch.nn.functional
        module = self.model.module
        module.eval()
        bins = self.cfg.eval.auc_bins
        vec = np.zeros(metrics.vector_size(self.num_classes, bins) + len(extra))
        vec[len(vec) - len(extra):] = extra
        body = vec[:len(vec) - len(extra)]
        with torch.no_grad():
            for x, y in self.data.val_batches(self.cfg.train.eval_batch_size):
                out = module(x)
                loss = float(F.cross_entropy(out, y, reduction="sum"))
                metrics.accumulate(body, torch.softmax(out, 1).numpy(), y.numpy(), loss, bins)
        totals = torch.from_numpy(vec)
        self.backend.allreduce_sum_(totals)
        return totals.numpy()
