"""The repackaged SSC npz layout (DDRNet format) and its torch Dataset.

One `<name>.npz` per scene with
    rgb       (3, H, W) float32, ImageNet-normalised colour image (H × W = 480 × 640)
    depth     (1, H, W) float32, metres (0 = no reading)
    tsdf_hr   (W, H, D) = (240, 144, 240) float32 flipped TSDF (a leading singleton channel is accepted)
    tsdf_lr   (60, 36, 60) float32, values 1 (surface), −0.001 (occluded), 0.001 (visible empty)
    target_hr (240, 144, 240) uint8, classes 0..11, 255 = ignore (optional; not read for training)
    target_lr (60, 36, 60) uint8, classes 0..11, 255 = ignore
    position  (H, W) int, flat index of each pixel's voxel in the (240, 144, 240) grid, C order over (x, y, z);
              0 = invalid pixel
Volumes are stored (x, y, z) = (W, H, D); the dataset returns them transposed to (D, H, W), the network order.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.config import DataError
from nyu_ssc import geometry

REQUIRED = ("rgb", "depth", "tsdf_hr", "tsdf_lr", "target_lr", "position")


def write_npz(path, *, rgb, depth, tsdf_hr, tsdf_lr, target_lr, position, target_hr=None, compress=True) -> Path:
    """Write one scene in the npz layout (the converter's and the demo generator's output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(rgb=np.asarray(rgb, np.float32), depth=np.asarray(depth, np.float32),
                  tsdf_hr=np.asarray(tsdf_hr, np.float32), tsdf_lr=np.asarray(tsdf_lr, np.float32),
                  target_lr=np.asarray(target_lr, np.uint8), position=np.asarray(position, np.int32))
    if target_hr is not None:
        arrays["target_hr"] = np.asarray(target_hr, np.uint8)
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    return path


def list_scenes(folder, max_items: int = 0) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found (set data.root / data.splits in config.yaml, "
                        f"or run with --demo)")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise DataError(f"{folder}: no .npz scenes found (expected <name>.npz files in the SSC npz layout)")
    return files[:max_items] if max_items > 0 else files


class SSCNpz(Dataset):
    """Scenes of one split. Item: dict(rgb (3,H,W), depth (1,H,W), tsdf (1,D,H,W) high-res (when load_tsdf),
    target (D,H,W) int64 low-res, nonempty (D,H,W) float, position (H,W) int64, name). Shapes are checked against
    the config grid."""

    def __init__(self, folder, hr=(240, 144, 240), lr=(60, 36, 60), image=(480, 640), max_items: int = 0,
                 load_tsdf: bool = True):
        self.files = list_scenes(folder, max_items)
        self.hr, self.lr, self.image = tuple(hr), tuple(lr), tuple(image)
        # tsdf_hr (8.3 M floats at the real size) is only decompressed for models that read it (PALNet)
        self.keys = REQUIRED if load_tsdf else tuple(k for k in REQUIRED if k != "tsdf_hr")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> dict:
        try:
            with np.load(path) as z:
                missing = [k for k in REQUIRED if k not in z.files]
                if missing:
                    raise DataError(f"{path}: missing key(s) {missing}; expected {list(REQUIRED)}")
                return {k: z[k] for k in self.keys}
        except DataError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{path}: not a readable npz file ({e})") from None

    def _shape(self, path, key, arr, want):
        if tuple(arr.shape) != tuple(want):
            raise DataError(f"{path}: key '{key}' has shape {tuple(arr.shape)}, expected {tuple(want)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            first = np.unravel_index(int(np.flatnonzero(~np.isfinite(arr))[0]), arr.shape)
            raise DataError(f"{path}: key '{key}' holds a non-finite value ({arr[first]}) at index "
                            f"{tuple(int(i) for i in first)}")

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        z = self._load(path)
        h, w = self.image
        rgb = z["rgb"]
        if rgb.ndim == 3 and rgb.shape[-1] == 3 and rgb.shape[0] != 3:
            rgb = rgb.transpose(2, 0, 1)
        self._shape(path, "rgb", rgb, (3, h, w))
        depth = z["depth"].reshape((1, h, w)) if z["depth"].size == h * w else z["depth"]
        self._shape(path, "depth", depth, (1, h, w))
        item = {}
        if "tsdf_hr" in z:
            tsdf_hr = z["tsdf_hr"][0] if z["tsdf_hr"].ndim == 4 and z["tsdf_hr"].shape[0] == 1 else z["tsdf_hr"]
            self._shape(path, "tsdf_hr", tsdf_hr, self.hr)
            item["tsdf"] = torch.from_numpy(np.ascontiguousarray(tsdf_hr.T, np.float32)).unsqueeze(0)
        tsdf_lr = z["tsdf_lr"][0] if z["tsdf_lr"].ndim == 4 and z["tsdf_lr"].shape[0] == 1 else z["tsdf_lr"]
        self._shape(path, "tsdf_lr", tsdf_lr, self.lr)
        target = z["target_lr"]
        self._shape(path, "target_lr", target, self.lr)
        bad = ~np.isin(target, np.r_[np.arange(12), 255])
        if bad.any():
            raise DataError(f"{path}: key 'target_lr' holds labels {np.unique(target[bad])[:5].tolist()}; "
                            f"expected 0..11 or 255")
        pos = z["position"].reshape((h, w)) if z["position"].size == h * w else z["position"]
        self._shape(path, "position", pos, (h, w))
        n_vox = int(np.prod(self.hr))
        if pos.min() < 0 or pos.max() >= n_vox:
            raise DataError(f"{path}: key 'position' has indices in [{pos.min()}, {pos.max()}], expected "
                            f"[0, {n_vox}) for the {self.hr} grid")
        nonempty = geometry.nonempty_mask(tsdf_lr, target)
        return {**item, "rgb": torch.from_numpy(np.ascontiguousarray(rgb, np.float32)),
                "depth": torch.from_numpy(np.ascontiguousarray(depth, np.float32)),
                "target": torch.from_numpy(np.ascontiguousarray(target.T).astype(np.int64)),
                "nonempty": torch.from_numpy(np.ascontiguousarray(nonempty.T)),
                "position": torch.from_numpy(pos.astype(np.int64)),
                "name": path.stem}
