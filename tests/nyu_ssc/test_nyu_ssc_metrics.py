import math

import numpy as np
import torch

from nyu_ssc.metrics import SSCMetrics


def _case():
    # two scenes of 6 voxels each (flattened volumes)
    target = torch.tensor([[0, 3, 3, 5, 255, 0], [2, 2, 0, 0, 5, 5]])
    pred = torch.tensor([[3, 3, 0, 5, 7, 0], [2, 0, 0, 3, 5, 5]])
    nonempty = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    return pred, target, nonempty


def test_values_and_inputs_unchanged():
    pred, target, nonempty = _case()
    copies = [t.clone() for t in (pred, target, nonempty)]
    m = SSCMetrics()
    m.update(pred, target, nonempty)
    for a, b in zip((pred, target, nonempty), copies):
        torch.testing.assert_close(a, b)
    d = m.dataset()
    # region without ignore: scene 0 voxels 0..3, scene 1 all 6
    # occupancy truth/pred: s0 t=[0,1,1,1] p=[1,1,0,1]; s1 t=[1,1,0,0,1,1] p=[1,0,0,1,1,1]
    tp, fp, fn = 2 + 3, 1 + 1, 1 + 1
    assert math.isclose(d["precision"], tp / (tp + fp)) and math.isclose(d["recall"], tp / (tp + fn))
    assert math.isclose(d["sc_iou"], tp / (tp + fp + fn))
    # class 3: truth at s0[1], s0[2]; pred at s0[0], s0[1], s1[3] → tp 1, fp 2, fn 1
    assert math.isclose(d["iou"]["wall"], 1 / 4)
    # class 5: truth s0[3], s1[4], s1[5]; pred the same → 1; class 2: truth s1[0], s1[1]; pred s1[0] → 1/2
    assert math.isclose(d["iou"]["chair"], 1.0) and math.isclose(d["iou"]["floor"], 0.5)
    assert d["iou"]["bed"] is None                                   # absent everywhere → not in the mean
    assert math.isclose(d["miou"], (0.25 + 1.0 + 0.5) / 3)
    assert math.isclose(d["pixel_acc"], 6 / 10)


def test_per_sample_reference_averaging():
    pred, target, nonempty = _case()
    m = SSCMetrics()
    m.update(pred[:1], target[:1], nonempty[:1])
    m.update(pred[1:], target[1:], nonempty[1:])
    ps = m.per_sample()
    # scene 0 (reference: 255 → 0 in the target, region = nonempty incl. the 255 voxel, 5 voxels):
    #   t=[0,3,3,5,0] p=[3,3,0,5,7]: occ t=[0,1,1,1,0] p=[1,1,0,1,1] → p=2/4 r=2/3
    p0, r0 = 2 / 4, 2 / 3
    iou0 = 1 / (1 / p0 + 1 / r0 - 1)
    # scene 1: occ t=[1,1,0,0,1,1] p=[1,0,0,1,1,1] → p=3/4 r=3/4
    p1 = r1 = 3 / 4
    iou1 = 1 / (1 / p1 + 1 / r1 - 1)
    assert math.isclose(ps["precision"], (p0 + p1) / 2) and math.isclose(ps["recall"], (r0 + r1) / 2)
    assert math.isclose(ps["sc_iou"], (iou0 + iou1) / 2)
    # wall only in scene 0: tp 1, fp 1 (s0[0]), fn 1 → 1/3; chair: scene 0 → 1, scene 1 → 1
    assert math.isclose(ps["iou"]["wall"], 1 / 3) and math.isclose(ps["iou"]["chair"], 1.0)
    assert math.isclose(ps["iou"]["floor"], 1 / 2)
    assert math.isclose(ps["miou"], (1 / 3 + 1 + 1 / 2) / 3)
    # the ignored voxel counts as "empty" here: class 0 present in scene 0 → iou over 2 scenes
    assert ps["iou"]["empty"] > 0
    d = m.dataset()
    assert not math.isclose(d["miou"], ps["miou"])                   # the two aggregations differ on this case


def test_batch_mean_of_means():
    pred, target, nonempty = _case()
    a, b = SSCMetrics(), SSCMetrics()
    a.update(pred, target, nonempty)
    b.update(pred[:1], target[:1], nonempty[:1]).update(pred[1:], target[1:], nonempty[1:])
    np.testing.assert_allclose(a.per_sample()["sc_iou"], b.per_sample()["sc_iou"])   # equal batches: same
    assert a.dataset() == b.dataset()
