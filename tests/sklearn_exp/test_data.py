"""sklearn_exp.data: which columns are decisive, the scaler fix, per-run seeds."""
import numpy as np
import pytest
import torch

from sklearn_exp import data

OVERLAPS = [20, 10, 0]
KW = dict(n_samples=400)


def test_decisive_columns_match_the_real_features():
    seeds = [3, 4]
    train, test = data.build(seeds, OVERLAPS, **KW)
    assert train.x1.shape == (6, 50, 240) and train.x2.shape == (6, 50, 240) and train.y.shape == (6, 240)
    assert test.x1.shape == (6, 50, 160)
    lay = data.Layout()
    for r, seed in enumerate(seeds):
        X_tr, y_tr, _, _ = data.features(seed, **KW)
        real = torch.from_numpy(X_tr.T.astype(np.float32))                 # (50, N)
        for k, ov in enumerate(OVERLAPS):
            g = k * len(seeds) + r
            x1, x2 = train.x1[g], train.x2[g]
            assert torch.equal(train.y[g], torch.from_numpy(y_tr))
            torch.testing.assert_close(x2[:20], real[:20])                   # student: real columns 0..19
            dec = lay.x1_decisive(ov)
            assert dec == list(range(20 - ov, 40 - ov))
            torch.testing.assert_close(x1[dec], real[dec])                   # teacher: real columns 20−ov..39−ov
            others = [c for c in range(50) if c not in dec]
            assert not any(torch.allclose(x1[c], real[c], atol=1e-3) for c in others)
            # the shared columns are identical in both modalities, and only those
            shared = lay.shared(ov)
            assert shared == [c for c in range(20) if c in dec]
            for c in range(50):
                assert torch.equal(x1[c], x2[c]) == (c in shared)
        # x2 is the same at every γ; x1's noise too (one draw per run serves every γ)
        torch.testing.assert_close(train.x2[r], train.x2[2 * len(seeds) + r])
        torch.testing.assert_close(train.x1[r, 45:], train.x1[2 * len(seeds) + r, 45:])
    assert data.gamma_of(15) == 0.75 and data.gamma_of(0) == 0.0


def test_scaler_is_fitted_on_train_only_unless_parity():
    X_tr, _, X_te, _ = data.features(0, **KW)
    np.testing.assert_allclose(X_tr.mean(0), 0, atol=1e-6)
    assert np.abs(X_te.mean(0)).max() > 1e-3                               # test statistics did not leak in
    A_tr, _, A_te, _ = data.features(0, scaler_fit="all", **KW)
    np.testing.assert_allclose(np.concatenate([A_tr, A_te]).mean(0), 0, atol=1e-6)
    assert np.abs(A_tr.mean(0)).max() > 1e-3
    with pytest.raises(ValueError, match="scaler_fit"):
        data.features(0, scaler_fit="both", **KW)


def test_seeds_make_the_runs_independent_and_reproducible():
    a, _ = data.build([5, 6], [10], **KW)
    b, _ = data.build([5, 5], [10], **KW)
    assert not torch.equal(a.x1[0], a.x1[1]) and torch.equal(b.x1[0], b.x1[1])
    assert torch.equal(a.x1[0], b.x1[0]) and torch.equal(a.y[0], b.y[0])
    with pytest.raises(ValueError, match="overlap"):
        data.build([0], [21], **KW)
