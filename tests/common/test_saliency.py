"""Algorithm 1 (common.saliency): toy models with known decisive channels, chunked == naive, interventions, removal."""
import copy

import pytest
import torch
from torch import nn

from common.divergence import full_js, nontarget_js
from common.saliency import (Intervention, channel_count, intervene, joint_train, remove_channels, removal_indices,
                             resolve_place, saliency_vector)
from common.synthetic import dispatch, rank1
from common.synthetic.vectorized import batched_mlp

SHARED = [2, 5, 7]  # features both modalities see, and the only ones the label depends on
TEACHER_ONLY = 9


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def _toy_modalities(n=256, classes=4, seed=0):
    """12 features; y = argmax of a linear map of features {2, 5, 7}. Teacher also uses feature 9 a little."""
    g = _gen(seed)
    w_true = torch.zeros(classes, 12)
    w_true[:, SHARED] = torch.randn(classes, len(SHARED), generator=g) * 3
    x_t = torch.randn(n, 12, generator=g)
    x_s = torch.randn(n, 12, generator=g)
    x_s[:, SHARED] = x_t[:, SHARED]  # the second modality shares only the decisive features
    y = (x_t @ w_true.t()).argmax(-1)
    w_teacher = w_true.clone()
    w_teacher[:, TEACHER_ONLY] = 0.3 * torch.randn(classes, generator=g)
    return _linear(w_teacher), _linear(w_true), x_t, x_s, y


def _distance(name, class_dim=-1):
    """Per-group distance for outputs (B, C), (R, B, C) with class_dim=-1, or feature-major (R, C, N) with class_dim=1:
    the mean over the last two axes is the mean over samples and classes in all three."""
    if name == "mse":
        return lambda h_t, h_s, y: (h_t - h_s).pow(2).mean((-2, -1))
    if name == "l1":
        return lambda h_t, h_s, y: (h_t - h_s).abs().mean((-2, -1))

    if name == "js":
        return lambda h_t, h_s, y: full_js(h_s, h_t, dim=class_dim).mean(-1)

    def ncjsd(h_t, h_s, y):
        labels = y.expand(h_s.movedim(class_dim, -1).shape[:-1])
        return nontarget_js(h_s, h_t, labels, dim=class_dim).mean(-1)
    return ncjsd


def _naive_saliency(teacher, student, batches, place, op, distance, repeats, generator, batch_dim=0,
                    channel_dim=None, class_dim=-1):
    """Alg. 1 step 2 written the slow way: one full teacher forward per (repeat, channel), with Intervention."""
    d = _distance(distance, class_dim)
    n_channels = channel_count(teacher, place, batches[0][0], batch_dim, channel_dim)
    total, n = 0.0, 0
    with torch.no_grad():
        for x_t, x_s, y in batches:
            h_s = student(x_s)
            per_channel = []
            for _ in range(repeats):
                row = []
                for c in range(n_channels):
                    with Intervention(teacher, place, [c], op, batch_dim=batch_dim, channel_dim=channel_dim,
                                      generator=generator):
                        row.append(d(teacher(x_t), h_s, y))
                per_channel.append(torch.stack(row, -1))
            batch_size = x_t.shape[batch_dim]
            total = total + batch_size * torch.stack(per_channel).mean(0)
            n += batch_size
    return total / n


# ---------------------------------------------------------------------------------------------------------------------
# 1. Known decisive channels rank on top


@pytest.mark.parametrize("distance", ["mse", "ncjsd", "js", "l1"])
def test_input_saliency_ranks_shared_decisive_features_on_top(distance):
    teacher, student, x_t, x_s, y = _toy_modalities()
    batches = [(x_t[:128], x_s[:128], y[:128]), (x_t[128:], x_s[128:], y[128:])]
    s = saliency_vector(teacher, student, batches, "input", op="permute", distance=distance, repeats=3,
                        generator=_gen(1))
    assert s.shape == (12,)
    assert set(s.topk(3).indices.tolist()) == set(SHARED)
    assert s.min() == 0 and s.max() == 1
    unused = [c for c in range(12) if c not in SHARED + [TEACHER_ONLY]]
    assert torch.all(s[unused] == s[unused[0]])  # a channel the teacher ignores leaves the baseline distance


def test_hidden_place_ranks_connected_units_and_zeroes_the_rest():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    connected = [1, 4, 6]
    with torch.no_grad():
        mask = torch.zeros(8)
        mask[connected] = 1
        teacher[2].weight.mul_(mask)
        teacher[0].bias.fill_(0.5)  # keep every ReLU unit active on part of the batch
    student = copy.deepcopy(teacher)  # perfect agreement: only a destroyed connected unit creates a distance
    x = torch.randn(200, 6)
    y = torch.randint(0, 3, (200,))
    for op in ("permute", "zero", "mean"):
        s = saliency_vector(teacher, student, [(x, x, y)], "1", op=op, repeats=2, generator=_gen(2))
        assert set(s.topk(3).indices.tolist()) == set(connected), op
        others = [c for c in range(8) if c not in connected]
        assert torch.all(s[others] == 0), op


# The feature-major vectorised models: inputs (R, D, N), hidden (R, H, N), outputs (R, C, N); samples on axis 2.
FEATURE_MAJOR = dict(batch_dim=2, channel_dim=1, class_dim=1)


def _runs_pair(runs=3, n=64, dtype=torch.float32):
    teacher = batched_mlp([12, 5, 4], runs=runs, seeds=[1, 2, 3][:runs]).to(dtype)
    student = batched_mlp([12, 5, 4], runs=runs, seeds=[4, 5, 6][:runs]).to(dtype)
    g = _gen(3)
    x_t = torch.randn(runs, 12, n, generator=g, dtype=dtype)
    x_s = torch.randn(runs, 12, n, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (runs, n), generator=g)
    return teacher, student, [(x_t, x_s, y)]


def test_vectorised_runs_give_one_saliency_row_per_run():
    runs = 3
    teacher, student, batches = _runs_pair(runs)
    for place in ("input", "1"):
        for op in ("zero", "mean"):
            fast = saliency_vector(teacher, student, batches, place, op=op, chunk=2, normalize=False,
                                   **FEATURE_MAJOR)
            slow = _naive_saliency(teacher, student, batches, place, op, "mse", 1, None, **FEATURE_MAJOR)
            assert fast.shape == (runs, 12 if place == "input" else 5)
            torch.testing.assert_close(fast, slow)
        normalised = saliency_vector(teacher, student, batches, place, op="permute", repeats=2, generator=_gen(4),
                                     **FEATURE_MAJOR)
        torch.testing.assert_close(normalised.amax(-1), torch.ones(runs))
        torch.testing.assert_close(normalised.amin(-1), torch.zeros(runs))


def test_vectorised_run_rows_equal_single_run_saliency():
    teacher, student, batches = _runs_pair(runs=3)
    x_t, x_s, y = batches[0]
    both = saliency_vector(teacher, student, batches, "1", op="mean", normalize=False, **FEATURE_MAJOR)
    for r in range(3):
        alone_t = batched_mlp([12, 5, 4], runs=1, seeds=[r + 1])
        alone_s = batched_mlp([12, 5, 4], runs=1, seeds=[r + 4])
        alone = saliency_vector(alone_t, alone_s, [(x_t[r:r + 1], x_s[r:r + 1], y[r:r + 1])], "1", op="mean",
                                normalize=False, **FEATURE_MAJOR)
        torch.testing.assert_close(both[r], alone[0])


# ---------------------------------------------------------------------------------------------------------------------
# 2. Chunked evaluation == one forward per channel


def _mlp_pair():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    student = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    g = _gen(5)
    batches = [(torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randn(b, 7, generator=g, dtype=torch.float64),
                torch.randint(0, 4, (b,), generator=g)) for b in (17, 30)]
    return teacher, student, batches


@pytest.mark.parametrize("place", ["input", "1", "3"])
@pytest.mark.parametrize("op", ["zero", "mean", "permute"])
@pytest.mark.parametrize("distance", ["mse", "ncjsd", "js", "l1"])
def test_chunked_equals_naive_per_channel_loop(place, op, distance):
    teacher, student, batches = _mlp_pair()
    # chunk=3 does not divide the channel counts (5, 8, 6): the last chunk is partial. The same seed gives the same
    # permutations, because both draw one permutation per (repeat, channel) in the same order.
    fast = saliency_vector(teacher, student, batches, place, op=op, distance=distance, repeats=3, chunk=3,
                           generator=_gen(6), normalize=False)
    slow = _naive_saliency(teacher, student, batches, place, op, distance, 3, _gen(6))
    torch.testing.assert_close(fast, slow)
    assert fast.dtype == torch.float64


@pytest.mark.parametrize("place", ["input", "1"])
@pytest.mark.parametrize("op", ["zero", "mean", "permute"])
@pytest.mark.parametrize("distance", ["mse", "ncjsd", "js", "l1"])
def test_chunked_equals_naive_per_channel_loop_feature_major_runs(place, op, distance):
    """Channel axis before the batch axis, runs axis in front: (R, 12, N) → (R, 5, N) → (R, 4, N)."""
    teacher, student, batches = _runs_pair(runs=2, n=23, dtype=torch.float64)
    fast = saliency_vector(teacher, student, batches, place, op=op, distance=distance, repeats=2, chunk=5,
                           generator=_gen(6), normalize=False, **FEATURE_MAJOR)
    slow = _naive_saliency(teacher, student, batches, place, op, distance, 2, _gen(6), **FEATURE_MAJOR)
    assert fast.shape == (2, 12 if place == "input" else 5)
    torch.testing.assert_close(fast, slow)


def test_custom_distance_callable_matches_builtin():
    teacher, student, batches = _mlp_pair()
    mse = lambda h_t, h_s, y: (h_t - h_s).pow(2).mean()
    a = saliency_vector(teacher, student, batches, "1", op="zero", distance=mse, normalize=False)
    b = saliency_vector(teacher, student, batches, "1", op="zero", distance="mse", normalize=False)
    torch.testing.assert_close(a, b)


def test_saliency_restores_modes_and_leaves_no_hooks():
    teacher, student, batches = _mlp_pair()
    teacher.train()
    student.eval()
    x = batches[0][0]
    before = teacher(x)
    saliency_vector(teacher, student, batches, "1", op="permute", repeats=1, generator=_gen(0))
    assert teacher.training and not student.training
    torch.testing.assert_close(teacher(x), before)
    assert not teacher._forward_pre_hooks and not any(m._forward_hooks for m in teacher.modules())


def test_constant_saliency_normalises_to_zeros_not_nan():
    teacher = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        teacher[0].weight.zero_()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    s = saliency_vector(teacher, teacher, [(x, x, y)], "input", op="permute", repeats=2, generator=_gen(0))
    assert torch.equal(s, torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------------------
# 3. intervene


def test_intervene_zero_and_mean():
    x = torch.arange(24.0).reshape(4, 3, 2)
    x_before = x.clone()
    z = intervene(x, [1], "zero")
    assert torch.all(z[:, 1] == 0) and torch.equal(z[:, [0, 2]], x[:, [0, 2]])
    m = intervene(x, [0, 2], "mean")
    torch.testing.assert_close(m[:, [0, 2]], x[:, [0, 2]].mean(0, keepdim=True).expand(4, 2, 2))
    assert torch.equal(m[:, 1], x[:, 1])
    assert torch.equal(x, x_before)


def test_intervene_permute_is_one_batch_permutation_of_the_chosen_channels():
    x = torch.randn(50, 6)
    x_before = x.clone()
    p = intervene(x, [1, 4], "permute", generator=_gen(0))
    assert torch.equal(x, x_before)
    assert torch.equal(p[:, [0, 2, 3, 5]], x[:, [0, 2, 3, 5]])
    # Recover π from channel 1 and check it is a permutation that channel 4 shares.
    pi = torch.stack([(x[:, 1] == v).nonzero().squeeze() for v in p[:, 1]])
    assert sorted(pi.tolist()) == list(range(50)) and not torch.equal(pi, torch.arange(50))
    assert torch.equal(p[:, 4], x[pi, 4])
    assert torch.equal(intervene(x, [1, 4], "permute", generator=_gen(0)), p)  # seeded → reproducible


def test_intervene_with_runs_axis_treats_runs_as_groups():
    x = torch.randn(3, 20, 5)  # (runs, batch, channels)
    m = intervene(x, [2], "mean", batch_dim=1)
    torch.testing.assert_close(m[:, :, 2], x[:, :, 2].mean(1, keepdim=True).expand(3, 20))
    assert torch.equal(m[:, :, [0, 1, 3, 4]], x[:, :, [0, 1, 3, 4]])
    p = intervene(x, [0], "permute", batch_dim=1, generator=_gen(1))
    for r in range(3):
        assert torch.equal(p[r, :, 0].sort().values, x[r, :, 0].sort().values)  # within-run shuffle
    assert torch.equal(p[:, :, 1:], x[:, :, 1:])
    with pytest.raises(ValueError):
        intervene(x, [5], "zero", batch_dim=1)
    with pytest.raises(ValueError):
        intervene(x, [0], "shuffle")


def test_intervene_channel_axis_before_batch_axis():
    x = torch.randn(3, 5, 20)  # feature-major runs: (runs, channels, batch)
    m = intervene(x, [2], "mean", batch_dim=2, channel_dim=1)
    torch.testing.assert_close(m[:, 2], x[:, 2].mean(-1, keepdim=True).expand(3, 20))
    assert torch.equal(m[:, [0, 1, 3, 4]], x[:, [0, 1, 3, 4]])
    p = intervene(x, [0, 3], "permute", batch_dim=2, channel_dim=1, generator=_gen(1))
    for r in range(3):
        assert torch.equal(p[r, 0].sort().values, x[r, 0].sort().values)  # within-run shuffle
    assert torch.equal(p[:, [1, 2, 4]], x[:, [1, 2, 4]])
    # The same as the default layout after moving the channel axis behind the batch axis.
    q = intervene(x.transpose(1, 2), [0, 3], "permute", batch_dim=1, generator=_gen(1))
    assert torch.equal(p, q.transpose(1, 2))
    assert torch.equal(intervene(x, [1], "zero", batch_dim=2, channel_dim=-2),
                       intervene(x, [1], "zero", batch_dim=2, channel_dim=1))
    with pytest.raises(ValueError, match="channel_dim"):
        intervene(x, [0], "zero", batch_dim=2, channel_dim=2)
    with pytest.raises(ValueError, match="batch_dim"):
        intervene(x, [0], "zero", batch_dim=2)  # no axis after the batch axis


def test_intervention_context_and_places():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    clean = model(x)
    with Intervention(model, "1", range(6), "zero"):
        torch.testing.assert_close(model(x), model[2].bias.expand(8, 2))
    torch.testing.assert_close(model(x), clean)
    assert resolve_place(model, "input") is None and resolve_place(model, "2") is model[2]
    with pytest.raises(ValueError, match="valid places"):
        resolve_place(model, "fc9")
    assert channel_count(model, "0", x) == 6 and channel_count(model, "input", x) == 4


def test_input_intervention_changes_what_the_model_sees():
    model = nn.Sequential(nn.Linear(4, 2))
    x = torch.randn(8, 4)
    with Intervention(model, "input", [0, 1, 2, 3], "zero"):
        out = model(x)
    torch.testing.assert_close(out, model[0].bias.expand(8, 2))


# ---------------------------------------------------------------------------------------------------------------------
# 4. Removal


def test_removal_indices_modes():
    s = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.7, 0.3, 0.0, 1.0])
    assert removal_indices(s, 1, 0.5).tolist() == [1, 3, 5, 6]  # the 4 lowest
    assert removal_indices(s, 2, 0.5).tolist() == [0, 2, 4, 7]  # the 4 highest
    assert removal_indices(s, 1, 0.25).tolist() == [1, 6]  # tie 0.1 at ids 1 and 3: the lower id goes first
    assert removal_indices(s, -1, 0.75).numel() == 0
    random_ids = removal_indices(s, 0, 0.75, generator=_gen(0))
    assert random_ids.numel() == 6 and len(set(random_ids.tolist())) == 6 and random_ids.max() < 8
    assert torch.equal(random_ids, removal_indices(s, 0, 0.75, generator=_gen(0)))
    assert removal_indices(s, 1, 0.0).numel() == 0 and removal_indices(s, 2, 1.0).tolist() == list(range(8))
    assert removal_indices(torch.stack([s, -s]), 1, 0.25).tolist() == [[1, 6], [2, 7]]  # per-run rows
    with pytest.raises(ValueError, match="mode"):
        removal_indices(s, 3, 0.5)
    with pytest.raises(ValueError, match="ratio"):
        removal_indices(s, 1, 1.5)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_remove_channels_and_undo(fill):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(10, 4)
    clean = model(x)
    hidden = model[1](model[0](x))
    removed = [0, 3]
    handle = remove_channels(model, "1", removed, fill=fill)
    expected_hidden = hidden.clone()
    expected_hidden[:, removed] = 0 if fill == "zero" else hidden[:, removed].mean(0)
    torch.testing.assert_close(model(x), model[2](expected_hidden))
    handle.remove()
    torch.testing.assert_close(model(x), clean)


def test_remove_channels_feature_major():
    model = batched_mlp([4, 6, 2], runs=2, seeds=[0, 1])
    x = torch.randn(2, 4, 10)
    hidden = model[1](model[0](x))
    handle = remove_channels(model, "1", [0, 3], fill="mean", batch_dim=2, channel_dim=1)
    expected_hidden = hidden.clone()
    expected_hidden[:, [0, 3]] = hidden[:, [0, 3]].mean(-1, keepdim=True)
    torch.testing.assert_close(model(x), model[2](expected_hidden))
    handle.remove()
    assert channel_count(model, "1", x, batch_dim=2, channel_dim=1) == 6


def test_remove_channels_out_of_range_raises_with_place_and_count():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    handle = remove_channels(model, "1", [2, 6])
    with pytest.raises(ValueError, match=r"'1'.*6 channels"):
        model(torch.randn(3, 4))
    handle.remove()
    with pytest.raises(ValueError):
        remove_channels(model, "1", [0], fill="median")


# ---------------------------------------------------------------------------------------------------------------------
# 5. All batches count, weighted by size


def test_saliency_averages_all_batches_weighted_by_size():
    teacher, student, x_t, x_s, y = _toy_modalities(n=120)
    x_t2 = x_t.clone()
    x_t2[80:] *= 3.0  # the second batch differs in content, so its saliency differs
    b1, b2 = (x_t2[:80], x_s[:80], y[:80]), (x_t2[80:], x_s[80:], y[80:])
    kwargs = dict(op="zero", distance="mse", normalize=False)
    s1 = saliency_vector(teacher, student, [b1], "input", **kwargs)
    s2 = saliency_vector(teacher, student, [b2], "input", **kwargs)
    both = saliency_vector(teacher, student, [b1, b2], "input", **kwargs)
    assert not torch.allclose(s1, s2)
    torch.testing.assert_close(both, (80 * s1 + 40 * s2) / 120)
    assert not torch.allclose(both, s2)  # not just the last batch (reference bug)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Joint training


@pytest.mark.parametrize("distance", ["mse", "ncjsd", "js"])
def test_joint_train_reduces_loss(distance):
    _, _, x_t, x_s, y = _toy_modalities(n=256)
    torch.manual_seed(0)
    model_a, model_b = nn.Linear(12, 4), nn.Linear(12, 4)
    batches_fn = lambda: [(x_t[i:i + 64], x_s[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    history = joint_train(model_a, model_b, batches_fn, epochs=12, lr=0.05, distance=distance)
    assert len(history) == 12
    assert history[-1] < 0.5 * history[0]
    assert (model_a(x_t).argmax(-1) == y).float().mean() > 0.85


@pytest.mark.parametrize("variant", ["textbook", "reference"])
def test_joint_train_ncjsd_matches_divergence_and_has_finite_gradients(variant):
    from common.saliency.joint import agreement
    g = _gen(7)
    a, b = torch.randn(9, 5, generator=g, requires_grad=True), torch.randn(9, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (9,), generator=g)
    d = agreement(a, b, y, "ncjsd", variant)
    torch.testing.assert_close(d, nontarget_js(b, a, y, variant).mean())
    torch.testing.assert_close(agreement(a, b, y, "js", variant), full_js(b, a, variant).mean())
    with pytest.raises(ValueError, match="distance must be one of"):
        agreement(a, b, y, "nc_jsd", variant)   # a misspelt distance is refused, not taken for ncjsd
    d.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and a.grad.abs().sum() > 0


def test_joint_train_custom_loss_fn_for_runs_axis():
    runs = 2
    model_a = batched_mlp([12, 4], runs=runs, seeds=[1, 2])
    model_b = batched_mlp([12, 4], runs=runs, seeds=[3, 4])
    _, _, x_t, x_s, y = _toy_modalities(n=128)
    xa, xb, yy = x_t.t().expand(runs, -1, -1), x_s.t().expand(runs, -1, -1), y.expand(runs, -1)  # (R, 12, N)

    def summed_over_runs(out_a, out_b, labels):  # outputs (R, C, N)
        ce = lambda out: nn.functional.cross_entropy(out, labels, reduction="none").mean(-1).sum()
        return ce(out_a) + ce(out_b) + (out_a - out_b).pow(2).mean((-2, -1)).sum()

    history = joint_train(model_a, model_b, lambda: [(xa, xb, yy)], epochs=20, lr=0.05, loss_fn=summed_over_runs)
    assert history[-1] < 0.5 * history[0]


@pytest.mark.parametrize("distance", ["mse", "ncjsd"])
def test_joint_train_default_loss_on_feature_major_runs(distance):
    runs = 2
    model_a = batched_mlp([12, 4], runs=runs, seeds=[1, 2])
    model_b = batched_mlp([12, 4], runs=runs, seeds=[3, 4])
    _, _, x_t, x_s, y = _toy_modalities(n=128)
    xa, xb, yy = x_t.t().expand(runs, -1, -1), x_s.t().expand(runs, -1, -1), y.expand(runs, -1)  # (R, 12, N)
    history = joint_train(model_a, model_b, lambda: [(xa, xb, yy)], epochs=20, lr=0.2, distance=distance,
                          class_dim=1)
    assert history[-1] < 0.5 * history[0]
    assert (model_a(xa).argmax(1) == yy).float().mean() > 0.8


@pytest.mark.parametrize("distance", ["mse", "ncjsd"])
def test_joint_train_default_loss_class_dim_matches_class_last(distance):
    """The default loss on (R, C, N) with class_dim=1 is the default loss on the same logits laid out (R, N, C)."""
    from common.saliency.joint import agreement, _cross_entropy
    g = _gen(8)
    a, b = (torch.randn(2, 5, 9, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, 5, (2, 9), generator=g)
    feature_major = _cross_entropy(a, y, 1) + agreement(a, b, y, distance, "textbook", 1)
    class_last = (_cross_entropy(a.transpose(1, 2), y)
                  + agreement(a.transpose(1, 2), b.transpose(1, 2), y, distance, "textbook"))
    torch.testing.assert_close(feature_major, class_last)


@pytest.mark.parametrize("op", ["zero", "mean", "permute"])
@pytest.mark.parametrize("distance", ["mse", "ncjsd"])
@pytest.mark.parametrize("model", ["single_linear", "mlp"])
def test_synthetic_rank1_stack_path_equals_copy_path(op, distance, model):
    """The synthetic engine's rank-1 path (common.synthetic.dispatch.saliency → rank1.stack_saliency) gives the
    reference copy path's numbers, for a lone BatchedLinear (gauss) and a BatchedLinear MLP (sklearn_exp), with the
    same random draws."""
    g = _gen(3)
    R, N = 3, 40
    dims = [9, 4] if model == "single_linear" else [9, 6, 5, 4]
    teacher = batched_mlp(dims, R, seeds=[1, 2, 3])
    student = batched_mlp([7, 4], R, seeds=[4, 5, 6])
    if model == "single_linear":
        teacher = teacher[0]
    x_t, x_s, y = torch.randn(R, 9, N, generator=g), torch.randn(R, 7, N, generator=g), torch.randint(0, 4, (R, N), generator=g)
    kw = dict(op=op, distance=distance, repeats=3, chunk=4, normalize=False)
    slow = saliency_vector(teacher, student, [(x_t, x_s, y)], "input", generator=_gen(8), **FEATURE_MAJOR, **kw)
    for group_chunk in (None, 1, 2):   # all runs at once, one at a time, a partial last block
        fast = dispatch.saliency(teacher, student, x_t, x_s, y, generator=_gen(8), group_chunk=group_chunk, **kw)
        assert fast.shape == (R, 9)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert rank1.runs_stack(nn.Sequential(nn.Tanh(), teacher)) is None


@pytest.mark.parametrize("op", ["zero", "mean", "permute"])
@pytest.mark.parametrize("distance", ["mse", "ncjsd"])
def test_nn_linear_rank1_input_shortcut_equals_copy_path(op, distance):
    """common.saliency's own shortcut: at place "input" of a model starting with an nn.Linear, the copies are a rank-1
    update of that layer's output — the copy path's numbers and random draws."""
    g = _gen(4)
    teacher = nn.Sequential(nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 4))
    student = nn.Sequential(nn.Linear(7, 4))
    batches = [(torch.randn(30, 9, generator=g), torch.randn(30, 7, generator=g), torch.randint(0, 4, (30,), generator=g))]
    kw = dict(op=op, distance=distance, repeats=3, chunk=4, normalize=False)
    slow = saliency_vector(teacher, student, batches, "input", generator=_gen(8), rank1=False, **kw)
    fast = saliency_vector(teacher, student, batches, "input", generator=_gen(8), **kw)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_rank1_path_is_skipped_when_the_first_layer_is_not_linear():
    teacher = nn.Sequential(nn.Tanh(), nn.Linear(5, 4))
    student = nn.Sequential(nn.Linear(5, 4))
    g = _gen(1)
    batches = [(torch.randn(30, 5, generator=g), torch.randn(30, 5, generator=g), torch.randint(0, 4, (30,), generator=g))]
    a = saliency_vector(teacher, student, batches, "input", generator=_gen(2), normalize=False)
    b = saliency_vector(teacher, student, batches, "input", generator=_gen(2), normalize=False, rank1=False)
    torch.testing.assert_close(a, b)
