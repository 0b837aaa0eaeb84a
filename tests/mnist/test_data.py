"""mnist data layer: IDX parsing, the pickle layout, the MNIST-M composition rule, backgrounds, stand-in, noise."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ConfigError, DataError
from mnist import data as D


def _digits(n, seed=0):
    rng = np.random.RandomState(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    x[:, 8:20, 10:18] = rng.randint(0, 256, (n, 12, 8))
    return x, rng.randint(0, 10, n).astype(np.int64)


def _write_idx_set(folder, n_train=40, n_test=12, gz=True):
    (tr_x, tr_y), (te_x, te_y) = _digits(n_train, 1), _digits(n_test, 2)
    ext = ".gz" if gz else ""
    D.write_idx(folder / f"train-images-idx3-ubyte{ext}", tr_x)
    D.write_idx(folder / f"train-labels-idx1-ubyte{ext}", tr_y)
    D.write_idx(folder / f"t10k-images-idx3-ubyte{ext}", te_x)
    D.write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", te_y)
    return (tr_x, tr_y), (te_x, te_y)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_and_header(tmp_path, gz):
    x, y = _digits(7)
    p = D.write_idx(tmp_path / ("imgs" + (".gz" if gz else "")), x)
    np.testing.assert_array_equal(D.read_idx(p), x)
    raw = D._open_maybe_gz(p)
    assert raw[:4] == bytes([0, 0, 8, 3]) and int.from_bytes(raw[4:8], "big") == 7
    np.testing.assert_array_equal(D.read_idx(D.write_idx(tmp_path / "l", y)), y)


def test_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x08\x03\x00\x00junk")
    with pytest.raises(DataError, match="bad-idx: expected an IDX file"):
        D.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(DataError, match="short: expected 10 data bytes"):
        D.read_idx(short)


def test_find_idx_layouts_and_incomplete(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (tr_x, tr_y), (te_x, te_y) = _write_idx_set(raw)
    files = D.find_idx(tmp_path)
    (a, b), (c, d) = D.read_mnist_idx(files)
    np.testing.assert_array_equal(a, tr_x), np.testing.assert_array_equal(d, te_y)
    (tmp_path / "other").mkdir()
    D.write_idx(tmp_path / "other" / "train-images-idx3-ubyte", tr_x)
    with pytest.raises(DataError, match="incomplete MNIST IDX set"):
        D.find_idx(tmp_path / "other")


def test_compose_rule_and_seed():
    h, w = 40, 50
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([yy * 3, xx * 3, (yy + xx) % 256], -1).astype(np.uint8)  # every crop is unique
    digits, _ = _digits(5)
    out = D.compose_mnistm(digits, [bg], seed=3)
    assert out.shape == (5, 28, 28, 3) and out.dtype == np.uint8
    rand = np.random.RandomState(3)
    for i, d in enumerate(digits):
        rand.randint(1)  # the background choice
        x, y = rand.randint(0, w - 28), rand.randint(0, h - 28)
        crop = bg[y:y + 28, x:x + 28].astype(int)
        expected = np.abs(crop - np.where(d > 0, 255, 0)[..., None])
        np.testing.assert_array_equal(out[i], expected)
        on = d > 0
        np.testing.assert_array_equal(out[i][on], 255 - crop[on])   # inverted where the digit is
        np.testing.assert_array_equal(out[i][~on], crop[~on])       # the background elsewhere
    np.testing.assert_array_equal(out, D.compose_mnistm(digits, [bg], seed=3))
    assert not np.array_equal(out, D.compose_mnistm(digits, [bg], seed=4))
    with pytest.raises(DataError, match="larger than 28"):
        D.compose_mnistm(digits, [bg[:20]], seed=0)


def _png(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_backgrounds_from_folder_and_bsds_tarball(tmp_path):
    rng = np.random.RandomState(0)
    imgs = [rng.randint(0, 256, (33 + i, 41, 3)).astype(np.uint8) for i in range(3)]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, im in enumerate(imgs):
        (folder / f"{i}.png").write_bytes(_png(im))
    (folder / "notes.txt").write_text("not an image")
    got = D.load_backgrounds(folder)
    assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, imgs))
    tgz = tmp_path / "BSR_bsds500.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, im in ((D.BSDS_TRAIN_PREFIX + "1.png", imgs[0]), ("BSR/BSDS500/data/images/test/2.png", imgs[1]),
                         (D.BSDS_TRAIN_PREFIX + "Thumbs.db", None)):
            raw = _png(im) if im is not None else b"garbage"
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    got = D.load_backgrounds(tgz)
    assert len(got) == 1 and np.array_equal(got[0], imgs[0])  # only the train images, unreadable entries skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable image"):
        D.load_backgrounds(tmp_path / "empty")
    with pytest.raises(DataError, match="expected the BSDS500 tarball"):
        D.load_backgrounds(folder / "notes.txt")


def test_pickle_layout_round_trip(tmp_path):
    (tr_x, tr_y), (te_x, te_y) = _digits(30, 1), _digits(9, 2)
    bg = np.random.RandomState(0).randint(0, 256, (40, 40, 3)).astype(np.uint8)
    train = D.Split(tr_x, D.compose_mnistm(tr_x, [bg], 0), tr_y)
    test = D.Split(te_x, D.compose_mnistm(te_x, [bg], 1), te_y)
    pm, pmm = D.write_pickle_layout(tmp_path, train, test)
    raw, _ = D.read_pickle_mnist(tmp_path)
    assert set(raw) == {"train", "train_label", "val", "val_label"}
    assert raw["train"].shape == (30, 28, 28, 3) and raw["train_label"].dtype == np.int32
    cfg = {"source": "pickle", "root": str(tmp_path), "backgrounds": "", "mnistm_seed": 42,
           "standin_test_fraction": 0.2}
    pair = D.load_pair(cfg, tmp_path)
    for a, b in ((pair.train, train), (pair.test, test)):
        np.testing.assert_array_equal(a.mnist, b.mnist)
        np.testing.assert_array_equal(a.mnist_m, b.mnist_m)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert "pickle" in pair.source
    import pickle
    pmm.write_bytes(pickle.dumps({"train": 1}))
    with pytest.raises(DataError, match="mnist_m_data.pkl: expected a dict with keys"):
        D.load_pair(cfg, tmp_path)


def test_idx_plus_backgrounds_and_source_errors(tmp_path):
    (tr_x, tr_y), _ = _write_idx_set(tmp_path, gz=False)
    cfg = {"source": "auto", "root": ".", "backgrounds": "", "mnistm_seed": 42, "standin_test_fraction": 0.2}
    with pytest.raises(DataError, match="MNIST-M was not"):
        D.load_pair(cfg, tmp_path)
    bgdir = tmp_path / "bg"
    bgdir.mkdir()
    (bgdir / "a.png").write_bytes(_png(np.full((35, 36, 3), 100, np.uint8)))
    pair = D.load_pair({**cfg, "backgrounds": "bg"}, tmp_path)
    np.testing.assert_array_equal(pair.train.mnist, tr_x)
    np.testing.assert_array_equal(pair.train.mnist_m[..., 0], np.abs(100 - np.where(tr_x > 0, 255, 0)))
    with pytest.raises(DataError, match="data.source is 'pickle'"):
        D.load_pair({**cfg, "source": "pickle"}, tmp_path)
    with pytest.raises(ConfigError, match="data.source"):
        D.load_pair({**cfg, "source": "web"}, tmp_path)


def test_standin_shapes_and_labels(tmp_path):
    cfg = {"source": "auto", "root": "empty", "backgrounds": "", "mnistm_seed": 42, "standin_test_fraction": 0.2}
    messages = []
    pair = D.load_pair(cfg, tmp_path, log=messages.append, explicit_root=False)
    assert any("STAND-IN" in m and "smoke test only" in m for m in messages) and pair.is_standin
    assert len(pair.train) + len(pair.test) == 1797 and len(pair.test) == 359
    for s in (pair.train, pair.test):
        assert s.mnist.shape[1:] == (28, 28) and s.mnist.dtype == np.uint8
        assert s.mnist_m.shape[1:] == (28, 28, 3) and s.mnist_m.dtype == np.uint8
        assert set(np.unique(s.labels)) == set(range(10))
        assert s.mnist[:, :4].max() == 0 and s.mnist.max() > 200  # a 4-pixel empty border, MNIST-like range
    from sklearn.datasets import load_digits
    assert np.bincount(np.concatenate([pair.train.labels, pair.test.labels])).tolist() == \
        np.bincount(load_digits().target).tolist()


def test_loader_and_noise():
    x, y = _digits(10)
    split = D.Split(x, np.repeat(x[..., None], 3, -1), y)
    loader = D.BatchLoader(split, 4, "cpu", shuffle=False, noise_seed=7)
    batches = list(loader)
    assert len(loader) == 3 and [len(b["label"]) for b in batches] == [4, 4, 2]
    assert batches[1]["noise_seed"] == 8 and batches[2]["index"].tolist() == [8, 9]
    clean = D.Prepare(0.0, 4.0, 0, "cpu", seed=0)
    out = clean(batches[0])
    assert out["student"].shape == (4, 2352) and out["teacher"].shape == (4, 784)
    torch.testing.assert_close(out["teacher"], torch.from_numpy(x[:4]).float().flatten(1) / 127.5 - 1)
    noisy = D.Prepare(0.5, 4.0, 0, "cpu", seed=0)
    a, b = noisy(batches[0]), noisy(batches[0])
    torch.testing.assert_close(a["student"], b["student"])  # noise_seed: same evaluation noise every pass
    assert a["student"].min() >= -1 and a["student"].max() <= 1
    # the teacher (MNIST, level 2.0): U·2 ≥ 1 half of the time, so about half the pixels saturate at +1
    assert 0.4 < (a["teacher"] == 1).float().mean() < 0.7
    q = (a["student"] + 1) / 2 * 255
    torch.testing.assert_close(q, q.round())  # quantised to 1/255 steps
    train_batch = {k: v for k, v in batches[0].items() if k != "noise_seed"}
    assert not torch.equal(noisy(train_batch)["student"], noisy(train_batch)["student"])  # fresh per batch
    swapped = D.Prepare(0.5, 4.0, 1, "cpu", seed=0)
    assert swapped(batches[0])["student"].shape == (4, 784) and swapped.dims == (784, 2352)
    with pytest.raises(ConfigError, match="stu_type"):
        D.Prepare(0.5, 4.0, 2, "cpu", seed=0)


@pytest.mark.parametrize("make", ["missing", "empty", "unrelated"])
def test_explicit_root_without_data_is_an_error(tmp_path, make):
    """Issue 15 item 7: only the default root may fall back to the stand-in; a root the user named must hold data."""
    root = tmp_path / "data"
    if make != "missing":
        root.mkdir()
    if make == "unrelated":
        (root / "notes.txt").write_text("no digits here")
    cfg = {"source": "auto", "root": str(root), "backgrounds": "", "mnistm_seed": 42, "standin_test_fraction": 0.2}
    expected = "does not exist" if make == "missing" else "holds no MNIST"
    with pytest.raises(DataError, match=f"{root}: data root {expected}"):
        D.load_pair(cfg, tmp_path)
    messages = []
    assert D.load_pair({**cfg, "source": "standin"}, tmp_path, log=messages.append).is_standin  # asked for: fine
    assert any("smoke test only" in m for m in messages)


def _fake_download(calls, digits, labels):
    """torchvision's download_url stand-in: writes what the real URLs serve (gzip IDX files, the BSDS500 tarball)."""
    def download_url(url, root, filename=None, md5=None, max_redirect_hops=3):
        calls.append(url)
        name = filename or url.rsplit("/", 1)[1]
        path = Path(root) / name
        if name.endswith("idx3-ubyte.gz"):
            D.write_idx(path, digits[:60] if name.startswith("train") else digits[60:80])
        elif name.endswith("idx1-ubyte.gz"):
            D.write_idx(path, labels[:60] if name.startswith("train") else labels[60:80])
        else:
            with tarfile.open(path, "w:gz") as tar:
                for i, shape in enumerate([(40, 50, 3), (45, 33, 3)]):
                    raw = _png(np.full(shape, 60 * (i + 1), np.uint8))
                    info = tarfile.TarInfo(f"{D.BSDS_TRAIN_PREFIX}{i}.jpg")
                    info.size = len(raw)
                    tar.addfile(info, io.BytesIO(raw))
    return download_url


def test_download_source_with_a_fake_network(tmp_path, monkeypatch):
    """data.source download: torchvision's MNIST download (its real extraction and reading of the IDX files) and the
    BSDS500 tarball, with download_url replaced by a function writing the real formats (no network in tests)."""
    import torchvision.datasets.utils as tv_utils
    digits, labels = _digits(80, 3)
    calls = []
    monkeypatch.setattr(tv_utils, "download_url", _fake_download(calls, digits, labels))
    url = "http://example.org/BSR/BSR_bsds500.tgz"
    cfg = {"source": "download", "root": "data", "backgrounds": "", "mnistm_seed": 42, "standin_test_fraction": 0.2,
           "bsds_url": url}
    pair = D.load_pair(cfg, tmp_path)
    assert (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert (tmp_path / "data" / "BSR_bsds500.tgz").is_file() and calls[-1] == url and len(calls) == 5
    np.testing.assert_array_equal(pair.train.mnist, digits[:60])
    np.testing.assert_array_equal(pair.test.labels, labels[60:80])
    assert set(np.unique(pair.train.mnist_m[..., 0][digits[:60] == 0])) <= {60, 120}  # background pixels
    assert "composed in memory" in pair.source and not pair.is_standin
    D.load_pair(cfg, tmp_path)
    assert len(calls) == 5  # what is there is kept, not fetched again
    D.load_pair({**cfg, "source": "auto", "backgrounds": "data/BSR_bsds500.tgz"}, tmp_path)  # and readable offline


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(url, *args, **kwargs):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(tv_utils, "download_url", offline)
    cfg = {"source": "download", "root": "data", "backgrounds": "", "mnistm_seed": 42, "standin_test_fraction": 0.2,
           "bsds_url": "http://example.org/BSR_bsds500.tgz"}
    with pytest.raises(DataError, match="data.source download failed") as e:
        D.load_pair(cfg, tmp_path)
    assert "\n" not in str(e.value)


def test_max_train_keeps_a_stratified_subset(dataset):
    from mnist import experiment as E
    from mnist import main as M
    cfg, _ = M.resolve_config(M.parse_args(["--data-root", str(dataset), "--set", f"data.backgrounds={dataset / 'bg'}",
                                            "--set", "data.max_train=100", "--set", "data.val_fraction=0.2"]))
    pair = D.load_pair(cfg["data"], Path("."))
    splits = E._splits(cfg, pair, log=lambda m: None)
    assert len(splits["train"]) + len(splits["val"]) == 100 and len(splits["test"]) == 64
    counts = np.bincount(np.concatenate([splits["train"].labels, splits["val"].labels]), minlength=10)
    assert counts.min() >= 7  # every class keeps its share (160 digits, ~16 per class, subset 100)
    full = E._splits({**cfg, "data": {**cfg["data"], "max_train": 0}}, pair, log=lambda m: None)
    assert len(full["train"]) + len(full["val"]) == 160
