"""Algorithm 1's step 2 for the synthetic experiments' models: a rank-1 path through stacks of BatchedLinear layers.

At the input of a stack W_L σ(… σ(W_1 x + b_1) …), destroying input column c changes the first layer's output by the
rank-1 term W_1[:, c] ⊗ (x̃_c − x_c), so each intervened copy costs one multiply-add of the hidden size instead of a
copy of the input and a first-layer matmul; the runs are evaluated `group_chunk` at a time so that one block's
activations stay in cache. The permutations are those of the reference, common.saliency.saliency_vector's copy path
(one per repeat and column, drawn in that order, shared by the runs), so both give the same numbers up to float
rounding (tests/golden, tests/common/test_saliency.py).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from common.kd.layers import BatchedLinear
from common.saliency.copies import _rank1_delta
from common.saliency.distances import Distance, _FixedStudent, _without, minmax_normalize
from common.saliency.hooks import _randperm
from common.saliency.vector import check_saliency_args


def stack_saliency(layers: list[nn.Module], student: nn.Module, x_t: torch.Tensor, x_s: torch.Tensor,
                   y: torch.Tensor, *, op: str = "permute", distance: Distance = "mse", repeats: int = 10,
                   chunk: int = 64, group_chunk: int | None = None, generator: torch.Generator | None = None,
                   normalize: bool = True, variant: str = "textbook", progress: bool = False,
                   desc: str | None = None) -> torch.Tensor:
    """Per-run input saliency (R, D) of a `runs_stack` teacher on one full batch, (R, D, N) inputs and (R, C, N)
    outputs: the value of saliency_vector(..., "input", batch_dim=2, channel_dim=1, class_dim=1)."""
    check_saliency_args(op, distance, variant, repeats, chunk)
    if group_chunk is not None and group_chunk < 1:
        raise ValueError(f"group_chunk must be >= 1, got {group_chunk}")
    n_repeats = repeats if op == "permute" else 1
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            h_s = student(x_s)
            sums = _stack_sums(layers, h_s, x_t, y, op=op, distance=distance, variant=variant, n_repeats=n_repeats,
                               chunk=chunk, group_chunk=group_chunk or x_t.shape[0], generator=generator,
                               progress=progress, desc=desc)
    finally:
        student.train(was_training)
    n = x_t.shape[2]
    # the reference's batch-size weighting of its one batch, kept for identical rounding
    saliency = (sums * (n / n_repeats) / n).to(h_s.dtype if h_s.is_floating_point() else torch.float32)
    return minmax_normalize(saliency) if normalize else saliency


def runs_stack(model: nn.Module) -> list[nn.Module] | None:
    """The layers of a lone BatchedLinear with runs, or of an nn.Sequential of such layers (all with the same runs)
    and parameter-free per-sample modules (ReLU, Tanh, …) starting with a BatchedLinear; None for anything else."""
    layers = list(model) if isinstance(model, nn.Sequential) else [model]
    if not layers or not isinstance(layers[0], BatchedLinear) or layers[0].runs is None:
        return None
    for m in layers:
        if isinstance(m, BatchedLinear):
            if m.runs != layers[0].runs:
                return None
        elif next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
            return None
    return layers


def _stack_forward(layers: list[nn.Module], h: torch.Tensor, runs: slice) -> torch.Tensor:
    """The forward of `runs_stack` layers for the runs in `runs` only (parameter views, no copies)."""
    for m in layers:
        if isinstance(m, BatchedLinear):
            w = m.weight[runs]
            h = torch.bmm(w, h) if m.bias is None else torch.baddbmm(m.bias[runs], w, h)
        elif type(m) is nn.ReLU:
            h = h.relu_()    # h is this function's own intermediate: in place saves a pass over memory
        else:
            h = m(h)
    return h


def _stack_sums(layers: list[nn.Module], h_s: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, *, op: str,
                distance: Distance, variant: str, n_repeats: int, chunk: int, group_chunk: int,
                generator: torch.Generator | None, progress: bool = False, desc: str | None = None
                 ) -> torch.Tensor:
    """Σ over repeats of the per-channel distances, (R, D) float64, for a `runs_stack` teacher on (R, D, N) input
    (batch_dim 2, channel_dim 1, class_dim 1): the rank-1 path, `group_chunk` runs at a time so that one block's
    (runs × hidden × chunk·N) activations stay in cache. The permutations are those of the copy path — one per
    (repeat, channel), drawn in that order and shared by the runs — drawn once up front."""
    groups, n_channels, n = x_t.shape
    first, rest = layers[0], layers[1:]
    perms = None
    if op == "permute":
        perms = torch.stack([_randperm(n, generator, x_t.device) for _ in range(n_repeats * n_channels)])
        perms = perms.view(n_repeats, n_channels, n)
    labels = y.expand(_without(h_s.shape, 1))
    sums = torch.zeros(groups, n_channels, dtype=torch.float64, device=x_t.device)
    for g0 in tqdm(range(0, groups, group_chunk), desc=desc, disable=not progress, leave=False):
        runs = slice(g0, min(g0 + group_chunk, groups))
        x = x_t[runs]
        w1 = first.weight[runs]
        base = torch.baddbmm(first.bias[runs], w1, x) if first.bias is not None else torch.bmm(w1, x)
        fixed = _FixedStudent(h_s[runs], labels[runs], distance, variant, 2, 1)
        for r in range(n_repeats):
            for c0 in range(0, n_channels, chunk):
                ch = slice(c0, min(c0 + chunk, n_channels))
                k = ch.stop - ch.start
                delta = _rank1_delta(x[:, ch], op, None if perms is None else perms[r, ch])       # (g, k, N)
                h = torch.addcmul(base.unsqueeze(2), w1[:, :, ch].unsqueeze(-1), delta.unsqueeze(1))  # (g, H, k, N)
                out = _stack_forward(rest, h.flatten(2, 3), runs)
                sums[runs, ch] += fixed.distances(out.unflatten(2, (k, n))).double()
    return sums
