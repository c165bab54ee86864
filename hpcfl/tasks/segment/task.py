"""``task: segment``: federated semantic segmentation built on MONAI, the way Clara FL studies run.

* the network is any of ``monai.networks.nets`` by name with its arguments (UNet by default);
  ``spatial_dims``, ``in_channels`` and ``out_channels`` come from the data unless given;
* the loss is MONAI's DiceCELoss or DiceLoss (softmax, one-hot labels);
* validation runs MONAI's ``sliding_window_inference`` where an input is larger than the training
  patch (whole volumes), else one forward per batch, and adds a confusion matrix per item into a
  vector of sums (hpcfl.tasks.segment.metrics): per-class Dice is then exact over ranks and sites;
* the headline, and the metric the best model follows, is mean Dice over the foreground classes.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from ...errors import ConfigError
from ..base import DataSpec, StepContext, Task
from . import metrics as SM
from .config import check as check_config


def build_net(seg, spec: DataSpec) -> Any:
    """``monai.networks.nets.<seg.net>(**args)`` with the data's dimensions filled in."""
    from monai.networks import nets

    names = [n for n in dir(nets) if not n.startswith("_") and isinstance(getattr(nets, n), type)]
    cls = getattr(nets, seg.net, None)
    if not isinstance(cls, type):
        close = difflib.get_close_matches(seg.net, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"segment.net: {seg.net!r} is not a network of monai.networks.nets{hint}")
    args = dict(seg.net_args)
    params = inspect.signature(cls.__init__).parameters
    filled = {"spatial_dims": len(spec.input_shape) - 1, "in_channels": spec.input_shape[0],
              "out_channels": spec.num_classes}
    for k, v in filled.items():
        if k in params:
            args.setdefault(k, v)
    if "img_size" in params and "img_size" not in args:  # transformers (UNETR, SwinUNETR) need the patch size
        args["img_size"] = tuple(spec.input_shape[1:])
    try:
        return cls(**args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"segment.net_args: {seg.net}({', '.join(f'{k}={v!r}' for k, v in args.items())}): "
                          f"{exc}") from None


def segment_loss(seg) -> Any:
    from monai.losses import DiceCELoss, DiceLoss

    kind = DiceCELoss if seg.loss == "dice_ce" else DiceLoss
    return kind(to_onehot_y=True, softmax=True, include_background=seg.include_background)


class SegmentTask(Task):
    name = "segment"
    metrics = ("mean_dice", "loss", "pixel_accuracy", "hd95")
    minimize = ("loss", "hd95")
    headline = ("mean_dice", "loss")

    @classmethod
    def check_config(cls, cfg) -> None:
        check_config(cfg)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.seg = cfg.segment
        self._loss = None

    # -- data -----------------------------------------------------------------------------------------------
    @classmethod
    def prepare_data(cls, cfg) -> None:
        if cfg.data.name == "volumes":
            from .volumes import prepare_volumes

            prepare_volumes(cfg)
        elif cfg.data.name == "tiles":
            from ...wsi.index import load_index
            from .masks import check_index_masks, tile_classes

            index = load_index(cfg.data.tiles.index_dir)
            check_index_masks(index, tile_classes(cfg, index), cfg.data.tiles.backend)

    @classmethod
    def site_data(cls, cfg, topology, role, run_dir, shared, device):
        from .data import TileMaskData, VolumeData

        if cfg.data.name == "volumes":
            return VolumeData(cfg, topology, role, device)
        return TileMaskData(cfg, topology, role, run_dir, device)

    # -- model and training ---------------------------------------------------------------------------------
    def build_model(self, spec: DataSpec) -> Any:
        return build_net(self.seg, spec)

    def _criterion(self):
        if self._loss is None:
            self._loss = segment_loss(self.seg)
        return self._loss

    def loss(self, module: Any, batch: Tuple[Any, Any], ctx: StepContext):
        x, y = batch
        return self._criterion()(module(x), y), {}

    # -- evaluation -----------------------------------------------------------------------------------------
    def eval_size(self, spec: DataSpec) -> int:
        return SM.vector_size(spec.num_classes, self.seg.hausdorff)

    def _predict(self, module: Any, x: Any, roi: Tuple[int, ...]) -> Any:
        """Logits of a batch: one forward where it has the training input's size, else MONAI's sliding window."""
        from monai.inferers import sliding_window_inference

        if tuple(x.shape[2:]) == roi:
            return module(x)
        return sliding_window_inference(x, roi, self.seg.sw_batch_size, module, overlap=self.seg.sw_overlap)

    def evaluate(self, module: Any, data: Any, ctx: StepContext) -> np.ndarray:
        import torch

        c = data.num_classes
        vec = torch.zeros(SM.vector_size(c, self.seg.hausdorff), dtype=torch.float64, device=ctx.device)
        loss = self._criterion()
        roi = tuple(data.input_shape[1:])
        with torch.no_grad():
            for x, y in data.val_batches(self.cfg.train.eval_batch_size):
                logits = self._predict(module, x.to(ctx.device), roi).float()
                y = y.to(ctx.device)
                accumulate(vec, logits, y, c, loss, self.seg.hausdorff, self.seg.include_background)
        return vec.cpu().numpy()

    def summarize(self, vec: np.ndarray) -> Dict[str, Any]:
        return SM.summarize(vec, self.seg.hausdorff, self.seg.include_background)


def accumulate(vec: Any, logits: Any, labels: Any, num_classes: int, loss_fn: Any, hausdorff: bool,
               include_background: bool) -> None:
    """Add a batch into the sums vector (float64, on the device): loss per item, the confusion matrix, and
    per item and class the HD95 where both prediction and label hold the class."""
    import torch

    c, n = num_classes, labels.shape[0]
    # Items of a batch have one size: the batch's loss (Dice per item, then the mean; CE over all voxels)
    # is the mean of the items' losses
    vec[0] += loss_fn(logits, labels.reshape(logits.shape[:1] + (1,) + logits.shape[2:])).double() * n
    vec[1] += n
    pred = logits.argmax(1)
    lab = labels.reshape(pred.shape)
    vec[2:2 + c * c] += torch.bincount((lab * c + pred).reshape(-1), minlength=c * c)[:c * c].double()
    if hausdorff:
        vec[2 + c * c:] += hd95_sums(pred, lab, c).to(vec.device)


def hd95_sums(pred: Any, lab: Any, num_classes: int) -> Any:
    """[sum over items of HD95 per class, count of items per class] (C each); items where a class is absent
    from the prediction or the label count nowhere (their distance is undefined)."""
    import warnings

    import torch
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.utils import one_hot

    c = num_classes
    with warnings.catch_warnings():  # MONAI warns per empty class (counted out below) and of its own deprecations
        warnings.simplefilter("ignore")
        # on the host: MONAI's distance transform needs cuCIM/CuPy on a GPU, and one item is little work
        hd = compute_hausdorff_distance(one_hot(pred[:, None].cpu(), c), one_hot(lab[:, None].cpu(), c),
                                        include_background=True, percentile=95).double()
    ok = torch.isfinite(hd)
    return torch.cat([torch.where(ok, hd, torch.zeros_like(hd)).sum(0), ok.double().sum(0)])
