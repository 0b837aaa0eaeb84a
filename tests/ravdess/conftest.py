import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from common import config as C
from ravdess import demo, preprocess

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# tiny but real: 2×2 face tiles of 32 px (64×64 image), 40×32 audio features, narrow nets, one epoch
TEST_CFG = {
    "progress": False, "torch_threads": 1,
    "data": {"layout": "features", "frames": 32, "image_height": 64, "image_width": 64, "batch_size": 6,
             "batch_size2": 16, "num_workers": 0},
    "preprocess": {"audio": {"sample_rate": 16000, "n_fft": 512, "hop_length": 256, "mel_bands": 64},
                   "video": {"tile_rows": 2, "tile_cols": 2, "tile_size": 32, "min_face_size": 40},
                   "splits": {"val_actors": [2], "test_actors": [3]}},
    "model": {"conv_channels": [4, 8, 8], "fc": [32, 16]},
    "tag": {"epochs": 1, "num_permute": 2, "chunk": 8},
    "eval": {"epochs": 1},
}


@pytest.fixture(scope="session")
def cfg_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "test.yaml"
    p.write_text(yaml.safe_dump(TEST_CFG))
    return p


@pytest.fixture(scope="session")
def cfg(cfg_file) -> dict:
    import argparse
    return C.resolve(ROOT / "ravdess" / "config.yaml", argparse.Namespace(config=str(cfg_file), set=[]))


def _blank_video(path: Path, frames: int = 4, size: int = 96):
    import cv2
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (size, size))
    for k in range(frames):
        w.write(np.full((size, size, 3), 90 + 5 * k, np.uint8))
    w.release()


@pytest.fixture(scope="session")
def raw_tree(tmp_path_factory) -> Path:
    """3 actors × 4 emotions of the demo generator, plus a corrupt wav and a clip with no face in actor 1."""
    root = tmp_path_factory.mktemp("raw")
    demo.make_raw_tree(root, actors=(1, 2, 3), emotions=(1, 3, 5, 8), seconds=0.8, frames=4, size=96, fps=8)
    a1 = root / "Actor_01"
    (a1 / "03-01-02-02-01-01-01.wav").write_bytes(b"not a wav file at all")
    shutil.copy(a1 / "01-01-03-02-01-01-01.mp4", a1 / "01-01-02-02-01-01-01.mp4")
    demo.make_raw_tree(root / "tmp", actors=(1,), emotions=(4,), seconds=0.8, frames=4, size=96)
    shutil.move(root / "tmp" / "Actor_01" / "03-01-04-02-01-01-01.wav", a1 / "03-01-04-02-01-01-01.wav")
    _blank_video(a1 / "01-01-04-02-01-01-01.mp4")
    shutil.rmtree(root / "tmp")
    (a1 / "notes-about-this-actor.wav").write_bytes(b"")  # badly named: reported, skipped
    return root


@pytest.fixture(scope="session")
def features(raw_tree, cfg, tmp_path_factory):
    dest = tmp_path_factory.mktemp("features")
    messages = []
    result = preprocess.preprocess(raw_tree, dest, cfg, log=messages.append, progress=False)
    return dest, result, messages
