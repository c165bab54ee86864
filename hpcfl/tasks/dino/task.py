"""``task: dino``: federated self-supervised pretraining of a tile encoder (Caron et al. 2021).

Per site and step: multi-crop on the batch (2 global + N local crops per tile),
the student sees every crop, the teacher the global ones; the loss compares
each student crop with each teacher view but its own. After the optimizer
step the teacher follows the student by EMA (cosine momentum over the run's
steps) and the centre by momentum over the batch mean of the teacher outputs,
averaged over the SITE's ranks. Between sites travels the student, or student
and teacher, and the centre unless each site keeps its own (``dino.exchange``,
``dino.center``). Labels are used only by the evaluation: k-NN and a linear
probe on the frozen teacher encoder.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ...errors import ConfigError
from ..base import DataSpec, StepContext, Task
from .config import check as check_config

# torch is imported inside the methods: rank 0 builds the task to summarize metrics and never imports it.


class DinoTask(Task):
    name = "dino"

    @classmethod
    def check_config(cls, cfg) -> None:
        check_config(cfg.dino)

    metrics = ("knn_accuracy", "probe_accuracy", "knn_balanced_accuracy", "probe_balanced_accuracy")
    minimize = ()
    headline = ("knn_accuracy", "probe_accuracy")
    supervised = False

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.d = cfg.dino
        check_config(self.d)
        self._center_sums = None  # the current step's teacher statistics, from loss() to after_step()

    # -- model and exchange ---------------------------------------------------------------------------
    def build_model(self, spec: DataSpec) -> Any:
        from .networks import DinoModel

        if len(spec.input_shape) != 3:
            raise ConfigError(f"task: dino needs images (C, H, W); data {self.cfg.data.name!r} gives "
                              f"samples of shape {tuple(spec.input_shape)}")
        module = DinoModel(self.d, spec.input_shape[0])
        module.num_classes = spec.num_classes  # for evaluate(), which gets no spec
        return module

    def exchanged(self) -> Sequence[str]:
        pats = [r"^student\."]
        if self.d.exchange == "student_teacher":
            pats.append(r"^teacher\.")
        if self.d.center == "averaged":
            pats.append(r"^center$")
        return tuple(pats)

    # -- training ---------------------------------------------------------------------------------------
    def loss(self, module: Any, batch: Tuple[Any, Any], ctx: StepContext):
        import torch

        from .augment import multicrop
        from .loss import batch_center_sums, dino_loss, teacher_temperature

        x = batch[0]  # the labels are never read
        d = self.d
        with torch.autocast(device_type=x.device.type, enabled=False):  # augment in float32 under any precision
            g, loc = multicrop(x, d.crops)
        n_crops = 2 + d.crops.local_crops
        student = module.student([g, loc])
        with torch.no_grad():
            teacher = module.teacher([g])
        temp = teacher_temperature(ctx.epoch, d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs)
        loss, entropy, kl = dino_loss(student, teacher, module.center, n_crops, d.student_temp, temp)
        self._center_sums = batch_center_sums(teacher)
        return loss, {"teacher_entropy": entropy, "kl": kl}

    def after_step(self, module: Any, ctx: StepContext) -> None:
        """Teacher EMA with the momentum of the step just taken, then the centre update from that
        step's teacher outputs averaged over the site's ranks (``ctx.group``, never the world)."""
        from .loss import ema_, teacher_momentum, update_center

        d = self.d
        m = teacher_momentum(ctx.global_step, ctx.total_steps, d.teacher_momentum)
        ema_(_float_state(module.teacher), _float_state(module.student), m)
        sums = self._center_sums
        if sums is None:
            raise RuntimeError("DinoTask.after_step without a loss() in the same step")
        self._center_sums = None
        ctx.group.allreduce_sum_(sums)
        update_center(module.center, sums.to(module.center.device), d.center_momentum)

    # -- evaluation -------------------------------------------------------------------------------------
    def eval_size(self, spec: DataSpec) -> int:
        return 3 * spec.num_classes  # per class: validation samples, k-NN correct, probe correct

    def evaluate(self, module: Any, data: Any, ctx: StepContext) -> np.ndarray:
        """Sums over this rank's validation share; the k-NN bank and the probe's training set are
        the site's whole training split (features gathered over the site's ranks)."""
        from .evaluate import encoder_scores

        was_training = module.training
        module.eval()
        try:
            return encoder_scores(module.teacher.backbone, module.feature_dim, self._classes(module), data,
                                  ctx.group, ctx.device, self.d.eval, self.cfg.train.eval_batch_size)
        finally:
            module.train(was_training)

    def _classes(self, module: Any) -> int:
        k = getattr(module, "num_classes", None)
        if k is None:
            raise RuntimeError("DinoTask.evaluate: the model was not built by this task")
        return k

    def summarize(self, vec: np.ndarray) -> Dict[str, Any]:
        return summarize_scores(vec)

    def encoder(self, module: Any) -> Any:
        """The teacher's encoder (the student's where each site keeps its own teacher: the global model
        then holds only the student), on tiles normalised and resized as the evaluation feeds them."""
        from .evaluate import Encoded

        net = module.student if self.d.exchange == "student" else module.teacher
        return Encoded(net.backbone, module.feature_dim, self.d.eval.size)


def _float_state(net) -> List[Any]:
    """Parameters and float buffers, in a fixed order (student and teacher have the same layout)."""
    import torch

    return [t for t in net.state_dict(keep_vars=True).values() if torch.is_floating_point(t)]


def summarize_scores(vec: np.ndarray) -> Dict[str, Any]:
    """Accuracies and class-balanced accuracies from the sums of ``encoder_scores`` (per class:
    validation samples, k-NN correct, probe correct). Pure NumPy."""
    counts, knn, probe = np.asarray(vec, dtype=np.float64).reshape(3, -1)
    n = counts.sum()
    seen = counts > 0

    def acc(c):
        return float(c.sum() / n) if n else 0.0

    def bal(c):
        return float(np.mean(c[seen] / counts[seen])) if seen.any() else 0.0

    return {"knn_accuracy": acc(knn), "probe_accuracy": acc(probe), "knn_balanced_accuracy": bal(knn),
            "probe_balanced_accuracy": bal(probe), "samples": int(n)}
