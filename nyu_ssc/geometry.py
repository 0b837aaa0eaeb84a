"""Voxel geometry of the SSCNet data: depth → voxel projection, projective TSDF, 4× label / TSDF downsampling.

Conventions (the npz layout's): every volume is stored with axes (x, y, z) = (W, H, D) = (240, 144, 240) at
0.02 m, where y is the height (world z: SSCNet's world is z-up, so world y and z are swapped into the grid).
`position[h, w]` is the C-order flat index of pixel (h, w)'s voxel in that (W, H, D) grid; 0 marks an invalid pixel
(no depth, or outside the volume), as in the released npz files. Networks work on the transposed (D, H, W) order.
"""
from __future__ import annotations

import numpy as np

TSDF_EMPTY = np.float32(0.001)     # visible free space (low resolution)
TSDF_OCCLUDED = np.float32(-0.001)  # occluded or unobserved
TSDF_SURFACE = np.float32(1.0)


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def depth_to_points(depth: np.ndarray, cam_pose: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Back-project every pixel: (H, W) metres → (H, W, 3) world points (camera → world with cam_pose)."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    d = depth.astype(np.float64)
    pts = np.stack([(u - k[0, 2]) * d / k[0, 0], (v - k[1, 2]) * d / k[1, 1], d, np.ones_like(d)], -1)
    return (pts @ cam_pose.astype(np.float64).T)[..., :3]


def world_to_grid(points: np.ndarray, origin: np.ndarray, voxel_size: float) -> np.ndarray:
    """World points (..., 3) → integer grid coordinates (..., 3) in (x, y=height, z) order (origin subtracted,
    world y/z swapped, divided by the voxel size, rounded)."""
    p = (points - np.asarray(origin, dtype=np.float64)) / voxel_size
    return np.rint(p[..., [0, 2, 1]]).astype(np.int64)


def grid_to_world(grid: np.ndarray, origin: np.ndarray, voxel_size: float) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64)[..., [0, 2, 1]]
    return g * voxel_size + np.asarray(origin, dtype=np.float64)


def depth_to_position(depth: np.ndarray, cam_pose: np.ndarray, origin: np.ndarray, k: np.ndarray,
                      voxel_size: float, grid: tuple[int, int, int]) -> np.ndarray:
    """(H, W) depth → (H, W) int64 flat voxel index in the (W, H, D) grid; 0 where depth ≤ 0 or outside the grid."""
    g = world_to_grid(depth_to_points(depth, cam_pose, k), origin, voxel_size)
    size = np.asarray(grid)
    ok = (depth > 0) & np.all((g >= 0) & (g < size), axis=-1)
    pos = np.zeros(depth.shape, dtype=np.int64)
    pos[ok] = np.ravel_multi_index(tuple(g[ok].T), tuple(grid))
    return pos


def projective_tsdf(depth: np.ndarray, position: np.ndarray, cam_pose: np.ndarray, origin: np.ndarray,
                    k: np.ndarray, voxel_size: float, grid: tuple[int, int, int], trunc: float,
                    chunk: int = 1 << 20) -> np.ndarray:
    """Flipped projective TSDF on the (W, H, D) grid, float32.

    1 on surface voxels (those holding a back-projected depth pixel); in front of the observed surface
    max(0.001, 1 − d/trunc) (visible free space, positive); behind it, outside the view or without depth
    −max(0.001, 1 − |d|/trunc) (occluded / unobserved, negative). d = observed depth − voxel depth along the axis.
    """
    n = int(np.prod(grid))
    out = np.empty(n, dtype=np.float32)
    inv = np.linalg.inv(cam_pose.astype(np.float64))
    h, w = depth.shape
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        g = np.stack(np.unravel_index(idx, grid), -1)
        pw = grid_to_world(g, origin, voxel_size)
        pc = pw @ inv[:3, :3].T + inv[:3, 3]
        z = pc[:, 2]
        zs = np.where(z > 1e-6, z, 1.0)
        u = np.rint(pc[:, 0] / zs * k[0, 0] + k[0, 2]).astype(np.int64)
        v = np.rint(pc[:, 1] / zs * k[1, 1] + k[1, 2]).astype(np.int64)
        seen = (z > 1e-6) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        d_obs = np.zeros_like(z)
        d_obs[seen] = depth[v[seen], u[seen]]
        seen &= d_obs > 0
        sdf = np.where(seen, d_obs - z, -np.inf)
        mag = np.maximum(TSDF_EMPTY, 1.0 - np.minimum(np.abs(sdf), trunc) / trunc).astype(np.float32)
        out[start:start + len(idx)] = np.where(sdf > 0, mag, -mag)
    flat_pos = position.reshape(-1)
    out[flat_pos[flat_pos > 0]] = TSDF_SURFACE
    return out.reshape(grid)


def _blocks(vol: np.ndarray, scale: int) -> np.ndarray:
    """(X, Y, Z) → (X/s·Y/s·Z/s, s³) blocks in C order of the small grid."""
    x, y, z = vol.shape
    if x % scale or y % scale or z % scale:
        raise ValueError(f"volume shape {vol.shape} is not divisible by {scale}")
    b = vol.reshape(x // scale, scale, y // scale, scale, z // scale, scale).transpose(0, 2, 4, 1, 3, 5)
    return b.reshape(-1, scale ** 3)


def downsample_labels(label: np.ndarray, scale: int = 4, empty_ratio: float = 0.95) -> np.ndarray:
    """4× label downsampling of the reference: per s³ block, if more than 95 % of it is 0 or 255, the more frequent
    of those two (255 on a tie); otherwise the most frequent label in 1..254 (the smallest on a tie)."""
    if scale == 1:
        return label.astype(np.uint8)
    b = _blocks(np.asarray(label), scale).astype(np.int64)
    n0, n255 = (b == 0).sum(1), (b == 255).sum(1)
    empty = (n0 + n255) > empty_ratio * scale ** 3
    valid = (b > 0) & (b < 255)
    rows = np.repeat(np.arange(b.shape[0]), b.shape[1]).reshape(b.shape)
    counts = np.bincount((rows * 256 + b)[valid], minlength=b.shape[0] * 256).reshape(-1, 256)
    majority = counts.argmax(1)
    out = np.where(empty, np.where(n0 > n255, 0, 255), majority)
    small = tuple(s // scale for s in label.shape)
    return out.reshape(small).astype(np.uint8)


def downsample_tsdf(tsdf: np.ndarray, scale: int = 4, surface_min: int = 2) -> np.ndarray:
    """Per s³ block: 1 if more than `surface_min` surface voxels (== 1), else −0.001 if any voxel is occluded
    (negative), else 0.001 (visible empty)."""
    if scale == 1:
        return tsdf.astype(np.float32)
    b = _blocks(np.asarray(tsdf), scale)
    surface = (b == TSDF_SURFACE).sum(1) > surface_min
    occluded = (b < 0).any(1)
    out = np.where(surface, TSDF_SURFACE, np.where(occluded, TSDF_OCCLUDED, TSDF_EMPTY))
    return out.reshape(tuple(s // scale for s in tsdf.shape)).astype(np.float32)


def nonempty_mask(tsdf_lr: np.ndarray, target_lr: np.ndarray) -> np.ndarray:
    """The evaluation region (reference `get_nonempty2`): occluded + surface voxels, minus ignore (255).
    Starts from ones; 0 where target == 255; 0 where tsdf ≥ 0.001 (visible empty); back to 1 where tsdf == 1."""
    m = np.ones(tsdf_lr.shape, dtype=np.float32)
    m[target_lr == 255] = 0
    m[tsdf_lr >= TSDF_EMPTY] = 0
    m[tsdf_lr == TSDF_SURFACE] = 1
    return m
