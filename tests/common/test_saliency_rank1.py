"""common.saliency.rank1: Algorithm 1's rank-1 path at places whose activation feeds one nn.Linear gives the copy
path's saliency (same permutations, same distances) for every place, op and distance, and is left alone wherever it
would not be exact (the next layer is not linear, a skip connection, a reshape, a shared layer)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from common.divergence import nontarget_js
from common.saliency import remove_channels, saliency_vector
from common.saliency.rank1 import find_site

DT = torch.float64


class MLP(nn.Module):
    """mnist's layout (in → h1 → h2 → classes, LeakyReLU, named layers, a custom forward that flattens first)."""

    def __init__(self, dims=(12, 9, 7, 5), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.act1 = nn.Linear(dims[0], dims[1]), nn.LeakyReLU(0.1)
        self.fc2, self.act2 = nn.Linear(dims[1], dims[2]), nn.LeakyReLU(0.1)
        self.fc3 = nn.Linear(dims[2], dims[3])
        self.to(DT)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x.flatten(1))))))


class Residual(MLP):
    """act1 also skips around fc2: its activation has two users, so the rank-1 path must not be taken."""

    def __init__(self):
        super().__init__((12, 9, 9, 5))

    def forward(self, x):
        h = self.act1(self.fc1(x))
        return self.fc3(self.act2(self.fc2(h)) + h)


class SharedLayer(MLP):
    """fc2 is applied twice: a module's cached output would be ambiguous."""

    def __init__(self):
        super().__init__((12, 9, 9, 5))

    def forward(self, x):
        return self.fc3(self.fc2(self.act1(self.fc2(self.act1(self.fc1(x))))))


class Doubled(MLP):
    """The place's activation is scaled before fc2: not the linear layer's own input."""

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(2 * self.act1(self.fc1(x)))))


def _sequential():
    """ravdess's layout: blocks of nn.Sequential(Linear, ReLU), places are the blocks' outputs."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Sequential(nn.Linear(12, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 6), nn.ReLU()),
                         nn.Linear(6, 5)).to(DT)


def _batches(sizes=(20, 13), d_t=12, d_s=10, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_t, generator=g, dtype=DT), torch.randn(n, d_s, generator=g, dtype=DT),
             torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def _student(seed=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 5)).to(DT)


def _full_js(h_t, h_s, y):
    """The full-distribution JS between the teacher's and the student's softmax, per batch (a callable distance)."""
    p, q = h_t.softmax(-1), h_s.softmax(-1)
    m = (p + q) / 2
    return 0.5 * ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1)).mean()


def _ncjsd_callable(h_t, h_s, y):
    return nontarget_js(h_s, h_t, y).mean()


def _both(teacher, place, batches, **kw):
    """(rank-1 path, copy path) with the same generator seed."""
    kw = dict(normalize=False, **kw)
    fast = saliency_vector(teacher, _student(), batches, place, generator=torch.Generator().manual_seed(7), **kw)
    slow = saliency_vector(teacher, _student(), batches, place, generator=torch.Generator().manual_seed(7),
                           rank1=False, **kw)
    return fast, slow


DISTANCES = [("mse", "textbook"), ("l1", "textbook"), ("ncjsd", "textbook"), ("ncjsd", "reference"),
             (_full_js, "textbook"), (_ncjsd_callable, "textbook"), ("js", "textbook"), ("js", "reference")]


@pytest.mark.parametrize("op", ["permute", "zero", "mean"])
@pytest.mark.parametrize("distance,variant", DISTANCES, ids=["mse", "l1", "ncjsd", "ncjsd_reference", "full_js",
                                                              "callable_ncjsd", "js", "js_reference"])
@pytest.mark.parametrize("place", ["input", "act1", "act2"])
def test_rank1_equals_copy_path_on_an_mlp(place, distance, variant, op):
    teacher = MLP()
    assert find_site(teacher, place, _batches()[0][0], 0, None) is not None
    fast, slow = _both(teacher, place, _batches(), op=op, distance=distance, variant=variant, repeats=3, chunk=4)
    assert fast.shape == slow.shape == (teacher.fc1.in_features if place == "input" else
                                         teacher.get_submodule(place.replace("act", "fc")).out_features,)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    assert slow.std() > 0   # a constant vector would hide a wrong channel order


@pytest.mark.parametrize("op", ["permute", "zero", "mean"])
@pytest.mark.parametrize("place", ["0", "1"])
def test_rank1_equals_copy_path_on_nested_sequential_blocks(place, op):
    teacher = _sequential()
    assert find_site(teacher, place, _batches()[0][0], 0, None).layer is teacher[int(place) + 1][0] \
        if place == "0" else teacher[2]
    fast, slow = _both(teacher, place, _batches(), op=op, distance="ncjsd", repeats=2, chunk=3)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_rank1_in_float32_and_with_normalisation():
    teacher = MLP().float()
    batches = [tuple(t.float() if t.is_floating_point() else t for t in b) for b in _batches()]
    student = _student().float()
    kw = dict(op="permute", distance="ncjsd", repeats=2, chunk=5)
    fast = saliency_vector(teacher, student, batches, "act1", generator=torch.Generator().manual_seed(3), **kw)
    slow = saliency_vector(teacher, student, batches, "act1", generator=torch.Generator().manual_seed(3),
                           rank1=False, **kw)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert fast.dtype == torch.float32 and fast.min() == 0 and fast.max() == 1


@pytest.mark.parametrize("place", ["fc1", "fc2", "fc3"])
def test_fallback_where_the_next_layer_is_not_linear(place):
    """fc1 and fc2 feed a LeakyReLU, fc3 is the output: no rank-1 site, and the saliency is the copy path's."""
    teacher = MLP()
    assert find_site(teacher, place, _batches()[0][0], 0, None) is None
    fast, slow = _both(teacher, place, _batches(), op="permute", distance="mse", repeats=2, chunk=4)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


@pytest.mark.parametrize("model", [Residual, SharedLayer, Doubled])
def test_no_rank1_site_when_it_would_not_be_exact(model):
    teacher = model()
    assert find_site(teacher, "act1", _batches()[0][0], 0, None) is None
    if model is Doubled:   # a one-path model: the copy path runs and still answers
        fast, slow = _both(teacher, "act1", _batches(), op="zero", distance="mse")
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_no_rank1_site_for_other_layouts():
    """A channel axis that is not the linear layer's input-feature axis (feature-major) is left to the copy path."""
    teacher = MLP()
    x = _batches()[0][0]
    assert find_site(teacher, "act1", x, 1, 0) is None
    conv = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 5)).to(DT)
    assert find_site(conv, "1", torch.randn(4, 2, 6, dtype=DT), 0, None) is None   # 3-D activation
    assert find_site(conv, "2", torch.randn(4, 2, 6, dtype=DT), 0, None) is not None  # Flatten's output feeds it


class _LinearRows(TorchFunctionMode):
    """The largest number of rows any F.linear with `weight` received."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.rows = weight, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            self.rows = max(self.rows, args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rank1", [True, False])
def test_the_rank1_path_never_multiplies_copies_by_the_next_layer(rank1):
    """The point of the path: fc2 (after place act1) and fc1 (before it) only ever see the B clean samples; the copy
    path sends k·B copies through fc2."""
    teacher, batches = MLP(), _batches(sizes=(20,))
    with _LinearRows(teacher.fc2.weight) as fc2_rows:
        saliency_vector(teacher, _student(), batches, "act1", op="zero", chunk=4, rank1=rank1)
    assert fc2_rows.rows == (20 if rank1 else 4 * 20)


def test_rank1_with_a_removal_hook_before_the_place_and_models_restored():
    """Channels removed at act1 (step 3's hook) while the saliency of act2 is measured: the cached prefix replays
    the removal; afterwards the teacher has no patched forward and no hook left."""
    teacher = MLP()
    handle = remove_channels(teacher, "act1", [0, 3, 4], fill="mean")
    try:
        fast, slow = _both(teacher, "act2", _batches(), op="permute", distance="ncjsd", repeats=2, chunk=3)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
        fast, slow = _both(teacher, "act1", _batches(), op="mean", distance="mse", chunk=3)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
        # a channel already at its batch mean does not move when replaced by its batch mean: the clean distance
        assert fast[[0, 3, 4]].std() < 1e-12 < fast.std()
    finally:
        handle.remove()
    for m in teacher.modules():
        assert "forward" not in vars(m) and not m._forward_hooks and not m._forward_pre_hooks
    x = _batches()[0][0]
    torch.testing.assert_close(teacher(x), MLP()(x))
