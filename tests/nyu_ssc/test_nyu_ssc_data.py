import numpy as np
import pytest
import torch

from common.config import DataError
from nyu_ssc import config as SC
from nyu_ssc import data, geometry, sscnet, synth


def test_rle_roundtrip_and_bad_counts(tmp_path):
    flat = np.array([0, 0, 0, 5, 5, 255, 255, 255, 1], dtype=np.uint32)
    pairs = sscnet.encode_rle(flat)
    np.testing.assert_array_equal(pairs, [[0, 3], [5, 2], [255, 3], [1, 1]])
    np.testing.assert_array_equal(sscnet.decode_rle(pairs, flat.size), flat)
    with pytest.raises(DataError, match="sum to 9, expected 10"):
        sscnet.decode_rle(pairs, 10, "x.bin")


def test_bin_order_class_map_and_errors(tmp_path):
    grid = (4, 3, 5)   # (W, H, D)
    lab37 = np.zeros(grid, dtype=np.uint32)
    lab37[1, 2, 3] = 5        # NYU-37 id 5 → SSC class 11 (objects)
    lab37[0, 0, 4] = 6        # → 5 (chair)
    lab37[3, 1, 0] = 255      # outside stays 255
    pose = np.arange(16, dtype=np.float32).reshape(4, 4)
    path = sscnet.write_bin(tmp_path / "a.bin", [1, 2, 3], pose, lab37)
    raw = np.fromfile(path, np.uint8)
    flat = sscnet.decode_rle(raw[76:].view(np.uint32), int(np.prod(grid)))
    w, h, d = grid
    assert flat[(1 * h + 2) * d + 3] == 5          # C order over (x, y, z): index = (x·H + y)·D + z
    origin, cam, labels = sscnet.read_bin(path, grid)
    np.testing.assert_allclose(origin, [1, 2, 3])
    np.testing.assert_allclose(cam, pose)
    assert labels.shape == grid and labels[1, 2, 3] == 11 and labels[0, 0, 4] == 5 and labels[3, 1, 0] == 255
    assert (labels == 0).sum() == labels.size - 3
    bad = lab37.copy()
    bad[0, 0, 0] = 40
    sscnet.write_bin(tmp_path / "b.bin", [0, 0, 0], np.eye(4), bad)
    with pytest.raises(DataError, match=r"b\.bin: labels \[40\]"):
        sscnet.read_bin(tmp_path / "b.bin", grid)
    (tmp_path / "c.bin").write_bytes(b"\0" * 50)
    with pytest.raises(DataError, match=r"c\.bin: 50 bytes"):
        sscnet.read_bin(tmp_path / "c.bin", grid)


def _block(values):
    return np.asarray(values, dtype=np.uint8).reshape(4, 4, 4)


def test_label_downsampling_rule():
    vol = np.zeros((8, 4, 4), dtype=np.uint8)                       # two 4³ blocks along x
    a = np.zeros(64, np.uint8); a[:3] = 5                             # 61 empty > 60.8 → empty
    vol[:4] = _block(a)
    b = np.zeros(64, np.uint8); b[:14] = 5; b[14:24] = 7; b[24:30] = 255   # mostly empty/255 but ≤ 95 % → majority 5
    vol[4:] = _block(b)
    np.testing.assert_array_equal(geometry.downsample_labels(vol).ravel(), [0, 5])
    c = np.zeros(64, np.uint8); c[:32] = 255                          # 32 / 32 tie between 0 and 255 → 255
    d = np.full(64, 255, np.uint8); d[0] = 0                          # mostly ignore → 255
    e = np.zeros(64, np.uint8); e[:8] = 3; e[8:16] = 9; e[16:] = 0    # tie 3 vs 9 → the smaller id
    vol3 = np.concatenate([_block(c), _block(d), _block(e)], 0)
    np.testing.assert_array_equal(geometry.downsample_labels(vol3).ravel(), [255, 255, 3])


def test_tsdf_downsampling_and_nonempty():
    t = np.full((12, 4, 4), 0.5, np.float32)                          # visible empty everywhere
    t[4:8][0, 0, :3] = 1.0                                            # 3 surface voxels (> 2) → surface
    t[8:12][0, 0, 0] = 1.0; t[8:12][1, 1, 1] = -0.2                   # 1 surface + an occluded voxel → occluded
    lr = geometry.downsample_tsdf(t)
    np.testing.assert_allclose(lr.ravel(), [0.001, 1.0, -0.001])
    target = np.array([0, 255, 3], np.uint8).reshape(3, 1, 1)
    m = geometry.nonempty_mask(lr, target)
    np.testing.assert_array_equal(m.ravel(), [0, 1, 1])               # empty → 0, surface → 1 (even if 255), occluded → 1


def test_depth_to_position_matches_a_loop():
    rng = np.random.default_rng(0)
    grid, vs = (6, 4, 5), 0.5
    k = geometry.intrinsics_matrix(4.0, 4.0, 3.5, 2.5)
    pose = np.eye(4); pose[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]; pose[:3, 3] = [1.5, -0.5, 1.0]
    depth = rng.uniform(0.2, 3.0, (6, 8)); depth[0, 0] = 0
    origin = np.array([0.0, 0.0, 0.0])
    pos = geometry.depth_to_position(depth, pose, origin, k, vs, grid)
    for v in range(6):
        for u in range(8):
            d = depth[v, u]
            cam = np.array([(u - 3.5) * d / 4, (v - 2.5) * d / 4, d, 1.0])
            wpt = (pose @ cam)[:3] - origin
            g = np.rint(np.array([wpt[0], wpt[2], wpt[1]]) / vs).astype(int)
            inside = d > 0 and all(0 <= g[i] < grid[i] for i in range(3))
            assert pos[v, u] == (np.ravel_multi_index(tuple(g), grid) if inside else 0), (v, u)
    assert pos[0, 0] == 0 and (pos > 0).sum() > 5


def test_demo_scene_is_consistent(cfg):
    scene = synth.make_scene(3, cfg)
    arr = synth.scene_arrays(scene, cfg)
    pos = arr["position"]
    hit = pos[pos > 0]
    assert hit.size > 0.5 * pos.size
    labels_at = scene["labels"].reshape(-1)[hit]
    assert np.all((labels_at > 0) & (labels_at < 255))                # every valid pixel lands on a surface voxel
    assert np.all(arr["tsdf_hr"].reshape(-1)[hit] == 1.0)
    assert set(np.unique(arr["tsdf_lr"])) <= {np.float32(1.0), np.float32(-0.001), np.float32(0.001)}


def test_npz_dataset_item_and_errors(cfg, tmp_path):
    g = cfg["grid"]
    synth.write_npz_split(tmp_path / "ok", 2, 0, cfg)
    ds = data.SSCNpz(tmp_path / "ok", g["hr"], g["lr"], g["image"])
    item = ds[1]
    with np.load(ds.files[1]) as z:
        np.testing.assert_array_equal(item["target"].numpy(), z["target_lr"].T)
        np.testing.assert_array_equal(item["tsdf"][0].numpy(), z["tsdf_hr"].T)
        np.testing.assert_array_equal(item["position"].numpy(), z["position"])
        np.testing.assert_array_equal(item["nonempty"].numpy(), geometry.nonempty_mask(z["tsdf_lr"], z["target_lr"]).T)
    assert item["rgb"].shape == (3, 24, 32) and item["depth"].shape == (1, 24, 32)
    assert item["target"].shape == (4, 2, 4) and item["target"].dtype == torch.int64
    lean = data.SSCNpz(tmp_path / "ok", g["hr"], g["lr"], g["image"], load_tsdf=False)[1]
    assert "tsdf" not in lean and torch.equal(lean["target"], item["target"])
    # a file without `position`, one with a wrong shape, an unreadable one
    with np.load(ds.files[0]) as z:
        arrays = {k: z[k] for k in z.files}
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "nopos.npz", **{k: v for k, v in arrays.items() if k != "position"})
    with pytest.raises(DataError, match=r"nopos\.npz: missing key\(s\) \['position'\]"):
        data.SSCNpz(bad, g["hr"], g["lr"], g["image"])[0]
    np.savez(bad / "nopos.npz", **{**arrays, "target_lr": arrays["target_lr"][:2]})
    with pytest.raises(DataError, match=r"nopos\.npz: key 'target_lr' has shape \(2, 2, 4\), expected \(4, 2, 4\)"):
        data.SSCNpz(bad, g["hr"], g["lr"], g["image"])[0]
    (bad / "nopos.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable npz"):
        data.SSCNpz(bad, g["hr"], g["lr"], g["image"])[0]
    with pytest.raises(DataError, match="no .npz scenes"):
        data.SSCNpz(tmp_path / "ok" / "..", g["hr"], g["lr"], g["image"])


def test_converter_matches_the_geometry_and_skips_bad_scenes(cfg, tmp_path):
    src = tmp_path / "sscnet"
    scenes = [synth.make_scene(i, cfg) for i in range(2)]
    for i, s in enumerate(scenes):
        synth.write_sscnet_scene(src, f"NYU{i:04d}_0000", s)
    (src / "NYU0009_0000.png").write_bytes(b"not a png")             # unreadable depth
    (src / "NYU0009_0000.bin").write_bytes(b"\0" * 80)
    logs = []
    done, skipped = sscnet.convert_folder(src, tmp_path / "npz", cfg, log=logs.append)
    assert done == 2 and len(skipped) == 1 and "NYU0009_0000" in skipped[0]
    with np.load(tmp_path / "npz" / "NYU0001_0000.npz") as z:
        depth = sscnet.read_depth(src / "NYU0001_0000.png")
        np.testing.assert_allclose(depth, scenes[1]["depth"], atol=1e-3)   # mm quantisation
        ref = synth.scene_arrays({**scenes[1], "depth": depth}, cfg)
        for key in ("position", "tsdf_lr", "target_lr", "target_hr"):
            np.testing.assert_array_equal(z[key], ref[key], err_msg=key)
        np.testing.assert_allclose(z["rgb"], ref["rgb"], atol=1e-5)
    ds = data.SSCNpz(tmp_path / "npz", cfg["grid"]["hr"], cfg["grid"]["lr"], cfg["grid"]["image"])
    assert len(ds) == 2 and ds[0]["target"].shape == (4, 2, 4)


def test_depth_decodes():
    d = np.array([[0.0, 1.234, 7.5]])
    enc = sscnet.encode_depth(d)
    assert enc.dtype == np.uint16
    np.testing.assert_allclose(((enc >> 3) | (enc << 13)).astype(np.float32) / 1000, d, atol=1e-6)


def test_colormap():
    rgb = SC.colorize(np.array([0, 3, 255]))
    np.testing.assert_array_equal(rgb, SC.COLOR_MAP[[0, 3, 12]])
