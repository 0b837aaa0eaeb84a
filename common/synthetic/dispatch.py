"""The one place that decides, for the synthetic experiments, between the fast engine and the plain references.

objective  a common.kd Objective whose terms are the fused ones where they exist (common.synthetic.fused): the same
           numbers as the references of common.kd, with closed-form gradients.
train      full-batch SGD of a BatchedLinear stack (common.synthetic.fastfit): a closed-form logit gradient when the
           objective has one (CE, CE + KL without a mask), run by the C kernel (common.synthetic.native) or torch
           according to `engine`; autograd on the logits for every other objective.
joint_train  Algorithm 1's step 1: a closed-form joint gradient on fastfit, or the reference joint_train.
saliency   Algorithm 1's step 2: the rank-1 path of common.synthetic.rank1 for a stack of BatchedLinear layers at
           its input, else the reference, common.saliency.saliency_vector.
gauss and sklearn_exp import from here, not from the modules behind it.
"""
from __future__ import annotations

import torch
from torch import nn

from common.kd import method_objective
from common.synthetic import fastfit, fused, rank1
from common.saliency import joint_train as reference_joint_train
from common.saliency import saliency_vector


def objective(kd_cfg: dict, method: str, mask: str, *, detach_omega: bool = True, runs: int | None = None,
              context: dict | None = None):
    """common.kd.method_objective (ce + the terms of kd_cfg["methods"][method], mask none | omega) with fused
    terms."""
    return method_objective(kd_cfg, method, mask, detach_omega=detach_omega, runs=runs, context=context,
                            build=fused.build_loss)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, objective=None, teacher_out=None,
          closed_form: bool = True, **fit_kwargs) -> nn.Module:
    """Train one BatchedLinear stack on the cross-entropy (objective None) or on `objective` against teacher_out:
    by its closed-form gradient when it has one and closed_form, else by autograd on the logits (fastfit)."""
    return fastfit.fit_objective(model, x, y, objective=objective, teacher_out=teacher_out, closed_form=closed_form,
                                 **fit_kwargs)


def saliency(teacher: nn.Module, student: nn.Module, x_t: torch.Tensor, x_s: torch.Tensor, y: torch.Tensor, *,
             fast: bool = True, group_chunk: int | None = None, **kwargs) -> torch.Tensor:
    """Per-run input saliency (R, D) of one full batch in the runs layout (R, D, N) → (R, C, N): the rank-1 path
    when `fast` and the teacher is a BatchedLinear stack, else the reference (the generic copy path)."""
    layers = rank1.runs_stack(teacher) if fast else None
    if layers is not None:
        return rank1.stack_saliency(layers, student, x_t, x_s, y, group_chunk=group_chunk, **kwargs)
    return saliency_vector(teacher, student, [(x_t, x_s, y)], "input", batch_dim=2, channel_dim=1, class_dim=1,
                           **kwargs)


def joint_train(net_a: nn.Module, net_b: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, y: torch.Tensor, *,
                grad, loss_fn, epochs: int, lr: float, momentum: float, engine: str = "auto", chunk: int | None = None,
                progress: bool = False, desc: str | None = None) -> None:
    """Algorithm 1's step 1 for two BatchedLinear stacks on one full batch in the runs layout: by the closed-form
    logit gradient `grad` (a fastfit.LogitGrad) when there is one, on fastfit's `engine`; else the reference,
    common.saliency.joint_train, with loss_fn(out_a, out_b, y) summed over runs. The same updates either way."""
    if grad is not None:
        fastfit.fit([net_a, net_b], [x_a, x_b], epochs=epochs, lr=lr, momentum=momentum, grad_fn=grad, chunk=chunk,
                    progress=progress, desc=desc, engine=engine)
        return
    reference_joint_train(net_a, net_b, lambda: [(x_a, x_b, y)], epochs=epochs, lr=lr, momentum=momentum,
                          loss_fn=loss_fn, class_dim=1, progress=progress)
