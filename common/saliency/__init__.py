"""MFH Algorithm 1 (Xue et al., "The Modality Focusing Hypothesis", ICLR 2023, Algorithm 1): which teacher channels
carry modality-general decisive information. Where the activation at a place feeds one nn.Linear (an MLP's input
or hidden places), step 2 takes an exact rank-1 shortcut (common.saliency.rank1); the synthetic experiments' rank-1
engine for BatchedLinear stacks is common.synthetic.rank1.

Step 1 (`joint_train`): train a teacher-modality and a student-modality network together, with one optimiser on
    CE(f_a(x_a), y) + CE(f_b(x_b), y) + d(f_a(x_a), f_b(x_b)), d = MSE on logits (MFH) or non-target JS (NTDH).
Step 2 (`saliency_vector`): with both networks frozen and the student's output fixed, destroy one teacher channel at a
    place (permute it across the batch, zero it, or replace it by its batch mean) and measure how far the teacher's
    output moves from the student's. A large value means the two modalities agree *through* that channel.
Step 3 (`removal_indices` + `remove_channels`): remove a ratio of the teacher's channels during KD, the least salient
    (mode 1, "modality-general KD"), the most salient (mode 2) or a random subset (mode 0).

Interventions are forward hooks, so any nn.Module works unchanged: a `place` is a submodule name from
`named_modules()` (its output is changed) or "input" (a forward pre-hook on the model changes its first argument).
Layout: `batch_dim` is the samples axis and `channel_dim` the axis whose entries are intervened on (default: the one
right after the batch axis). Axes before the batch axis that are not the channel axis index independent groups: the
runs axis of the vectorised synthetic models, which are feature-major, (R, D, N) → (R, C, N), so they take
batch_dim=2, channel_dim=1, and class_dim=1 for their outputs. Every other axis is part of a sample (positions).

Differences from the reference repositories, on purpose: the saliency is averaged over *all* batches, weighted by
batch size (MFH's and NTDH's `main_overlap_tag.py` / `main.py` keep only the last batch's), and deterministic
interventions (zero, mean) are evaluated once rather than M identical times.

Modules: hooks (places, hooks, interventions, remove_channels), copies (the intervened copies of step 2), rank1 (the
rank-1 path of step 2 and when it is exact), distances, vector (step 2, saliency_vector), removal (step 3,
removal_indices), joint (step 1, joint_train and its agreement term).
"""
from common.saliency.distances import DISTANCES, Distance, minmax_normalize
from common.saliency.hooks import (INTERVENTIONS, REMOVAL_FILLS, Intervention, channel_count, intervene,
                                   remove_channels, resolve_place)
from common.saliency.joint import agreement, joint_train
from common.saliency.removal import REMOVAL_MODES, removal_indices
from common.saliency.vector import check_saliency_args, saliency_vector

__all__ = ["DISTANCES", "Distance", "INTERVENTIONS", "Intervention", "REMOVAL_FILLS", "REMOVAL_MODES", "agreement",
           "channel_count", "check_saliency_args", "intervene", "joint_train", "minmax_normalize", "remove_channels",
           "removal_indices", "resolve_place", "saliency_vector"]
