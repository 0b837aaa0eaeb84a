"""The synthetic engine's fused KD terms (common.synthetic.fused: closed-form gradients, shortcuts, layouts) against
the plain autograd references of common.kd they replace: values and every gradient, float64."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.kd import build_loss
from common.synthetic import fused
from tests.common.test_kd_losses import ref_crd, rng

DT = torch.float64


def t64(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=DT, requires_grad=grad)


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


def _inputs_runs(runs, n, ds, dt, seed, dtype=DT):
    """(R, C, N) inputs with runs, (N, C) without."""
    g = torch.Generator().manual_seed(seed)
    shape = (runs, ds, n) if runs else (n, ds)
    s = (torch.randn(*shape, generator=g, dtype=dtype) * 1.5).requires_grad_(True)
    t = torch.randn(*((runs, dt, n) if runs else (n, dt)), generator=g, dtype=dtype) * 1.5
    w = torch.rand(*((runs, n) if runs else (n,)), generator=g, dtype=dtype)
    return s, t, w


@pytest.mark.parametrize("runs", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rkd_sampled_closed_form_equals_autograd(runs, masked, dtype):
    """The sampled RKD's closed-form gradient (constant ω) equals autograd through the same formulas (the path
    taken when ω carries a gradient), value and gradient. N = 7 with 60 draws: many degenerate pairs (i = j) and
    triplets (a = b, a = c, b = c), whose clamped norms must give the same zero / finite gradients."""
    s, t, w = _inputs_runs(runs, 7, 3, 4, seed=70, dtype=dtype)
    w[..., 2] = 0.0
    ones = torch.ones_like(w)
    loss = fused.build_loss("rkd", pairs=60, triplets=60, runs=runs)
    torch.manual_seed(5)
    fast = loss(s, t, omega=w if masked else None)
    g_fast, = torch.autograd.grad(fast, s)
    torch.manual_seed(5)
    plain = loss(s, t, omega=(w if masked else ones).clone().requires_grad_(True))
    g_plain, = torch.autograd.grad(plain, s)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, plain, **tol)
    torch.testing.assert_close(g_fast, g_plain, **tol)
    assert torch.isfinite(g_fast).all()


def test_rkd_sampled_gradcheck():
    s, t, w = _inputs_runs(2, 9, 3, 3, seed=71)
    loss = fused.build_loss("rkd", pairs=40, triplets=40, runs=2)

    def f(x):
        torch.manual_seed(3)  # the same draws on every call
        return loss(x, t, omega=w)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("weights", ["none", "constant", "with_grad"])
@pytest.mark.parametrize("block", [1 << 22, 40])
def test_rkd_exact_blocked_angle_equals_the_reference(monkeypatch, weights, block):
    """FusedRKD's exact angle term (blocks of (group, anchor) slices, closed-form gradients) equals RKDistill's
    (G, N, N, N) autograd, value and gradients w.r.t. the student and ω; block 40 splits every group into anchor
    blocks of one sample, the default puts several groups in one block. Sample 0 and 3 coincide (degenerate pairs)."""
    from common.kd.relational import RKDistill
    from common.synthetic import fused_relational

    monkeypatch.setitem(fused_relational.ANGLE_BLOCK, "cpu", block)
    s, t, w = _inputs_runs(3, 6, 2, 2, seed=72)
    with torch.no_grad():
        s[:, :, 3] = s[:, :, 0]
    w = {"none": None, "constant": w, "with_grad": w.clone().requires_grad_(True)}[weights]
    fast = fused.build_loss("rkd", runs=3)
    assert isinstance(fast, fused_relational.FusedRKD) and fast.pairs is None
    inputs = [s] + ([w] if weights == "with_grad" else [])
    value = fast(s, t, omega=w)
    grads = torch.autograd.grad(value, inputs)
    ref_value = RKDistill(runs=3)(s, t, omega=w)
    ref_grads = torch.autograd.grad(ref_value, inputs)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_rkd_exact_blocked_angle_gradcheck(monkeypatch):
    """The blocked angle sum's gradients w.r.t. the unit differences and ω against finite differences."""
    from common.kd.relational import unit_differences
    from common.synthetic import fused_relational

    monkeypatch.setitem(fused_relational.ANGLE_BLOCK, "cpu", 30)
    s, t, w = _inputs_runs(2, 5, 3, 3, seed=73)
    w.requires_grad_(True)
    v = unit_differences(t.transpose(1, 2))
    angle_sum = fused_relational._RKDAngleSum.apply
    assert torch.autograd.gradcheck(lambda x, m: angle_sum(unit_differences(x.transpose(1, 2)), v, m), (s, w),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


def _dkd_split(zs, zt, y, alpha, beta, T):
    """DKD through the general target / non-target split (the path for C > 2), per row, (G, C, N) inputs."""
    from common import divergence as D
    bin_s, nt_s, support = D.split_log_probs(zs, y, T, 1)
    bin_t, nt_t, _ = D.split_log_probs(zt, y, T, 1)
    return (alpha * D.kl_from_log(bin_t, bin_s, 1) + beta * D.kl_from_log(nt_t, nt_s, 1, support)) * T ** 2


@pytest.mark.parametrize("runs", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_dkd_binary_shortcut_equals_split(runs, masked):
    """Two classes: DKD = α·T²·KL(p_t ‖ p_s) (NCKD ≡ 0) — value and gradients (student and teacher) equal the general
    split formula."""
    s, t, w = _inputs_runs(runs, 8, 2, 2, seed=72)
    t.requires_grad_(True)
    y = torch.randint(0, 2, (runs, 8) if runs else (8,), generator=torch.Generator().manual_seed(1))
    loss = fused.build_loss("dkd", alpha=1.3, beta=8.0, temperature=2.0, runs=runs)
    got = loss(s, t, labels=y, omega=w if masked else None)
    zs, zt = (s, t) if runs else (s.t().unsqueeze(0), t.t().unsqueeze(0))
    rows = _dkd_split(zs, zt, y.reshape(zs.shape[0], -1), 1.3, 8.0, 2.0)
    if masked:
        rows = rows * w.reshape(rows.shape)
    want = rows.mean(1).sum() if runs else rows.mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(got, (s, t)), torch.autograd.grad(want, (s, t))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def _crd_scores_reference(layer, x, bank, cidx):
    """⟨m_c, normalize(W x_b + b)⟩ written plainly: (G, B, K+1) from x (G, D, B), bank (G, f, n), cidx (G, B, K+1)."""
    v = F.normalize(torch.baddbmm(layer.bias, layer.weight, x), dim=1)             # (G, f, B)
    g, b, k1 = cidx.shape
    rows = torch.stack([bank[r][:, cidx[r]] for r in range(g)])                    # (G, f, B, K+1)
    return (rows * v.unsqueeze(3)).sum(1)


@pytest.mark.parametrize("n_data,dims", [(60, (3, 6)),   # large bank, D + 1 < f: the bank projected onto [x; 1]
                                         (60, (7, 4)),   # large bank, D + 1 ≥ f: normalised embeddings directly
                                         (12, (3, 6))])  # small bank: one matmul against every entry
def test_crd_scores_all_paths_equal_plain_formula(n_data, dims):
    d, f = dims
    torch.manual_seed(0)
    loss = fused.build_loss("crd", student_dim=d, teacher_dim=d, n_data=n_data, feat_dim=f, nce_k=5, runs=2).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, d, 5, generator=g, dtype=DT, requires_grad=True)
    cidx = torch.randint(0, n_data, (2, 5, 6), generator=g)
    got = loss._scores(loss.embed_s, x, loss.bank_t, cidx).transpose(1, 2)
    want = _crd_scores_reference(loss.embed_s, x, loss.bank_t, cidx)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    params = (x, loss.embed_s.weight, loss.embed_s.bias)
    probe = torch.randn(want.shape, generator=g, dtype=DT)
    for a, b in zip(torch.autograd.grad((got * probe).sum(), params), torch.autograd.grad((want * probe).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_crd_large_bank_direct_path_value(monkeypatch):
    """One step of the large-bank path without projection (D + 1 ≥ f) against the numpy reference."""
    r = rng(67)
    B, n_data, nce_k = 5, 40, 4
    torch.manual_seed(0)
    loss = fused.build_loss("crd", student_dim=3, teacher_dim=4, n_data=n_data, feat_dim=3, nce_k=nce_k).double()
    seen = _capture_contrast(monkeypatch, loss)
    for step in range(2):  # step 0 fixes Z (unfused path), step 1 takes the fused one (_NCELoss)
        s, t = r.normal(size=(B, 3)), r.normal(size=(B, 4))
        idx = r.choice(n_data, size=B, replace=False)
        w = r.uniform(0, 1, size=B)
        before = copy.deepcopy(loss)
        got = loss(t64(s), t64(t), omega=t64(w), index=torch.tensor(idx)).item()
        ref, mem_s, mem_t, _, _ = ref_crd(s, t, before, seen[-1][0].numpy(), idx, w)
        assert got == pytest.approx(ref, rel=1e-9)
        np.testing.assert_allclose(loss.memory_s[0].numpy(), mem_s, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(loss.memory_t[0].numpy(), mem_t, rtol=1e-10, atol=1e-12)


def test_crd_full_batch_memory_update_equals_indexed():
    """Full batch (index=None) updates the whole bank without indexing: the same banks as passing index=arange."""
    torch.manual_seed(0)
    a = fused.build_loss("crd", student_dim=3, teacher_dim=4, n_data=8, feat_dim=5, nce_k=3, runs=2).double()
    b = copy.deepcopy(a)
    s, t = torch.randn(2, 3, 8, dtype=DT), torch.randn(2, 4, 8, dtype=DT)
    torch.manual_seed(1)
    va = a(s, t)
    torch.manual_seed(1)
    vb = b(s, t, index=torch.arange(8))
    torch.testing.assert_close(va, vb)
    torch.testing.assert_close(a.memory_s, b.memory_s)
    torch.testing.assert_close(a.memory_t, b.memory_t)
    torch.testing.assert_close(a.memory_s.norm(dim=-1), torch.ones(2, 8, dtype=DT))


@pytest.mark.parametrize("case", ["pkt", "sp"])
@pytest.mark.parametrize("runs", [None, 3])
def test_pkt_sp_runs_with_sample_rows_equal_subset_loss(case, runs):
    """Feature-major sampling: with runs and sample_rows, each run's loss is the full loss of its drawn subset
    (drawn as the m smallest of one uniform number per sample), ω included."""
    s, t, w = _inputs_runs(runs, 9, 3, 5, seed=73)
    m = 4
    loss = fused.build_loss(case, sample_rows=m, runs=runs)
    full = fused.build_loss(case)
    torch.manual_seed(11)
    got = loss(s, t, omega=w)
    torch.manual_seed(11)
    g = runs or 1
    keep = torch.rand(g, 9).argsort(1)[:, :m]
    cols = lambda x, r: (x[r] if runs else x.t()).t()[keep[r]]                     # (m, C) samples of run r
    want = sum(full(cols(s, r), cols(t, r), omega=(w[r] if runs else w)[keep[r]]) for r in range(g))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["pkt", "sp"])
@pytest.mark.parametrize("runs", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_pkt_sp_closed_form_equals_autograd(case, runs, masked):
    """Constant teacher and ω: the student's closed-form gradient equals autograd through the same formula (the path
    taken when the teacher carries a gradient), value and gradient."""
    s, t, w = _inputs_runs(runs, 7, 3, 5, seed=74)
    w[..., 1] = 0.0
    loss = fused.build_loss(case, runs=runs)
    omega = w if masked else None
    fast = loss(s, t, omega=omega)
    g_fast, = torch.autograd.grad(fast, s)
    plain = loss(s, t.clone().requires_grad_(True), omega=omega)
    g_plain, = torch.autograd.grad(plain, s)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", ["pkt", "sp"])
def test_pkt_sp_closed_form_gradcheck(case):
    s, t, w = _inputs_runs(2, 6, 3, 4, seed=75)
    loss = fused.build_loss(case, runs=2)
    assert torch.autograd.gradcheck(lambda x: loss(x, t, omega=w), (s,), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dims", [(3, 6), (7, 4)])  # projected bank / normalised embeddings directly
@pytest.mark.parametrize("masked", [False, True])
def test_crd_fused_nce_equals_unfused(monkeypatch, dims, masked):
    """Large bank, Z fixed: the fused _NCELoss (both factors' gradients formed in the forward pass) equals the
    reference (common.kd's CRDistill, autograd), value and every gradient (inputs and embedding parameters)."""
    d, f = dims
    r = rng(69)
    B, n_data = 6, 50
    torch.manual_seed(0)
    base = fused.build_loss("crd", student_dim=d, teacher_dim=d, n_data=n_data, feat_dim=f, nce_k=4, runs=2).double()
    cidx = torch.tensor(r.integers(0, n_data, size=(2, B, 5)))
    idx = torch.tensor(np.stack([r.choice(n_data, size=B, replace=False) for _ in range(2)]))
    cidx[..., 0] = idx
    _capture_contrast(monkeypatch, base, fixed=lambda i, y: cidx)
    base(t64(r.normal(size=(2, d, B))), t64(r.normal(size=(2, d, B))), index=idx)  # fixes Z
    s, t = t64(r.normal(size=(2, d, B)), grad=True), t64(r.normal(size=(2, d, B)), grad=True)
    w = t64(r.uniform(0, 1, size=(2, B))) if masked else None
    reference = build_loss("crd", student_dim=d, teacher_dim=d, n_data=n_data, feat_dim=f, nce_k=4, runs=2).double()
    reference.load_state_dict(base.state_dict())
    results = []
    for term in (base, reference):
        loss = copy.deepcopy(term)
        _capture_contrast(monkeypatch, loss, fixed=lambda i, y: cidx)
        value = loss(s, t, omega=w, index=idx)
        grads = torch.autograd.grad(value, (s, t, *loss.parameters()))
        results.append((value, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
