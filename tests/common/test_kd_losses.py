"""KD losses (common.kd): every registered term against an independent float64 numpy / loop computation of its
formula (the papers and the NTDH reference repository's loss functions),
gradients (autograd.gradcheck), the ω contract (per-sample weight vs soft batch membership),
the runs axis (R, C, N) == R separate calls, dense (B, C, H, W) == flattened rows, and the Objective.

The reference computations below never call common code: they are written from the formulas in
/work/shared/spec/ntdh_reference.md §10 and the loss docstrings.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.kd import available_losses, build_loss, build_objective
from common.mask import omega as omega_fn

DT = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# independent numpy references (float64, explicit loops)
# ----------------------------------------------------------------------------------------------------------------
def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - m - math.log(np.exp(z - m).sum())


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_kl(p, q):
    """Σ p log(p/q) over entries with p > 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_kl(zs, zt, T=1.0, reduction="batchmean", t2=False, omega=None, mode="scale"):
    n, c = zs.shape
    total = 0.0
    for i in range(n):
        a, b = zs[i], zt[i]
        w = 1.0 if omega is None else float(omega[i])
        if omega is not None and mode == "scale":
            a, b = a * w, b * w
        v = np_kl(np_softmax(b / T), np_softmax(a / T))
        if reduction == "mean":
            v /= c
        if t2:
            v *= T * T
        if omega is not None and mode == "weight":
            v *= w
        total += v
    return total / n


def ref_dkd(zs, zt, y, alpha, beta, T, omega=None):
    """The reference DKD (NTDH repository, `dkd_loss`; Zhao et al., CVPR 2022), with its softmax(z/T − 1000·G)
    non-target trick."""
    n, c = zs.shape
    tckd = nckd = 0.0
    for i in range(n):
        w = 1.0 if omega is None else float(omega[i])
        g = np.zeros(c)
        g[y[i]] = 1.0
        ps, pt = np_softmax(zs[i] / T), np_softmax(zt[i] / T)
        bs = [ps[y[i]], sum(ps[k] for k in range(c) if k != y[i])]
        bt = [pt[y[i]], sum(pt[k] for k in range(c) if k != y[i])]
        tckd += w * sum(bt[k] * (math.log(bt[k]) - math.log(bs[k])) for k in range(2))
        ls, lt = np_log_softmax(zs[i] / T - 1000 * g), np_log_softmax(zt[i] / T - 1000 * g)
        nckd += w * sum(math.exp(lt[k]) * (lt[k] - ls[k]) for k in range(c))
    return (alpha * tckd + beta * nckd) * T * T / n


def np_js(p, q, variant):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    if variant == "textbook":
        return 0.5 * (np_kl(p, m) + np_kl(q, m))
    return 0.5 * (np_kl(m, p) + np_kl(m, q))


def split_np(z, y, T):
    p = np_softmax(z / T)
    other = [p[k] for k in range(len(p)) if k != y]
    rest = sum(other)
    return [p[y], rest], [o / rest for o in other]


def ref_js_rows(zs, zt, y, part="nontarget", variant="textbook", T=1.0):
    rows = []
    for i in range(zs.shape[0]):
        bs, ns = split_np(zs[i], y[i], T)
        bt, nt = split_np(zt[i], y[i], T)
        v = 0.0
        if part in ("nontarget", "both"):
            v += np_js(ns, nt, variant)
        if part in ("target", "both"):
            v += np_js(bs, bt, variant)
        rows.append(v)
    return np.array(rows)


def ref_mse(s, t, omega=None):
    n = s.shape[0]
    w = np.ones(n) if omega is None else omega
    return sum(w[i] * np.mean((s[i] - t[i]) ** 2) for i in range(n)) / n


def ref_cos_sample(s, t, omega=None):
    n = s.shape[0]
    w = np.ones(n) if omega is None else omega
    return sum(w[i] * (1 - s[i] @ t[i] / (np.linalg.norm(s[i]) * np.linalg.norm(t[i]))) for i in range(n)) / n


def ref_cos_global(s, t, omega=None):
    w = np.ones(s.shape[0]) if omega is None else omega
    dot = sum(w[i] * s[i] @ t[i] for i in range(len(w)))
    ns = sum(w[i] * s[i] @ s[i] for i in range(len(w)))
    nt = sum(w[i] * t[i] @ t[i] for i in range(len(w)))
    return 1 - dot / math.sqrt(ns * nt)


def ref_pkt(s, t, eps=1e-7):
    def cond(x):
        x = x / (np.sqrt((x ** 2).sum(1, keepdims=True)) + eps)
        sim = (x @ x.T + 1) / 2
        return sim / sim.sum(1, keepdims=True)

    ps, pt = cond(s), cond(t)
    return float(np.mean(pt * np.log((pt + eps) / (ps + eps))))


def ref_sp(s, t):
    def gram(x):
        g = x @ x.T
        return g / np.maximum(np.sqrt((g ** 2).sum(1, keepdims=True)), 1e-12)

    n = s.shape[0]
    return float(((gram(t) - gram(s)) ** 2).sum() / n ** 2)


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def ref_rkd(s, t, w_d=25.0, w_a=50.0):
    """Reference RKD (Park et al., CVPR 2019; NTDH repository, `RKDLoss`): all N² pairs (diagonal included in the
    mean) and all N³ triplets."""
    n = s.shape[0]

    def pdist(e):
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = math.sqrt(max(e[i] @ e[i] + e[j] @ e[j] - 2 * e[i] @ e[j], 1e-12))
        return d / d[d > 0].mean()

    def angle(e):
        a = np.zeros((n, n, n))
        for i in range(n):
            u = []
            for j in range(n):
                v = e[j] - e[i]
                u.append(v / max(np.linalg.norm(v), 1e-12))
            for j in range(n):
                for k in range(n):
                    a[i, j, k] = u[j] @ u[k]
        return a

    ds, dt = pdist(s), pdist(t)
    loss_d = np.mean([smooth_l1(a, b) for a, b in zip(ds.ravel(), dt.ravel())])
    as_, at = angle(s), angle(t)
    loss_a = np.mean([smooth_l1(a, b) for a, b in zip(as_.ravel(), at.ravel())])
    return w_d * loss_d + w_a * loss_a


def ref_ce(z, y, ignore_index=-100, label_smoothing=0.0):
    tot, cnt = 0.0, 0
    for i in range(z.shape[0]):
        if y[i] == ignore_index:
            continue
        lp = np_log_softmax(z[i])
        tot += (1 - label_smoothing) * -lp[y[i]] + label_smoothing * -lp.mean()
        cnt += 1
    return tot / max(cnt, 1)


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------
def rng(seed):
    return np.random.default_rng(seed)


def t64(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=DT, requires_grad=grad)


# name, kwargs, (student dim, teacher dim), needs labels, ω semantics
#   per_sample: (1/N) Σ ω_i ℓ_i (linear in ω; ω_k = 0 ⇔ term k removed, normaliser N)
#   scale:      KL_PSSM (ω_k = 0 ⇔ term k is 0, normaliser N; not linear in ω)
#   drop:       ω_k = 0 ⇔ the loss of the batch without sample k (relational, cosine global)
#   none:       ω ignored (ce)
CASES = {
    "kl": ("kl", {}, (5, 5), False, "scale"),
    "kl_T_mean_t2": ("kl", dict(temperature=2.0, reduction="mean", t2=True), (5, 5), False, "scale"),
    "kl_weight": ("kl", dict(temperature=0.7, omega_mode="weight"), (5, 5), False, "per_sample"),
    "dkd": ("dkd", dict(alpha=1.0, beta=8.0, temperature=4.0), (5, 5), True, "per_sample"),
    "js_nt_textbook": ("js", dict(part="nontarget", variant="textbook"), (5, 5), True, "per_sample"),
    "js_target_reference": ("js", dict(part="target", variant="reference", temperature=2.0), (5, 5), True,
                            "per_sample"),
    "js_both_reference": ("js", dict(part="both", variant="reference"), (5, 5), True, "per_sample"),
    "mse": ("mse", {}, (4, 4), False, "per_sample"),
    "cosine": ("cosine", {}, (4, 4), False, "per_sample"),
    "cosine_global": ("cosine", dict(scope="global"), (4, 4), False, "drop"),
    "fitnet": ("fitnet", dict(student_dim=3, teacher_dim=4), (3, 4), False, "per_sample"),
    "fitnet_bn": ("fitnet", dict(student_dim=4, teacher_dim=4, regressor="bn_relu"), (4, 4), False, "bn"),
    "fitnet_lin_bn": ("fitnet", dict(student_dim=3, teacher_dim=4, regressor="linear_bn_relu"), (3, 4), False,
                      "bn"),
    "pkt": ("pkt", {}, (3, 5), False, "drop"),
    "sp": ("sp", {}, (3, 5), False, "drop"),
    "rkd": ("rkd", {}, (3, 5), False, "drop"),
    "ce": ("ce", {}, (5, 5), True, "none"),
    "ce_smooth": ("ce", dict(label_smoothing=0.1), (5, 5), True, "none"),
}
PER_SAMPLE = [k for k, v in CASES.items() if v[4] in ("per_sample", "scale", "bn", "none")]
RELATIONAL = ["pkt", "sp", "rkd"]


def make_inputs(case, n=6, seed=0):
    _, _, (ds, dt), _, _ = CASES[case]
    r = rng(seed)
    s = r.normal(size=(n, ds)) * 1.5
    t = r.normal(size=(n, dt)) * 1.5
    y = r.integers(0, ds, size=n)
    return s, t, y


def build(case, runs=None, dtype=DT, seed=0):
    name, kw, *_ = CASES[case]
    torch.manual_seed(seed)
    return build_loss(name, runs=runs, **kw).to(dtype)


def call(loss, case, s, t, y, omega=None):
    needs_labels = CASES[case][3]
    return loss(s, t, labels=y if needs_labels else None, omega=omega)


def test_every_registered_loss_has_a_case():
    assert {v[0] for v in CASES.values()} | {"crd"} == set(available_losses())


# ----------------------------------------------------------------------------------------------------------------
# (a) values against the independent computations
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("t2", [False, True])
def test_kl_value(temperature, reduction, t2):
    s, t, _ = make_inputs("kl", n=5, seed=1)
    loss = build_loss("kl", temperature=temperature, reduction=reduction, t2=t2)
    got = loss(t64(s), t64(t)).item()
    assert got == pytest.approx(ref_kl(s, t, temperature, reduction, t2), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("mode", ["scale", "weight"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_kl_omega_value(mode, reduction):
    s, t, _ = make_inputs("kl", n=6, seed=2)
    w = np.array([1.0, 0.0, 0.5, 0.998, 0.0, 0.3])
    loss = build_loss("kl", temperature=0.7, reduction=reduction, omega_mode=mode)
    got = loss(t64(s), t64(t), omega=t64(w)).item()
    assert got == pytest.approx(ref_kl(s, t, 0.7, reduction, False, w, mode), rel=1e-10, abs=1e-14)


def test_kl_scale_mode_zero_omega_makes_both_uniform():
    """KL_PSSM: ω_i = 0 turns both distributions uniform, so the sample contributes exactly 0."""
    s, t, _ = make_inputs("kl", n=3, seed=3)
    loss = build_loss("kl")
    assert loss(t64(s), t64(t), omega=torch.zeros(3, dtype=DT)).item() == 0.0
    # scale differs from weight for fractional ω: ω scales the logits, not the KL
    w = t64([0.5, 0.5, 0.5])
    scale = loss(t64(s), t64(t), omega=w).item()
    weight = build_loss("kl", omega_mode="weight")(t64(s), t64(t), omega=w).item()
    assert scale == pytest.approx(ref_kl(s * 0.5, t * 0.5), rel=1e-10)
    assert weight == pytest.approx(0.5 * ref_kl(s, t), rel=1e-10)
    assert scale != pytest.approx(weight, rel=1e-3)


def test_kl_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        build_loss("kl", reduction="sum")
    with pytest.raises(ValueError, match="omega_mode"):
        build_loss("kl", omega_mode="mask")


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (1.0, 1.0, 0.7), (16.0, 1.0, 0.7), (0.5, 0.5, 1.0)])
def test_dkd_value(alpha, beta, T):
    s, t, y = make_inputs("dkd", n=6, seed=4)
    w = np.array([1.0, 0.0, 0.25, 1.0, 0.999, 0.5])
    loss = build_loss("dkd", alpha=alpha, beta=beta, temperature=T)
    assert loss(t64(s), t64(t), torch.tensor(y)).item() == pytest.approx(ref_dkd(s, t, y, alpha, beta, T),
                                                                         rel=1e-9)
    got = loss(t64(s), t64(t), torch.tensor(y), omega=t64(w)).item()
    assert got == pytest.approx(ref_dkd(s, t, y, alpha, beta, T, w), rel=1e-9)


def test_dkd_parts_separately():
    """α only → TCKD, β only → NCKD; equal logits → 0."""
    s, t, y = make_inputs("dkd", n=5, seed=5)
    tckd = build_loss("dkd", alpha=1.0, beta=0.0, temperature=2.0)(t64(s), t64(t), torch.tensor(y)).item()
    nckd = build_loss("dkd", alpha=0.0, beta=1.0, temperature=2.0)(t64(s), t64(t), torch.tensor(y)).item()
    assert tckd == pytest.approx(ref_dkd(s, t, y, 1.0, 0.0, 2.0), rel=1e-9)
    assert nckd == pytest.approx(ref_dkd(s, t, y, 0.0, 1.0, 2.0), rel=1e-9)
    both = build_loss("dkd", alpha=3.0, beta=2.0, temperature=2.0)(t64(s), t64(t), torch.tensor(y)).item()
    assert both == pytest.approx(3 * tckd + 2 * nckd, rel=1e-12)
    assert build_loss("dkd")(t64(s), t64(s), torch.tensor(y)).item() == pytest.approx(0.0, abs=1e-14)


def test_dkd_confident_teacher_float64():
    """A teacher whose target logit is 200 above the rest: finite, and equal to the reference formula (float64)."""
    zs = t64([[0.0, 2.0, 1.0, 0.0]], grad=True)
    zt = t64([[200.0, 0.0, 1.0, 2.0]])
    y = torch.tensor([0])
    v = build_loss("dkd", temperature=1.0)(zs, zt, y)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(zs.grad).all()
    assert v.item() == pytest.approx(ref_dkd(zs.detach().numpy(), zt.numpy(), [0], 1.0, 8.0, 1.0), rel=1e-9)


@pytest.mark.parametrize("name,kw", [("dkd", dict(temperature=1.0)), ("dkd", dict(temperature=4.0)),
                                     ("js", dict(variant="reference"))])
def test_confident_teacher_float32_is_finite(name, kw):
    zs = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    zt = torch.tensor([[400.0, 0.0, 1.0, 2.0]])  # p_teacher(target) = 1 in float32 (default DKD T = 4: gap 100)
    y = torch.tensor([0])
    assert torch.isfinite(build_loss(name, **kw)(zs, zt, y))


@pytest.mark.parametrize("name", ["dkd", "js"])
def test_label_losses_need_labels(name):
    with pytest.raises(ValueError, match="labels"):
        build_loss(name)(torch.randn(3, 4), torch.randn(3, 4))


@pytest.mark.parametrize("part", ["nontarget", "target", "both"])
@pytest.mark.parametrize("variant", ["textbook", "reference"])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_js_value(part, variant, T):
    s, t, y = make_inputs("js_nt_textbook", n=6, seed=6)
    w = np.array([1.0, 0.0, 0.5, 1.0, 0.2, 0.0])
    loss = build_loss("js", part=part, variant=variant, temperature=T)
    rows = ref_js_rows(s, t, y, part, variant, T)
    assert loss(t64(s), t64(t), torch.tensor(y)).item() == pytest.approx(rows.mean(), rel=1e-9, abs=1e-15)
    got = loss(t64(s), t64(t), torch.tensor(y), omega=t64(w)).item()
    assert got == pytest.approx((rows * w).sum() / len(w), rel=1e-9, abs=1e-15)


def test_js_bad_arguments():
    with pytest.raises(ValueError, match="part"):
        build_loss("js", part="all")
    with pytest.raises(ValueError, match="variant"):
        build_loss("js", variant="forward")


def test_mse_value():
    s, t, _ = make_inputs("mse", n=6, seed=7)
    w = np.array([1.0, 0.0, 0.5, 1.0, 0.2, 0.0])
    loss = build_loss("mse")
    assert loss(t64(s), t64(t)).item() == pytest.approx(ref_mse(s, t), rel=1e-12)
    assert loss(t64(s), t64(t)).item() == pytest.approx(F.mse_loss(t64(s), t64(t)).item(), rel=1e-12)
    assert loss(t64(s), t64(t), omega=t64(w)).item() == pytest.approx(ref_mse(s, t, w), rel=1e-12)
    with pytest.raises(ValueError, match="fitnet"):
        loss(torch.randn(3, 4), torch.randn(3, 5))


@pytest.mark.parametrize("scope", ["sample", "global"])
def test_cosine_value(scope):
    s, t, _ = make_inputs("cosine", n=6, seed=8)
    w = np.array([1.0, 0.0, 0.5, 1.0, 0.2, 0.7])
    ref = ref_cos_sample if scope == "sample" else ref_cos_global
    loss = build_loss("cosine", scope=scope)
    assert loss(t64(s), t64(t)).item() == pytest.approx(ref(s, t), rel=1e-12)
    assert loss(t64(s), t64(t), omega=t64(w)).item() == pytest.approx(ref(s, t, w), rel=1e-12)
    # collinear → 0, opposite → 2
    assert loss(t64(s), t64(3 * s)).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(t64(s), t64(-s)).item() == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError, match="scope"):
        build_loss("cosine", scope="batch")


def _fitnet_params(loss):
    lin = loss.regressor[0]
    return lin.weight.detach()[0].numpy(), lin.bias.detach()[0, :, 0].numpy()


def test_fitnet_linear_value_and_parameters():
    s, t, _ = make_inputs("fitnet", n=6, seed=9)
    w = np.array([1.0, 0.0, 0.5, 1.0, 0.2, 0.7])
    loss = build("fitnet")
    W, b = _fitnet_params(loss)
    reg = s @ W.T + b
    assert loss(t64(s), t64(t)).item() == pytest.approx(ref_mse(reg, t), rel=1e-12)
    assert loss(t64(s), t64(t), omega=t64(w)).item() == pytest.approx(ref_mse(reg, t, w), rel=1e-12)
    # the regressor is trainable, exposed through parameters(), and receives the gradient of the loss
    params = list(loss.parameters())
    assert len(params) == 2 and all(p.requires_grad for p in params)
    assert {tuple(p.shape) for p in params} == {(1, 4, 3), (1, 4, 1)}
    loss(t64(s), t64(t)).backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # analytic gradient of (1/(N·D)) Σ‖W s + b − t‖²
    n, d = t.shape
    resid = reg - t
    np.testing.assert_allclose(loss.regressor[0].weight.grad[0].numpy(), 2 * resid.T @ s / (n * d), rtol=1e-10)
    np.testing.assert_allclose(loss.regressor[0].bias.grad[0, :, 0].numpy(), 2 * resid.sum(0) / (n * d), rtol=1e-10)


@pytest.mark.parametrize("case", ["fitnet_bn", "fitnet_lin_bn"])
def test_fitnet_bn_relu_value(case):
    s, t, _ = make_inputs(case, n=7, seed=10)
    loss = build(case)
    with torch.no_grad():  # a non-trivial affine
        bn = loss.regressor[-2]
        bn.weight.copy_(t64(rng(1).normal(size=bn.weight.shape)))
        bn.bias.copy_(t64(rng(2).normal(size=bn.bias.shape)))
    x = s
    if case == "fitnet_lin_bn":
        W, b = _fitnet_params(loss)
        x = s @ W.T + b
    gamma, beta = bn.weight.detach()[0, :, 0].numpy(), bn.bias.detach()[0, :, 0].numpy()
    xn = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    reg = np.maximum(xn * gamma + beta, 0)
    assert loss(t64(s), t64(t)).item() == pytest.approx(ref_mse(reg, t), rel=1e-10)
    loss(t64(s), t64(t)).backward()
    for p in loss.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_fitnet_bad_arguments():
    with pytest.raises(ValueError, match="regressor"):
        build_loss("fitnet", student_dim=3, teacher_dim=3, regressor="mlp")
    with pytest.raises(ValueError, match="student_dim == teacher_dim"):
        build_loss("fitnet", student_dim=3, teacher_dim=4, regressor="bn_relu")
    with pytest.raises(ValueError, match="does not match"):
        build_loss("fitnet", student_dim=3, teacher_dim=4)(torch.randn(5, 3), torch.randn(5, 6))


def test_pkt_value():
    s, t, _ = make_inputs("pkt", n=7, seed=11)
    assert build_loss("pkt")(t64(s), t64(t)).item() == pytest.approx(ref_pkt(s, t), rel=1e-10)
    # identical similarity structure (rows rescaled) → 0 up to ε
    assert build_loss("pkt")(t64(s), t64(s * 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_sp_value():
    s, t, _ = make_inputs("sp", n=7, seed=12)
    assert build_loss("sp")(t64(s), t64(t)).item() == pytest.approx(ref_sp(s, t), rel=1e-10)


@pytest.mark.parametrize("w_d,w_a", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_exact_value(w_d, w_a):
    s, t, _ = make_inputs("rkd", n=6, seed=13)
    got = build_loss("rkd", w_d=w_d, w_a=w_a)(t64(s), t64(t)).item()
    assert got == pytest.approx(ref_rkd(s, t, w_d, w_a), rel=1e-9)


def test_rkd_invariances_and_teacher_no_grad():
    """Distances are normalised by their mean and angles are scale/translation free: a scaled, shifted copy of the
    teacher gives 0; the teacher side carries no gradient."""
    s, t, _ = make_inputs("rkd", n=6, seed=14)
    loss = build_loss("rkd")
    assert loss(t64(3 * t + 1.5), t64(t)).item() == pytest.approx(0.0, abs=1e-9)
    ss, tt = t64(s, grad=True), t64(t, grad=True)
    loss(ss, tt).backward()
    assert tt.grad is None and torch.isfinite(ss.grad).all() and ss.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="both pairs and triplets"):
        build_loss("rkd", pairs=10)(ss, tt)


@pytest.mark.parametrize("ignore_index,label_smoothing", [(-100, 0.0), (2, 0.0), (-100, 0.2), (1, 0.1)])
def test_ce_value(ignore_index, label_smoothing):
    s, _, y = make_inputs("ce", n=8, seed=15)
    loss = build_loss("ce", ignore_index=ignore_index, label_smoothing=label_smoothing)
    got = loss(t64(s), None, torch.tensor(y)).item()
    assert got == pytest.approx(ref_ce(s, y, ignore_index, label_smoothing), rel=1e-10)


def test_ce_all_ignored_is_zero_not_nan():
    loss = build_loss("ce", ignore_index=0)
    assert loss(torch.randn(3, 4), None, torch.zeros(3, dtype=torch.long)).item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# (b) gradients
# ----------------------------------------------------------------------------------------------------------------
GRADCHECK = [c for c in CASES]


@pytest.mark.parametrize("case", GRADCHECK)
def test_gradcheck(case):
    s, t, y = make_inputs(case, n=5, seed=20)
    loss = build(case)
    name = CASES[case][0]
    w = t64(rng(21).uniform(0.2, 1.0, size=5))
    ss = t64(s, grad=True)
    tt = t64(t, grad=name not in ("rkd", "ce"))  # rkd: teacher under no_grad; ce: no teacher
    yy = torch.tensor(y)
    omega = None if name == "ce" else w
    inputs = (ss, tt) if tt.requires_grad else (ss,)

    def f(*xs):
        return call(loss, case, xs[0], xs[1] if len(xs) > 1 else tt, yy, omega)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case", ["fitnet", "fitnet_lin_bn"])
def test_gradcheck_fitnet_parameters(case):
    """Gradient w.r.t. the regressor's parameters, through torch.func.functional_call."""
    s, t, _ = make_inputs(case, n=6, seed=22)
    loss = build(case)
    names = [n for n, _ in loss.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in loss.parameters())

    def f(*ps):
        return torch.func.functional_call(loss, dict(zip(names, ps)), (t64(s), t64(t)))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_finite_float32_with_zero_omega(case):
    s, t, y = make_inputs(case, n=6, seed=23)
    s = torch.tensor(s * 4, dtype=torch.float32, requires_grad=True)
    loss = build(case, dtype=torch.float32)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.9])
    value = call(loss, case, s, torch.tensor(t * 4, dtype=torch.float32), torch.tensor(y), w)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value)
    assert torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# (c) ω behaviour
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] != "none"])
def test_omega_one_equals_unmasked(case):
    s, t, y = make_inputs(case, n=6, seed=30)
    loss = build(case)
    base = call(loss, case, t64(s), t64(t), torch.tensor(y))
    ones = call(loss, case, t64(s), t64(t), torch.tensor(y), torch.ones(6, dtype=DT))
    assert ones.item() == pytest.approx(base.item(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] in ("per_sample", "scale")])
@pytest.mark.parametrize("k", [0, 3])
def test_omega_zero_removes_term_per_sample(case, k):
    """(1/N) Σ_{i≠k} ℓ_i: the loss of the batch without k, times (N − 1)/N (the normaliser stays N)."""
    n = 6
    s, t, y = make_inputs(case, n=n, seed=31)
    loss = build(case)
    w = torch.ones(n, dtype=DT)
    w[k] = 0
    keep = [i for i in range(n) if i != k]
    masked = call(loss, case, t64(s), t64(t), torch.tensor(y), w).item()
    without = call(loss, case, t64(s[keep]), t64(t[keep]), torch.tensor(y[keep])).item()
    assert masked == pytest.approx(without * (n - 1) / n, rel=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] in ("per_sample", "bn")])
def test_omega_linear_for_weighted_per_sample_losses(case):
    """loss(ω) = Σ_i ω_i · loss(e_i): ω only weights the per-row terms (also for FitNet's batch-norm regressor,
    whose statistics do not depend on ω)."""
    n = 5
    s, t, y = make_inputs(case, n=n, seed=32)
    loss = build(case)
    w = rng(33).uniform(0, 1, size=n)
    w[2] = 0
    got = call(loss, case, t64(s), t64(t), torch.tensor(y), t64(w)).item()
    parts = [call(loss, case, t64(s), t64(t), torch.tensor(y), t64(np.eye(n)[i])).item() for i in range(n)]
    assert got == pytest.approx(float(np.dot(w, parts)), rel=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] == "drop"])
@pytest.mark.parametrize("k", [0, 4])
def test_omega_zero_drops_sample_relational(case, k):
    """Soft batch membership: ω_k = 0 gives exactly the loss of the batch without sample k."""
    n = 7
    s, t, y = make_inputs(case, n=n, seed=34)
    loss = build(case)
    w = torch.ones(n, dtype=DT)
    w[k] = 0
    keep = [i for i in range(n) if i != k]
    masked = loss(t64(s), t64(t), omega=w).item()
    without = loss(t64(s[keep]), t64(t[keep])).item()
    assert masked == pytest.approx(without, rel=1e-10)
    # and several dropped at once
    w[(k + 2) % n] = 0
    keep = [i for i in range(n) if w[i] > 0]
    assert loss(t64(s), t64(t), omega=w).item() == pytest.approx(loss(t64(s[keep]), t64(t[keep])).item(), rel=1e-10)


@pytest.mark.parametrize("case", ["pkt", "sp", "cosine_global"])
def test_omega_two_equals_duplicated_sample(case):
    """Soft membership with integer weights: ω_k = 2 counts sample k twice."""
    n, k = 5, 1
    s, t, _ = make_inputs(case, n=n, seed=35)
    loss = build(case)
    w = torch.ones(n, dtype=DT)
    w[k] = 2
    dup = list(range(n)) + [k]
    assert loss(t64(s), t64(t), omega=w).item() == pytest.approx(loss(t64(s[dup]), t64(t[dup])).item(), rel=1e-9)


def test_omega_ignored_by_ce():
    s, _, y = make_inputs("ce", n=6, seed=36)
    loss = build_loss("ce")
    w = torch.zeros(6, dtype=DT)
    assert loss(t64(s), None, torch.tensor(y), omega=w).item() == loss(t64(s), None, torch.tensor(y)).item()


def test_omega_wrong_size_rejected():
    with pytest.raises(ValueError, match="omega"):
        build_loss("kl")(torch.randn(4, 3), torch.randn(4, 3), omega=torch.ones(5))


# ----------------------------------------------------------------------------------------------------------------
# (d) runs: (R, C, N) with runs=R == Σ_r of R separate calls on (N, C)
# ----------------------------------------------------------------------------------------------------------------
def _copy_run_state(src, dst, r):
    """Run r's slice of every parameter / buffer of a runs=R loss into a runs=None loss."""
    state = {k: v[r:r + 1].clone() for k, v in src.state_dict().items()}
    dst.load_state_dict(state)


@pytest.mark.parametrize("case", list(CASES))
def test_runs_equal_sum_of_separate_calls(case):
    R, n = 3, 6
    data = [make_inputs(case, n=n, seed=40 + r) for r in range(R)]
    r_ = rng(49)
    omegas = r_.uniform(0, 1, size=(R, n))
    omegas[0, 1] = omegas[2, 4] = 0.0
    name = CASES[case][0]
    use_omega = name != "ce"

    batched = build(case, runs=R, seed=1)
    with torch.no_grad():  # make run parameters visibly different (e.g. batch-norm affine starts at 1 / 0)
        for p in batched.parameters():
            p.add_(t64(r_.normal(scale=0.3, size=p.shape)))
    S = torch.stack([t64(d[0].T) for d in data]).requires_grad_(True)  # (R, C, N)
    T_ = torch.stack([t64(d[1].T) for d in data])
    Y = torch.stack([torch.tensor(d[2]) for d in data])
    W = t64(omegas) if use_omega else None
    total = call(batched, case, S, T_, Y, W)
    total.backward()

    expected, grads_s, grads_p = 0.0, [], []
    for r in range(R):
        single = build(case)
        _copy_run_state(batched, single, r)
        s_r = t64(data[r][0], grad=True)
        v = call(single, case, s_r, t64(data[r][1]), torch.tensor(data[r][2]),
                 t64(omegas[r]) if use_omega else None)
        v.backward()
        expected += v.item()
        grads_s.append(s_r.grad.T)
        grads_p.append([p.grad for p in single.parameters()])
    assert total.item() == pytest.approx(expected, rel=1e-10)
    # run r's inputs and parameters receive exactly the gradient of run r's own loss
    torch.testing.assert_close(S.grad, torch.stack(grads_s), rtol=1e-9, atol=1e-12)
    for k, p in enumerate(batched.parameters()):
        torch.testing.assert_close(p.grad, torch.cat([g[k] for g in grads_p]), rtol=1e-9, atol=1e-12)


def test_runs_shape_checked():
    loss = build_loss("kl", runs=3)
    with pytest.raises(ValueError, match="runs=3"):
        loss(torch.randn(2, 4, 5), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="runs"):
        build_loss("mse", runs=0)


# ----------------------------------------------------------------------------------------------------------------
# (e) dense (B, C, H, W) == flattened rows
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", PER_SAMPLE + ["cosine_global"])
def test_dense_equals_flattened_rows(case):
    B, H, W = 2, 3, 2
    _, _, (ds, dt), needs_labels, sem = CASES[case]
    r = rng(50)
    s = r.normal(size=(B, ds, H, W))
    t = r.normal(size=(B, dt, H, W))
    y = r.integers(0, ds, size=(B, H, W))
    w = r.uniform(0, 1, size=(B, H, W))
    w[0, 1, 1] = 0
    loss = build(case)
    omega = None if sem == "none" else t64(w)
    dense = call(loss, case, t64(s), t64(t), torch.tensor(y), omega).item()
    flat = lambda x: x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    rows = call(loss, case, t64(flat(s)), t64(flat(t)), torch.tensor(y.reshape(-1)),
                None if omega is None else t64(w.reshape(-1))).item()
    assert dense == pytest.approx(rows, rel=1e-10)


@pytest.mark.parametrize("case", RELATIONAL)
def test_relational_dense_is_one_vector_per_sample(case):
    """Relational terms compare whole samples: (B, C, H, W) == (B, C·H·W)."""
    r = rng(51)
    s, t = r.normal(size=(5, 2, 3, 2)), r.normal(size=(5, 3, 2, 2))
    w = t64([1.0, 0.0, 0.5, 1.0, 0.7])
    loss = build(case)
    dense = loss(t64(s), t64(t), omega=w).item()
    flat = loss(t64(s.reshape(5, -1)), t64(t.reshape(5, -1)), omega=w).item()
    assert dense == pytest.approx(flat, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# relational extras: row subsampling, rkd sampled mode
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", RELATIONAL)
def test_sample_rows_is_the_loss_of_a_random_subset(case):
    name, kw, *_ = CASES[case]
    s, t, _ = make_inputs(case, n=9, seed=52)
    full = build_loss(name, **kw)
    assert build_loss(name, sample_rows=9, **kw)(t64(s), t64(t)).item() == pytest.approx(
        full(t64(s), t64(t)).item(), rel=1e-12)
    sub = build_loss(name, sample_rows=5, **kw)
    torch.manual_seed(123)
    keep = torch.rand(1, 9).argsort(1)[0, :5].numpy()
    torch.manual_seed(123)
    got = sub(t64(s), t64(t)).item()
    assert got == pytest.approx(full(t64(s[keep]), t64(t[keep])).item(), rel=1e-10)


def _rkd_sampled_mean(s, t, calls, **kw):
    loss = build_loss("rkd", **kw)
    return float(np.mean([loss(t64(s), t64(t)).item() for _ in range(calls)]))


@pytest.mark.parametrize("w_d,w_a", [(1.0, 0.0), (0.0, 1.0), (25.0, 50.0)])
def test_rkd_sampled_approximates_exact_on_average(w_d, w_a):
    """Statistical, loose: at N = 40 the sampled estimate is within 10% of the exact loss."""
    torch.manual_seed(0)
    s, t, _ = make_inputs("rkd", n=40, seed=53)
    exact = build_loss("rkd", w_d=w_d, w_a=w_a)(t64(s), t64(t)).item()
    sampled = _rkd_sampled_mean(s, t, 4, w_d=w_d, w_a=w_a, pairs=20000, triplets=20000)
    assert sampled == pytest.approx(exact, rel=0.10)


@pytest.mark.parametrize("w_d,w_a", [(1.0, 0.0), (0.0, 1.0)])
def test_rkd_sampled_is_unbiased_for_small_batches(w_d, w_a):
    """The docstring promises 'an unbiased minibatch estimate of the same loss'; at N = 6 the bias is 20% / 44%."""
    torch.manual_seed(0)
    s, t, _ = make_inputs("rkd", n=6, seed=54)
    exact = build_loss("rkd", w_d=w_d, w_a=w_a)(t64(s), t64(t)).item()
    sampled = _rkd_sampled_mean(s, t, 4, w_d=w_d, w_a=w_a, pairs=50000, triplets=50000)
    assert sampled == pytest.approx(exact, rel=0.05)


def test_rkd_sampled_omega_zero_excludes_sample():
    """Sampled mode: ω = 0 samples never enter (a huge outlier with ω = 0 changes nothing)."""
    s, t, _ = make_inputs("rkd", n=8, seed=55)
    s_out, t_out = s.copy(), t.copy()
    s_out[3] += 1e3
    t_out[3] -= 1e3
    w = torch.ones(8, dtype=DT)
    w[3] = 0
    loss = build_loss("rkd", pairs=64, triplets=64)
    torch.manual_seed(7)
    a = loss(t64(s), t64(t), omega=w).item()
    torch.manual_seed(7)
    b = loss(t64(s_out), t64(t_out), omega=w).item()
    assert a == pytest.approx(b, rel=1e-10) and math.isfinite(a)


# ----------------------------------------------------------------------------------------------------------------
# CRD
# ----------------------------------------------------------------------------------------------------------------
def _normalize_rows(x):
    return x / np.maximum(np.sqrt((x ** 2).sum(-1, keepdims=True)), 1e-12)


def ref_crd(s, t, loss, cidx, idx, omega=None):
    """One CRD step (Tian et al., ICLR 2020; NTDH repository, `CRDLoss`) for one run: returns (loss, new memory_s,
    new memory_t, z_s, z_t)."""
    Ws, bs = loss.embed_s.weight.detach()[0].numpy(), loss.embed_s.bias.detach()[0, :, 0].numpy()
    Wt, bt = loss.embed_t.weight.detach()[0].numpy(), loss.embed_t.bias.detach()[0, :, 0].numpy()
    mem_s, mem_t = loss.memory_s[0].numpy().copy(), loss.memory_t[0].numpy().copy()
    z_s, z_t = float(loss.z_s[0]), float(loss.z_t[0])
    n_data, K, T, m, eps = loss.n_data, loss.nce_k, loss.nce_t, loss.nce_m, loss.eps
    vs, vt = _normalize_rows(s @ Ws.T + bs), _normalize_rows(t @ Wt.T + bt)
    B, cols = cidx.shape
    w = np.ones(B) if omega is None else omega

    def nce(anchors, memory, z):
        out = np.array([[math.exp(memory[cidx[b, k]] @ anchors[b] / T) for k in range(cols)] for b in range(B)])
        if z < 0:
            z = out.mean() * n_data
        p = out / z
        pn = K / n_data
        total = 0.0
        for b in range(B):
            lp = math.log(p[b, 0] / (p[b, 0] + pn + eps))
            ln = sum(math.log(pn / (p[b, k] + pn + eps)) for k in range(1, cols)) * K / (cols - 1)
            total += w[b] * -(lp + ln)
        return total / B, z

    l1, z_s = nce(vs, mem_t, z_s)
    l2, z_t = nce(vt, mem_s, z_t)
    new_s, new_t = mem_s.copy(), mem_t.copy()
    for b in range(B):
        new_s[idx[b]] = _normalize_rows(mem_s[idx[b]] * m + vs[b] * (1 - m))
        new_t[idx[b]] = _normalize_rows(mem_t[idx[b]] * m + vt[b] * (1 - m))
    return l1 + l2, new_s, new_t, z_s, z_t


def _crd(n_data=12, nce_k=5, runs=None, seed=0, **kw):
    torch.manual_seed(seed)
    return build_loss("crd", student_dim=3, teacher_dim=4, n_data=n_data, feat_dim=6, nce_k=nce_k, runs=runs,
                      **kw).double()


def _capture_contrast(monkeypatch, loss, fixed=None):
    """Record (or impose) the contrast indices of each call."""
    seen = []
    original = loss._contrast_index

    def wrapper(idx, y):
        out = original(idx, y) if fixed is None else fixed(idx, y)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(loss, "_contrast_index", wrapper)
    return seen


@pytest.mark.parametrize("n_data,nce_k", [(12, 5), (60, 5)])  # small bank (one matmul) and large bank (gather)
def test_crd_value_two_steps(monkeypatch, n_data, nce_k):
    r = rng(60)
    B = 5
    loss = _crd(n_data, nce_k, nce_m=0.3, nce_t=0.1)
    seen = _capture_contrast(monkeypatch, loss)
    for step in range(2):  # step 0 fixes Z, step 1 reuses it and sees the updated memory
        s, t = r.normal(size=(B, 3)), r.normal(size=(B, 4))
        idx = r.choice(n_data, size=B, replace=False)
        w = r.uniform(0, 1, size=B)
        before = copy.deepcopy(loss)
        got = loss(t64(s), t64(t), omega=t64(w), index=torch.tensor(idx))
        cidx = seen[-1][0].numpy()
        assert cidx.shape == (B, nce_k + 1) and (cidx[:, 0] == idx).all()
        assert (cidx >= 0).all() and (cidx < n_data).all()
        ref, mem_s, mem_t, z_s, z_t = ref_crd(s, t, before, cidx, idx, w)
        assert got.dim() == 0 and got.item() == pytest.approx(ref, rel=1e-9)
        np.testing.assert_allclose(loss.memory_s[0].numpy(), mem_s, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(loss.memory_t[0].numpy(), mem_t, rtol=1e-10, atol=1e-12)
        assert float(loss.z_s[0]) == pytest.approx(z_s, rel=1e-12) and float(loss.z_t[0]) == pytest.approx(z_t,
                                                                                                          rel=1e-12)
    assert float(before.z_s[0]) > 0  # the second step ran with the Z fixed at the first


def test_crd_gradients_and_memory_update(monkeypatch):
    r = rng(61)
    B, n_data = 6, 20
    loss = _crd(n_data, 7)
    s, t = t64(r.normal(size=(B, 3)), grad=True), t64(r.normal(size=(B, 4)), grad=True)
    idx = torch.tensor(r.choice(n_data, size=B, replace=False))
    old_s, old_t = loss.memory_s.clone(), loss.memory_t.clone()
    value = loss(s, t, index=idx)
    value.backward()
    assert torch.isfinite(value)
    for x in (s, t, *loss.parameters()):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert {n for n, _ in loss.named_parameters()} == {"embed_s.weight", "embed_s.bias", "embed_t.weight",
                                                       "embed_t.bias"}
    # memory moves toward the batch embeddings, stays unit-norm, and untouched rows do not change
    with torch.no_grad():
        vs = F.normalize(loss.embed_s(s.detach().T.unsqueeze(0))[0].T, dim=-1)
        vt = F.normalize(loss.embed_t(t.detach().T.unsqueeze(0))[0].T, dim=-1)
    for mem, old, v in ((loss.memory_s, old_s, vs), (loss.memory_t, old_t, vt)):
        new_rows, old_rows = mem[0, idx], old[0, idx]
        torch.testing.assert_close(new_rows.norm(dim=-1), torch.ones(B, dtype=DT))
        assert ((new_rows * v).sum(-1) > (old_rows * v).sum(-1) / old_rows.norm(dim=-1)).all()
        rest = torch.ones(n_data, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(mem[0, rest], old[0, rest])


@pytest.mark.parametrize("seed,n_data,draws,contrast", [
    (62, 10, None, 4),   # small bank: every entry scored by one matmul
    (68, 40, 2, 3),      # large bank, projected onto [W b], with the closed-form NCE gradient (gauss's configuration)
])
def test_crd_gradcheck(monkeypatch, seed, n_data, draws, contrast):
    """With the contrast indices, memory and Z held fixed, CRD is a smooth function of both embeddings' inputs and
    its (closed-form) gradient is the numerical one."""
    r = rng(seed)
    B = 4
    loss = _crd(n_data, 3, **({} if draws is None else {"draws": draws}))
    idx = torch.tensor([1, 4, 5, 8])
    cidx = torch.tensor(r.integers(0, n_data, size=(1, B, contrast)))
    cidx[..., 0] = idx
    _capture_contrast(monkeypatch, loss, fixed=lambda i, y: cidx)
    loss(t64(r.normal(size=(B, 3))), t64(r.normal(size=(B, 4))), index=idx)  # fixes Z
    buffers = {k: v.clone() for k, v in loss.named_buffers()}
    w = t64(r.uniform(0.3, 1, size=B))

    def f(s, t):
        for k, v in buffers.items():  # fresh buffers (not copy_: earlier graphs saved the old Z)
            setattr(loss, k, v.clone())
        return loss(s, t, omega=w, index=idx)

    assert torch.autograd.gradcheck(f, (t64(r.normal(size=(B, 3)), grad=True), t64(r.normal(size=(B, 4)), grad=True)),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


def test_crd_omega_weights_anchor_terms(monkeypatch):
    """ω_b weights anchor b's NCE terms (normaliser B): ω = 1 equals unmasked, ω = 0 removes the anchor's terms;
    the memory is still updated for every sample of the batch."""
    r = rng(63)
    B, n_data = 5, 15
    base = _crd(n_data, 4)
    idx = torch.tensor(r.choice(n_data, size=B, replace=False))
    cidx = torch.tensor(r.integers(0, n_data, size=(1, B, 5)))
    cidx[..., 0] = idx
    s, t = t64(r.normal(size=(B, 3))), t64(r.normal(size=(B, 4)))
    # fix Z first so that every variant below uses the same normalisers
    _capture_contrast(monkeypatch, base, fixed=lambda i, y: cidx)
    base(s, t, index=idx)

    def run(omega):
        loss = copy.deepcopy(base)
        _capture_contrast(monkeypatch, loss, fixed=lambda i, y: cidx)
        return loss(s, t, omega=omega, index=idx).item(), loss

    plain, l_plain = run(None)
    ones, l_ones = run(torch.ones(B, dtype=DT))
    assert ones == pytest.approx(plain, rel=1e-12)
    per_anchor = [run(t64(np.eye(B)[b]))[0] for b in range(B)]
    assert plain == pytest.approx(sum(per_anchor), rel=1e-10)
    w = np.array([1.0, 0.0, 0.5, 1.0, 0.0])
    masked, l_masked = run(t64(w))
    assert masked == pytest.approx(float(np.dot(w, per_anchor)), rel=1e-10)
    torch.testing.assert_close(l_masked.memory_s, l_plain.memory_s)


def test_crd_full_batch_index_and_errors():
    loss = _crd(n_data=6, nce_k=3)
    out = loss(torch.randn(6, 3, dtype=DT), torch.randn(6, 4, dtype=DT))  # index defaults to arange(n_data)
    assert torch.isfinite(out)
    with pytest.raises(ValueError, match="index"):
        loss(torch.randn(4, 3, dtype=DT), torch.randn(4, 4, dtype=DT))
    labelled = _crd(n_data=6, nce_k=3, dataset_labels=[0, 1, 0, 1, 2, 2])
    with pytest.raises(ValueError, match="labels"):
        labelled(torch.randn(6, 3, dtype=DT), torch.randn(6, 4, dtype=DT))


def test_crd_class_aware_negatives_are_uniform_over_other_classes(monkeypatch):
    n_data = 12
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 2, 0, 1, 1, 0])
    loss = _crd(n_data, nce_k=4000, dataset_labels=labels)
    seen = _capture_contrast(monkeypatch, loss)
    idx = torch.tensor([0, 1, 6])
    torch.manual_seed(0)
    loss(torch.randn(3, 3, dtype=DT), torch.randn(3, 4, dtype=DT), labels=torch.tensor(labels[[0, 1, 6]]), index=idx)
    cidx = seen[-1][0].numpy()
    for b, i in enumerate(idx.tolist()):
        neg = cidx[b, 1:]
        assert (labels[neg] != labels[i]).all()
        allowed = np.flatnonzero(labels != labels[i])
        counts = np.bincount(neg, minlength=n_data)[allowed]
        expected = len(neg) / len(allowed)
        assert set(np.unique(neg)) == set(allowed)
        assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)


def test_crd_draws_weight_negatives(monkeypatch):
    """draws < K: each drawn negative stands for K/draws of them."""
    r = rng(64)
    loss = _crd(n_data=30, nce_k=8, draws=2)
    seen = _capture_contrast(monkeypatch, loss)
    s, t = r.normal(size=(4, 3)), r.normal(size=(4, 4))
    idx = np.array([3, 7, 11, 20])
    before = copy.deepcopy(loss)
    got = loss(t64(s), t64(t), index=torch.tensor(idx)).item()
    cidx = seen[-1][0].numpy()
    assert cidx.shape == (4, 3)
    assert got == pytest.approx(ref_crd(s, t, before, cidx, idx)[0], rel=1e-9)


def test_crd_runs_equal_separate_runs(monkeypatch):
    R, B, n_data, K = 3, 5, 14, 4
    r = rng(65)
    batched = _crd(n_data, K, runs=R)
    cidx = torch.tensor(r.integers(0, n_data, size=(R, B, K + 1)))
    idx = torch.tensor(np.stack([r.choice(n_data, size=B, replace=False) for _ in range(R)]))
    cidx[..., 0] = idx
    _capture_contrast(monkeypatch, batched, fixed=lambda i, y: cidx)
    data = [(r.normal(size=(B, 3)), r.normal(size=(B, 4))) for _ in range(R)]
    w = r.uniform(0, 1, size=(R, B))
    singles = []
    for k in range(R):
        single = _crd(n_data, K)
        _copy_run_state(batched, single, k)
        _capture_contrast(monkeypatch, single, fixed=lambda i, y, k=k: cidx[k:k + 1])
        singles.append(single)
    for _ in range(2):  # the second step checks Z and the memory updates per run
        S = torch.stack([t64(d[0].T) for d in data])
        T_ = torch.stack([t64(d[1].T) for d in data])
        total = batched(S, T_, omega=t64(w), index=idx).item()
        expected = sum(singles[k](t64(data[k][0]), t64(data[k][1]), omega=t64(w[k]), index=idx[k]).item()
                       for k in range(R))
        assert total == pytest.approx(expected, rel=1e-10)
        for k in range(R):
            torch.testing.assert_close(batched.memory_s[k], singles[k].memory_s[0])
            torch.testing.assert_close(batched.memory_t[k], singles[k].memory_t[0])


def test_crd_dense_equals_flattened_samples(monkeypatch):
    r = rng(66)
    torch.manual_seed(0)
    a = build_loss("crd", student_dim=2 * 2 * 2, teacher_dim=3 * 2 * 2, n_data=10, feat_dim=5, nce_k=3).double()
    b = copy.deepcopy(a)
    cidx = torch.tensor(r.integers(0, 10, size=(1, 4, 4)))
    idx = torch.tensor([0, 2, 5, 9])
    cidx[..., 0] = idx
    for loss in (a, b):
        _capture_contrast(monkeypatch, loss, fixed=lambda i, y: cidx)
    s, t = r.normal(size=(4, 2, 2, 2)), r.normal(size=(4, 3, 2, 2))
    va = a(t64(s), t64(t), index=idx).item()
    vb = b(t64(s.reshape(4, -1)), t64(t.reshape(4, -1)), index=idx).item()
    assert va == pytest.approx(vb, rel=1e-12)


def test_crd_sample_rows_updates_all_memory_rows():
    torch.manual_seed(0)
    loss = build_loss("crd", student_dim=3, teacher_dim=4, n_data=10, feat_dim=5, nce_k=4, sample_rows=2).double()
    old = loss.memory_s.clone()
    idx = torch.tensor([1, 3, 5, 7, 9])
    v = loss(torch.randn(5, 3, dtype=DT), torch.randn(5, 4, dtype=DT), index=idx)
    assert torch.isfinite(v)
    changed = (loss.memory_s[0] != old[0]).any(-1)
    assert changed[idx].all() and not changed[[0, 2, 4, 6, 8]].any()


# ----------------------------------------------------------------------------------------------------------------
# registry and Objective
# ----------------------------------------------------------------------------------------------------------------
def test_build_loss_unknown_name_lists_available():
    with pytest.raises(KeyError) as err:
        build_loss("kd_unknown")
    msg = str(err.value)
    assert "kd_unknown" in msg
    for name in available_losses():
        assert name in msg
    assert set(available_losses()) >= {"kl", "dkd", "js", "mse", "cosine", "fitnet", "pkt", "sp", "rkd", "crd", "ce"}


def test_build_loss_bad_kwarg_names_loss():
    with pytest.raises(TypeError, match="'dkd'.*gamma"):
        build_loss("dkd", gamma=2.0)


def _logits(n=6, c=4, seed=70):
    r = rng(seed)
    return t64(r.normal(size=(n, c)) * 2), t64(r.normal(size=(n, c)) * 2), torch.tensor(r.integers(0, c, size=n))


def test_objective_weighted_sum_and_parts():
    zs, zt, y = _logits()
    obj = build_objective({"terms": {"ce": {"weight": 1.0}, "kl": {"weight": 0.5, "temperature": 2.0},
                                     "ncjs": {"weight": 3.0, "loss": "js", "part": "nontarget"}}})
    total, parts = obj(zs, zt, y)
    ce = build_loss("ce")(zs, None, y)
    kl = build_loss("kl", temperature=2.0)(zs, zt)
    js = build_loss("js", part="nontarget")(zs, zt, y)
    assert set(parts) == {"ce", "kl", "ncjs"}
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-12)
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-12)
    assert parts["ncjs"].item() == pytest.approx(js.item(), rel=1e-12)
    assert total.item() == pytest.approx(ce.item() + 0.5 * kl.item() + 3.0 * js.item(), rel=1e-12)
    assert not any(v.requires_grad for v in parts.values())


def test_objective_omega_only_on_distillation_terms():
    zs, zt, y = _logits(n=8, seed=71)
    zt = zt.clone()
    zt[0] = torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=DT)  # make sure some teachers are wrong and some right
    y = y.clone()
    y[0] = 1
    cfg = {"terms": {"ce": {"weight": 1.0}, "kl": {"weight": 1.0}, "dkd": {"weight": 2.0}}, "mask": "omega",
           "omega": {"threshold": 0.5}}
    total, parts = build_objective(cfg)(zs, zt, y)
    w = omega_fn(zt, y, zs, threshold=0.5)
    assert (w == 0).any() and (w == 1).any()
    assert parts["ce"].item() == pytest.approx(build_loss("ce")(zs, None, y).item(), rel=1e-12)
    assert parts["kl"].item() == pytest.approx(build_loss("kl")(zs, zt, omega=w).item(), rel=1e-12)
    assert parts["dkd"].item() == pytest.approx(build_loss("dkd")(zs, zt, y, omega=w).item(), rel=1e-12)
    assert parts["kl"].item() != pytest.approx(build_loss("kl")(zs, zt).item(), rel=1e-6)
    assert total.item() == pytest.approx(parts["ce"].item() + parts["kl"].item() + 2 * parts["dkd"].item(),
                                         rel=1e-12)
    # mask "none" → unmasked
    _, unmasked = build_objective({**cfg, "mask": "none"})(zs, zt, y)
    assert unmasked["kl"].item() == pytest.approx(build_loss("kl")(zs, zt).item(), rel=1e-12)


def test_objective_context_fills_constructor_arguments_and_inputs():
    r = rng(72)
    cfg = {"terms": {"ce": {}, "fitnet": {"weight": 2.0, "input": "features"},
                     "hint2": {"loss": "fitnet", "teacher_dim": 4, "student_dim": 4}}}  # on the logits
    # context offers more than any one term accepts; config entries win over context
    obj = build_objective(cfg, context={"student_dim": 3, "teacher_dim": 6, "n_data": 100, "unused": 1}).double()
    fit = obj.terms["fitnet"]
    assert fit.regressor[0].in_features == 3 and fit.regressor[0].out_features == 6
    hint2 = obj.terms["hint2"]
    assert hint2.regressor[0].in_features == 4 and hint2.regressor[0].out_features == 4
    assert obj.weights == {"ce": 1.0, "fitnet": 2.0, "hint2": 1.0}
    assert len(list(obj.parameters())) == 4  # both regressors, handed to the optimiser
    student = {"logits": t64(r.normal(size=(5, 4))), "features": t64(r.normal(size=(5, 3)))}
    teacher = {"logits": t64(r.normal(size=(5, 4))), "features": t64(r.normal(size=(5, 6)))}
    y = torch.tensor(r.integers(0, 4, size=5))
    total, parts = obj(student, teacher, y)
    assert parts["fitnet"].item() == pytest.approx(fit(student["features"], teacher["features"]).item(), rel=1e-12)
    assert parts["hint2"].item() == pytest.approx(hint2(student["logits"], teacher["logits"]).item(), rel=1e-12)
    assert parts["ce"].item() == pytest.approx(build_loss("ce")(student["logits"], None, y).item(), rel=1e-12)
    total.backward()
    assert all(p.grad is not None for p in obj.parameters())
    with pytest.raises(KeyError, match="embeddings"):
        build_objective({"terms": {"mse": {"input": "embeddings"}}})(student, teacher, y)
    # without context fitnet cannot be built; the error names the loss
    with pytest.raises(TypeError, match="fitnet"):
        build_objective({"terms": {"fitnet": {}}})


def test_objective_runs_parts_are_per_run_means():
    R, C, N = 3, 4, 5
    r = rng(73)
    zs, zt = t64(r.normal(size=(R, C, N))), t64(r.normal(size=(R, C, N)))
    y = torch.tensor(r.integers(0, C, size=(R, N)))
    obj = build_objective({"terms": {"ce": {}, "kl": {"weight": 0.3}}, "mask": "omega"}, runs=R)
    total, parts = obj(zs, zt, y)
    ce_sum, kl_sum = 0.0, 0.0
    for k in range(R):
        w = omega_fn(zt[k].T, y[k], zs[k].T)
        ce_sum += build_loss("ce")(zs[k].T, None, y[k]).item()
        kl_sum += build_loss("kl")(zs[k].T, zt[k].T, omega=w).item()
    assert total.item() == pytest.approx(ce_sum + 0.3 * kl_sum, rel=1e-12)
    assert parts["ce"].item() == pytest.approx(ce_sum / R, rel=1e-12)
    assert parts["kl"].item() == pytest.approx(kl_sum / R, rel=1e-12)


def test_objective_bad_config():
    with pytest.raises(ValueError, match="mask"):
        build_objective({"terms": {"ce": {}}, "mask": "pssm"})
    with pytest.raises(ValueError, match="empty"):
        build_objective({"terms": {}})
