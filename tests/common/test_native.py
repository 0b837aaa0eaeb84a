"""common.synthetic.native (fastfit's C engine): the same updates as autograd + torch.optim.SGD and as the torch engine for every
closed-form loss, on shapes that exercise the kernel's padding (widths not a multiple of 8, a partial last tile of
samples, one to four layers); fallback and errors when it cannot run; the build cache."""
import copy

import pytest
import torch

from common.synthetic import fastfit, native
from common.divergence import nontarget_js
from common.kd import build_objective
from common.saliency import joint_train
from common.synthetic.vectorized import BatchedLinear, batched_mlp, cross_entropy_sum

# only a machine without a C compiler skips: where one exists, a kernel that does not build fails these tests
pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")

# (dims, samples): the sklearn MLP, odd widths with a partial tile, lone linear layers (gauss: two classes), a deeper
# stack with more classes than the kernel's specialised 2..4
SHAPES = [((50, 16, 16, 4), 300), ((7, 13, 5, 3), 97), ((9, 3), 200), ((25, 2), 200), ((6, 24, 9, 10, 5), 130)]


def params(models):
    return [p for m in models for p in m.parameters()]


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


def data(dims, n, seed, runs=3):
    g = torch.Generator().manual_seed(seed)
    x, x2 = torch.randn(runs, dims[0], n, generator=g), torch.randn(runs, dims[0], n, generator=g)
    y = torch.randint(0, dims[-1], (runs, n), generator=g)
    return x, x2, y, 3 * torch.randn(runs, dims[-1], n, generator=g)


def stacks(dims, runs, n_models):
    return [batched_mlp(list(dims), runs, seeds=[100 * m + r for r in range(runs)]) for m in range(n_models)]


def losses(y, teacher, n_classes):
    """name → (models, closed form, the same loss for autograd on [logits])"""
    ce = lambda z, w=1.0: w * cross_entropy_sum(z, y)
    kl_obj = build_objective({"terms": {"ce": {"weight": 0.8}, "kl": {"weight": 1.3, "temperature": 2.0,
                                                                          "reduction": "mean", "t2": True}}}, runs=3)
    kl1_obj = build_objective({"terms": {"ce": {}, "kl": {"temperature": 1.0}}}, runs=3)
    agree = lambda d, kind: (d.pow(2) if kind == "mse" else d.abs()).mean((1, 2)).sum()
    return {
        "ce": (1, fastfit.ce_grad(y, n_classes, weight=0.7), lambda z: ce(z[0], 0.7)),
        "ce_kl": (1, fastfit.objective_grad(kl_obj, y, n_classes, teacher), lambda z: kl_obj(z[0], teacher, y)[0]),
        "ce_kl_t1": (1, fastfit.objective_grad(kl1_obj, y, n_classes, teacher),
                     lambda z: kl1_obj(z[0], teacher, y)[0]),
        "joint_ncjsd": (2, fastfit.joint_ncjsd_grad(y, n_classes, 0.7),
                        lambda z: ce(z[0]) + ce(z[1]) + 0.7 * nontarget_js(z[1], z[0], y, dim=1).mean(-1).sum()),
        "joint_mse": (2, fastfit.joint_logit_grad(y, n_classes, "mse", 0.5),
                      lambda z: ce(z[0]) + ce(z[1]) + 0.5 * agree(z[0] - z[1], "mse")),
        "joint_l1": (2, fastfit.joint_logit_grad(y, n_classes, "l1", 0.5),
                     lambda z: ce(z[0]) + ce(z[1]) + 0.5 * agree(z[0] - z[1], "l1")),
    }


def autograd_reference(models, inputs, loss, epochs, lr, momentum):
    """Plain autograd + torch.optim.SGD over every model's parameters on the summed loss."""
    opt = torch.optim.SGD(params(models), lr=lr, momentum=momentum)
    for _ in range(epochs):
        opt.zero_grad()
        loss([m(x) for m, x in zip(models, inputs)]).backward()
        opt.step()


@pytest.mark.parametrize("dims,n", SHAPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_native_engine_makes_the_updates_of_autograd_and_of_the_torch_engine(dims, n, momentum):
    x, x2, y, teacher = data(dims, n, seed=len(dims) * 7 + n)
    for name, (n_models, grad, loss) in losses(y, teacher, dims[-1]).items():
        assert grad.kind == name.removesuffix("_t1")
        start = stacks(dims, 3, n_models)
        ref, ours, torch_engine = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
        inputs = [x, x2][:n_models]
        autograd_reference(ref, inputs, loss, epochs=12, lr=0.05, momentum=momentum)
        fastfit.fit(ours, inputs, grad_fn=grad, epochs=12, lr=0.05, momentum=momentum, engine="native")
        fastfit.fit(torch_engine, inputs, grad_fn=grad, epochs=12, lr=0.05, momentum=momentum, engine="torch")
        moved = max_diff(params(ref), params(start))
        assert moved > 1e-2, name   # it trained
        assert max_diff(params(ours), params(ref)) < 1e-5 * max(1.0, moved), name
        assert max_diff(params(ours), params(torch_engine)) < 1e-5 * max(1.0, moved), name
        assert all(not m.training for m in ours)


def test_native_gradients_equal_autograd_where_the_distillation_term_dominates():
    """One epoch at lr = 1000 reads the kernel's gradient off the update to ~1e-6 relative: each loss's gradient,
    with the distillation / agreement term weighted up so that an error in it cannot hide behind the CE part."""
    dims = (7, 13, 5, 4)
    x, x2, y, teacher = data(dims, 203, seed=8)
    kl = build_objective({"terms": {"ce": {"weight": 0.1}, "kl": {"weight": 5.0, "temperature": 2.0}}}, runs=3)
    ce = lambda z: cross_entropy_sum(z, y)
    cases = {
        "ce_kl": (fastfit.objective_grad(kl, y, 4, teacher), lambda z: kl(z[0], teacher, y)[0]),
        "joint_ncjsd": (fastfit.joint_ncjsd_grad(y, 4, 30.0),
                        lambda z: ce(z[0]) + ce(z[1]) + 30.0 * nontarget_js(z[1], z[0], y, dim=1).mean(-1).sum()),
        "joint_mse": (fastfit.joint_logit_grad(y, 4, "mse", 5.0),
                      lambda z: ce(z[0]) + ce(z[1]) + 5.0 * (z[0] - z[1]).pow(2).mean((1, 2)).sum()),
    }
    for name, (grad, loss) in cases.items():
        start = stacks(dims, 3, grad.models)
        inputs = [x, x2][:grad.models]
        for m in start:   # spread the logits, so that the non-target distributions are far from uniform
            with torch.no_grad():
                m[-1].weight.mul_(4.0)
        ours = copy.deepcopy(start)
        fastfit.fit(ours, inputs, grad_fn=grad, epochs=1, lr=1000.0, engine="native")
        reference = torch.autograd.grad(loss([m(x) for m, x in zip(start, inputs)]), params(start))
        for p0, p1, g in zip(params(start), params(ours), reference):
            torch.testing.assert_close((p0 - p1).detach() / 1000.0, g, rtol=1e-4, atol=1e-4 * g.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")


def test_native_engine_matches_joint_train_over_many_epochs():
    """Alg. 1 step 1 as sklearn_exp runs it (momentum 0.9), 150 epochs: common.saliency.joint_train vs native."""
    dims = (50, 16, 16, 4)
    x, x2, y, _ = data(dims, 500, seed=11, runs=2)
    ta, sa = stacks(dims, 2, 2)
    tb, sb = copy.deepcopy(ta), copy.deepcopy(sa)
    loss = lambda zt, zs, yy: (cross_entropy_sum(zt, yy) + cross_entropy_sum(zs, yy)
                               + nontarget_js(zs, zt, yy, dim=1).mean(-1).sum())
    joint_train(ta, sa, lambda: [(x, x2, y)], epochs=150, lr=0.01, momentum=0.9, loss_fn=loss)
    fastfit.fit([tb, sb], [x, x2], epochs=150, lr=0.01, momentum=0.9, grad_fn=fastfit.joint_ncjsd_grad(y, 4),
                engine="native")
    assert max_diff([*ta.parameters(), *sa.parameters()], [*tb.parameters(), *sb.parameters()]) < 1e-4


def test_vector_exp_and_log_are_accurate_to_a_few_ulp():
    """The kernel's own e^x (softmax arguments, x <= 0) and ln x, against float64 over their whole ranges."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([-87.0 * torch.rand(20001, generator=g), torch.tensor([0.0, -1e-30, -86.99, -0.3466, -0.3467])])
    e = native.vector_math("exp", x).double()
    assert ((e - x.double().exp()).abs() / x.double().exp()).max() < 3e-7
    u = torch.cat([torch.rand(10001, generator=g) + 1.0, 10 ** (60 * torch.rand(10001, generator=g) - 30),
                   torch.tensor([1.0, 2.0, 0.70710677, 0.70710683, 3.4e38, 1.2e-38])])
    ln = native.vector_math("log", u).double()
    err = (ln - u.double().log()).abs()
    assert (err / u.double().log().abs().clamp_min(1.0)).max() < 3e-7
    assert ln[torch.nonzero(u == 1.0)].abs().max() == 0.0


def test_auto_falls_back_to_torch_and_native_says_why():
    dims = (5, 8, 3)
    x, _, y, _ = data(dims, 40, seed=3)
    a = batched_mlp(list(dims), 3, seeds=[1, 2, 3]).double()
    b = copy.deepcopy(a)
    fastfit.fit([a], [x.double()], labels=y, epochs=5, lr=0.1, engine="auto")      # float64: the torch engine
    fastfit.fit([b], [x.double()], labels=y, epochs=5, lr=0.1, engine="torch")
    assert max_diff(a.parameters(), b.parameters()) == 0.0
    with pytest.raises(ValueError, match="float32 CPU"):
        fastfit.fit([a], [x.double()], labels=y, epochs=1, lr=0.1, engine="native")
    m = batched_mlp(list(dims), 3, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="no native closed form"):
        fastfit.fit([m], [x], loss_fn=lambda z: cross_entropy_sum(z[0], y), epochs=1, lr=0.1, engine="native")
    with pytest.raises(ValueError, match="engine must be one of"):
        fastfit.fit([m], [x], labels=y, epochs=1, lr=0.1, engine="fast")
    deep = batched_mlp([5] + [4] * native.MAX_LAYERS + [3], 3, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="layers"):
        fastfit.fit([deep], [x], labels=y, epochs=1, lr=0.1, engine="native")
    out_of_range = fastfit.LogitGrad("ce", lambda sl, z: None, y + 3, 3, params=(1.0,))
    with pytest.raises(ValueError, match="labels must lie"):
        fastfit.fit([m], [x], grad_fn=out_of_range, epochs=1, lr=0.1, engine="native")


def test_non_contiguous_parameters_are_trained_and_written_back():
    dims = (6, 8, 3)
    x, _, y, _ = data(dims, 50, seed=4)
    a = BatchedLinear(6, 3, runs=3, seeds=[1, 2, 3])
    b = copy.deepcopy(a)
    with torch.no_grad():   # the same values, stored transposed (a non-contiguous parameter)
        b.weight = torch.nn.Parameter(b.weight.detach().transpose(1, 2).contiguous().transpose(1, 2))
    assert not b.weight.is_contiguous()
    fastfit.fit([a], [x], labels=y, epochs=7, lr=0.2, engine="native")
    fastfit.fit([b], [x], labels=y, epochs=7, lr=0.2, engine="native")
    assert max_diff(a.parameters(), b.parameters()) == 0.0
    assert max_diff(a.parameters(), BatchedLinear(6, 3, runs=3, seeds=[1, 2, 3]).parameters()) > 1e-2


def test_build_is_cached_by_source_and_a_failed_build_falls_back(tmp_path, monkeypatch):
    first = native.build(out_dir=tmp_path)
    assert native.build(out_dir=tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]   # no temporary files left behind
    # a broken compiler: the build error names it, auto trains with torch, native is refused with the reason
    bad = tmp_path / "broken-cc"
    bad.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="broken"):
        native.build(out_dir=tmp_path / "other", compiler=str(bad))
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("CMKD_NATIVE_CACHE", str(tmp_path / "empty"))
    native._reset()
    try:
        assert "broken" in native.unavailable()
        assert native.describe("auto").startswith("torch (native engine unavailable")
        x, _, y, _ = data((4, 3), 30, seed=5)
        m = BatchedLinear(4, 3, runs=3, seeds=[1, 2, 3])
        fastfit.fit([m], [x], labels=y, epochs=2, lr=0.1)   # auto: torch
        with pytest.raises(ValueError, match="broken"):
            fastfit.fit([m], [x], labels=y, epochs=1, lr=0.1, engine="native")
    finally:
        monkeypatch.undo()
        native._reset()
    assert native.unavailable() is None
    monkeypatch.setenv("CMKD_NATIVE", "0")
    native._reset()
    try:
        assert native.unavailable() == "disabled by CMKD_NATIVE=0"
    finally:
        monkeypatch.undo()
        native._reset()


def test_mismatched_shapes_are_refused_not_read_out_of_bounds():
    x, _, y, _ = data((6, 3), 40, seed=6)
    m = BatchedLinear(5, 3, runs=3, seeds=[1, 2, 3])   # expects 5 inputs, gets 6
    with pytest.raises(ValueError, match=r"\(R, D, N\)"):
        fastfit.fit([m], [x], labels=y, epochs=1, lr=0.1, engine="native")
    ok = BatchedLinear(6, 3, runs=3, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match=r"\(R, N\)"):
        fastfit.fit([ok], [x], grad_fn=fastfit.ce_grad(y[:, :30], 3), epochs=1, lr=0.1, engine="native")
