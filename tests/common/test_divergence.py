"""common.divergence: JS (textbook and reference variants) on the target / non-target split, KL helpers and CMD,
against direct float64 numpy computations (NTDH repository: `js_divergence`; CMD: Zellinger et al., ICLR 2017,
without the range normalisation, as the reference's `CMD`)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common import divergence as D

DT = torch.float64
LOG2 = math.log(2.0)


def np_softmax(z, T=1.0):
    z = np.asarray(z, dtype=np.float64) / T
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    return float(sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0))


def np_js(p, q, variant):
    m = (np.asarray(p) + np.asarray(q)) / 2
    if variant == "textbook":
        return 0.5 * (np_kl(p, m) + np_kl(q, m))
    return 0.5 * (np_kl(m, p) + np_kl(m, q))


def np_split(z, y, T=1.0):
    p = np_softmax(z, T)
    other = np.delete(p, y)
    return np.array([p[y], other.sum()]), other / other.sum()


def data(n=7, c=5, seed=0, scale=2.0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, c)) * scale, r.normal(size=(n, c)) * scale, r.integers(0, c, size=n)


def t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=DT, requires_grad=grad)


# ----------------------------------------------------------------------------------------------------------------
# JS properties
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [D.nontarget_js, D.target_js])
def test_textbook_js_symmetric_nonnegative_bounded(fn):
    zs, zt, y = data(n=50, seed=1, scale=4.0)
    a = fn(t(zs), t(zt), torch.tensor(y))
    b = fn(t(zt), t(zs), torch.tensor(y))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert a.shape == (50,)
    assert (a >= -1e-15).all() and (a <= LOG2 + 1e-12).all()


def test_textbook_js_reaches_log2_for_disjoint_distributions():
    # non-target masses concentrated on different classes → JS → log 2
    zs = t([[0.0, 60.0, -60.0, -60.0]])
    zt = t([[0.0, -60.0, 60.0, -60.0]])
    y = torch.tensor([0])
    assert D.nontarget_js(zs, zt, y).item() == pytest.approx(LOG2, rel=1e-9)
    assert D.nontarget_js(zs, zt, y).item() <= LOG2
    # binary split: target mass ≈ 1 vs ≈ 0
    assert D.target_js(t([[40.0, -40.0, -40.0]]), t([[-40.0, 40.0, 40.0]]), y).item() == pytest.approx(LOG2, rel=1e-9)


def test_js_zero_iff_equal():
    zs, zt, y = data(n=6, seed=2)
    yy = torch.tensor(y)
    for variant in D.JS_VARIANTS:
        assert torch.allclose(D.nontarget_js(t(zs), t(zs), yy, variant), torch.zeros(6, dtype=DT), atol=1e-15)
        assert torch.allclose(D.target_js(t(zs), t(zs), yy, variant), torch.zeros(6, dtype=DT), atol=1e-15)
        # changing only the target logit leaves the non-target distribution (hence its JS) unchanged ...
        moved = zs.copy()
        moved[np.arange(6), y] += 3.0
        assert torch.allclose(D.nontarget_js(t(moved), t(zs), yy, variant), torch.zeros(6, dtype=DT), atol=1e-14)
        # ... but not the target split, and different distributions give > 0
        assert (D.target_js(t(moved), t(zs), yy, variant) > 1e-6).all()
        assert (D.nontarget_js(t(zs), t(zt), yy, variant) > 1e-8).all()


def test_nontarget_js_two_classes_is_zero():
    zs, zt, y = data(n=5, c=2, seed=3)
    assert torch.allclose(D.nontarget_js(t(zs), t(zt), torch.tensor(y)), torch.zeros(5, dtype=DT), atol=1e-15)


def test_variants_differ_and_bad_variant():
    zs, zt, y = data(n=4, seed=4)
    a = D.nontarget_js(t(zs), t(zt), torch.tensor(y), "textbook")
    b = D.nontarget_js(t(zs), t(zt), torch.tensor(y), "reference")
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="variant"):
        D.nontarget_js(t(zs), t(zt), torch.tensor(y), "forward")


# ----------------------------------------------------------------------------------------------------------------
# values against numpy
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["textbook", "reference"])
@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_nontarget_and_target_js_values(variant, T):
    zs, zt, y = data(n=8, c=6, seed=5, scale=3.0)
    nt = D.nontarget_js(t(zs), t(zt), torch.tensor(y), variant, T)
    tg = D.target_js(t(zs), t(zt), torch.tensor(y), variant, T)
    for i in range(8):
        bs, ns = np_split(zs[i], y[i], T)
        bt, nt_ = np_split(zt[i], y[i], T)
        assert nt[i].item() == pytest.approx(np_js(ns, nt_, variant), rel=1e-10, abs=1e-15)
        assert tg[i].item() == pytest.approx(np_js(bs, bt, variant), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("variant", ["textbook", "reference"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_full_js_values(variant, T):
    """full_js: the JS of the whole softmax (target included), unlike nontarget_js it changes with the target mass."""
    zs, zt, y = data(n=8, c=6, seed=9, scale=3.0)
    got = D.full_js(t(zs), t(zt), variant, T)
    for i in range(8):
        assert got[i].item() == pytest.approx(np_js(np_softmax(zs[i], T), np_softmax(zt[i], T), variant), rel=1e-10)
    torch.testing.assert_close(D.full_js(t(zs).T, t(zt).T, variant, T, dim=0), got)


def test_reference_variant_is_reverse_kl_to_mixture():
    """The reference quantity ½[KL(M‖P) + KL(M‖Q)] — through the reference's own softmax(z − 1000·onehot) trick."""
    zs, zt, y = data(n=5, c=4, seed=6)
    got = D.nontarget_js(t(zs), t(zt), torch.tensor(y), "reference")
    for i in range(5):
        g = np.eye(4)[y[i]]
        ps, pt = np_softmax(zs[i] - 1000 * g), np_softmax(zt[i] - 1000 * g)
        m = (ps + pt) / 2
        ref = 0.5 * (sum(m[c] * (math.log(m[c]) - math.log(ps[c])) for c in range(4) if c != y[i])
                     + sum(m[c] * (math.log(m[c]) - math.log(pt[c])) for c in range(4) if c != y[i]))
        assert got[i].item() == pytest.approx(ref, rel=1e-10)


def test_js_divergence_returns_means():
    zs, zt, y = data(n=6, seed=7)
    tc, nc = D.js_divergence(t(zs), t(zt), torch.tensor(y), "reference")
    assert tc.dim() == 0 and nc.dim() == 0
    assert tc.item() == pytest.approx(D.target_js(t(zs), t(zt), torch.tensor(y), "reference").mean().item())
    assert nc.item() == pytest.approx(D.nontarget_js(t(zs), t(zt), torch.tensor(y), "reference").mean().item())


def test_split_log_probs():
    zs, _, y = data(n=6, c=5, seed=8)
    binary, nontarget, support = D.split_log_probs(t(zs), torch.tensor(y), temperature=2.0)
    assert binary.shape == (6, 2) and nontarget.shape == (6, 5) and support.shape == (6, 5)
    for i in range(6):
        b, nt = np_split(zs[i], y[i], 2.0)
        np.testing.assert_allclose(binary[i].exp().numpy(), b, rtol=1e-12)
        np.testing.assert_allclose(np.delete(nontarget[i].exp().numpy(), y[i]), nt, rtol=1e-12)
        assert support[i, y[i]] == 0 and support[i].sum() == 4
    torch.testing.assert_close(D.binary_log_probs(t(zs), torch.tensor(y), 2.0), binary)


def test_kl_logits_and_kl_from_log():
    zs, zt, _ = data(n=5, seed=9)
    got = D.kl_logits(t(zt), t(zs), temperature=0.7)
    for i in range(5):
        assert got[i].item() == pytest.approx(np_kl(np_softmax(zt[i], 0.7), np_softmax(zs[i], 0.7)), rel=1e-10)
    lp, lq = torch.log_softmax(t(zt), -1), torch.log_softmax(t(zs), -1)
    support = torch.ones(5, 5, dtype=DT)
    support[:, 0] = 0
    expected = (lp.exp() * (lp - lq))[:, 1:].sum(-1)
    torch.testing.assert_close(D.kl_from_log(lp, lq, support=support), expected)


# ----------------------------------------------------------------------------------------------------------------
# gradients and numerics
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["textbook", "reference"])
def test_gradcheck(variant):
    zs, zt, y = data(n=4, c=5, seed=10)
    yy = torch.tensor(y)
    for fn in (D.nontarget_js, D.target_js):
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, yy, variant, 1.5), (t(zs, True), t(zt, True)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["textbook", "reference"])
def test_finite_gradients_for_extreme_logits(dtype, variant):
    zs = torch.tensor([[80.0, -80.0, 0.0, 3.0], [-80.0, 80.0, -80.0, 80.0], [800.0, 0.0, 0.0, 0.0],
                       [30.0, 0.0, 0.0, 0.0]], dtype=dtype, requires_grad=True)
    zt = torch.tensor([[-80.0, 80.0, 0.0, -3.0], [80.0, -80.0, 80.0, -80.0], [800.0, 1.0, 2.0, 0.0],
                       [60.0, 0.0, -1.0, 0.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 1, 0, 0])  # rows 2-3: p_target → 1 (in row 2 the non-target mass underflows)
    nt, tg = D.nontarget_js(zs, zt, y, variant), D.target_js(zs, zt, y, variant)
    (nt.sum() + tg.sum()).backward()
    assert torch.isfinite(nt).all() and torch.isfinite(tg).all()
    assert torch.isfinite(zs.grad).all() and torch.isfinite(zt.grad).all()
    if variant == "textbook":
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert (nt >= -tol).all() and (nt <= LOG2 + tol).all() and (tg <= LOG2 + tol).all()


@pytest.mark.parametrize("variant", ["textbook", "reference"])
def test_finite_for_one_sided_dominant_target_float64(variant):
    """Teacher target logit 200 above the rest, student uniform: finite value and gradients (float64)."""
    zs = torch.zeros(1, 4, dtype=DT, requires_grad=True)
    zt = torch.tensor([[200.0, 0.0, 0.0, 0.0]], dtype=DT, requires_grad=True)
    y = torch.tensor([0])
    v = D.nontarget_js(zs, zt, y, variant) + D.target_js(zs, zt, y, variant)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(zs.grad).all() and torch.isfinite(zt.grad).all()


def test_reference_nontarget_js_finite_when_one_target_dominates_float32():
    zs = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    zt = torch.tensor([[100.0, 0.0, 1.0, 2.0]])
    y = torch.tensor([0])
    v = D.nontarget_js(zs, zt, y, "reference")
    assert torch.isfinite(v).all()
    assert v.item() == pytest.approx(D.nontarget_js(zs.double(), zt.double(), y, "reference").item(), rel=1e-4)


def test_p_target_to_one_keeps_nontarget_mass():
    """1 − p_y is summed from the non-target probabilities, so it does not cancel to 0 when p_y → 1."""
    z = t([[30.0, 0.0, 1.0]])
    binary, nontarget, support = D.split_log_probs(z, torch.tensor([0]))
    p_other = math.exp(-30) * (1 + math.e) / (1 + math.exp(-30) * (1 + math.e))
    assert binary[0, 1].item() == pytest.approx(math.log(p_other), rel=1e-12)
    assert (nontarget.exp() * support).sum().item() == pytest.approx(1.0, rel=1e-12)


def test_float32_nontarget_matches_float64_for_large_gaps():
    """The target logit 60 above the rest: float32 still agrees with float64."""
    zt = torch.tensor([[60.0, 1.0, 2.0, 3.0]])
    zs = torch.tensor([[60.0, 3.0, 2.0, 1.0]])
    y = torch.tensor([0])
    for variant in D.JS_VARIANTS:
        a = D.nontarget_js(zs, zt, y, variant).item()
        b = D.nontarget_js(zs.double(), zt.double(), y, variant).item()
        assert a == pytest.approx(b, rel=1e-4)


def test_float32_nontarget_distribution_exact_when_target_dominates():
    zt = torch.tensor([[95.0, 1.0, 2.0, 3.0]])
    zs = torch.tensor([[95.0, 3.0, 2.0, 1.0]])
    y = torch.tensor([0])
    _, nontarget, support = D.split_log_probs(zt, y)
    total = (nontarget.exp() * support).sum().item()
    expected = D.nontarget_js(zs.double(), zt.double(), y).item()  # 0.2476: the distributions are [.09,.24,.67]
    assert total == pytest.approx(1.0, rel=1e-4)
    assert D.nontarget_js(zs, zt, y).item() == pytest.approx(expected, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# dim= argument
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [D.nontarget_js, D.target_js, D.kl_logits])
def test_dim_argument_class_axis_1_vs_last(fn):
    r = np.random.default_rng(11)
    G, C, N = 3, 5, 4
    zs, zt = r.normal(size=(G, C, N)) * 2, r.normal(size=(G, C, N)) * 2
    y = torch.tensor(r.integers(0, C, size=(G, N)))
    if fn is D.kl_logits:
        a = fn(t(zs), t(zt), 1.3, dim=1)
        b = fn(t(zs).transpose(1, 2), t(zt).transpose(1, 2), 1.3, dim=-1)
        c = fn(t(zs).transpose(1, 2), t(zt).transpose(1, 2), 1.3, dim=2)
    else:
        a = fn(t(zs), t(zt), y, "reference", 1.3, dim=1)
        b = fn(t(zs).transpose(1, 2), t(zt).transpose(1, 2), y, "reference", 1.3, dim=-1)
        c = fn(t(zs).transpose(1, 2), t(zt).transpose(1, 2), y, "reference", 1.3, dim=2)
    assert a.shape == (G, N)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-15)


def test_dim_argument_split_log_probs_and_js_divergence():
    r = np.random.default_rng(12)
    zs, zt = r.normal(size=(4, 6)), r.normal(size=(4, 6))
    y = torch.tensor(r.integers(0, 6, size=4))
    b1, n1, s1 = D.split_log_probs(t(zs).T, y, dim=0)
    b2, n2, s2 = D.split_log_probs(t(zs), y, dim=-1)
    torch.testing.assert_close(b1.T, b2)
    torch.testing.assert_close(n1.T, n2)
    torch.testing.assert_close(s1.T, s2)
    a = D.js_divergence(t(zs).T, t(zt).T, y, dim=0)
    b = D.js_divergence(t(zs), t(zt), y)
    torch.testing.assert_close(torch.stack(a), torch.stack(b))


# ----------------------------------------------------------------------------------------------------------------
# CMD
# ----------------------------------------------------------------------------------------------------------------
def np_cmd(x1, x2, k=5, value_range=None):
    scale = 1.0 if value_range is None else abs(value_range[1] - value_range[0])
    m1, m2 = x1.mean(0), x2.mean(0)
    total = math.sqrt(((m1 - m2) ** 2).sum()) / scale
    for j in range(2, k + 1):
        c1 = ((x1 - m1) ** j).mean(0)
        c2 = ((x2 - m2) ** j).mean(0)
        total += math.sqrt(((c1 - c2) ** 2).sum()) / scale ** j
    return total


@pytest.mark.parametrize("moments", [1, 2, 5])
@pytest.mark.parametrize("value_range", [None, (0.0, 1.0), (-1.0, 2.0), (3.0, -1.0)])
def test_cmd_value(moments, value_range):
    r = np.random.default_rng(13)
    x1, x2 = r.uniform(size=(9, 4)), r.uniform(size=(7, 4)) ** 2  # sample sizes may differ
    got = D.cmd(t(x1), t(x2), moments, value_range)
    assert got.dim() == 0
    assert got.item() == pytest.approx(np_cmd(x1, x2, moments, value_range), rel=1e-12)


def test_cmd_properties_and_leading_axes():
    r = np.random.default_rng(14)
    x1, x2 = r.normal(size=(3, 2, 8, 4)), r.normal(size=(3, 2, 6, 4)) * 1.5 + 0.3
    got = D.cmd(t(x1), t(x2))
    assert got.shape == (3, 2)
    for a in range(3):
        for b in range(2):
            assert got[a, b].item() == pytest.approx(np_cmd(x1[a, b], x2[a, b]), rel=1e-12)
    # zero for the same sample, symmetric, translation invariant beyond the mean term
    assert D.cmd(t(x1[0, 0]), t(x1[0, 0])).item() == 0.0
    assert D.cmd(t(x1[0, 0]), t(x2[0, 0])).item() == pytest.approx(D.cmd(t(x2[0, 0]), t(x1[0, 0])).item())
    shifted = D.cmd(t(x1[0, 0] + 5.0), t(x1[0, 0]))
    assert shifted.item() == pytest.approx(5.0 * 2.0, rel=1e-10)  # ‖μ1 − μ2‖ = 5·√4
    x = t(x1[0, 0], grad=True)
    assert torch.autograd.gradcheck(lambda a: D.cmd(a, t(x2[0, 0])), (x,))
