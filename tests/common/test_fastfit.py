"""common.synthetic.fastfit (torch engine): the hand-written backward and every closed-form logit gradient make the updates of
autograd + torch.optim.SGD through the losses they replace; objective_grad covers exactly the objectives it can.
The native engine is held to the same references in test_native.py."""
import copy

import pytest
import torch

from common.synthetic import dispatch, fastfit
from common.divergence import nontarget_js
from common.kd import build_objective
from common.saliency import joint_train, saliency_vector
from common.synthetic.vectorized import BatchedLinear, batched_mlp, cross_entropy_sum
from common.synthetic.vectorized import fit as autograd_fit


def mlp(runs, seeds, dims=(50, 16, 16, 4)):
    return batched_mlp(list(dims), runs, seeds=seeds)


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


def test_fast_trainer_equals_autograd_sgd():
    g = torch.Generator().manual_seed(0)
    R, N = 3, 300
    x, x2 = torch.randn(R, 50, N, generator=g), torch.randn(R, 50, N, generator=g)
    y = torch.randint(0, 4, (R, N), generator=g)
    # cross-entropy (closed-form logit gradient, chunked backward)
    a = mlp(R, [1, 2, 3])
    b = copy.deepcopy(a)
    autograd_fit(a, x, y, epochs=25, lr=0.05, momentum=0.5)
    fastfit.fit([b], [x], labels=y, epochs=25, lr=0.05, momentum=0.5, chunk=2, engine="torch")
    assert _max_diff(a.parameters(), b.parameters()) < 1e-5
    assert _max_diff(a.parameters(), mlp(R, [1, 2, 3]).parameters()) > 1e-3  # it trained
    # a KD objective with ω and a trainable regressor
    t = torch.randn(R, 4, N, generator=g)
    obj = build_objective({"terms": {"ce": {"weight": 1.0}, "fitnet": {"weight": 0.1, "regressor": "bn_relu"},
                                     "kl": {"weight": 1.0}}, "mask": "omega"}, runs=R,
                          context={"student_dim": 4, "teacher_dim": 4})
    obj2 = copy.deepcopy(obj)
    a = mlp(R, [1, 2, 3])
    b = copy.deepcopy(a)
    autograd_fit(a, x, y, epochs=25, lr=0.05, objective=obj, teacher_out=t)
    fastfit.fit([b], [x], epochs=25, lr=0.05, loss_fn=lambda z: obj2(z[0], t, y)[0],
               extra_params=list(obj2.parameters()), chunk=2)
    assert _max_diff([*a.parameters(), *obj.parameters()], [*b.parameters(), *obj2.parameters()]) < 1e-5
    # Alg. 1 joint training, against common.saliency.joint_train with the same run-summed loss
    ta, sa = mlp(R, [1, 2, 3]), mlp(R, [4, 5, 6])
    tb, sb = copy.deepcopy(ta), copy.deepcopy(sa)
    loss = lambda zt, zs, yy: (cross_entropy_sum(zt, yy) + cross_entropy_sum(zs, yy)
                               + nontarget_js(zs, zt, yy, dim=1).mean(-1).sum())
    joint_train(ta, sa, lambda: [(x, x2, y)], epochs=25, lr=0.01, momentum=0.9, loss_fn=loss)
    fastfit.fit([tb, sb], [x, x2], epochs=25, lr=0.01, momentum=0.9, loss_fn=lambda z: loss(z[0], z[1], y))
    assert _max_diff([*ta.parameters(), *sa.parameters()], [*tb.parameters(), *sb.parameters()]) < 1e-5
    with pytest.raises(TypeError, match="BatchedLinear"):
        fastfit.fit([torch.nn.Linear(3, 2)], [x], labels=y, epochs=1, lr=0.1)


def test_closed_form_gradients_equal_autograd():
    """fastfit.joint_ncjsd_grad / kd_kl_grad make the updates of autograd through the losses they replace."""
    g = torch.Generator().manual_seed(1)
    R, N = 3, 300
    x, x2 = torch.randn(R, 50, N, generator=g), torch.randn(R, 50, N, generator=g)
    y = torch.randint(0, 4, (R, N), generator=g)
    ta, sa = mlp(R, [1, 2, 3]), mlp(R, [4, 5, 6])
    tb, sb = copy.deepcopy(ta), copy.deepcopy(sa)
    loss = lambda zt, zs, yy: (cross_entropy_sum(zt, yy) + cross_entropy_sum(zs, yy)
                               + 0.7 * nontarget_js(zs, zt, yy, dim=1).mean(-1).sum())
    joint_train(ta, sa, lambda: [(x, x2, y)], epochs=25, lr=0.05, momentum=0.9, loss_fn=loss)
    fastfit.fit([tb, sb], [x, x2], epochs=25, lr=0.05, momentum=0.9, grad_fn=fastfit.joint_ncjsd_grad(y, 4, 0.7),
               chunk=1, engine="torch")
    assert _max_diff([*ta.parameters(), *sa.parameters()], [*tb.parameters(), *sb.parameters()]) < 1e-5
    for kl in [{"weight": 1.0, "temperature": 1.0},
               {"weight": 1.3, "temperature": 2.0, "reduction": "mean", "t2": True}]:
        t = 3 * torch.randn(R, 4, N, generator=g)
        obj = build_objective({"terms": {"ce": {"weight": 0.8}, "kl": kl}}, runs=R)
        a = mlp(R, [1, 2, 3])
        b = copy.deepcopy(a)
        autograd_fit(a, x, y, epochs=25, lr=0.05, objective=obj, teacher_out=t)
        grad_fn = fastfit.objective_grad(obj, y, 4, t)
        assert grad_fn is not None
        fastfit.fit([b], [x], epochs=25, lr=0.05, grad_fn=grad_fn, chunk=2, engine="torch")
        assert _max_diff(a.parameters(), b.parameters()) < 1e-5
    with pytest.raises(ValueError, match="not both"):
        fastfit.fit([a], [x], epochs=1, lr=0.1, loss_fn=lambda z: z[0].sum(), grad_fn=fastfit.ce_grad(y, 4))


@pytest.mark.parametrize("distance", ["mse", "l1"])
def test_joint_logit_grad_equals_autograd_on_a_single_linear_layer(distance):
    """MFH's Alg. 1 step 1 (CE + CE + MSE / L1 on the logits) for lone BatchedLinear layers (gauss)."""
    g = torch.Generator().manual_seed(3)
    R, N = 4, 120
    x, x2 = torch.randn(R, 9, N, generator=g), torch.randn(R, 7, N, generator=g)
    y = torch.randint(0, 3, (R, N), generator=g)
    ta, sa = BatchedLinear(9, 3, runs=R, seeds=range(R)), BatchedLinear(7, 3, runs=R, seeds=range(10, 10 + R))
    tb, sb = copy.deepcopy(ta), copy.deepcopy(sa)

    def loss(zt, zs, yy):
        d = zt - zs
        agree = (d.pow(2) if distance == "mse" else d.abs()).mean((1, 2)).sum()
        return cross_entropy_sum(zt, yy) + cross_entropy_sum(zs, yy) + 0.5 * agree

    joint_train(ta, sa, lambda: [(x, x2, y)], epochs=30, lr=0.1, momentum=0.9, loss_fn=loss)
    fastfit.fit([tb, sb], [x, x2], epochs=30, lr=0.1, momentum=0.9,
                grad_fn=fastfit.joint_logit_grad(y, 3, distance, weight=0.5), engine="torch")
    assert _max_diff([*ta.parameters(), *sa.parameters()], [*tb.parameters(), *sb.parameters()]) < 1e-5
    with pytest.raises(ValueError, match="mse"):
        fastfit.joint_logit_grad(y, 3, "ncjsd")


def test_objective_grad_only_for_objectives_it_covers():
    R, N = 2, 10
    y = torch.randint(0, 4, (R, N))
    t = torch.randn(R, 4, N)
    ce_only = build_objective({"terms": {"ce": {"weight": 2.0}}}, runs=R)
    assert fastfit.objective_grad(ce_only, y, 4) is not None
    kl = {"terms": {"ce": {}, "kl": {"temperature": 0.7}}}
    assert fastfit.objective_grad(build_objective(kl, runs=R), y, 4, t) is not None
    assert fastfit.objective_grad(build_objective({**kl, "mask": "omega"}, runs=R), y, 4, t) is None
    assert fastfit.objective_grad(build_objective({"terms": {"ce": {}, "dkd": {}}}, runs=R), y, 4, t) is None
    smooth = build_objective({"terms": {"ce": {"label_smoothing": 0.1}}}, runs=R)
    assert fastfit.objective_grad(smooth, y, 4) is None
    # CE with weight 2: twice the plain gradient
    z = torch.randn(R, 4, N)
    g1 = fastfit.objective_grad(ce_only, y, 4)(slice(0, R), [z.clone()])[0]
    g2 = fastfit.ce_grad(y, 4)(slice(0, R), [z.clone()])[0]
    torch.testing.assert_close(g1, 2 * g2)


@pytest.mark.parametrize("variant", ["textbook", "reference"])
def test_rank1_saliency_on_a_trained_mlp_equals_the_copy_path(variant):
    """After joint training (so the non-target distributions are far from uniform), the synthetic engine's rank-1
    input path gives the reference copy path's saliency, raw and normalised."""
    g = torch.Generator().manual_seed(2)
    R, N = 2, 400
    x, x2 = torch.randn(R, 50, N, generator=g), torch.randn(R, 50, N, generator=g)
    x[:, :5] += torch.randint(0, 4, (R, 1, N), generator=g).float()
    y = torch.randint(0, 4, (R, N), generator=g)
    t, s = mlp(R, [1, 2]), mlp(R, [3, 4])
    fastfit.fit([t, s], [x, x2], epochs=30, lr=0.1, momentum=0.9, grad_fn=fastfit.joint_ncjsd_grad(y, 4))
    for normalize in (False, True):
        kw = dict(op="permute", distance="ncjsd", repeats=3, variant=variant, normalize=normalize)
        ref = saliency_vector(t, s, [(x, x2, y)], "input", chunk=7, generator=torch.Generator().manual_seed(5),
                              batch_dim=2, channel_dim=1, class_dim=1, **kw)
        fast = dispatch.saliency(t, s, x, x2, y, chunk=4, generator=torch.Generator().manual_seed(5), **kw)
        assert fast.shape == ref.shape == (R, 50)
        assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4 if normalize else 1e-8)
    assert not t.training and not s.training


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lone_linear_layer_ce_path_equals_autograd_in_float64(momentum):
    """The softmax-regression case (gauss's teachers and baselines): a lone BatchedLinear trained by fastfit's
    closed-form CE gradient == autograd + torch.optim.SGD, to float64 rounding."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 30, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 30), generator=g)
    a = BatchedLinear(4, 3, runs=2, seeds=[5, 6], dtype=torch.float64)
    b = copy.deepcopy(a)
    fastfit.fit([a], [x], labels=y, epochs=15, lr=0.3, momentum=momentum)
    autograd_fit(b, x, y, epochs=15, lr=0.3, momentum=momentum)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-10, atol=1e-12)


def test_objective_grad_needs_the_teacher_for_a_kl_term_whatever_its_name():
    R, N = 2, 10
    y = torch.randint(0, 4, (R, N))
    named = build_objective({"terms": {"ce": {}, "distill": {"loss": "kl", "temperature": 2.0}}}, runs=R)
    assert fastfit.objective_grad(named, y, 4) is None
    assert fastfit.objective_grad(named, y, 4, torch.randn(R, 4, N)) is not None
