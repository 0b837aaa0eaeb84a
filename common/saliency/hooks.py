"""Places, forward hooks and interventions of Algorithm 1 (MFH, "The Modality Focusing Hypothesis", Algorithm 1;
the reference repositories' `my_change` / `my_freeze`): destroy channels of an activation by permuting them across
the batch, zeroing them or replacing them by their batch mean, at any submodule's output or at the model's input.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

INTERVENTIONS = ("permute", "zero", "mean")
REMOVAL_FILLS = ("zero", "mean")


def resolve_place(model: nn.Module, place: str) -> nn.Module | None:
    """The submodule whose output is intervened on, or None for "input" (the model's own input)."""
    if place == "input":
        return None
    try:
        return model.get_submodule(place)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise ValueError(f"unknown place {place!r} in {type(model).__name__}; "
                         f"valid places: 'input', {shown}") from None


def _map_first(value, fn):
    """Apply fn to a tensor, or to the first element of a tuple/list of outputs (e.g. an RNN's (output, state))."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return type(value)([fn(value[0]), *value[1:]])
    raise TypeError(f"cannot intervene on a value of type {type(value).__name__}; expected a tensor")


def _hook_at(model: nn.Module, place: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Make every forward of `model` see fn(activation) at `place`; returns a removable handle."""
    module = resolve_place(model, place)
    if module is None:
        def pre_hook(_module, args):
            if not args:
                raise ValueError("place 'input' needs the model's input as its first positional argument")
            return (_map_first(args[0], fn), *args[1:])
        return model.register_forward_pre_hook(pre_hook)
    return module.register_forward_hook(lambda _module, _args, output: _map_first(output, fn))


def _axes(x: torch.Tensor, batch_dim: int, channel_dim: int | None) -> tuple[int, int]:
    """(batch axis, channel axis) of x, both non-negative; channel_dim=None means the axis right after the batch."""
    shape = tuple(x.shape)
    if channel_dim is None:
        if not 0 <= batch_dim < x.dim() - 1:
            raise ValueError(f"batch_dim={batch_dim} leaves no channel axis in a tensor of shape {shape}")
        return batch_dim, batch_dim + 1
    if not 0 <= batch_dim < x.dim():
        raise ValueError(f"batch_dim={batch_dim} is not an axis of a tensor of shape {shape}")
    if not -x.dim() <= channel_dim < x.dim() or channel_dim % x.dim() == batch_dim:
        raise ValueError(f"channel_dim={channel_dim} must be an axis other than batch_dim={batch_dim} "
                         f"in a tensor of shape {shape}")
    return batch_dim, channel_dim % x.dim()


def channel_count(model: nn.Module, place: str, example_input: torch.Tensor, batch_dim: int = 0,
                  channel_dim: int | None = None) -> int:
    """Size of the channel axis at `place`, read from one forward of `example_input`.

    channel_dim: the channel axis of the activation at `place` (negative counts from the end); None means
    batch_dim + 1.
    """
    sizes: list[int] = []

    def record(a: torch.Tensor) -> torch.Tensor:
        sizes.append(a.shape[_axes(a, batch_dim, channel_dim)[1]])
        return a

    was_training = model.training
    handle = _hook_at(model, place, record)
    try:
        model.eval()  # no BatchNorm statistics are updated by this probe
        with torch.no_grad():
            model(example_input)
    finally:
        handle.remove()
        model.train(was_training)
    if not sizes:
        raise ValueError(f"place {place!r} was not reached by the forward pass")
    return sizes[0]


def _check_op(op: str) -> None:
    if op not in INTERVENTIONS:
        raise ValueError(f"op must be one of {INTERVENTIONS}, got {op!r}")


def _randperm(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    # Drawn on the generator's own device so a seeded CPU generator gives the same permutations whatever `device` is.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def _channel_index(channels, device) -> torch.Tensor:
    return torch.as_tensor(channels, dtype=torch.long, device=device).reshape(-1)


def intervene(x: torch.Tensor, channels, op: str, batch_dim: int = 0,
              generator: torch.Generator | None = None, *, channel_dim: int | None = None) -> torch.Tensor:
    """A copy of x with `channels` (entries of axis channel_dim) destroyed by `op`; x itself is never modified.

    permute: one random permutation π of the batch axis per call, y[..., i, c, ...] = x[..., π(i), c, ...].
    zero:    y[..., c, ...] = 0 (NTDH's "freeze").
    mean:    y[..., c, ...] = mean over the batch axis of x[..., c, ...] (MFH's "freeze").
    channel_dim: the channel axis, any axis but batch_dim (negative counts from the end); None means batch_dim + 1.
    Axes before batch_dim other than the channel axis are independent groups: the mean is taken per group (π is
    shared by the groups). E.g. feature-major runs (R, D, N) use batch_dim=2, channel_dim=1.
    """
    _check_op(op)
    b, c = _axes(x, batch_dim, channel_dim)
    index = torch.unique(_channel_index(channels, x.device))  # duplicates would be written twice with the same value
    if index.numel() == 0:
        return x.clone()
    n_channels = x.shape[c]
    if index.min() < 0 or index.max() >= n_channels:
        raise ValueError(f"channels must lie in [0, {n_channels}), got {index.tolist()}")
    chosen = x.index_select(c, index)
    if op == "zero":
        replaced = torch.zeros_like(chosen)
    elif op == "mean":
        replaced = chosen.mean(b, keepdim=True).expand_as(chosen)
    else:
        replaced = chosen.index_select(b, _randperm(x.shape[b], generator, x.device))
    return x.index_copy(c, index, replaced)


class Intervention:
    """While active, every forward of `model` has `op` applied to `channels` at `place`.

        with Intervention(teacher, "fc1", [3, 7], "permute", generator=g):
            logits = teacher(x)   # a fresh permutation per forward

    batch_dim / channel_dim: the batch and channel axes of the activation at `place`, as in `intervene`.
    """

    def __init__(self, model: nn.Module, place: str, channels, op: str, batch_dim: int = 0,
                 generator: torch.Generator | None = None, *, channel_dim: int | None = None):
        _check_op(op)
        resolve_place(model, place)  # fail on a bad place now, not at __enter__
        self.model, self.place, self.channels, self.op = model, place, channels, op
        self.batch_dim, self.channel_dim, self.generator = batch_dim, channel_dim, generator
        self._handle = None

    def _apply(self, a: torch.Tensor) -> torch.Tensor:
        return intervene(a, self.channels, self.op, self.batch_dim, self.generator, channel_dim=self.channel_dim)

    def __enter__(self) -> "Intervention":
        self._handle = _hook_at(self.model, self.place, self._apply)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def remove_channels(model: nn.Module, place: str, channels, fill: str = "zero", batch_dim: int = 0, *,
                    channel_dim: int | None = None):
    """Persistently remove `channels` at `place` (Alg. 1 step 3): zero fill (NTDH) or batch-mean fill (MFH).

    batch_dim / channel_dim: the batch and channel axes of the activation at `place`, as in `intervene`.
    Returns the hook handle; `handle.remove()` restores the model. The channel ids are checked against the channel
    count at the first forward, when that count is first known.
    """
    if fill not in REMOVAL_FILLS:
        raise ValueError(f"fill must be one of {REMOVAL_FILLS}, got {fill!r}")
    resolve_place(model, place)
    index = _channel_index(channels, "cpu")
    checked = False

    def remove(a: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        if not checked:
            n_channels = a.shape[_axes(a, batch_dim, channel_dim)[1]]
            if index.numel() and (index.min() < 0 or index.max() >= n_channels):
                raise ValueError(f"channels to remove at place {place!r} must lie in [0, {n_channels}) "
                                 f"({n_channels} channels there), got min {index.min().item()}, "
                                 f"max {index.max().item()}")
            checked = True
        return intervene(a, index, fill, batch_dim, channel_dim=channel_dim)

    return _hook_at(model, place, remove)
