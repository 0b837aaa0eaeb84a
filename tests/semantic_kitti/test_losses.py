import math

import numpy as np
import pytest
import torch

from common.config import ConfigError
from common.metrics import ConfusionMatrix
from semantic_kitti.engine import kitti_scores
from semantic_kitti.losses import FocalSoftmaxLoss, lovasz_softmax, perception_aware_loss
from semantic_kitti.main import parse_args, resolve_config
from semantic_kitti.trainer_student import build_kd_objective, kd_loss


def jaccard_loss(gt: set, errors: set, n: int) -> float:
    """Δ_J(M) = 1 − |G ∖ M| / |G ∪ M| for the set M of mispredicted pixels."""
    if not gt and not errors:
        return 0.0
    return 1 - len(gt - errors) / len(gt | errors)


def lovasz_brute(probs: np.ndarray, labels: np.ndarray, ignore=0) -> float:
    """Lovász extension by its integral definition f(e) = ∫₀¹ Δ({i : e_i ≥ t}) dt, class by class (present ones)."""
    keep = labels != ignore
    p, y = probs[keep], labels[keep]
    losses = []
    for c in range(p.shape[1]):
        gt = set(np.nonzero(y == c)[0].tolist())
        if not gt:
            continue
        e = np.abs((y == c).astype(float) - p[:, c])
        levels = sorted(set(e.tolist()) | {0.0}, reverse=True)
        total = 0.0
        for hi, lo in zip(levels, levels[1:]):
            s = {i for i in range(len(e)) if e[i] >= hi}
            total += (hi - lo) * jaccard_loss(gt, s, len(e))
        losses.append(total)
    return float(np.mean(losses))


def test_lovasz_softmax_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        logits = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 4, (1, 3, 3), generator=g)
        probs = logits.softmax(1)
        got = lovasz_softmax(probs, labels, ignore=0).item()
        want = lovasz_brute(probs.permute(0, 2, 3, 1).reshape(-1, 4).numpy(), labels.reshape(-1).numpy())
        assert got == pytest.approx(want, abs=1e-10)
    perfect = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3]]), 4).permute(0, 2, 1).double()
    assert lovasz_softmax(perfect, torch.tensor([[1, 2, 3]])).item() == 0
    assert lovasz_softmax(perfect, torch.tensor([[0, 0, 0]])).item() == 0  # only ignored pixels


def test_focal_loss_by_hand():
    alpha = torch.tensor([0.0, 0.5, 1.0])
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 3.0]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[[1, 2]]])
    mask = torch.tensor([[[1, 1]]])
    p = logits.softmax(1)[0, :, 0]  # (3, 2)
    want = [-a * (1 - q) ** 2 * math.log(q) for a, q in ((0.5, p[1, 0].item()), (1.0, p[2, 1].item()))]
    loss = FocalSoftmaxLoss(alpha, gamma=2.0)(logits, labels, mask)
    assert loss.item() == pytest.approx(sum(want) / 2, rel=1e-6)
    assert FocalSoftmaxLoss(alpha)(logits, labels, torch.tensor([[[1, 0]]])).item() == pytest.approx(want[0], rel=1e-6)


def test_scores_follow_the_semantic_kitti_api_convention():
    cm = ConfusionMatrix(4, ignore_index=0)
    # rows: truth, columns: prediction; row 0 (truth ignored) is not counted; class c is absent everywhere
    cm.mat = torch.tensor([[9, 9, 9, 0], [5, 6, 2, 0], [0, 4, 8, 0], [0, 0, 0, 0]])
    r = kitti_scores(cm, [1, 2, 3], ["unlabeled", "a", "b", "c"])
    # class a: tp 6, fp 4 (predicted a, truth b), fn 2 + 5 (predicted the ignored class 0 counts as a miss)
    assert r["per_class"]["a"]["IOU"] == pytest.approx(6 / (6 + 4 + 7))
    assert r["per_class"]["a"]["Precision"] == pytest.approx(6 / 10)
    assert r["per_class"]["a"]["Recall"] == pytest.approx(6 / 13)
    assert r["per_class"]["b"]["IOU"] == pytest.approx(8 / (8 + 2 + 4))
    # the absent class counts as IoU 0 in the mean over ALL included classes (ConfusionMatrix.mean_iou skips it)
    assert r["per_class"]["c"]["IOU"] == 0
    assert r["IOU"] == pytest.approx((6 / 17 + 8 / 14 + 0) / 3)
    assert cm.mean_iou([1, 2, 3]) != pytest.approx(r["IOU"])
    assert r["Recall"] == pytest.approx((6 / 13 + 8 / 12 + 0) / 3)


def _cfg(*sets):
    return resolve_config(parse_args([f"--set={s}" for s in sets]))


def test_omega_per_pixel_weights_the_kd_on_valid_pixels():
    cfg = _cfg("kd.kd_weight=2.0")
    obj = build_kd_objective(cfg)
    # 4 pixels (1 image, 1×4), 3 classes: label 0 (no point), teacher right, teacher wrong and far from the
    # student, teacher wrong and collinear with the student
    tp = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 5, 0], [0, 5, 0]])
    sp = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 3], [0, 5.01, 0]])
    labels = torch.tensor([[[0, 1, 2, 2]]])
    t, s = tp.T.reshape(1, 3, 1, 4), sp.T.reshape(1, 3, 1, 4)
    total, value = kd_loss(obj, s, t, labels, valid_only=True)
    pt, ps = t.softmax(1)[0, :, 0].T, s.softmax(1)[0, :, 0].T  # (4 pixels, 3)
    kl = (pt * (pt.log() - ps.log())).sum(1)
    cos = torch.nn.functional.cosine_similarity(pt, ps, dim=1)
    wrong = t[0, :, 0].argmax(0) != labels[0, 0]
    omega = torch.where(wrong, (cos >= 0.996).float() * (cos + 1) / 2, torch.ones(4))
    assert omega[1] == 1 and omega[2] == 0 and omega[3] > 0.99  # right, wrong & far, wrong & collinear
    want = (kl[1:] * omega[1:]).mean()  # the label-0 pixel is left out
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    assert total.item() == pytest.approx(2.0 * want.item(), rel=1e-5)
    # no mask: plain KL over the valid pixels; parity: every pixel, mean over pixels × classes
    _, plain = kd_loss(build_kd_objective(_cfg("kd.mask=none")), s, t, labels, True)
    assert plain.item() == pytest.approx(kl[1:].mean().item(), rel=1e-5)
    _, par = kd_loss(build_kd_objective(_cfg("parity=true")), s, t, labels, False)
    assert par.item() == pytest.approx((kl * omega).sum().item() / 12, rel=1e-5)


def test_perception_aware_loss_directions():
    conf = torch.tensor([[[[8.0]], [[0.0]], [[0.0]]]])   # confident
    flat = torch.zeros(1, 3, 1, 1)                         # uniform
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    pcd, img = conf.clone().requires_grad_(), flat.clone().requires_grad_()
    perception_aware_loss(pcd, img, mask, tau=0.7).backward()
    assert img.grad.abs().sum() > 0 and pcd.grad.abs().sum() == 0  # only the unsure image learns from the LiDAR


@pytest.mark.parametrize("name", ["kl", "dkd", "js", "mse", "cosine"])
def test_every_per_pixel_kd_loss_starts_with_its_own_params(name):
    obj = build_kd_objective(_cfg(f"kd.kd_loss={name}"))
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 20, 4, 4, generator=g, requires_grad=True)
    t, y = torch.randn(2, 20, 4, 4, generator=g), torch.randint(0, 20, (2, 4, 4), generator=g)
    total, value = kd_loss(obj, s, t, y, valid_only=True)
    total.backward()
    assert torch.isfinite(total) and s.grad is not None and list(obj.terms) == [name]


def test_kd_params_are_checked_by_the_config():
    with pytest.raises(ConfigError, match="kd.params.kl.temperature"):
        _cfg("kd.params.kl.temperature=0")
    with pytest.raises(ConfigError, match="kd.kd_loss"):
        _cfg("kd.kd_loss=rkd")
