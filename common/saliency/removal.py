"""Algorithm 1, step 3 (MFH, Algorithm 1): which channels to remove — the least salient (mode 1, modality-general
KD), the most salient (mode 2) or a random subset (mode 0)."""
from __future__ import annotations

import torch

from common.saliency.hooks import _randperm

REMOVAL_MODES = (-1, 0, 1, 2)


def removal_indices(saliency: torch.Tensor, mode: int, ratio: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Channel ids to remove, k = int(ratio·C), returned in increasing order (last axis; leading axes are groups).

    mode 0: a random subset of size k; 1: the k lowest saliencies (keeps the modality-general channels); 2: the k
    highest (keeps the modality-specific ones); -1: none. Ties go to the lower index (stable sort).
    """
    if mode not in REMOVAL_MODES:
        raise ValueError(f"mode must be one of {REMOVAL_MODES}, got {mode!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    n_channels = saliency.shape[-1]
    k = int(ratio * n_channels) if mode >= 0 else 0
    lead = saliency.shape[:-1]
    if k == 0:
        return torch.empty(*lead, 0, dtype=torch.long, device=saliency.device)
    if mode == 0:
        rows = [_randperm(n_channels, generator, saliency.device)[:k] for _ in range(lead.numel())]
        chosen = torch.stack(rows).reshape(*lead, k)
    else:
        chosen = torch.sort(saliency, dim=-1, descending=(mode == 2), stable=True).indices[..., :k]
    return chosen.sort(-1).values
