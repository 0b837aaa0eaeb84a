"""The k intervened copies of an activation that Algorithm 1's step 2 evaluates in one teacher forward: a generic
copy of the activation per channel, or, where the activation feeds an nn.Linear (common.saliency.rank1 decides), a
rank-1 update of that layer's output (the same numbers and random draws)."""
from __future__ import annotations

import torch
from torch import nn

from common.saliency.hooks import _axes, _randperm


def _expand_copies(a: torch.Tensor, channels: torch.Tensor, op: str, batch_dim: int, channel_dim: int | None,
                   generator: torch.Generator | None) -> torch.Tensor:
    """(..., B, ...) → (..., k·B, ...): copy j is `a` with channel channels[j] (of axis channel_dim) intervened.

    Equivalent to concatenating intervene(a, [c_j], op, batch_dim, channel_dim=channel_dim) along the batch axis for
    j = 0..k−1 (same random draws, in the same order), but written with one advanced-index assignment instead of k
    full clones.
    """
    b, c = _axes(a, batch_dim, channel_dim)
    k, n = channels.numel(), a.shape[b]
    channels = channels.to(a.device)
    # A real copy even for k = 1 (a plain view would let the assignments below write into `a`). The copy axis is
    # inserted right before the batch axis, so a channel axis after the batch axis moves one place right.
    copies = a.unsqueeze(b).expand(*a.shape[:b], k, *a.shape[b:]).clone(memory_format=torch.contiguous_format)
    # Bring (copy, channel) to the front: view[j, c_j] is then copy j's channel c_j, shaped like `a` without c.
    view = copies.movedim((b, c + (c > b)), (0, 1))
    copy_ids = torch.arange(k, device=a.device)
    clean = a.movedim(c, 0)[channels]  # (k, ...): the clean channel c_j for each copy, same layout as view[j, c_j]
    batch = 1 + b - (c < b)  # the batch axis of `clean`
    if op == "zero":
        view[copy_ids, channels] = 0
    elif op == "mean":
        view[copy_ids, channels] = clean.mean(batch, keepdim=True)
    else:  # permute: each copy gets its own permutation, drawn in copy order
        perms = torch.stack([_randperm(n, generator, a.device) for _ in range(k)])  # (k, B)
        shuffled = clean.movedim(batch, 1)[copy_ids[:, None], perms]  # (k, B, ...)
        view[copy_ids, channels] = shuffled.movedim(1, batch)
    return copies.flatten(b, b + 1)


def _rank1_delta(clean: torch.Tensor, op: str, perms: torch.Tensor | None) -> torch.Tensor:
    """x̃_c − x_c for the intervened channels, clean (…, k, n) with the samples last; perms (k, n) for "permute"."""
    if op == "zero":
        return -clean
    if op == "mean":
        return clean.mean(-1, keepdim=True) - clean
    return clean.gather(-1, perms.expand_as(clean)).sub_(clean)


def _rank1_copies(layer: nn.Linear, x: torch.Tensor, out: torch.Tensor, channels: torch.Tensor, op: str,
                  generator: torch.Generator | None) -> torch.Tensor:
    """A linear layer's output on the k intervened copies of its input (B, D) that `_expand_copies` would
    build (the same random draws, in the same order), from its clean output (B, H) alone.

    Changing input channel c from x_c to x̃_c changes W x + b by the rank-1 term W[:, c] ⊗ (x̃_c − x_c), so a copy
    costs one multiply-add of the layer's output size, and neither the (k × D) copies nor the k layer matmuls are
    made. The copy axis goes right before the batch axis, as in `_expand_copies`: (k·B, H).
    """
    channels = channels.to(x.device)
    clean = x.index_select(1, channels).t()         # (k, B); index_select: a third of x[:, channels]'s CPU overhead
    perms = None
    if op == "permute":
        perms = torch.stack([_randperm(clean.shape[-1], generator, x.device) for _ in range(channels.numel())])
    delta = _rank1_delta(clean, op, perms)
    w = layer.weight.index_select(1, channels).t()                                        # (k, H)
    # One pass writes the (k, B, H) copies (cloning `out` first and adding in place takes two); the output is given
    # row-major, since broadcasting alone may lay it out otherwise and flatten would then copy it again.
    copies = out.new_empty(channels.numel(), *out.shape)
    return torch.addcmul(out, delta.unsqueeze(-1), w.unsqueeze(1), out=copies).flatten(0, 1)
