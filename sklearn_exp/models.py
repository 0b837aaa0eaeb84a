"""The reference's `TwoLayerNN` (spec §3.2) for R independent runs at once, and a fast full-batch SGD trainer for it.

`two_layer_nn(in, hidden, classes, runs, seeds)` is `common.vectorized.batched_mlp([in, h, h, classes])`: Linear →
ReLU → Linear → ReLU → Linear, feature-major (R, D, N) → (R, C, N). The reference's unused `fc2_1` layer, its
ignored `beta` argument and its dropout (p = 0) are left out; its global-RNG reseeding is replaced by per-run seeds.

`fit` trains such stacks by plain / momentum SGD with a hand-written backward pass:
- the MLP's backward (bmm for the weight and input gradients, a fused ReLU mask) runs on `chunk` runs at a time, so
  the (chunk, 16, 6000) activations stay in cache instead of streaming 20 MB tensors through memory per op;
- the loss itself goes through autograd, but only on the (R, C, N) logits (and the objective's own parameters:
  FitNet regressor, CRD embeddings), so any `common.kd` objective, ω mask or the Alg. 1 joint loss works unchanged;
- for the plain cross-entropy the logit gradient is the closed form (softmax − onehot) / N, fused per chunk.
It performs exactly the updates of autograd + `torch.optim.SGD` (momentum, no dampening) on the run-summed loss
(tested against `common.vectorized.fit` and `common.saliency.joint_train`), about twice as fast on 2 CPU cores.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.vectorized import BatchedLinear, batched_mlp


def two_layer_nn(in_dim: int, hidden: int, n_classes: int, runs: int, seeds: Sequence[int]) -> nn.Sequential:
    return batched_mlp([in_dim, hidden, hidden, n_classes], runs, seeds=seeds)


def _linears(model: nn.Module) -> list[BatchedLinear]:
    """The BatchedLinear layers of a Linear, ReLU, ..., Linear stack (what `fit` knows how to differentiate)."""
    mods = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    ok = bool(mods) and all(isinstance(m, BatchedLinear if i % 2 == 0 else nn.ReLU) for i, m in enumerate(mods))
    if not ok or len(mods) % 2 == 0 or any(m.runs is None or m.bias is None for m in mods[::2]):
        raise TypeError("fit expects BatchedLinear(runs=R, bias) layers separated by ReLU, e.g. two_layer_nn(...)")
    return mods[::2]


def _forward(layers, x, sl):
    """Activations [x, h1, ...] (inputs of each layer) and the logits, for the runs in slice sl."""
    acts, h = [], x[sl]
    for i, lin in enumerate(layers):
        acts.append(h)
        h = torch.baddbmm(lin.bias[sl], lin.weight[sl], h)
        if i < len(layers) - 1:
            h = h.relu_()
    return acts, h


def _backward(layers, acts, g, sl, grads):
    """Write ∂L/∂W, ∂L/∂b of the runs in sl into grads[i] = (gW, gb), from the logit gradient g."""
    for i in range(len(layers) - 1, -1, -1):
        gw, gb = grads[i]
        torch.bmm(g, acts[i].transpose(1, 2), out=gw[sl])
        torch.sum(g, 2, keepdim=True, out=gb[sl])
        if i:
            g = torch.bmm(layers[i].weight[sl].transpose(1, 2), g)
            g = torch.ops.aten.threshold_backward(g, acts[i], 0)   # ReLU mask: acts[i] = relu(pre-activation)


def fit(models: Sequence[nn.Module], inputs: Sequence[torch.Tensor], *, epochs: int, lr: float,
        momentum: float = 0.0, labels: torch.Tensor | None = None,
        loss_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None, extra_params=(),
        chunk: int | None = None, progress: bool = False, desc: str | None = None) -> list[nn.Module]:
    """Full-batch SGD of one or more batched MLP stacks on one loss; every tensor (R, ·, N) with the same R.

    loss_fn(logits) → scalar, summed over runs (so run r's gradient is its own loss's); logits is the list of the
        models' (R, C, N) outputs. None: the cross-entropy of a single model against `labels` (run-summed mean CE).
    extra_params: further parameters of the loss (a common.kd Objective's), stepped with the models'.
    chunk: runs per backward block (None: all at once).
    Returns the models, in eval mode.
    """
    if loss_fn is None and (len(models) != 1 or labels is None):
        raise ValueError("without loss_fn, fit trains one model on the cross-entropy against labels")
    stacks = [_linears(m) for m in models]
    runs = stacks[0][0].runs
    if any(layers[0].runs != runs for layers in stacks) or any(x.shape[0] != runs for x in inputs):
        raise ValueError("every model and input must have the same number of runs")
    chunk = runs if not chunk or chunk > runs else int(chunk)
    slices = [slice(s, min(s + chunk, runs)) for s in range(0, runs, chunk)]
    params = [p for layers in stacks for lin in layers for p in (lin.weight, lin.bias)]
    grads = [[(torch.empty_like(lin.weight), torch.empty_like(lin.bias)) for lin in layers] for layers in stacks]
    flat_grads = [g for per_model in grads for pair in per_model for g in pair]
    extra = [p for p in extra_params if p.requires_grad]
    extra_opt = torch.optim.SGD(extra, lr=lr, momentum=momentum) if extra else None
    buffers: list[torch.Tensor | None] = [None] * len(params)
    if loss_fn is None:
        n = labels.shape[-1]
        onehot = F.one_hot(labels.long(), stacks[0][-1].out_features).transpose(1, 2).to(inputs[0].dtype)
    for m in models:
        m.train()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        for _ in bar:
            if loss_fn is None:
                for sl in slices:
                    acts, z = _forward(stacks[0], inputs[0], sl)
                    g = z.softmax(1).sub_(onehot[sl]).div_(n)
                    _backward(stacks[0], acts, g, sl, grads[0])
            else:
                cached = [[_forward(layers, x, sl) for sl in slices] for layers, x in zip(stacks, inputs)]
                logits = [torch.cat([z for _, z in per], 0).requires_grad_() for per in cached]
                with torch.enable_grad():
                    loss = loss_fn(logits)
                    g_all = torch.autograd.grad(loss, logits + extra, allow_unused=True)
                for k, (layers, per) in enumerate(zip(stacks, cached)):
                    for sl, (acts, _) in zip(slices, per):
                        _backward(layers, acts, g_all[k][sl], sl, grads[k])
                if extra_opt is not None:
                    for p, g in zip(extra, g_all[len(logits):]):
                        p.grad = torch.zeros_like(p) if g is None else g
                    extra_opt.step()
            for i, (p, g) in enumerate(zip(params, flat_grads)):
                if momentum:
                    if buffers[i] is None:
                        buffers[i] = g.clone()
                    else:
                        buffers[i].mul_(momentum).add_(g)
                    g = buffers[i]
                p.sub_(g, alpha=lr)
    for m in models:
        m.eval()
    return list(models)
