"""Labels vs depth alignment of the SSCNet converter, on a scene built here from plane geometry alone: a camera
looking along world +y at a back wall, above a floor. Nothing of synth.py or geometry.py builds it: the depth map
is the analytic ray / plane intersection, the .bin is written byte by byte in the reference loader's order
(waterljwant/SSC `NYUDataset._rle2voxel`: `reshape(240, 144, 240)`, C order over x, height, depth)."""
import json

import cv2
import numpy as np
import pytest

from common.run import cli
from nyu_ssc import convert_sscnet, sscnet
from tests.nyu_ssc.ssc_testutil import tiny_cfg

W, H, D = 24, 8, 16          # grid (x, height, depth), voxel 0.25 m; deliberately W != D
VS = 0.25
FLOOR_TOP, WALL_FRONT = 1, 9  # floor = height index ≤ 1, back wall = depth index ≥ 9
K = (25.94, 25.94, 16.0, 12.0)
IMG = (24, 32)


def _plane_depth():
    """Depth (m) of each pixel from a camera at world (3.0, 0.0, 1.0), looking along +y, image v pointing down (−z)."""
    _, fy, _, cy = K
    v = np.mgrid[0:IMG[0], 0:IMG[1]][0].astype(float)
    dz = -(v - cy) / fy                                     # the ray's height change per unit depth (both planes are
                                                            # axis-aligned, so the horizontal direction does not matter)
    cam = np.array([3.0, 0.0, 1.0])
    wall_y = (WALL_FRONT - 0.2) * VS                        # plane inside voxel WALL_FRONT
    floor_z = (FLOOR_TOP - 0.2) * VS
    t_wall = wall_y - cam[1]
    t_floor = np.where(dz < 0, (floor_z - cam[2]) / np.where(dz < 0, dz, -1), np.inf)
    return np.minimum(t_wall, t_floor), cam


def _labels37():
    lab = np.zeros((W, H, D), np.uint32)
    lab[:, : FLOOR_TOP + 1, :] = 2                          # NYU-37 2 = floor
    lab[:, :, WALL_FRONT:] = 1                              # NYU-37 1 = wall
    return lab


def _write_scene(folder, stem, lab):
    depth, cam = _plane_depth()
    pose = np.eye(4)
    pose[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]       # camera x → world x, camera z (forward) → world y
    pose[:3, 3] = cam
    folder.mkdir(parents=True, exist_ok=True)
    flat = lab.reshape(-1)                                  # C order over (x, height, depth)
    starts = np.r_[0, np.flatnonzero(np.diff(flat)) + 1]
    pairs = np.stack([flat[starts], np.diff(np.r_[starts, flat.size])], 1).astype(np.uint32)
    with open(folder / f"{stem}.bin", "wb") as f:
        f.write(np.zeros(3, np.float32).tobytes() + pose.astype(np.float32).tobytes() + pairs.tobytes())
    mm = np.rint(depth * 1000).astype(np.uint16)
    cv2.imwrite(str(folder / f"{stem}.png"), ((mm << 3) | (mm >> 13)).astype(np.uint16))
    cv2.imwrite(str(folder / f"{stem}_rgb.png"), np.full(IMG + (3,), 128, np.uint8))


def _cfg(order):
    cfg = tiny_cfg()
    cfg["grid"].update(hr=[W, H, D], lr=[W // 4, H // 4, D // 4], image=list(IMG), voxel_size=VS, intrinsics=list(K))
    cfg["convert"]["rle_order"] = order
    return cfg


def test_alignment_share_is_high_in_the_reference_order_and_low_swapped(tmp_path):
    _write_scene(tmp_path, "NYU0001_0000", _labels37())
    good = sscnet.scene_alignment(tmp_path / "NYU0001_0000.png", _cfg("xyz"))
    swapped = sscnet.scene_alignment(tmp_path / "NYU0001_0000.png", _cfg("zyx"))   # the old default
    assert good > 0.95
    assert swapped < 0.5


def test_converter_reports_and_refuses_misaligned_folders(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    lab = _labels37()
    _write_scene(src, "NYU0001_0000", lab)
    _write_scene(src, "NYU0002_0000", lab[::-1, :, ::-1].copy())   # x and depth mirrored: misaligned
    cfg = _cfg("xyz")
    monkeypatch.setattr(convert_sscnet.C, "resolve", lambda *a, **k: cfg)
    report_path = tmp_path / "dst" / "convert_report.json"
    convert_sscnet.main(["--src", str(src), "--dst", str(tmp_path / "dst")])
    rep = json.loads(report_path.read_text())
    assert rep["scenes"]["NYU0001_0000"] > 0.95 and rep["scenes"]["NYU0002_0000"] < 0.5
    assert rep["below"] == ["NYU0002_0000"] and (tmp_path / "dst" / "NYU0001_0000.npz").is_file()
    assert "NYU0001_0000: alignment share" in capsys.readouterr().out
    # the whole folder misaligned: exit 2, one line naming the scenes, nothing converted; --force converts
    bad = tmp_path / "bad"
    _write_scene(bad, "NYU0003_0000", lab[::-1, :, ::-1].copy())
    with pytest.raises(SystemExit) as e:
        cli(lambda: convert_sscnet.main(["--src", str(bad), "--dst", str(tmp_path / "out")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "NYU0003_0000" in err and "convert.min_alignment" in err
    assert not (tmp_path / "out" / "NYU0003_0000.npz").exists()
    convert_sscnet.main(["--src", str(bad), "--dst", str(tmp_path / "out"), "--force"])
    assert (tmp_path / "out" / "NYU0003_0000.npz").is_file()


def test_demo_refuses_a_source_folder_with_foreign_files(tmp_path, capsys):
    """Issue 15 item 1: --demo writes SSCNet-style names; a folder holding data it did not create is refused."""
    src = tmp_path / "real"
    src.mkdir()
    (src / "NYU0000_0000.png").write_bytes(b"a real scene")
    with pytest.raises(SystemExit) as e:
        cli(lambda: convert_sscnet.main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--demo", "1"]))
    assert e.value.code == 2 and "refusing to write" in capsys.readouterr().err
    assert (src / "NYU0000_0000.png").read_bytes() == b"a real scene"
