"""task: mil: pooled slide AUC exact (against scikit-learn), per-site AUC, padding that changes nothing,
and the evaluation vector that carries every slide's score once."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from hpcfl.tasks.mil import MilTask, pooled_scores, roc_auc, summarize_mil
from hpcfl.tasks.mil_net import GatedAttentionMIL, instance_loss, smooth_top1_svm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_is_sklearns_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    assert roc_auc(y == 1, s) == pytest.approx(roc_auc_score(y, s), abs=1e-15)
    assert roc_auc(np.ones(3, bool), np.arange(3.0)) is None


def site_vector(slides: int, owned, labels, scores, c=2):
    """A site's sums vector as MilTask.evaluate writes it, for the slides it owns."""
    vec = np.zeros(3 + 2 * c + slides * (c + 1))
    per = vec[3 + 2 * c:].reshape(slides, c + 1)
    for p, y, s in zip(owned, labels, scores):
        probs = np.array([1 - s, s])
        vec[0] += -np.log(probs[y])
        vec[1] += int(probs.argmax() == y)
        vec[2] += 1
        vec[3 + y] += int(probs.argmax() == y)
        vec[3 + c + y] += 1
        per[p, :c], per[p, c] = probs, y + 1
    return vec


def test_pooled_auc_of_summed_site_vectors_is_sklearn_on_pooled_scores_not_the_mean_of_site_aucs():
    rng = np.random.default_rng(3)
    n = 30
    labels = rng.integers(0, 2, n)
    scores = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1)
    scores[:10] += 0.3 * (1 - labels[:10])  # site 0 scores its negatives higher: site AUCs differ
    scores = np.clip(scores, 0, 1)
    owners = [np.arange(0, 10), np.arange(10, 30)]
    vecs = [site_vector(n, o, labels[o], scores[o]) for o in owners]
    pooled = summarize_mil(vecs[0] + vecs[1], 2)
    assert pooled["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    per_site = [summarize_mil(v, 2)["auc"] for v in vecs]
    for o, a in zip(owners, per_site):
        assert a == pytest.approx(roc_auc_score(labels[o], scores[o]), abs=1e-12)
    assert abs(pooled["auc"] - np.mean(per_site)) > 1e-3  # averaging site AUCs would be wrong
    y, p = pooled_scores(vecs[0] + vecs[1], 2)
    assert y.tolist() == labels.tolist() and np.allclose(p[:, 1], scores)
    assert pooled["samples"] == n and 0 <= pooled["balanced_accuracy"] <= 1


def test_padding_changes_no_bag_and_padded_tiles_get_no_attention():
    torch.manual_seed(0)
    net = GatedAttentionMIL(8, 16, 8, 2, dropout=0.0).eval()
    a, b = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    x = torch.zeros(2, 5, 8)
    x[0], x[1, :3] = a[0], b[0]
    x[1, 3:] = 100.0  # whatever the padding holds
    logits, att = net(x, torch.tensor([5, 3]))
    la, _ = net(a, torch.tensor([5]))
    lb, _ = net(b, torch.tensor([3]))
    assert torch.allclose(logits[0], la[0], atol=1e-6) and torch.allclose(logits[1], lb[0], atol=1e-6)
    assert att[1, 3:].abs().max() == 0 and torch.allclose(att.sum(1), torch.ones(2))


class FakeBags:
    def __init__(self, bags, labels, positions):
        self.items = list(zip(bags, labels, positions))

    def val_batches(self, bs):
        from hpcfl.features.bags import pad

        for k in range(0, len(self.items), bs):
            chunk = self.items[k:k + bs]
            yield pad([b for b, _, _ in chunk], [(y, p) for _, y, p in chunk], chunk[0][0].shape[1])


def test_evaluate_writes_each_slide_at_its_position(monkeypatch):
    cfg = SimpleNamespace(mil=SimpleNamespace(hidden=8, attention=4, dropout=0.0, instance_loss="none", instance_k=8),
                          train=SimpleNamespace(eval_batch_size=2), data=SimpleNamespace(name="features"))
    task = MilTask(cfg)
    monkeypatch.setattr(task, "_layout", lambda: (6, 2))
    torch.manual_seed(0)
    from hpcfl.tasks.base import DataSpec

    net = task.build_model(DataSpec((4,), 2)).eval()
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 4)).astype(np.float32) for n in (3, 7, 2)]
    data = FakeBags(bags, [1, 0, 1], [4, 0, 2])
    vec = task.evaluate(net, data, SimpleNamespace(device=torch.device("cpu")))
    assert len(vec) == task.eval_size(None) == 3 + 4 + 6 * 3
    y, p = pooled_scores(vec, 2)
    assert y.tolist() == [0, 1, 1]  # slide positions 0, 2, 4
    for bag, pos in zip(bags, [4, 0, 2]):
        with torch.no_grad():
            logits, _ = net(torch.from_numpy(bag)[None], torch.tensor([len(bag)]))
        assert np.allclose(vec[7:].reshape(6, 3)[pos, :2], torch.softmax(logits, 1)[0].numpy(), atol=1e-6)
    assert vec[2] == 3


# ---------------------------------------------------------------------------------------- CLAM instance loss

def test_smooth_top1_svm_by_hand():
    s = torch.tensor([[1.0, 0.5], [0.2, 2.0]])
    # row 0, y = 1: terms (s0 + 1 - s1, s1 - s1) = (1.5, 0); row 1, y = 0: (0, 2.0 + 1 - 0.2) = (0, 2.8)
    want = (math.log(math.exp(1.5) + 1) + math.log(1 + math.exp(2.8))) / 2
    assert smooth_top1_svm(s, torch.tensor([1, 0])).item() == pytest.approx(want, rel=1e-6)
    # small tau: the hinge max_j(s_j + [j != y]) - s_y
    assert smooth_top1_svm(s, torch.tensor([1, 0]), tau=1e-3).item() == pytest.approx((1.5 + 2.8) / 2, abs=1e-3)


def fixed_classifiers():
    """Instance classifier of class c scores a 1-d embedding h as (0, (c + 1) * h)."""
    heads = torch.nn.ModuleList(torch.nn.Linear(1, 2) for _ in range(2))
    with torch.no_grad():
        for c, lin in enumerate(heads):
            lin.weight.copy_(torch.tensor([[0.0], [c + 1.0]]))
            lin.bias.zero_()
    return heads


@pytest.mark.parametrize("kind", ["ce", "svm"])
def test_instance_loss_pseudo_labels_top_and_bottom_attended_tiles_by_hand(kind):
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 - softplus
    # bag 0 (class 1, 5 tiles, k = 2): top-2 attention tiles 1, 3 (h = 2, 4) positive, bottom-2 tiles 2, 0
    # (h = 3, 1) negative; bag 1 (class 0, 3 valid tiles of 5, k capped at 1): top tile 2 (h = 7), bottom 0 (h = 5)
    h = torch.tensor([[1.0, 2, 3, 4, 5], [5, 6, 7, 99, 99]])[..., None]
    a = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.2, 0.3, 0.5, 0.0, 0.0]])
    lengths, labels = torch.tensor([5, 3]), torch.tensor([1, 0])
    got = instance_loss(h, a, lengths, labels, fixed_classifiers(), k=2, kind=kind).item()
    if kind == "ce":  # positive: -log sigmoid(z) = softplus(-z); negative: softplus(z); z = (c + 1) h
        bag0 = (sp(-4) + sp(-8) + sp(6) + sp(2)) / 4
        bag1 = (sp(-7) + sp(5)) / 2
    else:  # scores (0, z): positive log(exp(1 - z) + 1), negative log(1 + exp(z + 1))
        bag0 = (sp(1 - 4) + sp(1 - 8) + sp(6 + 1) + sp(2 + 1)) / 4
        bag1 = (sp(1 - 7) + sp(5 + 1)) / 2
    assert got == pytest.approx((bag0 + bag1) / 2, rel=1e-6)
    # a bag of one tile has no pair to pseudo-label: it adds nothing
    one = instance_loss(h[:1], a[:1], torch.tensor([1]), labels[:1], fixed_classifiers(), k=2, kind=kind)
    assert one.item() == 0.0


def mil_cfg(**mil):
    from hpcfl.config import MilConfig

    return SimpleNamespace(mil=MilConfig(hidden=8, attention=4, dropout=0.0, **mil), data=SimpleNamespace(name="features"))


def test_instance_loss_is_reached_from_the_config_and_weighted_by_bag_weight():
    from hpcfl.tasks.base import DataSpec

    torch.manual_seed(0)
    plain = MilTask(mil_cfg()).build_model(DataSpec((4,), 2))
    torch.manual_seed(0)
    task = MilTask(mil_cfg(instance_loss="svm", instance_k=2, bag_weight=0.7))
    clam = task.build_model(DataSpec((4,), 2))
    # off by default: no extra weights; on: the plain network's weights, initialised alike, plus the heads
    assert not any(k.startswith("instance") for k in plain.state_dict())
    extra = sorted(k for k in clam.state_dict() if k not in plain.state_dict())
    assert extra == [f"instance_classifiers.{c}.{p}" for c in (0, 1) for p in ("bias", "weight")]
    assert all(torch.equal(v, clam.state_dict()[k]) for k, v in plain.state_dict().items())
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(2, 6, 4)).astype(np.float32))
    y = torch.tensor([[1, 6, 0], [0, 4, 1]])  # (label, tiles, slide position)
    loss, stats = task.loss(clam, (x, y), None)
    want = 0.7 * stats["bag_loss"] + 0.3 * stats["instance_loss"]
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and stats["instance_loss"].item() > 0
    loss.backward()
    assert clam.instance_classifiers[0].weight.grad.abs().sum() > 0 and clam.instance_classifiers[1].weight.grad.abs().sum() > 0
    plain_loss, plain_stats = MilTask(mil_cfg()).loss(plain, (x, y), None)
    assert plain_stats == {} and plain_loss.item() == pytest.approx(stats["bag_loss"].item(), rel=1e-6)
