"""common.synthetic.vectorized: R stacked models == R separate models (forward, seeded init, full-batch SGD training)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.kd import build_objective
from common.synthetic.vectorized import BatchedLinear, accuracy, batched_mlp, cross_entropy_sum, fit

DT = torch.float64


def t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=DT, requires_grad=grad)


# ----------------------------------------------------------------------------------------------------------------
# BatchedLinear
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_batched_linear_equals_separate_linears(bias):
    R, D, O, N = 4, 3, 5, 7
    layer = BatchedLinear(D, O, runs=R, bias=bias, dtype=DT)
    x = t(np.random.default_rng(0).normal(size=(R, D, N)), grad=True)
    out = layer(x)
    assert out.shape == (R, O, N)
    for r in range(R):
        b = layer.bias[r, :, 0] if bias else None
        ref = F.linear(x[r].T, layer.weight[r], b).T  # nn.Linear on the (N, D) samples of run r
        torch.testing.assert_close(out[r], ref, rtol=1e-12, atol=1e-12)
    out.pow(2).sum().backward()
    # run r's parameters get only the gradient of run r's outputs
    for r in range(R):
        w = layer.weight[r].detach().clone().requires_grad_(True)
        b = layer.bias[r, :, 0].detach().clone().requires_grad_(True) if bias else None
        F.linear(x[r].detach().T, w, b).pow(2).sum().backward()
        torch.testing.assert_close(layer.weight.grad[r], w.grad, rtol=1e-12, atol=1e-12)
        if bias:
            torch.testing.assert_close(layer.bias.grad[r, :, 0], b.grad, rtol=1e-12, atol=1e-12)


def test_batched_linear_without_runs_is_shared_1x1_conv():
    layer = BatchedLinear(3, 2, dtype=DT)
    assert layer.weight.shape == (1, 2, 3) and layer.bias.shape == (1, 2, 1)
    x = t(np.random.default_rng(1).normal(size=(5, 3, 4)))  # (B, in, N)
    out = layer(x)
    conv = F.conv1d(x, layer.weight[0].unsqueeze(-1), layer.bias[0, :, 0])
    torch.testing.assert_close(out, conv, rtol=1e-12, atol=1e-12)


def test_batched_linear_shape_errors_and_repr():
    layer = BatchedLinear(3, 2, runs=4)
    with pytest.raises(ValueError, match="runs=4"):
        layer(torch.randn(3, 3, 5))
    with pytest.raises(ValueError):
        layer(torch.randn(4, 2, 5))
    assert "runs=4" in repr(layer)
    with pytest.raises(ValueError, match="seeds"):
        BatchedLinear(3, 2, runs=4, seeds=[1, 2])


def test_init_bounds_like_nn_linear():
    layer = BatchedLinear(16, 50, runs=3)
    bound = 1 / math.sqrt(16)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight.abs().max() > 0.8 * bound  # uniform over the whole range, not a tiny init
    assert not torch.equal(layer.weight[0], layer.weight[1])


def test_seeds_make_runs_independent_of_run_count():
    seeds = [11, 5, 42, 7]
    big = BatchedLinear(4, 3, runs=4, seeds=seeds)
    for r, s in enumerate(seeds):
        alone = BatchedLinear(4, 3, runs=1, seeds=[s])
        torch.testing.assert_close(big.weight[r], alone.weight[0], rtol=0, atol=0)
        torch.testing.assert_close(big.bias[r], alone.bias[0], rtol=0, atol=0)
    pair = BatchedLinear(4, 3, runs=2, seeds=[42, 11])
    torch.testing.assert_close(pair.weight[0], big.weight[2], rtol=0, atol=0)
    torch.testing.assert_close(pair.weight[1], big.weight[0], rtol=0, atol=0)
    # the seeded draw does not depend on (or disturb) the global RNG state
    torch.manual_seed(0)
    a = BatchedLinear(4, 3, runs=1, seeds=[5])
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = BatchedLinear(4, 3, runs=1, seeds=[5])
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    torch.manual_seed(0)
    torch.rand(1)
    assert not torch.equal(a.weight, BatchedLinear(4, 3, runs=1, seeds=[6]).weight)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after_a)
    # reset_parameters(seeds) reproduces the init
    w0 = big.weight.detach().clone()
    with torch.no_grad():
        big.weight.zero_()
    big.reset_parameters(seeds)
    torch.testing.assert_close(big.weight, w0, rtol=0, atol=0)


def test_batched_mlp_seeds_independent_of_run_count():
    seeds = [3, 9, 27]
    big = batched_mlp([5, 8, 4], runs=3, seeds=seeds)
    assert isinstance(big[1], nn.ReLU) and len(big) == 3
    x = torch.randn(3, 5, 6)
    out = big(x)
    for r, s in enumerate(seeds):
        alone = batched_mlp([5, 8, 4], runs=1, seeds=[s])
        torch.testing.assert_close(out[r:r + 1], alone(x[r:r + 1]), rtol=1e-6, atol=1e-6)
    # different layers of one run are not drawn from the same seed
    assert not torch.equal(big[0].weight[0, :4, :4], big[2].weight[0, :4, :4])


# ----------------------------------------------------------------------------------------------------------------
# cross_entropy_sum, accuracy
# ----------------------------------------------------------------------------------------------------------------
def test_cross_entropy_sum_and_accuracy():
    r = np.random.default_rng(2)
    R, C, N = 3, 4, 6
    z = r.normal(size=(R, C, N))
    y = r.integers(0, C, size=(R, N))
    expected = 0.0
    for k in range(R):
        lp = z[k] - z[k].max(0) - np.log(np.exp(z[k] - z[k].max(0)).sum(0))
        expected += -np.mean([lp[y[k, i], i] for i in range(N)])
    assert cross_entropy_sum(t(z), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-12)
    acc = accuracy(t(z), torch.tensor(y))
    assert acc.shape == (R,)
    np.testing.assert_allclose(acc.numpy(), (z.argmax(1) == y).mean(1), rtol=1e-6)
    assert accuracy(t(np.eye(3)[None]), torch.tensor([[0, 1, 0]])).tolist() == pytest.approx([2 / 3])


# ----------------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------------
def _problem(R=3, D=4, C=3, N=20, seed=3):
    r = np.random.default_rng(seed)
    x = r.normal(size=(R, D, N))
    w_true = r.normal(size=(R, C, D))
    y = np.einsum("rcd,rdn->rcn", w_true, x).argmax(1)
    return t(x), torch.tensor(y)


def _separate_sgd(weight, bias, x, y, epochs, lr, momentum):
    """One softmax regression (nn.Linear semantics) by full-batch torch SGD with autograd."""
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=momentum)
    for _ in range(epochs):
        loss = F.cross_entropy(F.linear(x.T, w, b), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fit_stacked_logistic_regressions_equal_separate_trainings(momentum):
    R, epochs, lr = 3, 25, 0.5
    x, y = _problem(R)
    model = BatchedLinear(4, 3, runs=R, seeds=[1, 2, 3], dtype=DT)
    init_w, init_b = model.weight.detach().clone(), model.bias.detach().clone()
    out = fit(model, x, y, epochs=epochs, lr=lr, momentum=momentum)
    assert out is model and not model.training
    assert not torch.equal(model.weight, init_w)
    for r in range(R):
        w, b = _separate_sgd(init_w[r], init_b[r, :, 0], x[r], y[r], epochs, lr, momentum)
        torch.testing.assert_close(model.weight[r].detach(), w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.bias[r, :, 0].detach(), b, rtol=1e-10, atol=1e-12)
    # training helped
    assert (accuracy(model(x), y) > accuracy(BatchedLinear(4, 3, runs=R, seeds=[1, 2, 3], dtype=DT)(x), y)).all() \
        or (accuracy(model(x), y) == 1).all()


def test_fit_mlp_runs_equal_separate_runs():
    R = 3
    x, y = _problem(R=R, seed=5)
    seeds = [10, 20, 30]
    big = batched_mlp([4, 6, 3], runs=R, seeds=seeds).double()
    fit(big, x, y, epochs=10, lr=0.2, momentum=0.5)
    for r, s in enumerate(seeds):
        alone = batched_mlp([4, 6, 3], runs=1, seeds=[s]).double()
        fit(alone, x[r:r + 1], y[r:r + 1], epochs=10, lr=0.2, momentum=0.5)
        for p_big, p_alone in zip(big.parameters(), alone.parameters()):
            torch.testing.assert_close(p_big[r:r + 1], p_alone, rtol=1e-10, atol=1e-12)


def test_fit_with_objective_trains_objective_parameters_per_run():
    """With an objective (ce + fitnet on the logits + kl), run r's model and regressor follow run r's own loss."""
    R = 2
    x, y = _problem(R=R, seed=6)
    teacher = t(np.random.default_rng(7).normal(size=(R, 3, 20)))
    cfg = {"terms": {"ce": {}, "kl": {"weight": 0.5}, "fitnet": {"weight": 0.3}}, "mask": "omega"}
    ctx = {"student_dim": 3, "teacher_dim": 3}
    torch.manual_seed(0)
    obj = build_objective(cfg, runs=R, context=ctx).double()
    model = BatchedLinear(4, 3, runs=R, seeds=[1, 2], dtype=DT)
    singles = []
    for r in range(R):
        o = build_objective(cfg, runs=1, context=ctx).double()
        o.load_state_dict({k: v[r:r + 1].clone() for k, v in obj.state_dict().items()})
        singles.append((BatchedLinear(4, 3, runs=1, seeds=[r + 1], dtype=DT), o))
    reg0 = obj.terms["fitnet"].regressor[0].weight.detach().clone()
    fit(model, x, y, epochs=8, lr=0.2, objective=obj, teacher_out=teacher)
    assert not torch.equal(obj.terms["fitnet"].regressor[0].weight, reg0)  # the objective's parameters trained
    for r, (m, o) in enumerate(singles):
        fit(m, x[r:r + 1], y[r:r + 1], epochs=8, lr=0.2, objective=o, teacher_out=teacher[r:r + 1])
        torch.testing.assert_close(model.weight[r:r + 1], m.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(obj.terms["fitnet"].regressor[0].weight[r:r + 1],
                                   o.terms["fitnet"].regressor[0].weight, rtol=1e-10, atol=1e-12)
