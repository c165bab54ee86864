"""The Task interface and classify, without MPI."""
import numpy as np
import pytest
import torch

from reference_impl import accumulate_metrics

from hpcfl import metrics as M
from hpcfl.config import from_dict
from hpcfl.errors import ConfigError
from hpcfl.tasks import StepContext, task_class
from hpcfl.tasks.classify import ClassifyTask, accumulate, accumulate_sites, num_classes_of

CFG = from_dict({"sites": [{"name": "a"}], "eval": {"auc_bins": 16}})


def test_device_accumulation_equals_the_numpy_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    vec = torch.zeros(M.vector_size(4, 16), dtype=torch.float64)
    accumulate(vec, logits, labels, 4, 16)
    ref = np.zeros(M.vector_size(4, 16))
    loss = float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    accumulate_metrics(ref, torch.softmax(logits, 1).numpy(), labels.numpy(), loss, 16)
    assert np.array_equal(vec.numpy(), ref)


def test_many_sites_in_one_pass_equal_site_by_site():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, 3, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    site = torch.tensor([0] * 10 + [2] * 12 + [1] * 8)
    out = torch.zeros((3, M.vector_size(3, 16)), dtype=torch.float64)
    accumulate_sites(out, logits, labels, site, 3, 16)
    for k in range(3):
        one = torch.zeros(M.vector_size(3, 16), dtype=torch.float64)
        accumulate(one, logits[site == k], labels[site == k], 3, 16)
        assert np.array_equal(out[k, 1:].numpy(), one[1:].numpy())  # counts and histograms: exact
        assert out[k, 0].item() == pytest.approx(one[0].item(), rel=1e-6)  # the loss: another summation order


def test_the_class_count_is_recovered_from_the_vector_size():
    assert num_classes_of(M.vector_size(10, 256), 256) == 10
    with pytest.raises(ValueError):
        num_classes_of(M.vector_size(10, 256) + 1, 256)


def test_classify_summarizes_a_hand_made_vector():
    # 2 classes, 4 bins: 3 samples, 2 correct (one of each class)
    vec = np.zeros(M.vector_size(2, 16))
    vec[:3] = [1.5, 2, 3]
    vec[3:5] = [1, 1]  # correct per class
    vec[5:7] = [2, 1]  # count per class
    s = ClassifyTask(CFG).summarize(vec)
    assert s["loss"] == 0.5 and s["accuracy"] == pytest.approx(2 / 3) and s["recall"] == [0.5, 1.0]


def test_tasks_by_name_and_one_line_errors():
    assert task_class("classify") is ClassifyTask
    with pytest.raises(ConfigError, match="^task: cannot import 'no.such:Thing'"):
        task_class("no.such:Thing")
    with pytest.raises(ConfigError, match="is not a subclass of hpcfl.tasks.Task"):
        task_class("numpy:ndarray")
    with pytest.raises(ConfigError, match=r"task: 'clasify' is not classify, dino.*did you mean 'classify'"):
        from_dict({"sites": [{"name": "a"}], "task": "clasify"})


def test_step_context_counts_across_rounds():
    ctx = StepContext(round=3, rounds=10, step=4, steps_per_round=20, steps_per_epoch=10, site="a", site_index=0,
                      device=torch.device("cpu"), group=None)
    assert ctx.global_step == 44 and ctx.total_steps == 200 and ctx.epoch == pytest.approx(4.4)


def test_a_task_refuses_its_own_bad_settings_at_config_load():
    raw = {"sites": [{"name": "a"}], "task": "dino", "data": {"name": "tiles"},
           "dino": {"backbone": "vit", "width": 30, "heads": 4}}
    with pytest.raises(ConfigError, match=r"^c\.yaml: dino\.heads: 4 does not divide dino\.width \(30\)$"):
        from_dict(raw, "c.yaml")
