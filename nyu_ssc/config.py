"""Dataset paths and the SSC constants (the seed's `config.py`, without hard-coded machine paths).

Dataset folders come from the YAML (`data.root`, `data.splits`); a relative root is taken relative to this folder,
so `data/NYUtrain_npz` next to `main.py` works out of the box and `--set data.root=/big/disk/NYU_SSC` moves it.
"""
from __future__ import annotations

from pathlib import Path as FsPath

import numpy as np

from common.config import ConfigError

HERE = FsPath(__file__).resolve().parent

NUM_CLASSES = 12
IGNORE = 255
CLASS_NAMES = ["empty", "ceiling", "floor", "wall", "window", "chair", "bed", "sofa", "table", "tvs", "furniture",
               "objects"]

# SSCNet's 37 → 12 class map (index = NYU-37 id, value = SSC class); 255 (outside the room) is kept as is.
SEG_CLASS_MAP = np.array([0, 1, 2, 3, 4, 11, 5, 6, 7, 8, 8, 10, 10, 10, 11, 11, 9, 8, 11, 11, 11, 11, 11, 11, 11, 11,
                          11, 10, 10, 11, 8, 10, 11, 9, 11, 11, 11], dtype=np.uint8)

# The seed's colour map: one RGB row per class 0..11, then the colour of ignored voxels (255).
COLOR_MAP = np.array([[22, 191, 206], [214, 38, 40], [43, 160, 4], [158, 216, 229], [114, 158, 206],
                      [204, 204, 91], [255, 186, 119], [147, 102, 188], [30, 119, 181], [188, 188, 33],
                      [255, 127, 12], [196, 175, 214], [153, 153, 153]], dtype=np.uint8)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class Path_:  # noqa: N801 - the seed's `config.Path.db_root_dir`, as a function of the resolved config
    @staticmethod
    def db_root_dir(dataset: str, cfg: dict, split: str) -> FsPath:
        """Folder of `split` (train | val) of `dataset`, from the config's data.root and data.splits."""
        splits = cfg["data"]["splits"]
        if dataset not in splits:
            raise ConfigError(f"data.dataset: unknown dataset {dataset!r}; known: {', '.join(splits)} (or demo)")
        entry = splits[dataset]
        if not isinstance(entry, dict) or split not in entry:
            raise ConfigError(f"data.splits.{dataset}: expected a mapping with keys train and val, got {entry!r}")
        root = FsPath(cfg["data"]["root"]).expanduser()
        if not root.is_absolute():
            root = HERE / root
        return root / entry[split]


Path = Path_  # the seed's spelling: config.Path.db_root_dir(...)


def colorize(labels: np.ndarray) -> np.ndarray:
    """Class ids (any shape, 255 = ignore) → uint8 RGB with the seed's colour map."""
    lab = np.asarray(labels).astype(np.int64)
    idx = np.where(lab == IGNORE, NUM_CLASSES, np.clip(lab, 0, NUM_CLASSES))
    return COLOR_MAP[idx]
