import math

import numpy as np
import pytest
import torch

from common.metrics import ConfusionMatrix, accuracy, ccc, ccc_loss, ccc_np


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    dense = torch.zeros(1, 3, 2, 2)
    dense[0, 2] = 1.0  # predicts class 2 everywhere
    assert accuracy(dense, torch.tensor([[[2, 2], [0, 1]]])) == 0.5


# Hand-computed example, 3 classes. rows = ground truth, cols = prediction:
#   target: 0 0 0 1 1 2 2 2 2
#   pred:   0 0 1 1 2 2 2 0 2
#           t\p  0  1  2
#           0    2  1  0
#           1    0  1  1
#           2    1  0  3
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 2])


def test_confusion_matrix_hand_example():
    cm = ConfusionMatrix(3).update(PRED.view(3, 3), TARGET.view(3, 3))  # any shape, flattened
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    # class 0: tp 2, fp 1, fn 1; class 1: tp 1, fp 1, fn 1; class 2: tp 3, fp 1, fn 1
    assert cm.iou().tolist() == pytest.approx([2 / 4, 1 / 3, 3 / 5])
    assert cm.precision().tolist() == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert cm.recall().tolist() == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert cm.mean_iou() == pytest.approx((2 / 4 + 1 / 3 + 3 / 5) / 3)
    assert cm.mean_iou(classes=[0, 2]) == pytest.approx((2 / 4 + 3 / 5) / 2)
    assert cm.pixel_accuracy() == pytest.approx(6 / 9)
    d = cm.as_dict(["road", "car", "tree"])
    assert d["iou"]["car"] == pytest.approx(1 / 3) and d["miou"] == pytest.approx(cm.mean_iou())
    assert set(d) == {"miou", "pixel_accuracy", "iou", "precision", "recall"}

    cm.update(PRED, TARGET)  # accumulates
    assert cm.mat.sum().item() == 18
    cm.reset()
    assert cm.mat.sum().item() == 0 and math.isnan(cm.pixel_accuracy())


def test_confusion_matrix_ignore_and_absent_classes():
    target = torch.tensor([0, 1, 1, 255, 3, 0, -1])
    pred = torch.tensor([1, 1, 1, 2, 1, 0, 3])
    cm = ConfusionMatrix(4, ignore_index=[0, 255]).update(pred, target)
    # target 0 ignored, 255 and -1 out of range: only (1,1), (1,1), (3,1) counted
    assert cm.mat.sum().item() == 3 and cm.mat[1, 1].item() == 2 and cm.mat[3, 1].item() == 1
    iou = cm.iou()
    assert math.isnan(iou[0]) and math.isnan(iou[2])  # never in gt nor pred
    assert iou[1].item() == pytest.approx(2 / 3) and iou[3].item() == 0.0
    assert math.isnan(cm.precision()[3]) and cm.recall()[3].item() == 0.0
    assert cm.mean_iou() == pytest.approx((2 / 3 + 0.0) / 2)  # classes 1, 2 (NaN, skipped), 3

    single = ConfusionMatrix(3, ignore_index=0).update(torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert single.mat.sum().item() == 0
    with pytest.raises(ValueError, match="class ids"):
        ConfusionMatrix(3).update(torch.tensor([3]), torch.tensor([0]))


def test_confusion_matrix_single_process_all_reduce():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    before = cm.mat.clone()
    assert torch.equal(cm.all_reduce().mat, before)


def _ccc_reference(p, g):
    # Independent formulation: Pearson correlation times the bias-correction factor (Lin 1989).
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    r = np.corrcoef(p, g)[0, 1]
    sp, sg = p.std(), g.std()
    return 2 * r * sp * sg / (sp ** 2 + sg ** 2 + (p.mean() - g.mean()) ** 2)


def test_ccc_matches_reference():
    rng = np.random.default_rng(0)
    g = rng.normal(size=200)
    p = 0.7 * g + rng.normal(scale=0.5, size=200) + 0.3
    expected = _ccc_reference(p, g)
    assert ccc_np(p, g) == pytest.approx(expected, abs=1e-12)
    assert ccc(torch.tensor(p), torch.tensor(g)).item() == pytest.approx(expected, abs=1e-8)
    assert ccc_loss(torch.tensor(p), torch.tensor(g)).item() == pytest.approx(1 - expected, abs=1e-8)

    # batched along dim
    P = torch.tensor(np.stack([p, g, -g]))
    G = torch.tensor(np.stack([g, g, g]))
    out = ccc(P, G, dim=1)
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx([expected, 1.0, _ccc_reference(-g, g)], abs=1e-8)
    assert ccc(P.T, G.T, dim=0).tolist() == pytest.approx(out.tolist())
    assert ccc(P, G, dim=None).item() == pytest.approx(_ccc_reference(P.flatten(), G.flatten()), abs=1e-8)


def test_ccc_properties():
    x = torch.randn(100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert ccc(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert ccc_np(x.numpy(), x.numpy()) == pytest.approx(1.0)
    assert ccc(2 * x, x).item() < 1.0 - 1e-3   # scale disagreement
    assert ccc(x + 1, x).item() < 1.0 - 1e-3   # offset disagreement
    assert math.isnan(ccc_np([1.0, 1.0], [1.0, 1.0]))


def test_ccc_gradient_finite():
    pred = torch.randn(4, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    gold = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    ccc_loss(pred, gold).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    const = torch.ones(8, requires_grad=True)  # zero variance: eps keeps the gradient finite
    ccc_loss(const, torch.ones(8)).backward()
    assert torch.isfinite(const.grad).all()


def test_spearman_matches_scipy_with_ties_and_degenerate_input():
    from scipy import stats

    from common.metrics import spearman, spearman_summary
    rng = np.random.default_rng(0)
    for n in (5, 40, 600):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        x[: n // 5] = np.round(x[: n // 5])           # ties
        rho, p = spearman(x, y)
        ref = stats.spearmanr(x, y)
        assert abs(rho - ref[0]) < 1e-12 and abs(p - ref[1]) < 1e-9 * max(1.0, ref[1])
    assert np.isnan(spearman(np.ones(5), np.arange(5))[0])
    rho, p = spearman(np.arange(5), np.arange(5) ** 2)
    assert abs(rho - 1) < 1e-12 and p < 1e-12
    s = spearman_summary(np.arange(12.0).reshape(3, 4), -np.arange(12.0).reshape(3, 4))
    assert abs(s["rho"] + 1) < 1e-12 and abs(s["rho_means"] + 1) < 1e-12 and s["n"] == 12


def test_within_setting_correlation_on_a_constructed_case():
    """Across settings x and y rise together (pooled ρ > 0), inside every setting y falls as x rises: the within-
    setting ρ and the setting-controlled partial ρ are −1 exactly, with intervals that exclude 0; a setting where y
    is independent noise has an interval that contains 0."""
    from common.metrics import spearman_summary
    rng = np.random.default_rng(1)
    u = rng.permutation(np.linspace(0, 1, 30))
    x = np.stack([10.0 * s + u for s in range(4)])
    y = np.stack([10.0 * s - u for s in range(4)])
    s = spearman_summary(x, y, n_resamples=400)
    assert s["rho"] > 0.8 and s["rho_means"] == 1.0
    for w in s["within"]:
        assert abs(w["rho"] + 1) < 1e-12 and w["ci"][1] < 0
    assert abs(s["partial"]["rho"] + 1) < 1e-12 and s["partial"]["ci"][1] < 0
    noise = rng.normal(size=(2, 60))
    s = spearman_summary(np.stack([u.repeat(2)] * 2), noise, n_resamples=400)
    assert all(w["ci"][0] < w["rho"] < w["ci"][1] and w["ci"][0] < 0 < w["ci"][1] for w in s["within"])
    assert s["within"][0]["rho"] != s["within"][1]["rho"]


def test_partial_correlation_removes_the_setting_effect():
    """y = setting mean + noise correlated with x within settings: the partial ρ equals the pooled ρ of the
    within-setting residuals, which scipy computes independently."""
    from scipy import stats

    from common.metrics import spearman_summary
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 50))
    y = 0.6 * x + rng.normal(size=(3, 50)) + np.array([[0.0], [5.0], [-5.0]])
    s = spearman_summary(x, y, n_resamples=200)
    rx = stats.rankdata(x.ravel()).reshape(3, 50)
    ry = stats.rankdata(y.ravel()).reshape(3, 50)
    ref = stats.pearsonr((rx - rx.mean(1, keepdims=True)).ravel(), (ry - ry.mean(1, keepdims=True)).ravel())[0]
    assert abs(s["partial"]["rho"] - ref) < 1e-12 and 0.3 < s["partial"]["rho"] and s["partial"]["ci"][0] > 0
