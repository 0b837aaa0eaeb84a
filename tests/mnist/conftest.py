"""Shared fixtures of the mnist tests: tiny MNIST in the real IDX format and a folder of background photos."""
import io

import pytest
from PIL import Image

from mnist import data as D


def _png(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Tiny MNIST in IDX format (the stand-in's digits) + a folder of two background photos."""
    root = tmp_path_factory.mktemp("mnist_data")
    images, labels = D.standin_digits()
    D.write_idx(root / "train-images-idx3-ubyte.gz", images[:160])
    D.write_idx(root / "train-labels-idx1-ubyte.gz", labels[:160])
    D.write_idx(root / "t10k-images-idx3-ubyte.gz", images[160:224])
    D.write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[160:224])
    (root / "bg").mkdir()
    for i, bg in enumerate(D.standin_backgrounds()):
        (root / "bg" / f"{i}.png").write_bytes(_png(bg[:120, :160]))
    return root
