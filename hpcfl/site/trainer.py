"""Local training and evaluation, for any task, backend and device.

One :class:`SiteTrainer` per process holds ONE model and ONE optimizer and
trains, in turn, every site its slot simulates. Sites are stateless between
rounds except for what their task keeps in the model's local entries (handled
by the slot), as in FedAvg: each round starts from the global model with a
fresh optimizer state, and all randomness (shuffling, dropout, augmentation)
is seeded from (run seed, round, the rank's virtual world rank). So a site's
round is a pure function of the global weights, whatever else the process
simulated before it, and resuming needs nothing from the sites.

On a GPU, the model, the optimizer state, batches, the loss and the metric
sums stay on the device; the host sees a round's statistics once at its end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from ..model import FlatModel
from ..tasks.base import DataSpec, StepContext, Task
from .backend import SiteBackend
from .optim import FlatOptimizer, clip_grad_norm_


@dataclass
class TrainStats:
    steps: int = 0
    samples: int = 0  # samples this rank trained on
    loss_sum: float = 0.0
    data_s: float = 0.0  # waiting for the next batch
    compute_s: float = 0.0  # forward, backward, optimizer step (on a GPU: launching them)
    allreduce_s: float = 0.0  # averaging gradients over the slot's ranks
    train_s: float = 0.0
    task: Dict[str, float] = field(default_factory=dict)  # the task's stats, summed over samples (e.g. DINO's entropy)


@dataclass(frozen=True)
class SiteSettings:
    """How one site trains: the config's training section with the site's overrides applied."""

    lr: float
    batch_size: int
    epochs: Optional[int]
    steps: Optional[int]

    @classmethod
    def of(cls, cfg, index: int) -> "SiteSettings":
        site = cfg.sites[index]
        epochs, steps = cfg.site_local(site)
        return cls(lr=site.overrides.lr or cfg.train.lr, batch_size=site.overrides.batch_size or cfg.train.batch_size,
                   epochs=epochs, steps=steps)


IN_BACKWARD_MIN = 1 << 20  # trainable entries from which direct SGD steps inside the backward pass (4 MiB)


def round_seed(seed: int, round_: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 23, round_, rank]).generate_state(1)[0])


class SiteTrainer:
    def __init__(self, cfg, task: Task, spec: DataSpec, backend: SiteBackend, device: Any, strategy=None):
        import torch

        from ..device import Precision

        self.torch, self.cfg, self.task, self.spec = torch, cfg, task, spec
        self.backend, self.device = backend, device
        self.strategy = strategy
        torch.manual_seed(cfg.run.seed)  # every site builds the same initial weights
        module = task.build_model(spec)
        trainable = [n for n, _ in task.trainable(module)]
        self.model = FlatModel(module, trainable, device)
        self.trainable = [p for n, p in self.model.module.named_parameters() if n in set(trainable)]
        t = cfg.train
        self.optimizer = FlatOptimizer(self.model.flat[:self.model.num_trainable], self.model.grad, t.optimizer,
                                       lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.precision = Precision(t.precision, device)
        # Plain SGD on the CPU with nothing between the backward pass and the step that needs the flat gradient
        # (one rank: no averaging; no clipping; no fp16 unscaling): the step reads autograd's gradients as they
        # are (FlatOptimizer.sgd_part), which saves copying them into it (docs/benchmarks.md 12.10).
        self.direct_sgd = (device.type == "cpu" and t.optimizer == "sgd" and backend.size == 1
                           and not t.grad_clip and not self.precision.scaled)
        self._views = self.model.views()
        self._slices = [(e.offset, e.numel, e.shape) for e in self.model.entries[:len(self._views)]]
        self._stepping, self._stepped = False, [False] * len(self._views)
        # Large models step each parameter inside the backward pass, freeing its gradient there; small ones
        # (where a Python hook per parameter would cost more than the memory it saves) step after it.
        self.in_backward = self.direct_sgd and self.model.num_trainable >= IN_BACKWARD_MIN
        if self.in_backward:
            index = {id(p): i for i, p in enumerate(self._views)}
            for p in self._views:
                p.register_post_accumulate_grad_hook(lambda p, i=index[id(p)]: self._grad_ready(p, i))
        self.channels_last = t.channels_last and len(spec.input_shape) == 3
        if device.type == "cuda":  # pragma: no cover - needs a GPU
            torch.backends.cudnn.benchmark = bool(t.cudnn_benchmark)
        # A strategy's local penalty (FedProx) needs the global values of the trainable parameters.
        self.uses_penalty = strategy is not None and strategy.has_local_penalty()
        self._anchors = [p.detach().clone() for p in self.trainable] if self.uses_penalty else None
        self.on_step = None  # called after every step (the heartbeat: a hung rank is one whose steps stop)

    def _seed(self, seed: int) -> None:
        """torch.manual_seed's effect on the generators this rank uses. torch.manual_seed itself also
        seeds every CUDA/XPU/MTIA device through lazy calls that format a stack trace each time: 3 ms,
        which 128 simulated sites per round would pay 128 times."""
        self.torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":  # pragma: no cover - needs a GPU
            self.torch.cuda.manual_seed(seed)

    def planned_steps(self, settings: SiteSettings, data) -> int:
        """Local steps per round (what simulated time and the straggler deadline are computed from)."""
        if settings.steps is not None:
            return settings.steps
        return settings.epochs * data.steps_per_epoch(settings.batch_size)

    def context(self, site, round_: int, settings: SiteSettings, data, step: int = 0) -> StepContext:
        return StepContext(round=round_, rounds=self.cfg.fl.rounds, step=step,
                           steps_per_round=self.planned_steps(settings, data),
                           steps_per_epoch=data.steps_per_epoch(settings.batch_size), site=site.name,
                           site_index=site.index, device=self.device, group=self.backend)

    def _to_device(self, batch):
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=self.torch.channels_last)
        return x, (y.to(self.device, non_blocking=True) if y is not None else None)

    def train_round(self, site, rank_seed: int, round_: int, settings: SiteSettings, data) -> TrainStats:
        """One site's local training of a round, from the weights the model holds now."""
        torch = self.torch
        st = TrainStats()
        t0 = time.perf_counter()
        self._seed(round_seed(self.cfg.run.seed, round_, rank_seed))
        self.optimizer.reset()  # stateless sites: fresh optimizer state every round
        self.optimizer.lr = settings.lr
        self.precision.reset()
        if self.uses_penalty:
            for a, p in zip(self._anchors, self.trainable):
                a.copy_(p.detach())
        module = self.model.module
        if not module.training:
            module.train()
        total = self.planned_steps(settings, data)
        ctx = self.context(site, round_, settings, data)
        self.task.begin_round(module, ctx)
        sums: Dict[str, Any] = {" loss": torch.zeros((), dtype=torch.float64, device=self.device)}  # + task stats
        epoch = 0
        while st.steps < total:
            batches = data.epoch_batches(round_, epoch, settings.batch_size)
            while st.steps < total:
                t = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                st.data_s += time.perf_counter() - t
                ctx.step = st.steps
                self._step(self._to_device(batch), ctx, st, sums)
                if self.on_step is not None:
                    self.on_step()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            epoch += 1
        st.loss_sum = float(sums.pop(" loss"))  # the round's one host sync
        st.task = {k: float(v) for k, v in sums.items()}
        st.train_s = time.perf_counter() - t0
        return st

    def _step(self, batch, ctx: StepContext, st: TrainStats, sums: Dict[str, Any]) -> None:
        """One optimizer step: the task's loss (and a strategy's penalty), backward, gradient averaging over
        the slot's ranks, unscaling (fp16), clipping, the step, the task's after-step; sums on the device."""
        module, task = self.model.module, self.task
        t1 = time.perf_counter()
        self.model.release_grads()
        with self.precision.autocast():
            loss, stats = task.loss(module, batch, ctx)
        total_loss = loss
        if self.uses_penalty:
            total_loss = loss + self.strategy.local_penalty(self.trainable, self._anchors)
        if self.direct_sgd:
            self._direct_backward(self.precision.scale_loss(total_loss))
            t2 = t3 = time.perf_counter()
        else:
            self.precision.scale_loss(total_loss).backward()
            t2 = time.perf_counter()
            self.model.collect_grads()
            self.backend.average_gradients_(self.model.grad)
            t3 = time.perf_counter()
            found_inf = self.precision.unscale_(self.model.grad)  # fp16: a device flag, never read on the host here
            if self.cfg.train.grad_clip:
                clip_grad_norm_(self.model.grad, self.cfg.train.grad_clip)
            self.optimizer.step(found_inf)  # skipped on the device when found_inf is set
        task.after_step(module, ctx)
        t4 = time.perf_counter()
        n = int(batch[0].shape[0])
        st.compute_s += (t2 - t1) + (t4 - t3)
        st.allreduce_s += t3 - t2
        sums[" loss"] += loss.detach().double() * n
        for k, v in stats.items():
            val = v.detach().double() * n
            sums[k] = val if k not in sums else sums[k] + val
        st.samples += n
        st.steps += 1

    def _grad_ready(self, p, i: int) -> None:
        """Direct SGD: parameter ``i``'s step as soon as autograd has its gradient, which is freed at once (torch's
        optimizer-in-backward pattern). Adding it into the flat gradient took four passes over it; holding every
        gradient until the backward pass ended made glibc keep more heap (docs/benchmarks.md 12.10)."""
        if not self._stepping:  # a backward pass outside a training step (none in hpcfl): left as it is
            return
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        self.optimizer.sgd_part([p], [g], [self._slices[i]])
        p.grad = None
        self._stepped[i] = True

    def _direct_backward(self, loss) -> None:
        """The backward pass with each parameter's step inside it (large models) or after it; then the step of
        the parameters the loss did not reach (a zero gradient still moves them under weight decay, as the flat
        step does)."""
        self._stepping = self.in_backward
        try:
            loss.backward()
        finally:
            self._stepping = False
        opt, torch = self.optimizer, self.torch
        if not self.in_backward:
            reached = [i for i, p in enumerate(self._views) if p.grad is not None]
            grads = [self._views[i].grad for i in reached]
            opt.sgd_part([self._views[i] for i in reached], [g.to_dense() if g.is_sparse else g for g in grads],
                         [self._slices[i] for i in reached])
            for i in reached:
                self._stepped[i] = True
            self.model.release_grads()
        for i, p in enumerate(self._views):
            if not self._stepped[i] and (opt.momentum != 0 or opt.weight_decay != 0):
                opt.sgd_part([p], [torch.zeros_like(p)], [self._slices[i]])
            self._stepped[i] = False
        opt.finish_sgd()

    def evaluate_many(self, sites, round_: int, settings: SiteSettings, datas) -> List[np.ndarray]:
        """The current model on the data of several sites (their models are the same): one vector per
        site, summed over the slot's ranks in ONE collective."""
        torch = self.torch
        module = self.model.module
        if module.training:
            module.eval()
        ctx = self.context(sites[0], round_, settings, datas[0])
        with self.precision.autocast():
            vecs = self.task.evaluate_many(module, datas, ctx)
        totals = torch.from_numpy(np.stack([np.asarray(v, np.float64) for v in vecs])).to(self.device)
        self.backend.allreduce_sum_(totals)
        return list(totals.cpu().numpy())

    def evaluate(self, site, round_: int, settings: SiteSettings, data, extra=()) -> np.ndarray:
        """The task's metric sums of the current model on the site's data, then ``extra``, summed over
        the slot's ranks in one collective."""
        torch = self.torch
        module = self.model.module
        if module.training:
            module.eval()
        ctx = self.context(site, round_, settings, data)
        with self.precision.autocast():
            body = self.task.evaluate(module, data, ctx)
        vec = np.concatenate([np.asarray(body, np.float64), np.asarray(extra, np.float64)])
        totals = torch.from_numpy(vec).to(self.device)
        self.backend.allreduce_sum_(totals)
        return totals.cpu().numpy()
