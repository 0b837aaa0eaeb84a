"""Synthetic indoor scenes in the real formats, for `--demo` and the tests.

A scene is a room in the (W, H, D) voxel grid (floor, back and side walls with a window, a ceiling, furniture
boxes on the floor, a small TV on the back wall; voxels in front of the room are 255 = outside). A pinhole camera
with the configured intrinsics looks into it; depth and RGB are rendered from the same voxels by ray marching, so
`position` (computed from the depth exactly as the converter does) lands on the surface voxels that produced each
pixel. Scenes can be written directly in the npz layout or as an SSCNet release (depth PNG, RGB PNG, .bin).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from nyu_ssc import config as C
from nyu_ssc import data, geometry, sscnet

FURNITURE = [5, 6, 7, 8, 10, 11]  # chair, bed, sofa, table, furniture, objects


def _box(lab, x0, x1, y0, y1, z0, z1, cls):
    lab[max(0, x0):x1, max(0, y0):y1, max(0, z0):z1] = cls


def room_labels(rng: np.random.Generator, grid) -> np.ndarray:
    w, h, d = grid
    lab = np.zeros(grid, dtype=np.uint8)
    t = max(1, w // 20)                              # wall / floor thickness in voxels
    _box(lab, 0, w, 0, t, 0, d, 2)                   # floor
    _box(lab, 0, w, h - t, h, 0, d, 1)               # ceiling
    _box(lab, 0, w, 0, h, d - t, d, 3)               # back wall
    _box(lab, 0, t, 0, h, 0, d, 3)                   # left wall
    _box(lab, w - t, w, 0, h, 0, d, 3)               # right wall
    wx = rng.integers(w // 5, w // 2)                # window in the back wall
    _box(lab, wx, wx + w // 4, h // 3, 2 * h // 3, d - t, d, 4)
    for _ in range(int(rng.integers(2, 5))):         # furniture boxes standing on the floor
        cls = int(rng.choice(FURNITURE))
        sx, sy, sz = rng.integers(w // 8, w // 3), rng.integers(h // 6, h // 2), rng.integers(d // 8, d // 3)
        x0, z0 = rng.integers(t, w - t - sx), rng.integers(d // 4, d - t - sz)
        _box(lab, x0, x0 + sx, t, t + sy, z0, z0 + sz, cls)
    tx = rng.integers(w // 2, 3 * w // 4)            # a TV on the back wall
    _box(lab, tx, tx + w // 8, h // 2, h // 2 + h // 8, d - 2 * t, d - t, 9)
    lab[:, :, : max(1, d // 10)] = 255               # in front of the room: outside, ignored
    return lab


def camera(rng: np.random.Generator, grid, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(origin (3,), cam_pose (4, 4) camera → world); the world is z-up and the camera looks along +y."""
    w, h, d = grid
    origin = rng.uniform(-0.5, 0.5, 3) * voxel_size * 4
    pitch = np.deg2rad(rng.uniform(10, 25))
    r = np.array([[1, 0, 0], [0, -np.sin(pitch), np.cos(pitch)], [0, -np.cos(pitch), -np.sin(pitch)]])
    pos = origin + np.array([w * rng.uniform(0.4, 0.6), -0.6 * d, h * rng.uniform(0.55, 0.75)]) * voxel_size
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = r, pos
    return origin, pose


def render(labels, origin, pose, k, voxel_size, image, step_frac: float = 0.25):
    """Ray-march every pixel through the voxels: → depth (H, W) metres (0 = no hit), hit class (H, W)."""
    h, w = image
    grid = np.asarray(labels.shape)
    far = 2.0 * float(np.linalg.norm(grid)) * voxel_size
    depth = np.zeros((h, w))
    cls = np.zeros((h, w), dtype=np.int64)
    todo = np.ones((h, w), bool)
    for dval in np.arange(step_frac * voxel_size, far, step_frac * voxel_size):
        if not todo.any():
            break
        pts = geometry.depth_to_points(np.full((h, w), dval), pose, k)
        g = geometry.world_to_grid(pts, origin, voxel_size)
        inside = np.all((g >= 0) & (g < grid), -1) & todo
        if not inside.any():
            continue
        lab = np.zeros((h, w), dtype=np.int64)
        gi = g[inside]
        lab[inside] = labels[gi[:, 0], gi[:, 1], gi[:, 2]]
        hit = inside & (lab > 0) & (lab < 255)
        depth[hit], cls[hit] = dval, lab[hit]
        todo &= ~hit
    return depth.astype(np.float32), cls


def make_scene(seed: int, cfg: dict) -> dict:
    """Geometry, camera, depth and an 8-bit RGB rendering of one synthetic scene."""
    g = cfg["grid"]
    rng = np.random.default_rng(seed)
    hr, image, vs = tuple(g["hr"]), tuple(g["image"]), g["voxel_size"]
    labels = room_labels(rng, hr)
    origin, pose = camera(rng, hr, vs)
    k = geometry.intrinsics_matrix(*g["intrinsics"])
    depth, cls = render(labels, origin, pose, k, vs, image)
    shade = np.clip(1.1 - 0.15 * depth / max(depth.max(), 1e-6), 0.5, 1.0)[..., None]
    rgb = C.COLOR_MAP[cls].astype(np.float64) * shade + rng.normal(0, 8, cls.shape + (3,))
    rgb[depth == 0] = 0
    return dict(labels=labels, origin=origin, pose=pose, depth=depth, rgb8=np.clip(rgb, 0, 255).astype(np.uint8))


def scene_arrays(scene: dict, cfg: dict) -> dict:
    """A scene → the npz layout's arrays (the same geometry functions as the converter)."""
    g, cv = cfg["grid"], cfg["convert"]
    hr, vs = tuple(g["hr"]), g["voxel_size"]
    scale = hr[0] // g["lr"][0]
    k = geometry.intrinsics_matrix(*g["intrinsics"])
    pos = geometry.depth_to_position(scene["depth"], scene["pose"], scene["origin"], k, vs, hr)
    tsdf_hr = geometry.projective_tsdf(scene["depth"], pos, scene["pose"], scene["origin"], k, vs, hr,
                                       cv["tsdf_trunc"])
    rgb = ((scene["rgb8"].astype(np.float32) / 255.0 - C.IMAGENET_MEAN) / C.IMAGENET_STD).transpose(2, 0, 1)
    return dict(rgb=rgb, depth=scene["depth"][None], tsdf_hr=tsdf_hr,
                tsdf_lr=geometry.downsample_tsdf(tsdf_hr, scale, cv["tsdf_surface_min"]),
                target_hr=scene["labels"],
                target_lr=geometry.downsample_labels(scene["labels"], scale, cv["empty_ratio"]), position=pos)


def write_npz_split(folder, n: int, seed: int, cfg: dict, prefix: str = "NYU") -> list[Path]:
    out = []
    for i in range(n):
        scene = make_scene(seed + i, cfg)
        out.append(data.write_npz(Path(folder) / f"{prefix}{seed + i:04d}_0000.npz", **scene_arrays(scene, cfg)))
    return out


# one NYU-37 id per SSC class (the first that maps to it), to write SSCNet .bin files
_INV_MAP = np.array([int(np.flatnonzero(C.SEG_CLASS_MAP == c)[0]) for c in range(C.NUM_CLASSES)], dtype=np.uint32)


def write_sscnet_scene(folder, stem: str, scene: dict, order: str = "xyz") -> Path:
    """Write a scene as the SSCNet release does: <stem>.png (uint16, bit-rotated mm), <stem>.bin, <stem>_rgb.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lab = scene["labels"].astype(np.uint32)
    lab37 = np.where(lab == 255, 255, _INV_MAP[np.minimum(lab, C.NUM_CLASSES - 1)])
    sscnet.write_bin(folder / f"{stem}.bin", scene["origin"], scene["pose"], lab37, order)
    cv2.imwrite(str(folder / f"{stem}.png"), sscnet.encode_depth(scene["depth"]))
    cv2.imwrite(str(folder / f"{stem}_rgb.png"), scene["rgb8"][..., ::-1])
    return folder / f"{stem}.png"
