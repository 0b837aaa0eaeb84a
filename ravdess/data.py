"""RAVDESS data: the raw release's file names, and MFH's feature layout (MFH repository ravdess/utils/dataloader.py,
`AudioImageDataset` and `gen_data`) read as the reference reads it.

Feature layout (what MFH distributes and what `preprocess` writes)::

    <dir>/data_file/spa_dl.csv | spa_val.csv | spa_test.csv   header row; columns: audio file, image file, label 0..7
    <dir>/aud_features/<audio file>                             .npy, n_mels × frames float (40 × 256)
    <dir>/vid_features/<image file>                             image read by OpenCV (BGR), H × W × 3 (256 × 512)
    <dir>/normalization.json                                    written by `preprocess` only: the training split's
                                                                audio mean / std and image RGB mean / std

A sample is {"audio": (1, n_mels, frames) float, "image": (3, H, W) float, "label": int, "index": int}.
The reference's swap of audio time frames 0 and 2 (a copy-paste of the BGR fix in `AudioImageDataset.__getitem__`) is
not done unless `parity: true`; val and test loaders are not shuffled (the reference's `get_loader` shuffles every
split).
"""
from __future__ import annotations

import csv
import json
import math
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
NORM_FILE = "normalization.json"
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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a CSV: audio file, image file, label") \
            from None
    rows = []
    reader = csv.reader(text.splitlines())
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
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.shape != (d["n_mels"], d["frames"]) or not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{path}: expected a numeric {d['n_mels']}×{d['frames']} array, got {a.dtype} {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{path}: non-finite value {a[first]} at index {first} (row, frame) and {int(bad.sum()) - 1} "
                        f"more; expected finite numbers")
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


def normalization(root: str | Path, cfg: dict) -> dict:
    """The normalisation the samples get: {"audio": {mean, std}, "image": {mean: [3], std: [3]}, "source": ...}.

    data.normalization auto: the training-split statistics `preprocess` stored in <root>/normalization.json when the
    file exists, else the config's audio_norm / image_norm (MFH's constants for its published features); config: the
    constants; stored: the file, which must exist."""
    d = cfg["data"]
    path = Path(root) / NORM_FILE
    if d["normalization"] == "config" or (d["normalization"] == "auto" and not path.is_file()):
        return {"audio": dict(d["audio_norm"]), "image": dict(d["image_norm"]), "source": "config"}
    if not path.is_file():
        raise DataError(f"{path}: not found (data.normalization 'stored' needs the statistics `preprocess` writes)")
    return read_normalization(path)


def read_normalization(path: Path) -> dict:
    try:
        stats = json.loads(Path(path).read_text(encoding="utf-8"))
        a, im = stats["audio"], stats["image"]
        values = [float(a["mean"]), float(a["std"]), *map(float, im["mean"]), *map(float, im["std"])]
        ok = len(im["mean"]) == len(im["std"]) == 3
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: expected JSON {{audio: {{mean, std}}, image: {{mean: [3], std: [3]}}}} "
                        f"({type(e).__name__}: {e})") from None
    if not ok or not all(math.isfinite(v) for v in values) or a["std"] <= 0 or min(im["std"]) <= 0:
        raise DataError(f"{path}: expected finite means, positive standard deviations and 3 image channels")
    return {"audio": {"mean": float(a["mean"]), "std": float(a["std"])},
            "image": {"mean": list(map(float, im["mean"])), "std": list(map(float, im["std"]))}, "source": str(path)}


def audio_tensor(a: np.ndarray, norm: dict, parity: bool = False) -> torch.Tensor:
    """(n_mels, frames) array → normalised (1, n_mels, frames) float tensor (ToTensor without /255 + Normalize);
    norm = normalization(...)["audio"]."""
    x = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None] - norm["mean"]) / norm["std"]
    if parity:  # the reference swaps time frames 0 and 2 (AudioImageDataset.__getitem__)
        x = x[..., [2, 1, 0, *range(3, x.shape[-1])]]
    return x


def image_tensor(img_bgr: np.ndarray, norm: dict) -> torch.Tensor:
    """BGR uint8 H×W×3 → RGB, /255, normalised (3, H, W) float tensor; norm = normalization(...)["image"]."""
    rgb = np.ascontiguousarray(img_bgr[..., ::-1])
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(norm["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(norm["std"], dtype=torch.float32)[:, None, None]
    return (x - mean) / std


class AudioImageDataset(Dataset):
    """One split of the feature layout. Every file is checked on first access with a one-line DataError."""

    def __init__(self, root: str | Path, cfg: dict, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.cfg, self.split = Path(root), cfg, split
        self.rows = read_split(self.root, cfg, split)
        self.norm = normalization(self.root, cfg)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([r[2] for r in self.rows], dtype=torch.long)

    def __getitem__(self, i: int) -> dict:
        aud, img, label = self.rows[i]
        a = load_audio_array(self.root / "aud_features" / aud, self.cfg)
        im = load_image_array(self.root / "vid_features" / img, self.cfg)
        return {"audio": audio_tensor(a, self.norm["audio"], self.cfg["parity"]),
                "image": image_tensor(im, self.norm["image"]),
                "label": torch.tensor(label, dtype=torch.long), "index": torch.tensor(i, dtype=torch.long)}


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int, device,
                generator: torch.Generator | None = None) -> DataLoader:
    """batch_size ≤ 0 means one full batch (as the reference). A shuffled loader draws its order from `generator`
    (common.train.loader_generator: a fresh one per fit, so two fits given the same names see the same batches)."""
    from common.train import seed_worker
    bs = len(ds) if batch_size <= 0 else batch_size
    return DataLoader(ds, batch_size=bs, shuffle=shuffle, num_workers=num_workers, generator=generator,
                      worker_init_fn=seed_worker if num_workers else None,
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=False)


def datasets(root: str | Path, cfg: dict) -> dict[str, AudioImageDataset]:
    return {s: AudioImageDataset(root, cfg, s) for s in SPLITS}


def eval_loaders(root: str | Path, cfg: dict, device) -> dict[str, DataLoader]:
    """{'train','val','test'} in file order (for evaluation and the saliency): nothing shuffled."""
    d = cfg["data"]
    return {s: make_loader(ds, d["batch_size"], False, d["num_workers"], device)
            for s, ds in datasets(root, cfg).items()}
