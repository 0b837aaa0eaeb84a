"""common.mask: the NTDH per-sample / per-pixel weight ω (spec §10.1)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.mask import omega, teacher_wrong

DT = torch.float64


def np_cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_omega(t, y, s, threshold=0.996, space="logits"):
    """Row-wise ω from the spec: 1 if argmax(t) = y, else 1[cos ≥ τ]·(cos + 1)/2."""
    out = []
    for ti, yi, si in zip(t, y, s):
        a, b = (np_softmax(ti), np_softmax(si)) if space == "probs" else (ti, si)
        c = np_cos(a, b)
        if ti.argmax() == yi:
            out.append(1.0)
        else:
            out.append((c + 1) / 2 if c >= threshold else 0.0)
    return np.array(out)


def t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=DT, requires_grad=grad)


def cases():
    """Rows: teacher right (student anti-aligned); teacher wrong & collinear; teacher wrong & cos just below τ."""
    teacher = np.array([[3.0, 1.0, 0.0],
                        [0.5, 2.0, -1.0],
                        [0.0, 2.0, 1.0]])
    labels = np.array([0, 0, 2])
    student = np.array([[-3.0, -1.0, 0.0],                 # cos = −1, but the teacher is right → 1
                        [1.0, 4.0, -2.0] + np.array([0.01, 0.0, 0.0]),  # cos ≈ 0.99999 → (cos + 1)/2
                        [0.0, 2.0, 1.3]])                  # cos ≈ 0.9912 < 0.996 → 0
    return teacher, labels, student


def test_three_cases():
    tt, y, ss = cases()
    w = omega(t(tt), torch.tensor(y), t(ss))
    c1 = np_cos(tt[1], ss[1])
    assert c1 >= 0.996 and np_cos(tt[2], ss[2]) < 0.996
    assert w.shape == (3,)
    assert w[0].item() == 1.0
    assert w[1].item() == pytest.approx((c1 + 1) / 2, rel=1e-12) and w[1].item() < 1.0
    assert w[2].item() == 0.0
    np.testing.assert_allclose(w.numpy(), ref_omega(tt, y, ss), rtol=1e-12)


def test_random_rows_against_reference():
    r = np.random.default_rng(0)
    tt = r.normal(size=(200, 4))
    y = r.integers(0, 4, size=200)
    # half the students nearly collinear with the teacher, half random
    ss = np.where(np.arange(200)[:, None] % 2 == 0, tt * r.uniform(0.5, 2, size=(200, 1))
                  + r.normal(scale=0.05, size=(200, 4)), r.normal(size=(200, 4)))
    for threshold in (0.996, 0.9, 0.0):
        got = omega(t(tt), torch.tensor(y), t(ss), threshold=threshold).numpy()
        ref = ref_omega(tt, y, ss, threshold)
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    got = omega(t(tt), torch.tensor(y), t(ss)).numpy()
    assert ((got == 0) | (got == 1) | ((got >= 0.998) & (got <= 1))).all()
    assert (got == 0).any() and (got == 1).any() and ((got > 0.998) & (got < 1)).any()


def test_threshold_configurable():
    tt, y, ss = cases()
    c2 = np_cos(tt[2], ss[2])
    assert omega(t(tt), torch.tensor(y), t(ss), threshold=0.99)[2].item() == pytest.approx((c2 + 1) / 2, rel=1e-12)
    assert omega(t(tt), torch.tensor(y), t(ss), threshold=c2 - 1e-9)[2].item() == pytest.approx((c2 + 1) / 2)
    assert omega(t(tt), torch.tensor(y), t(ss), threshold=c2 + 1e-9)[2].item() == 0.0
    assert omega(t(tt), torch.tensor(y), t(ss), threshold=0.99999999)[1].item() == 0.0
    # a threshold above 1 drops every teacher-wrong sample; −1 keeps them all with weight (cos + 1)/2
    w = omega(t(tt), torch.tensor(y), t(ss), threshold=1.01)
    assert w.tolist() == [1.0, 0.0, 0.0]
    w = omega(t(tt), torch.tensor(y), t(ss), threshold=-1.0)
    assert w[2].item() == pytest.approx((c2 + 1) / 2)


def test_threshold_is_inclusive():
    """cos ≥ τ keeps the sample: [3, 4, 0] vs [4, 3, 0] has cos = 24/25 = 0.96 exactly."""
    tt, ss, y = t([[3.0, 4.0, 0.0]]), t([[4.0, 3.0, 0.0]]), torch.tensor([0])
    assert omega(tt, y, ss, threshold=0.96).item() == pytest.approx(0.98, rel=1e-15)
    assert omega(tt, y, ss, threshold=np.nextafter(0.96, 1.0)).item() == 0.0


def test_probs_space_uses_softmax():
    # logits far from collinear (cos ≈ 0.58), but both softmaxes ≈ one-hot on class 1 (cos ≈ 0.9999)
    tt = np.array([[0.0, 5.0, 0.0]])
    ss = np.array([[-5.0, 5.0, -5.0]])
    y = torch.tensor([0])  # the teacher is wrong
    assert omega(t(tt), y, t(ss), space="logits").item() == 0.0
    c = np_cos(np_softmax(tt[0]), np_softmax(ss[0]))
    assert c >= 0.996
    assert omega(t(tt), y, t(ss), space="probs").item() == pytest.approx((c + 1) / 2, rel=1e-12)
    r = np.random.default_rng(1)
    tt, ss = r.normal(size=(50, 5)) * 3, r.normal(size=(50, 5)) * 3
    yy = r.integers(0, 5, size=50)
    for th in (0.996, 0.5):
        np.testing.assert_allclose(omega(t(tt), torch.tensor(yy), t(ss), space="probs", threshold=th).numpy(),
                                   ref_omega(tt, yy, ss, th, "probs"), rtol=1e-12)
    with pytest.raises(ValueError, match="space"):
        omega(t(tt), torch.tensor(yy), t(ss), space="softmax")


def test_per_pixel_dense():
    r = np.random.default_rng(2)
    B, C, H, W = 2, 4, 3, 5
    tt = r.normal(size=(B, C, H, W))
    ss = np.where(r.uniform(size=(B, 1, H, W)) < 0.5, tt * 1.5 + r.normal(scale=0.02, size=(B, C, H, W)),
                  r.normal(size=(B, C, H, W)))
    y = r.integers(0, C, size=(B, H, W))
    w = omega(t(tt), torch.tensor(y), t(ss), threshold=0.99)
    assert w.shape == (B, H, W)
    flat = lambda x: x.transpose(0, 2, 3, 1).reshape(-1, C)
    ref = ref_omega(flat(tt), y.reshape(-1), flat(ss), 0.99).reshape(B, H, W)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-12)
    assert (ref == 0).any() and (ref == 1).any() and ((ref > 0) & (ref < 1)).any()


def test_class_dim_for_runs_layout():
    """(R, C, N) with class_dim=1 == (R, N, C) with class_dim=-1 == flattened rows."""
    r = np.random.default_rng(3)
    R, C, N = 3, 4, 10
    tt = r.normal(size=(R, C, N))
    ss = np.where(r.uniform(size=(R, 1, N)) < 0.5, tt * 2 + r.normal(scale=0.01, size=(R, C, N)),
                  r.normal(size=(R, C, N)))
    y = r.integers(0, C, size=(R, N))
    a = omega(t(tt), torch.tensor(y), t(ss), class_dim=1)
    b = omega(t(tt).transpose(1, 2), torch.tensor(y), t(ss).transpose(1, 2), class_dim=-1)
    c = omega(t(tt).transpose(1, 2), torch.tensor(y), t(ss).transpose(1, 2), class_dim=2)
    assert a.shape == (R, N)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    ref = ref_omega(tt.transpose(0, 2, 1).reshape(-1, C), y.reshape(-1), ss.transpose(0, 2, 1).reshape(-1, C))
    np.testing.assert_allclose(a.numpy().reshape(-1), ref, rtol=1e-12)


def test_teacher_wrong():
    tt = t([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 1])
    # ties count as right (the label's score equals the maximum)
    assert teacher_wrong(tt, y).tolist() == [False, True, False, False]
    assert teacher_wrong(tt.T, y, class_dim=0).tolist() == [False, True, False, False]
    # a tie between the label and another class → ω = 1 even for an anti-aligned student
    assert omega(tt[2:3], y[2:3], -tt[2:3]).item() == 1.0


def test_zero_student_no_nan():
    w = omega(t([[0.0, 2.0, 1.0]]), torch.tensor([0]), t([[0.0, 0.0, 0.0]]))
    assert w.item() == 0.0  # cos = 0 (not NaN) → dropped


def test_detach_default_no_grad():
    tt, y, ss = cases()
    s = t(ss, grad=True)
    w = omega(t(tt, grad=True), torch.tensor(y), s)
    assert not w.requires_grad and w.grad_fn is None


def test_detach_false_gradient_flows_for_wrong_collinear_only():
    tt, y, ss = cases()
    s = t(ss, grad=True)
    w = omega(t(tt), torch.tensor(y), s, detach=False)
    assert w.requires_grad
    w.sum().backward()
    g = s.grad.numpy()
    # rows 0 (teacher right) and 2 (teacher wrong, not collinear): no gradient
    assert (g[0] == 0).all() and (g[2] == 0).all()
    # row 1: ∂/∂s (cos + 1)/2 = ½ (t/(‖s‖‖t‖) − cos · s/‖s‖²)
    a, b = tt[1], ss[1]
    c = np_cos(a, b)
    expected = 0.5 * (a / (np.linalg.norm(a) * np.linalg.norm(b)) - c * b / (b @ b))
    np.testing.assert_allclose(g[1], expected, rtol=1e-9, atol=1e-15)
    assert np.abs(g[1]).sum() > 0
    # autograd agrees with finite differences on the collinear row
    assert torch.autograd.gradcheck(lambda x: omega(t(tt[1:2]), torch.tensor(y[1:2]), x, detach=False),
                                    (t(ss[1:2], grad=True),))


def test_detach_false_probs_space_gradient():
    tt = np.array([[0.0, 5.0, 0.0]])
    s = t([[-5.0, 5.0, -5.0]], grad=True)
    w = omega(t(tt), torch.tensor([0]), s, space="probs", detach=False)
    w.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert not math.isnan(w.item())
