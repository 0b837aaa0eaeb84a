import numpy as np
import pytest
import torch

from common.config import DataError
from semantic_kitti import data as D
from semantic_kitti import demo
from semantic_kitti.option import HERE

LABELS = D.load_label_config(HERE / "semantic-kitti.yaml")


def test_label_decoding_lower_16_bits_and_learning_map(tmp_path):
    sem = np.array([10, 252, 40, 60, 1, 52, 0, 81], dtype=np.uint32)
    inst = np.array([3, 7, 0, 0, 0, 0, 0, 65535], dtype=np.uint32)
    (inst << 16 | sem).astype(np.uint32).tofile(tmp_path / "a.label")
    s, i = D.read_labels(tmp_path / "a.label", 8)
    np.testing.assert_array_equal(s, sem)
    np.testing.assert_array_equal(i, inst)
    # car, moving-car → car, road, lane-marking → road, outlier / other-structure / unlabeled → 0, traffic-sign
    np.testing.assert_array_equal(LABELS.map(s), [1, 1, 9, 9, 0, 0, 0, 19])
    assert LABELS.nclasses == 20 and LABELS.ignore == [0] and LABELS.names[13] == "building"
    alpha = D.focal_alpha(LABELS)
    assert alpha[0] == 0 and alpha.max() == 1 and alpha[1] < alpha[2]  # rarer classes weigh more
    with pytest.raises(DataError, match="not in the label config"):
        LABELS.map(np.array([12], dtype=np.uint32))
    with pytest.raises(DataError, match="one uint32 label per point"):
        D.read_labels(tmp_path / "a.label", 9)


def test_calib_parsing(tmp_path):
    p2 = np.arange(12, dtype=float).reshape(3, 4) + 0.5
    tr = np.arange(12, dtype=float).reshape(3, 4) * -1.0
    text = ("P0: " + " ".join(["1"] * 12) + "\nP2: " + " ".join(map(str, p2.ravel())) + "\nTr: "
            + " ".join(map(str, tr.ravel())) + "\n\nP2: garbage after the blank line\n")
    (tmp_path / "calib.txt").write_text(text)
    cal = D.parse_calib(tmp_path / "calib.txt")
    np.testing.assert_array_equal(cal["P2"], p2)
    np.testing.assert_array_equal(cal["Tr"][:3], tr)
    np.testing.assert_array_equal(cal["Tr"][3], [0, 0, 0, 1])
    (tmp_path / "bad.txt").write_text("P2: 1 2 3\nTr: " + " ".join(["0"] * 12) + "\n")
    with pytest.raises(DataError, match=r"bad.txt: expected a 'P2:' line with 12 numbers"):
        D.parse_calib(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="float32 rows of 4"):
        np.zeros(6, dtype=np.float32).tofile(tmp_path / "x.bin")
        D.read_scan(tmp_path / "x.bin")


def test_projection_of_known_points():
    # camera looks along +x of the LiDAR: x_cam = −y, y_cam = −z, z_cam = x; f = 100, principal point (50, 20)
    P2 = np.array([[100.0, 0, 50, 0], [0, 100.0, 20, 0], [0, 0, 1, 0]])
    Tr = np.array([[0, -1.0, 0, 0], [0, 0, -1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    pts = np.array([[10, 0, 0], [10, -1, 0.5], [5, 1, -0.5], [-5, 0, 0], [10, 10, 0], [20, 0, 0]], dtype=np.float32)
    idx, r, c = D.project(pts, P2, Tr, 40, 100, zbuffer=True)
    got = {int(i): (int(a), int(b)) for i, a, b in zip(idx, r, c)}
    # (u, v) = (50 − 100·y/x, 20 − 100·z/x): point 1 → (60, 15), point 2 → (30, 30); point 0 and 5 share (50, 20)
    assert got == {0: (20, 50), 1: (15, 60), 2: (30, 30)}  # behind (3) and outside (4) dropped, nearest (0) wins
    idx, r, c = D.project(pts, P2, Tr, 40, 100, zbuffer=False)
    assert 5 in idx.tolist() and 0 not in idx.tolist()  # the reference: the last point written wins
    rgb = np.zeros((40, 100, 3), dtype=np.float32)
    v = D.build_view(np.c_[pts, np.full(6, 0.3)], np.array([1, 9, 13, 0, 0, 18]), rgb, P2, Tr)
    assert v.shape == (10, 40, 100) and v[8].sum() == 3
    assert v[9, 15, 60] == 9 and v[9, 30, 30] == 13 and v[0, 20, 50] == pytest.approx(10)
    np.testing.assert_allclose(v[1:5, 15, 60], [10, -1, 0.5, 0.3])


def test_demo_sequence_is_the_real_format_and_consistent(tmp_path):
    demo.write_demo(tmp_path, [0], [8], {"train": 2, "val": 1}, image_size=(48, 160), beams=16, azimuths=360)
    seq = tmp_path / "00"
    assert sorted(p.name for p in (seq / "velodyne").iterdir()) == ["000000.bin", "000001.bin"]
    pts = D.read_scan(seq / "velodyne" / "000000.bin")
    assert pts.dtype == np.float32 and pts.shape[1] == 4 and len(pts) > 1000
    sem, inst = D.read_labels(seq / "labels" / "000000.label", len(pts))
    assert {10, 40, 48, 50}.issubset(set(sem.tolist())) and inst.max() > 0
    assert set(inst[sem == 40].tolist()) == {0} and (inst[np.isin(sem, [10, 252])] > 0).all()
    cal = D.parse_calib(seq / "calib.txt")
    img = np.asarray(D.read_image(seq / "image_2" / "000000.png"), dtype=np.float32) / 255
    assert img.shape == (48, 160, 3)
    view = D.build_view(pts, LABELS.map(sem), img, cal["P2"], cal["Tr"])
    # the image is rendered from the same geometry: road pixels with a point are grey, vegetation pixels green
    road, veg = view[9] == 9, view[9] == 15
    assert road.sum() > 20
    rgb_road = view[5:8][:, road].mean(1)
    assert abs(rgb_road[0] - rgb_road[2]) < 0.1
    if veg.sum() > 5:
        g = view[5:8][:, veg].mean(1)
        assert g[1] > g[0] and g[1] > g[2]
    cfg = {"train_crop": [32, 64], "val_size": [48, 160], "pad": [7, 3], "hflip": 1.0, "rotation": 10.0,
           "color_jitter": [0.4, 0.4, 0.4], "mean": [12.12, 10.88, 0.23, -1.04, 0.21],
           "std": [12.32, 11.47, 6.91, 0.86, 0.16], "pcd_aug": {"enabled": False}}
    tr = D.PerspectiveViewDataset(tmp_path, [0], LABELS, cfg, train=True, seed=3)
    f, m, y = tr[1]
    assert f.shape == (8, 32, 64) and m.shape == (32, 64) and y.dtype == torch.int64
    assert (f[:, :7].abs().sum() == 0) and (y[(m == 0)] == 0).all() and (f[0:5][:, m == 0] == 0).all()
    f2, _, _ = tr[1]
    torch.testing.assert_close(f, f2)  # the augmentation is seeded per (seed, epoch, index)
    va = D.PerspectiveViewDataset(tmp_path, [8], LABELS, cfg, train=False)
    f, m, y = va[0]
    assert f.shape == (8, 48, 160) and m[:7].sum() == 0 and m[:, :3].sum() == 0  # zero padding rows / columns
    dm = (f[0] * 12.32 + 12.12)[m > 0]
    assert dm.min() > 0  # normalisation is invertible on the mask
    with pytest.raises(DataError, match="sequence folder not found"):
        D.PerspectiveViewDataset(tmp_path, [5], LABELS, cfg, train=False)


DATA_CFG = {"train_crop": [32, 64], "val_size": [48, 160], "pad": [7, 3], "hflip": 0.5, "rotation": 10.0,
            "color_jitter": [0.4, 0.4, 0.4], "mean": [12.12, 10.88, 0.23, -1.04, 0.21],
            "std": [12.32, 11.47, 6.91, 0.86, 0.16], "pcd_aug": {"enabled": False}}


def test_augmentation_changes_every_epoch_in_persistent_workers(tmp_path):
    demo.write_demo(tmp_path, [0], [8], {"train": 2, "val": 1}, image_size=(48, 160), beams=16, azimuths=360)
    ds = D.PerspectiveViewDataset(tmp_path, [0], LABELS, DATA_CFG, train=True, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in (1, 2, 1):
        ds.set_epoch(epoch)  # in the main process; the worker started in epoch 1 must see it
        epochs.append(next(iter(loader))[0])
    assert not torch.equal(epochs[0], epochs[1])  # new flips / rotations / crops / jitter in epoch 2
    torch.testing.assert_close(epochs[0], epochs[2])  # and the same draw for the same (seed, epoch, frame)


def test_damaged_input_files_are_named_with_the_first_bad_value(tmp_path):
    pts = np.ones((5, 4), dtype=np.float32)
    pts[3, 2] = np.inf
    pts.tofile(tmp_path / "inf.bin")
    with pytest.raises(DataError, match=r"inf.bin: non-finite value inf at point 3, column 2"):
        D.read_scan(tmp_path / "inf.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.bin: expected float32 rows of 4 values .* got 0 floats"):
        D.read_scan(tmp_path / "empty.bin")
    (tmp_path / "calib.txt").write_bytes(b"P2: 1 2 3\xff\xfe\n")
    with pytest.raises(DataError, match=r"calib.txt: not UTF-8 text"):
        D.parse_calib(tmp_path / "calib.txt")
    (tmp_path / "nan.txt").write_text("P2: " + " ".join(["1"] * 5 + ["nan"] + ["1"] * 6) + "\n")
    with pytest.raises(DataError, match=r"nan.txt: line 1 \(P2\): non-finite number nan at position 5"):
        D.parse_calib(tmp_path / "nan.txt")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: not a readable image"):
        D.read_image(tmp_path / "empty.png")


def test_imagenet_normalisation_of_rgb_only():
    f = torch.rand(8, 4, 4)
    mask = torch.ones(4, 4)
    out = D.normalize(f, mask, [0.0] * 5, [1.0] * 5, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    torch.testing.assert_close(out[5:8], (f[5:8] - 0.5) / 0.25)
    torch.testing.assert_close(out[0:5], f[0:5])
    torch.testing.assert_close(D.normalize(f, mask, [0.0] * 5, [1.0] * 5)[5:8], f[5:8])  # no weights: [0, 1]
