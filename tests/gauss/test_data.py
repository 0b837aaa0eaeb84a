import numpy as np
import pytest
import torch

from gauss import data


def test_decisive_columns_and_gamma():
    seeds, overlaps = [3, 4], [0, 4, 10]
    train, test = data.increase_gamma(seeds, overlaps, n_train=50, n_test=70)
    assert train.x1.shape == (6, 25, 50) and train.x2.shape == (6, 25, 50) and train.y.shape == (6, 50)
    assert test.x1.shape == (6, 25, 70)
    for k, ov in enumerate(overlaps):
        for r in range(len(seeds)):
            g = k * len(seeds) + r
            x1, x2 = train.x1[g], train.x2[g]
            # the student's decisive columns 0..9; the teacher holds latent dims [10−ov, 20−ov) at the same indices
            shared = list(range(10 - ov, 10))
            for c in shared:
                torch.testing.assert_close(x1[c], x2[c])
            for c in range(10):
                if c not in shared:
                    assert not torch.allclose(x1[c], x2[c])
    assert data.gamma_of(0, 10, 10) == 0 and data.gamma_of(10, 10, 10) == 1 and data.gamma_of(4, 10, 10) == 4 / 16


def test_reference_random_stream():
    """Run `seed` sees the numbers the reference's np.random.seed(seed) + randn calls would give it."""
    seed, ov = 7, 6
    np.random.seed(seed)
    a = np.random.randn(500)
    xs = np.random.randn(200, 20)
    x2 = np.random.randn(200, 25)
    x2[:, :10] = xs[:, :10]
    x1 = np.random.randn(200, 25)
    x1[:, 10 - ov:20 - ov] = xs[:, 10 - ov:20 - ov]
    y = (xs @ a[:20] > 0).astype(np.int64)
    np.random.seed(seed + 1)
    xs_t = np.random.randn(1000, 20)
    train, test = data.increase_gamma([seed], [ov])
    np.testing.assert_allclose(train.x1[0].numpy().T, x1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(train.x2[0].numpy().T, x2, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(train.y[0].numpy(), y)
    np.testing.assert_array_equal(test.y[0].numpy(), (xs_t @ a[:20] > 0).astype(np.int64))


def test_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        data.increase_gamma([0], [11])
