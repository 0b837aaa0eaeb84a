"""RAVDESS data: the raw release's file names, and the MFH feature layout (spec §5.1) read as specified.

Feature layout (what MFH distributes and what `preprocess` writes)::

    <dir>/data_file/spa_dl.csv | spa_val.csv | spa_test.csv   header row; columns: audio file, image file, label 0..7
    <dir>/aud_features/<audio file>                             .npy, n_mels × frames float (40 × 256)
    <dir>/vid_features/<image file>                             image read by OpenCV (BGR), H × W × 3 (256 × 512)

A sample is {"audio": (1, n_mels, frames) float, "image": (3, H, W) float, "label": int, "index": int}.
The reference's swap of audio time frames 0 and 2 (a copy-paste of the BGR fix, spec §12 item 44) is not done
unless `parity: true`; val and test loaders are not shuffled (item 51).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.config import DataError

EMOTIONS = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
MODALITIES = {"01": "full-AV", "02": "video-only", "03": "audio-only"}
CHANNELS = {"01": "speech", "02": "song"}
SPLITS = ("train", "val", "test")
NAME_RE = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})\.(wav|mp4)$", re.IGNORECASE)


@dataclass(frozen=True)
class ClipName:
    """The seven fields of a RAVDESS file name `MM-VV-EE-II-SS-RR-AA.ext`."""
    modality: str
    channel: str
    emotion: int      # 1..8
    intensity: int    # 1 normal, 2 strong
    statement: int    # 1, 2
    repetition: int   # 1, 2
    actor: int        # 1..24
    ext: str

    @property
    def label(self) -> int:
        """Class index 0..7 (emotion − 1)."""
        return self.emotion - 1

    @property
    def key(self) -> tuple:
        """Everything but the modality: an audio file and a video file of the same take share it."""
        return (self.channel, self.emotion, self.intensity, self.statement, self.repetition, self.actor)

    def filename(self, modality: str | None = None, ext: str | None = None) -> str:
        m = modality or self.modality
        return (f"{m}-{self.channel}-{self.emotion:02d}-{self.intensity:02d}-{self.statement:02d}-"
                f"{self.repetition:02d}-{self.actor:02d}.{ext or self.ext}")


def parse_name(name: str) -> ClipName:
    """Parse a RAVDESS file name; ValueError naming the file and the expected form if it does not fit."""
    m = NAME_RE.match(Path(name).name)
    if not m:
        raise ValueError(f"{name}: expected a RAVDESS name MM-VV-EE-II-SS-RR-AA.wav|.mp4 (two digits each)")
    mm, vv, ee, ii, ss, rr, aa, ext = m.groups()
    c = ClipName(mm, vv, int(ee), int(ii), int(ss), int(rr), int(aa), ext.lower())
    problems = []
    if mm not in MODALITIES:
        problems.append(f"modality {mm} not in {sorted(MODALITIES)}")
    if vv not in CHANNELS:
        problems.append(f"vocal channel {vv} not in {sorted(CHANNELS)}")
    if not 1 <= c.emotion <= 8:
        problems.append(f"emotion {ee} not in 01..08")
    if c.intensity not in (1, 2) or c.statement not in (1, 2) or c.repetition not in (1, 2):
        problems.append("intensity, statement and repetition must be 01 or 02")
    if not 1 <= c.actor <= 99:
        problems.append(f"actor {aa} must be ≥ 01")
    if problems:
        raise ValueError(f"{name}: " + "; ".join(problems))
    return c


# ----------------------------------------------------------------------------------------------------------------------
# Feature layout

def split_csv(root: Path, cfg: dict, split: str) -> Path:
    return Path(root) / "data_file" / cfg["data"]["split_files"][split]


def read_split(root: Path, cfg: dict, split: str) -> list[tuple[str, str, int]]:
    """Rows (audio file, image file, label) of one split CSV (header row skipped)."""
    path = split_csv(root, cfg, split)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (expected a CSV: audio file, image file, label 0..7)")
    rows = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file, expected a header row and rows (audio file, image file, label)")
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 3:
                raise DataError(f"{path}:{line}: expected 3 columns (audio file, image file, label), got {row}")
            try:
                label = int(row[2])
            except ValueError:
                raise DataError(f"{path}:{line}: label must be an integer 0..7, got {row[2]!r}") from None
            if not 0 <= label < len(EMOTIONS):
                raise DataError(f"{path}:{line}: label must be in 0..7, got {label}")
            rows.append((row[0].strip(), row[1].strip(), label))
    if not rows:
        raise DataError(f"{path}: no samples (expected rows: audio file, image file, label)")
    return rows


def write_split(root: Path, cfg: dict, split: str, rows: list[tuple[str, str, int]]) -> Path:
    path = split_csv(root, cfg, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["audio", "image", "label"])
        w.writerows(rows)
    return path


def load_audio_array(path: Path, cfg: dict) -> np.ndarray:
    d = cfg["data"]
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: audio feature file not found") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.shape != (d["n_mels"], d["frames"]) or not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{path}: expected a numeric {d['n_mels']}×{d['frames']} array, got {a.dtype} {a.shape}")
    return a


def load_image_array(path: Path, cfg: dict) -> np.ndarray:
    d = cfg["data"]
    if not Path(path).is_file():
        raise DataError(f"{path}: image file not found")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: OpenCV cannot read this image")
    if img.shape != (d["image_height"], d["image_width"], 3):
        raise DataError(f"{path}: expected a {d['image_height']}×{d['image_width']}×3 image, got {img.shape}")
    return img


def audio_tensor(a: np.ndarray, cfg: dict) -> torch.Tensor:
    """(n_mels, frames) array → normalised (1, n_mels, frames) float tensor (ToTensor without /255 + Normalize)."""
    n = cfg["data"]["audio_norm"]
    x = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None] - n["mean"]) / n["std"]
    if cfg["parity"]:  # the reference swaps time frames 0 and 2 (spec §12 item 44)
        x = x[..., [2, 1, 0, *range(3, x.shape[-1])]]
    return x


def image_tensor(img_bgr: np.ndarray, cfg: dict) -> torch.Tensor:
    """BGR uint8 H×W×3 → RGB, /255, ImageNet-normalised (3, H, W) float tensor."""
    n = cfg["data"]["image_norm"]
    rgb = np.ascontiguousarray(img_bgr[..., ::-1])
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(n["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(n["std"], dtype=torch.float32)[:, None, None]
    return (x - mean) / std


class AudioImageDataset(Dataset):
    """One split of the feature layout. Every file is checked on first access with a one-line DataError."""

    def __init__(self, root: str | Path, cfg: dict, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.cfg, self.split = Path(root), cfg, split
        self.rows = read_split(self.root, cfg, split)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([r[2] for r in self.rows], dtype=torch.long)

    def __getitem__(self, i: int) -> dict:
        aud, img, label = self.rows[i]
        a = load_audio_array(self.root / "aud_features" / aud, self.cfg)
        im = load_image_array(self.root / "vid_features" / img, self.cfg)
        return {"audio": audio_tensor(a, self.cfg), "image": image_tensor(im, self.cfg),
                "label": torch.tensor(label, dtype=torch.long), "index": torch.tensor(i, dtype=torch.long)}


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int, device) -> DataLoader:
    """batch_size ≤ 0 means one full batch (as the reference)."""
    bs = len(ds) if batch_size <= 0 else batch_size
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=bs, shuffle=shuffle, num_workers=num_workers, generator=g,
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=False)


def datasets(root: str | Path, cfg: dict) -> dict[str, AudioImageDataset]:
    return {s: AudioImageDataset(root, cfg, s) for s in SPLITS}


def loaders(root: str | Path, cfg: dict, device, batch_size: int | None = None) -> dict[str, DataLoader]:
    """{'train','val','test'}: the train split shuffled (seeded), val and test in file order."""
    d = cfg["data"]
    bs = d["batch_size"] if batch_size is None else batch_size
    return {s: make_loader(ds, bs, s == "train", d["num_workers"], cfg["seed"], device)
            for s, ds in datasets(root, cfg).items()}
