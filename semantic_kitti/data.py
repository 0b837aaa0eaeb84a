"""SemanticKITTI in its real on-disk format, projected onto the camera image plane (PMF's perspective view: the
reference repository's semanticKITTI/pc_processor/dataset/perspective_view_loader.py, PerspectiveViewLoader).

    <data_root>/<seq:02d>/velodyne/<frame>.bin    float32 rows (x, y, z, intensity)
    <data_root>/<seq:02d>/labels/<frame>.label    uint32 per point: semantic id = v & 0xFFFF, instance = v >> 16
    <data_root>/<seq:02d>/image_2/<frame>.png     left colour camera
    <data_root>/<seq:02d>/calib.txt               "KEY: 12 floats" lines (P0..P3, Tr)

One sample is a 10-channel image-plane tensor: [0] depth ‖xyz‖, [1..4] x, y, z, intensity, [5..7] RGB in [0, 1],
[8] mask (a point landed), [9] learning label (0 where no point). The dataset returns (features[0:8], mask, label)
after the joint geometric augmentation (train) or centre crop (val), with channels 0..4 normalised on the mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from common.config import DataError, load_yaml
from common.train import SharedEpoch, epoch_rng

HERE = Path(__file__).resolve().parent
N_CHANNELS = 10


# ----------------------------------------------------------------------------------------------------------------
# Label configuration

@dataclass
class LabelConfig:
    lut: np.ndarray            # raw semantic id → learning class, −1 for ids the map does not know
    names: list[str]           # learning class names, index = class id
    ignore: list[int]          # learning classes left out of losses and mIoU (0)
    cls_freq: np.ndarray       # per learning class, the summed `content` frequencies of its raw ids
    colors: np.ndarray         # (C, 3) uint8 RGB per learning class
    learning_map: dict

    @property
    def nclasses(self) -> int:
        return len(self.names)

    def map(self, sem: np.ndarray, path="labels") -> np.ndarray:
        """Raw semantic ids (lower 16 bits) → learning classes; unknown ids are a DataError."""
        sem = sem.astype(np.int64)
        bad = (sem >= len(self.lut)) | (self.lut[np.minimum(sem, len(self.lut) - 1)] < 0)
        if bad.any():
            raise DataError(f"{path}: semantic id(s) {sorted(set(sem[bad].tolist()))[:5]} are not in the label "
                            f"config's learning_map")
        return self.lut[sem]


def load_label_config(path: str | Path) -> LabelConfig:
    path = Path(path)
    cfg = load_yaml(path)
    for key in ("labels", "learning_map", "learning_map_inv", "learning_ignore", "content", "color_map"):
        if not isinstance(cfg.get(key), dict):
            raise DataError(f"{path}: expected a mapping under '{key}' (the semantic-kitti.yaml layout)")
    lmap = {int(k): int(v) for k, v in cfg["learning_map"].items()}
    n = max(lmap.values()) + 1
    lut = np.full(max(lmap) + 1, -1, dtype=np.int64)
    for k, v in lmap.items():
        lut[k] = v
    inv = {int(k): int(v) for k, v in cfg["learning_map_inv"].items()}
    if sorted(inv) != list(range(n)):
        raise DataError(f"{path}: learning_map_inv must name every learning class 0..{n - 1}")
    names = [str(cfg["labels"][inv[c]]) for c in range(n)]
    ignore = [int(k) for k, v in cfg["learning_ignore"].items() if v]
    freq = np.zeros(n)
    for raw, f in cfg["content"].items():
        if int(raw) in lmap:
            freq[lmap[int(raw)]] += float(f)
    colors = np.array([cfg["color_map"][inv[c]][::-1] for c in range(n)], dtype=np.uint8)  # BGR → RGB
    return LabelConfig(lut, names, ignore, freq, colors, lmap)


# ----------------------------------------------------------------------------------------------------------------
# Files

def read_scan(path: str | Path) -> np.ndarray:
    """velodyne .bin → (N, 4) float32 (x, y, z, intensity)."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.float32)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if raw.size == 0 or raw.size % 4:
        raise DataError(f"{path}: expected float32 rows of 4 values (x, y, z, intensity), got {raw.size} floats")
    pts = raw.reshape(-1, 4)
    bad = np.argwhere(~np.isfinite(pts))
    if len(bad):
        r, c = bad[0]
        raise DataError(f"{path}: non-finite value {pts[r, c]} at point {r}, column {c} (x, y, z, intensity); "
                        f"{len(bad)} in all")
    return pts


def read_labels(path: str | Path, n_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """.label → (semantic id = v & 0xFFFF, instance id = v >> 16), both uint32 arrays."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint32)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if path.stat().st_size % 4:
        raise DataError(f"{path}: expected uint32 values, got {path.stat().st_size} bytes")
    if n_points is not None and raw.size != n_points:
        raise DataError(f"{path}: expected one uint32 label per point ({n_points}), got {raw.size}")
    return raw & 0xFFFF, raw >> 16


def parse_calib(path: str | Path) -> dict[str, np.ndarray]:
    """calib.txt → {"P2": (3, 4), "Tr": (4, 4), and every other KEY as its floats}; stops at the first blank line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected 'KEY: 12 floats' lines") from None
    out: dict[str, np.ndarray] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            break
        key, sep, values = line.partition(":")
        try:
            nums = np.array([float(v) for v in values.split()], dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: line {i}: expected 'KEY: numbers', got {line.strip()[:60]!r}") from None
        if not sep:
            raise DataError(f"{path}: line {i}: expected 'KEY: numbers', got {line.strip()[:60]!r}")
        if not np.isfinite(nums).all():
            j = int(np.argmin(np.isfinite(nums)))
            raise DataError(f"{path}: line {i} ({key.strip()}): non-finite number {nums[j]} at position {j}")
        out[key.strip()] = nums
    for key in ("P2", "Tr"):
        if key not in out or out[key].size != 12:
            raise DataError(f"{path}: expected a '{key}:' line with 12 numbers")
    out["P2"] = out["P2"].reshape(3, 4)
    out["Tr"] = np.vstack([out["Tr"].reshape(3, 4), [0, 0, 0, 1]])
    return out


def read_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Projection

def project(xyz: np.ndarray, P2: np.ndarray, Tr: np.ndarray, height: int, width: int, zbuffer: bool = True):
    """Points in front of the LiDAR (x > 0) through P2·Tr into the image: returns (point indices, rows, cols),
    one point per pixel. zbuffer: the nearest point wins a pixel (default); False: the last point in file order
    wins, as the reference's unordered write in mapLidar2Camera (README "Reference bugs fixed")."""
    idx = np.nonzero(xyz[:, 0] > 0)[0]
    hom = np.concatenate([xyz[idx].astype(np.float64), np.ones((idx.size, 1))], 1)
    img = hom @ (P2 @ Tr).T
    z = img[:, 2]
    front = z > 0
    u = np.where(front, img[:, 0] / np.where(front, z, 1), -1)
    v = np.where(front, img[:, 1] / np.where(front, z, 1), -1)
    inside = front & (u > 0) & (u < width) & (v > 0) & (v < height)
    idx, u, v = idx[inside], u[inside], v[inside]
    rows, cols = v.astype(np.int64), u.astype(np.int64)  # truncation, as the reference
    pix = rows * width + cols
    if zbuffer:
        order = np.argsort(np.linalg.norm(xyz[idx, :3], axis=1), kind="stable")
    else:
        order = np.arange(idx.size)[::-1]  # reversed file order: the first occurrence below is the last write
    _, first = np.unique(pix[order], return_index=True)
    keep = order[first]
    return idx[keep], rows[keep], cols[keep]


def build_view(points: np.ndarray, labels: np.ndarray | None, rgb: np.ndarray, P2: np.ndarray, Tr: np.ndarray,
               zbuffer: bool = True, features: np.ndarray | None = None) -> np.ndarray:
    """(10, H, W) float32 view. rgb: (H, W, 3) in [0, 1]; labels: learning classes per point (None → 0).
    features: the (N, 4) values written into channels 1..4 (default: the points); the projection always uses the
    points' true geometry, so point-cloud augmentation keeps the camera alignment."""
    H, W = rgb.shape[:2]
    idx, r, c = project(points[:, :3], P2, Tr, H, W, zbuffer)
    feats = points if features is None else features
    out = np.zeros((N_CHANNELS, H, W), dtype=np.float32)
    out[0, r, c] = np.linalg.norm(feats[idx, :3], axis=1)
    out[1:5, r, c] = feats[idx, :4].T
    out[5:8] = rgb.transpose(2, 0, 1)
    out[8, r, c] = 1.0
    if labels is not None:
        out[9, r, c] = labels[idx]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Augmentation

def _pad_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    ph, pw = max(0, h - x.shape[1]), max(0, w - x.shape[2])
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return x


def train_transform(view: torch.Tensor, crop: tuple[int, int], pad: tuple[int, int], hflip: float, rotation: float,
                    rng: np.random.Generator) -> torch.Tensor:
    """Flip, rotate (nearest, fill 0), random crop to crop − 2·pad (zero-padding a smaller image first), pad."""
    if rng.random() < hflip:
        view = view.flip(-1)
    if rotation > 0:
        angle = rng.uniform(-rotation, rotation)
        view = TF.rotate(view, angle, interpolation=InterpolationMode.NEAREST, fill=0.0)
    ch, cw = crop[0] - 2 * pad[0], crop[1] - 2 * pad[1]
    view = _pad_to(view, ch, cw)
    top, left = int(rng.integers(0, view.shape[1] - ch + 1)), int(rng.integers(0, view.shape[2] - cw + 1))
    view = view[:, top:top + ch, left:left + cw]
    return torch.nn.functional.pad(view, (pad[1], pad[1], pad[0], pad[0]))


def val_transform(view: torch.Tensor, size: tuple[int, int], pad: tuple[int, int]) -> torch.Tensor:
    """Centre crop to size − 2·pad (zero-padding a smaller image), then pad to `size`."""
    ch, cw = size[0] - 2 * pad[0], size[1] - 2 * pad[1]
    view = _pad_to(view, ch, cw)
    top, left = (view.shape[1] - ch) // 2, (view.shape[2] - cw) // 2
    view = view[:, top:top + ch, left:left + cw]
    return torch.nn.functional.pad(view, (pad[1], pad[1], pad[0], pad[0]))


def color_jitter(image: Image.Image, strength, rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter(brightness, contrast, saturation) with its factors drawn from `rng` (uniform in
    [max(0, 1 − s), 1 + s], applied in a random order), so the jitter follows the per-epoch generator instead of
    torch's global RNG."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    factors = [rng.uniform(max(0.0, 1 - a), 1 + a) for a in strength]
    for k in rng.permutation(3):
        if strength[k] > 0:
            image = ops[k](image, float(factors[k]))
    return image


def augment_points(points: np.ndarray, cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """PMF's point-cloud Augmentor (flips, translations, roll/pitch/yaw) on a copy of the points' features."""
    p = points.copy()
    if rng.random() < cfg["p_flipx"]:
        p[:, 0] = -p[:, 0]
    if rng.random() < cfg["p_flipy"]:
        p[:, 1] = -p[:, 1]
    for axis, name in enumerate("xyz"):
        if rng.random() < cfg[f"p_trans{name}"]:
            p[:, axis] += rng.uniform(cfg[f"trans_{name}min"], cfg[f"trans_{name}max"])
    angles = []
    for name in ("yaw", "pitch", "roll"):
        lo, hi = sorted((cfg[f"rot_{name}min"], cfg[f"rot_{name}max"]))  # the reference lists yaw reversed
        angles.append(rng.uniform(lo, hi) if rng.random() < cfg[f"p_rot_{name}"] else 0.0)
    if any(angles):
        from scipy.spatial.transform import Rotation  # only here: importing scipy.spatial costs ~1 s per process
        rot = Rotation.from_euler("zyx", angles, degrees=True).as_matrix().astype(np.float32)
        p[:, :3] = p[:, :3] @ rot.T
    return p


def normalize(features: torch.Tensor, mask: torch.Tensor, mean, std, rgb_norm=None) -> torch.Tensor:
    """(f − mean)/std · mask on channels 0..4 (dim −3 is the channel axis); RGB (5..7) stays in [0, 1], or with
    rgb_norm = (mean, std) (ImageNet weights) becomes (rgb − mean)/std everywhere."""
    f = features.clone()
    m = torch.as_tensor(mean, dtype=f.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=f.dtype).view(-1, 1, 1)
    f[..., 0:5, :, :] = (f[..., 0:5, :, :] - m) / s * mask.unsqueeze(-3)
    if rgb_norm is not None:
        rm = torch.as_tensor(rgb_norm[0], dtype=f.dtype).view(-1, 1, 1)
        rs = torch.as_tensor(rgb_norm[1], dtype=f.dtype).view(-1, 1, 1)
        f[..., 5:8, :, :] = (f[..., 5:8, :, :] - rm) / rs
    return f


# ----------------------------------------------------------------------------------------------------------------
# Dataset

@dataclass
class Frame:
    scan: Path
    label: Path | None
    image: Path
    calib: Path


def list_frames(root: str | Path, sequences: list[int], has_label: bool = True) -> list[Frame]:
    """Every frame of the given sequences, with the velodyne / label / image lists matched one to one."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data_root not found (expected <data_root>/<seq:02d>/velodyne, labels, image_2)")
    frames = []
    for seq in sequences:
        d = root / f"{int(seq):02d}"
        if not d.is_dir():
            raise DataError(f"{d}: sequence folder not found")
        scans = sorted((d / "velodyne").glob("*.bin"))
        images = sorted((d / "image_2").glob("*.png"))
        labels = sorted((d / "labels").glob("*.label")) if has_label else [None] * len(scans)
        if not scans:
            raise DataError(f"{d / 'velodyne'}: no .bin scans")
        if len(images) != len(scans) or len(labels) != len(scans):
            raise DataError(f"{d}: expected as many image_2/*.png and labels/*.label as velodyne/*.bin "
                            f"({len(scans)}), got {len(images)} images and {len(labels)} labels")
        for s, lab, im in zip(scans, labels, images):
            if s.stem != im.stem or (lab is not None and lab.stem != s.stem):
                raise DataError(f"{d}: frame names do not match: {s.name}, {im.name}, {lab.name if lab else '-'}")
            frames.append(Frame(s, lab, im, d / "calib.txt"))
    return frames


class PerspectiveViewDataset(Dataset):
    """(features (8, H, W) normalised, mask (H, W), label (H, W) int64) per frame."""

    def __init__(self, root, sequences, labels: LabelConfig, data_cfg: dict, train: bool, seed: int = 0,
                 zbuffer: bool = True, has_label: bool = True, rgb_norm=None):
        self.frames = list_frames(root, sequences, has_label)
        self.labels, self.cfg, self.train, self.zbuffer = labels, data_cfg, train, zbuffer
        self.seed, self.epoch, self.rgb_norm = seed, SharedEpoch(), rgb_norm
        self.jitter = list(data_cfg["color_jitter"]) if train and any(data_cfg["color_jitter"]) else None
        # one calib.txt per sequence, read here in the main process: a damaged one is a one-line error at start-up
        self._calib = {f.calib: None for f in self.frames}
        for path in self._calib:
            if not path.is_file():
                raise DataError(f"{path}: calib.txt not found")
            self._calib[path] = parse_calib(path)

    def __len__(self) -> int:
        return len(self.frames)

    def set_epoch(self, epoch: int) -> None:
        """Called in the main process each epoch; DataLoader workers (persistent ones too) read it through the
        shared value, so each epoch draws new augmentations."""
        self.epoch.set(epoch)

    def view(self, i: int, rng: np.random.Generator) -> torch.Tensor:
        f = self.frames[i]
        points = read_scan(f.scan)
        lab = None
        if f.label is not None:
            sem, _ = read_labels(f.label, len(points))
            lab = self.labels.map(sem, f.label)
        image = read_image(f.image)
        if self.jitter is not None:
            image = color_jitter(image, self.jitter, rng)
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        cal = self._calib[f.calib]
        feats = augment_points(points, self.cfg["pcd_aug"], rng) if (self.train and self.cfg["pcd_aug"]["enabled"]) \
            else None
        return torch.from_numpy(build_view(points, lab, rgb, cal["P2"], cal["Tr"], self.zbuffer, feats))

    def __getitem__(self, i: int):
        rng = epoch_rng(self.seed, self.epoch.get(), i)
        v = self.view(i, rng)
        c = self.cfg
        if self.train:
            v = train_transform(v, tuple(c["train_crop"]), tuple(c["pad"]), c["hflip"], c["rotation"], rng)
        else:
            v = val_transform(v, tuple(c["val_size"]), tuple(c["pad"]))
        mask = v[8]
        features = normalize(v[0:8], mask, c["mean"], c["std"], self.rgb_norm)
        return features, mask, v[9].long()


def focal_alpha(labels: LabelConfig) -> torch.Tensor:
    """α_c = log(1 + w_c) / max log(1 + w), w_c = 1 / (freq_c + 1e−3), 0 for ignored classes."""
    w = 1.0 / (labels.cls_freq + 1e-3)
    w[labels.ignore] = 0
    a = np.log1p(w)
    return torch.tensor(a / a.max(), dtype=torch.float32)

