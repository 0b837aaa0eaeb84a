"""Fast full-batch SGD for R independent stacks of BatchedLinear layers (Linear → ReLU → … → Linear, runs axis
first, feature-major (R, D, N) → (R, C, N)): the trainer of the synthetic experiments (gauss, sklearn_exp).

`fit` writes the stack's backward out by hand (bmm for the weight and input gradients, a fused ReLU mask) and runs it
on `chunk` runs at a time, so a block's activations stay in cache; the per-block parameter / gradient views are built
once per fit, not per epoch. The loss enters in one of two ways:
- a closed-form logit gradient that is local to each run (`grad_fn`): the cross-entropy (`ce_grad`), CE + KL against
  a frozen teacher (`kd_kl_grad`, the teacher's softmax computed once), Alg. 1's joint CE + CE + non-target JS
  (`joint_ncjsd_grad`) or CE + CE + MSE / L1 on the logits (`joint_logit_grad`); each block of runs is then done
  forward → gradient → backward with no autograd at all. `objective_grad` returns the closed form of a
  `common.kd` Objective when it has one (CE, or CE + KL without a mask);
- any other loss (`loss_fn`: every `common.kd` objective, the ω mask, the reference's JS variant) goes through
  autograd on the (R, C, N) logits only (plus the objective's own parameters: FitNet regressor, CRD embeddings).
It performs exactly the updates of autograd + `torch.optim.SGD` (momentum, no dampening) on the run-summed loss, up
to float rounding (tests/common/test_fastfit.py compares every path with autograd).

That is the torch engine. The closed forms are `LogitGrad`s, which also describe themselves to the native engine
(`common.synthetic.native`, a C kernel compiled on first use): `fit(..., engine="auto")`, the default, trains them there —
about 2x faster on sklearn_exp's MLPs — whenever the tensors are float32 on the CPU and the kernel builds, and on
the torch engine otherwise (tests/common/test_native.py holds it to the same references).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.synthetic import native
from common.train import check_finite, due
from common.kd.logit import KLDistill
from common.kd.objective import CrossEntropy
from common.synthetic.vectorized import BatchedLinear

ENGINES = ("auto", "native", "torch")
CHECK_EVERY = 50   # epochs between two non-finite checks of a training (and one after the last)


def engine_problem(engine: str) -> str | None:
    """What is wrong with `engine` as a config value (None: nothing): not one of ENGINES, or "native" where the
    kernel cannot be built or loaded (the experiments' config checks turn this into their one-line error)."""
    if engine not in ENGINES:
        return f"expected one of {', '.join(ENGINES)}, got {engine!r}"
    if engine == "native" and native.unavailable():
        return f"native, but {native.unavailable()}"
    return None


def linear_layers(model: nn.Module) -> list[BatchedLinear]:
    """The BatchedLinear layers of a Linear, ReLU, ..., Linear stack (what `fit` knows how to differentiate)."""
    mods = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    ok = bool(mods) and all(isinstance(m, BatchedLinear if i % 2 == 0 else nn.ReLU) for i, m in enumerate(mods))
    if not ok or len(mods) % 2 == 0 or any(m.runs is None or m.bias is None for m in mods[::2]):
        raise TypeError("fit expects BatchedLinear(runs=R, bias) layers separated by ReLU, e.g. two_layer_nn(...)")
    return mods[::2]


def _slice_views(layers, x, sl, grads):
    """Per-layer (W, b, gW, gb) views of the runs in sl, and x[sl]: built once per fit, not once per epoch (the
    parameters are updated in place, so the views stay valid)."""
    return [(lin.weight[sl], lin.bias[sl], gw[sl], gb[sl]) for lin, (gw, gb) in zip(layers, grads)], x[sl]


def _forward(views, x):
    """Activations [x, h1, ...] (inputs of each layer) and the logits of one block of runs."""
    acts, h = [], x
    last = len(views) - 1
    for i, (w, b, _, _) in enumerate(views):
        acts.append(h)
        h = torch.baddbmm(b, w, h)
        if i < last:
            h = h.relu_()
    return acts, h


def _backward(views, acts, g):
    """Write ∂L/∂W, ∂L/∂b of one block of runs into its gradient views, from the logit gradient g."""
    for i in range(len(views) - 1, -1, -1):
        w, _, gw, gb = views[i]
        torch.bmm(g, acts[i].transpose(1, 2), out=gw)
        torch.sum(g, 2, keepdim=True, out=gb)
        if i:
            g = torch.bmm(w.transpose(1, 2), g)
            g = torch.ops.aten.threshold_backward(g, acts[i], 0)   # ReLU mask: acts[i] = relu(pre-activation)


class LogitGrad:
    """A closed-form logit gradient, local to each run: called as grad_fn(sl, logits) it returns ∂loss/∂logits for
    the runs in slice sl (the torch engine); `kind`, `params`, `labels` and `teacher_probs` describe the same loss to
    the native engine (common.synthetic.native), which computes it in C. `models` is how many models' logits it takes."""

    def __init__(self, kind: str, fn: Callable, labels: torch.Tensor, n_classes: int, models: int = 1,
                 params: Sequence[float] = (), teacher_probs: torch.Tensor | None = None):
        self.kind, self.fn, self.labels, self.n_classes = kind, fn, labels, n_classes
        self.models, self.params, self.teacher_probs = models, tuple(float(p) for p in params), teacher_probs

    def __call__(self, sl: slice, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.fn(sl, logits)

    def __repr__(self) -> str:
        return f"LogitGrad({self.kind}, params={self.params})"


def ce_grad(labels: torch.Tensor, n_classes: int, dtype=torch.float32, weight: float = 1.0) -> LogitGrad:
    """The run-summed mean cross-entropy of one model, times weight: weight (softmax(z) − onehot(y)) / N per block."""
    onehot = F.one_hot(labels.long(), n_classes).transpose(1, 2).to(dtype)
    n = labels.shape[-1]

    def grad(sl, logits):
        g = logits[0].softmax(1).sub_(onehot[sl]).div_(n)
        return [g if weight == 1.0 else g.mul_(weight)]
    return LogitGrad("ce", grad, labels, n_classes, params=(weight,))


def _nontarget(z: torch.Tensor, target_inf: torch.Tensor, support: torch.Tensor):
    """Non-target distribution of (G, C, N) logits along axis 1: p̂ and log p̂, both 0 in the target slot (the
    quantities of common.divergence.split_log_probs, computed with fewer passes). target_inf is −inf in the target
    slot and 0 elsewhere, support 0 / 1 (an add and a multiply: much faster on CPU than masked_fill)."""
    top = (z + target_inf).amax(1, keepdim=True)   # max over the non-target classes
    d = (z - top).mul_(support)                     # target slot 0 before the exp: no overflow, no inf·0
    e = d.exp().mul_(support)
    s = e.sum(1, keepdim=True)
    return e.div_(s), d.sub_(s.log_()).mul_(support)


def _log_mean_exp2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log((eᵃ + eᵇ)/2) = max(a, b) + log(1 + e^−|a−b|) − log 2. torch.logaddexp and torch.log1p are unvectorised
    slow paths on this CPU build (~25 ns per element); these are vectorised passes. 1 + e^−|a−b| lies in (1, 2], so
    log(1 + u) instead of log1p(u) costs at most one float32 rounding of the result (absolute, ~6e-8)."""
    return torch.maximum(a, b).add_((a - b).abs_().neg_().exp_().add_(1.0).log_()).sub_(math.log(2.0))


def target_masks(labels: torch.Tensor, n_classes: int, dtype=torch.float32):
    """(onehot, support, target_inf) of (G, N) labels, each (G, C, N): 1 / 0 / −inf at the target class."""
    onehot = F.one_hot(labels.long(), n_classes).transpose(1, 2).to(dtype)
    return onehot, 1 - onehot, torch.zeros_like(onehot).masked_fill_(onehot.bool(), float("-inf"))


def joint_ncjsd_grad(labels: torch.Tensor, n_classes: int, weight: float = 1.0) -> LogitGrad:
    """grad_fn of Alg. 1's joint loss Σ_runs [CE(z_t) + CE(z_s) + weight · mean_n JS(p̂_s, p̂_t)] (textbook JS of
    the non-target distributions, common.divergence.nontarget_js) in closed form, for the logits [z_t, z_s].

    With M = (P + Q)/2, ∂JS/∂P_c = ½ log(P_c / M_c), and through the non-target softmax
    ∂JS/∂z_c = P_c (h_c − Σ_k P_k h_k), h = ½ (log P − log M), for c ≠ y (0 for the target class).
    """
    onehot, support, target_inf = target_masks(labels, n_classes)
    n = labels.shape[-1]

    def js_part(p, log_p, log_m):
        h = (log_p - log_m).mul_(0.5)
        return p * (h - (p * h).sum(1, keepdim=True))

    def grad(sl, logits):
        z_t, z_s = logits
        ti, sp, oh = target_inf[sl], support[sl], onehot[sl]
        p_t, log_t = _nontarget(z_t, ti, sp)
        p_s, log_s = _nontarget(z_s, ti, sp)
        log_m = _log_mean_exp2(log_t, log_s)
        g_t = z_t.softmax(1).sub_(oh).add_(js_part(p_t, log_t, log_m), alpha=weight).div_(n)
        g_s = z_s.softmax(1).sub_(oh).add_(js_part(p_s, log_s, log_m), alpha=weight).div_(n)
        return [g_t, g_s]
    return LogitGrad("joint_ncjsd", grad, labels, n_classes, models=2, params=(weight,))


def kd_kl_grad(labels: torch.Tensor, teacher_logits: torch.Tensor, *, ce_weight: float = 1.0, kl_weight: float = 1.0,
               temperature: float = 1.0, reduction: str = "batchmean", t2: bool = False) -> LogitGrad:
    """grad_fn of ce_weight · CE + kl_weight · KL(softmax(z_t/T) ‖ softmax(z_s/T)) (common.kd "ce" + "kl", no mask)
    in closed form: ∂/∂z_s = [ce_weight (softmax(z_s) − onehot) + kl_weight · f · (softmax(z_s/T) − p_t) / T] / N,
    f = T² (t2) / C (reduction "mean"). The frozen teacher's p_t = softmax(z_t/T) is computed once, not per epoch."""
    n_classes, n = teacher_logits.shape[1], labels.shape[-1]
    onehot = F.one_hot(labels.long(), n_classes).transpose(1, 2).to(teacher_logits.dtype)
    p_t = (teacher_logits / temperature).softmax(1)
    scale = kl_weight / temperature * (temperature ** 2 if t2 else 1.0) / (n_classes if reduction == "mean" else 1)

    def grad(sl, logits):
        z = logits[0]
        p = z.softmax(1)
        p_s = p if temperature == 1.0 else (z / temperature).softmax(1)
        g = (p_s - p_t[sl]).mul_(scale)
        return [g.add_(p.sub_(onehot[sl]), alpha=ce_weight).div_(n)]
    return LogitGrad("ce_kl", grad, labels, n_classes, params=(ce_weight, scale, 1.0 / temperature), teacher_probs=p_t)


def joint_logit_grad(labels: torch.Tensor, n_classes: int, distance: str = "mse", weight: float = 1.0) -> LogitGrad:
    """grad_fn of MFH's Alg. 1 joint loss Σ_runs [CE(z_a) + CE(z_b) + weight · d(z_a, z_b)] for the logits
    [z_a, z_b], d the mean over classes and samples of (z_a − z_b)² ("mse") or |z_a − z_b| ("l1"):
    ∂d/∂z_a = 2 (z_a − z_b) / (C·N) or sign(z_a − z_b) / (C·N), and ∂d/∂z_b = −∂d/∂z_a."""
    if distance not in ("mse", "l1"):
        raise ValueError(f"joint_logit_grad: distance must be 'mse' or 'l1', got {distance!r}")
    onehot = F.one_hot(labels.long(), n_classes).transpose(1, 2).to(torch.float32)
    n = labels.shape[-1]
    scale = weight * (2.0 if distance == "mse" else 1.0) / n_classes

    def grad(sl, logits):
        z_a, z_b = logits
        diff = z_a - z_b
        agree = (diff if distance == "mse" else diff.sign_()).mul_(scale)
        g_a = z_a.softmax(1).sub_(onehot[sl]).add_(agree)
        g_b = z_b.softmax(1).sub_(onehot[sl]).sub_(agree)
        return [g_a.div_(n), g_b.div_(n)]
    return LogitGrad(f"joint_{distance}", grad, labels, n_classes, models=2, params=(scale,))


def objective_grad(objective, labels: torch.Tensor, n_classes: int,
                   teacher_logits: torch.Tensor | None = None) -> LogitGrad | None:
    """The closed-form grad_fn of a `common.kd` Objective (runs=R) when it has one, else None.

    Covered: a plain cross-entropy term `ce` (no label smoothing, no ignored labels) alone or with one vanilla-KD
    term `kl` on the logits, without a mask — NTDH's and MFH's default KD. Everything else (ω, DKD, relational and
    feature terms) returns None: the caller differentiates the objective by autograd (fit's loss_fn).
    """
    if getattr(objective, "mask", None) != "none":
        return None
    ce, kl = [], []
    for name, term in objective.terms.items():
        if objective.inputs[name] != "logits":
            return None
        if isinstance(term, CrossEntropy) and term.label_smoothing == 0 and not (labels == term.ignore_index).any():
            ce.append(objective.weights[name])
        elif type(term) is KLDistill:
            kl.append((objective.weights[name], term))
        else:
            return None
    if len(ce) != 1 or len(kl) > 1 or kl and teacher_logits is None:
        return None
    if not kl:
        return ce_grad(labels, n_classes, weight=ce[0])
    weight, term = kl[0]
    return kd_kl_grad(labels, teacher_logits, ce_weight=ce[0], kl_weight=weight, temperature=term.temperature,
                      reduction=term.reduction, t2=term.t2)


def fit(models: Sequence[nn.Module], inputs: Sequence[torch.Tensor], *, epochs: int, lr: float,
        momentum: float = 0.0, labels: torch.Tensor | None = None,
        loss_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None, grad_fn: Callable | None = None,
        extra_params=(), chunk: int | None = None, progress: bool = False, desc: str | None = None,
        engine: str = "auto", check_every: int = CHECK_EVERY) -> list[nn.Module]:
    """Full-batch SGD of one or more batched MLP stacks on one loss; every tensor (R, ·, N) with the same R.

    The loss is given in one of three ways:
    loss_fn(logits) → scalar, summed over runs (so run r's gradient is its own loss's); logits is the list of the
        models' (R, C, N) outputs; differentiated by autograd on the logits (any common.kd objective).
    grad_fn(sl, logits) → the list of ∂loss/∂logits for the runs in slice sl, given those runs' logits (a closed form
        that is local to each run: `ce_grad`, `joint_ncjsd_grad`, `kd_kl_grad`); each block of runs is then done
        forward → gradient → backward while its activations are in cache.
    neither: the cross-entropy of a single model against `labels` (run-summed mean CE, `ce_grad`).
    extra_params: further parameters of the loss_fn (a common.kd Objective's), stepped with the models'.
    chunk: runs per forward / backward block of the torch engine (None: all at once).
    engine: "torch" (`_TorchFit`), "native" (common.synthetic.native's C kernel: a LogitGrad closed form on float32
        CPU tensors; an error otherwise) or "auto" (native when it can run this training, else torch). Both make the
        same updates up to float rounding.
    check_every: every that many epochs and after the last, a non-finite loss (loss_fn) or non-finite outputs (a
        closed form, whose loss is never formed; the native engine after its last epoch) stop the training with
        common.train.NonFiniteLoss, named by `desc`.
    Returns the models, in eval mode.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if loss_fn is not None and grad_fn is not None:
        raise ValueError("give loss_fn or grad_fn, not both")
    if loss_fn is None and grad_fn is None and (len(models) != 1 or labels is None):
        raise ValueError("without loss_fn / grad_fn, fit trains one model on the cross-entropy against labels")
    stacks = [linear_layers(m) for m in models]
    runs = stacks[0][0].runs
    if any(layers[0].runs != runs for layers in stacks) or any(x.shape[0] != runs for x in inputs):
        raise ValueError("every model and input must have the same number of runs")
    if loss_fn is None and grad_fn is None:
        grad_fn = ce_grad(labels, stacks[0][-1].out_features, inputs[0].dtype)
    for m in models:
        m.train()
    why = native.unsupported(stacks, inputs, grad_fn if loss_fn is None else None) if engine != "torch" else ""
    if why is None:
        native.fit(stacks, inputs, grad_fn, epochs=epochs, lr=lr, momentum=momentum, progress=progress, desc=desc)
        with torch.no_grad():
            _check_outputs(models, inputs, grad_fn, epochs - 1, desc)
    elif engine == "native":
        raise ValueError(f"engine 'native' cannot run this training: {why}")
    else:
        torch_fit = _TorchFit(stacks, inputs, chunk, extra_params, lr, momentum)
        with torch.no_grad():
            for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
                loss = torch_fit.closed_form_epoch(grad_fn) if grad_fn is not None else torch_fit.autograd_epoch(loss_fn)
                torch_fit.step()
                if due(epoch + 1, check_every) or epoch == epochs - 1:
                    if loss is None:
                        _check_outputs(models, inputs, grad_fn, epoch, desc)
                    else:
                        check_finite(loss, epoch=epoch, step=epoch, where=desc or "")
    for m in models:
        m.eval()
    return list(models)


def _check_outputs(models, inputs, grad_fn, epoch: int, desc: str | None) -> None:
    """NonFiniteLoss when a model's outputs went NaN / inf: a closed-form training never forms its loss, but a loss
    that became non-finite leaves non-finite weights or outputs behind (one forward per check)."""
    for model, x in zip(models, inputs):
        if not torch.isfinite(model(x)).all():
            name = getattr(grad_fn, "kind", "loss")
            check_finite(float("nan"), {name: float("nan")}, epoch=epoch, step=epoch, where=desc or "")


class _TorchFit:
    """The torch engine of `fit`: per-block parameter / gradient views built once, the hand-written backward, and
    SGD with momentum (no dampening) — exactly the updates of autograd + torch.optim.SGD on the run-summed loss."""

    def __init__(self, stacks, inputs, chunk, extra_params, lr: float, momentum: float):
        runs = stacks[0][0].runs
        chunk = runs if not chunk or chunk > runs else int(chunk)
        self.slices = [slice(s, min(s + chunk, runs)) for s in range(0, runs, chunk)]
        self.params = [p for layers in stacks for lin in layers for p in (lin.weight, lin.bias)]
        grads = [[(torch.empty_like(lin.weight), torch.empty_like(lin.bias)) for lin in layers] for layers in stacks]
        self.flat_grads = [g for per_model in grads for pair in per_model for g in pair]
        # views[k][j] = (per-layer views, input) of model k for block j
        self.views = [[_slice_views(layers, x, sl, per) for sl in self.slices]
                      for layers, x, per in zip(stacks, inputs, grads)]
        self.extra = [p for p in extra_params if p.requires_grad]
        self.extra_opt = torch.optim.SGD(self.extra, lr=lr, momentum=momentum) if self.extra else None
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.lr, self.momentum = lr, momentum

    def closed_form_epoch(self, grad_fn) -> None:
        """Forward → closed-form logit gradient → backward, block by block of runs (activations stay in cache)."""
        for j, sl in enumerate(self.slices):
            cached = [_forward(per[j][0], per[j][1]) for per in self.views]
            gs = grad_fn(sl, [z for _, z in cached])
            for per, (acts, _), g in zip(self.views, cached, gs):
                _backward(per[j][0], acts, g)

    def autograd_epoch(self, loss_fn) -> torch.Tensor:
        """Forward, autograd of loss_fn on the logits (and the loss's own parameters, stepped here), backward."""
        cached = [[_forward(v, x) for v, x in per] for per in self.views]
        logits = [torch.cat([z for _, z in per], 0).requires_grad_() for per in cached]
        with torch.enable_grad():
            loss = loss_fn(logits)
            g_all = torch.autograd.grad(loss, logits + self.extra, allow_unused=True)
        for k, (per_views, per) in enumerate(zip(self.views, cached)):
            for sl, (v, _), (acts, _) in zip(self.slices, per_views, per):
                _backward(v, acts, g_all[k][sl])
        if self.extra_opt is not None:
            for p, g in zip(self.extra, g_all[len(logits):]):
                p.grad = torch.zeros_like(p) if g is None else g
            self.extra_opt.step()
        return loss.detach()

    def step(self) -> None:
        for i, (p, g) in enumerate(zip(self.params, self.flat_grads)):
            if self.momentum:
                if self.buffers[i] is None:
                    self.buffers[i] = g.clone()
                else:
                    self.buffers[i].mul_(self.momentum).add_(g)
                g = self.buffers[i]
            p.sub_(g, alpha=self.lr)


def fit_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                  momentum: float = 0.0, objective=None, teacher_out: torch.Tensor | None = None,
                  closed_form: bool = True, chunk: int | None = None, progress: bool = False,
                  desc: str | None = None, engine: str = "auto") -> nn.Module:
    """Train one stack on the cross-entropy (objective None) or on a `common.kd` Objective against teacher_out: by
    its closed-form gradient when `objective_grad` has one (and closed_form), else by autograd on the logits with
    the objective's own parameters stepped alongside. The same updates either way, up to float rounding.
    engine: as `fit` (a closed form runs on the native engine under "auto" when it can)."""
    common = dict(epochs=epochs, lr=lr, momentum=momentum, chunk=chunk, progress=progress, desc=desc, engine=engine)
    if objective is None:
        return fit([model], [x], labels=y, **common)[0]
    n_classes = linear_layers(model)[-1].out_features
    grad_fn = objective_grad(objective, y, n_classes, teacher_out) if closed_form else None
    if grad_fn is not None:
        return fit([model], [x], grad_fn=grad_fn, **common)[0]
    return fit([model], [x], loss_fn=lambda z: objective(z[0], teacher_out, y)[0],
               extra_params=list(objective.parameters()), **common)[0]
