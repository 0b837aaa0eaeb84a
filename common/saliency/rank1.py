"""The rank-1 path of Algorithm 1's step 2 (MFH, "The Modality Focusing Hypothesis", Algorithm 1) at any place whose
activation feeds an nn.Linear and nothing else.

Destroying channel c of the activation a (B, C) that a linear layer z = W a + b receives changes z by the rank-1 term
W[:, c] ⊗ (ã_c − a_c), whatever the destruction (permute, zero, mean). So the k intervened copies of a chunk are
built at that layer's output from its clean output alone (`copies._rank1_copies`), instead of copying the activation
and multiplying every copy by W again; everything before that layer is computed once per batch and replayed from a
cache, and only the layers after it run on the k·B copies. The copies, and the random permutations drawn for them,
are those of the copy path (`copies._expand_copies`), so both give the same saliency up to float rounding.

Whether the shortcut is exact is read from one traced forward of the first batch (`find_site`), not from names: the
activation at the place (after every hook there) must be a (B, C) tensor with the samples on axis 0 and the channels
on axis 1, used by exactly one operation, the `F.linear` of an nn.Linear (exact type) whose input it is; operations
that return the very same tensor (e.g. `flatten(1)` of a (B, C) tensor) pass it on; and every submodule must run at
most once per forward (so a module's cached output is unambiguous). Anything else — a conv or activation after the
place, a skip connection, a reshape, a shared layer — leaves the copy path in charge.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from common.saliency.copies import _rank1_copies
from common.saliency.hooks import _axes, _hook_at

_LINEAR_FUNCS = (F.linear, torch._C._nn.linear)
# Channels per rank-1 forward are capped so that one block of copies at the linear layer's output, (k, B, H), holds
# about this many entries (4 MiB in float32): the element-wise passes after it then run in cache. On CPU at mnist's
# place 1 (B = 256, H = 256) that is k = 16, measured ~1.3-1.6× faster than k = 64 on 2 shared cores. The random draws
# do not depend on the blocks: one permutation per channel, in channel order, as on the copy path.
BLOCK_ENTRIES = 1 << 20


class _Uses(TorchFunctionMode):
    """Records every torch operation that takes `target` (once set) as an argument, except those returning it."""

    def __init__(self):
        super().__init__()
        self.target: torch.Tensor | None = None
        self.uses: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        target = self.target
        if target is not None and out is not target and any(t is target for t in tree_leaves((args, kwargs))):
            self.uses.append((func, args))
        return out


def _trace(teacher: nn.Module, place: str, x_t: torch.Tensor):
    """One clean forward of x_t recording: the activation at `place` as its consumer receives it, the torch
    operations that use it, the submodules' start/end order and call counts, and each module's first positional
    input. Returns (activation or None, uses, events, counts, inputs)."""
    events: list[tuple[str, nn.Module]] = []
    counts: Counter = Counter()
    inputs: dict[nn.Module, object] = {}
    mode = _Uses()
    seen: list[torch.Tensor] = []

    def at_place(a: torch.Tensor) -> torch.Tensor:
        seen.append(a)
        mode.target = a
        return a

    def start(module, args):
        events.append(("start", module))
        counts[module] += 1
        inputs[module] = args[0] if args else None

    handles = []
    try:
        handles.append(_hook_at(teacher, place, at_place))  # before the others: a pre-hook at "input" runs first
        for _, m in teacher.named_modules(remove_duplicate=False):
            if m is not teacher:
                handles.append(m.register_forward_pre_hook(start))
                handles.append(m.register_forward_hook(lambda module, _args, _out: events.append(("end", module))))
        with torch.no_grad(), mode:
            teacher(x_t)
    finally:
        for h in handles:
            h.remove()
    return (seen[0] if len(seen) == 1 else None), mode.uses, events, counts, inputs


class Rank1Site:
    """The linear layer after a place and the modules before it, for one teacher and layout (see the module doc)."""

    def __init__(self, teacher: nn.Module, layer: nn.Linear, before: list[nn.Module]):
        self.teacher, self.layer, self.before = teacher, layer, before
        self._cache: dict[nn.Module, object] = {}
        self._a = self._z = None

    def capture(self, x_t: torch.Tensor) -> None:
        """One clean forward of a batch: the raw outputs of the modules before the layer, its input a and output z."""
        cache: dict[nn.Module, object] = {}

        def recorder(module: nn.Module):
            original = module.forward

            def forward(*args, **kwargs):
                cache[module] = out = original(*args, **kwargs)
                if module is self.layer:
                    self._a = args[0]
                return out
            return forward

        with _patched(self.before + [self.layer], recorder):
            self.teacher(x_t)
        self._z = cache.pop(self.layer)
        self._cache = cache

    def block(self, chunk: int) -> int:
        """Channels per forward: at most `chunk`, and at most BLOCK_ENTRIES / (B·H) (at least 1)."""
        return max(1, min(chunk, BLOCK_ENTRIES // max(1, self._z.numel())))

    def forward_copies(self, x_t: torch.Tensor, channels: torch.Tensor, op: str,
                       generator: torch.Generator | None) -> torch.Tensor:
        """The teacher's output on the k intervened copies of the captured batch, copies stacked on the batch axis."""
        copies = _rank1_copies(self.layer, self._a, self._z, channels, op, generator)

        def replay(module: nn.Module):
            value = copies if module is self.layer else self._cache[module]
            return lambda *args, **kwargs: value

        with _patched(self.before + [self.layer], replay):
            return self.teacher(x_t)


@contextlib.contextmanager
def _patched(modules: list[nn.Module], make_forward):
    """Temporarily replace each module's forward by make_forward(module); hooks still run around it."""
    saved = [(m, vars(m).get("forward")) for m in modules]
    try:
        for m in modules:
            m.forward = make_forward(m)
        yield
    finally:
        for m, previous in saved:
            if previous is None:
                del m.forward
            else:
                m.forward = previous


def find_site(teacher: nn.Module, place: str, x_t: torch.Tensor, batch_dim: int,
              channel_dim: int | None) -> Rank1Site | None:
    """The rank-1 site of `place` when the shortcut is exact for this teacher and layout, else None."""
    a, uses, events, counts, inputs = _trace(teacher, place, x_t)
    if a is None or not isinstance(a, torch.Tensor) or a.dim() != 2 or _axes(a, batch_dim, channel_dim) != (0, 1):
        return None
    if len(uses) != 1 or any(n != 1 for n in counts.values()):
        return None
    func, args = uses[0]
    if func not in _LINEAR_FUNCS or len(args) < 2 or args[0] is not a:
        return None
    layers = [m for m in counts if type(m) is nn.Linear and m.weight is args[1] and inputs.get(m) is a]
    if len(layers) != 1 or layers[0].in_features != a.shape[1]:
        return None
    layer = layers[0]
    started = events.index(("start", layer))
    before = [m for kind, m in events[:started] if kind == "end"]
    return Rank1Site(teacher, layer, before)
