import csv

import numpy as np
import pytest
import torch

from common.config import DataError
from ravdess import data as D
from ravdess import preprocess as P


def test_parse_name_fields_and_pairing():
    n = D.parse_name("03-01-05-02-01-02-12.wav")
    assert (n.modality, n.channel, n.emotion, n.intensity, n.statement, n.repetition, n.actor) == \
        ("03", "01", 5, 2, 1, 2, 12)
    assert n.label == 4 and D.EMOTIONS[n.label] == "angry"
    v = D.parse_name("Actor_12/01-01-05-02-01-02-12.MP4")
    assert v.ext == "mp4" and v.key == n.key and v.modality != n.modality
    assert n.filename("01", "mp4") == "01-01-05-02-01-02-12.mp4"
    for bad, why in [("03-01-09-02-01-02-12.wav", "emotion 09"), ("03-01-05-02-01-02.wav", "MM-VV-EE"),
                     ("07-01-05-02-01-02-12.wav", "modality 07"), ("03-01-05-03-01-02-12.wav", "intensity")]:
        with pytest.raises(ValueError, match=why) as e:
            D.parse_name(bad)
        assert bad in str(e.value)


def test_preprocess_shapes_splits_and_faces(features, cfg, raw_tree):
    dest, result, _ = features
    d = cfg["data"]
    assert result["counts"] == {"train": 4, "val": 4, "test": 4}  # actor 1 train, 2 val, 3 test; 4 emotions each
    for split, actor in (("train", 1), ("val", 2), ("test", 3)):
        rows = D.read_split(dest, cfg, split)
        for aud, img, label in rows:
            assert D.parse_name(aud.replace(".npy", ".wav")).actor == actor
            assert D.parse_name(aud.replace(".npy", ".wav")).label == label
            a = np.load(dest / "aud_features" / aud)
            assert a.shape == (d["n_mels"], d["frames"]) == (40, 32) and a.dtype == np.float32
            im = D.load_image_array(dest / "vid_features" / img, cfg)
            assert im.shape == (64, 64, 3)
    # a face is actually found in every sampled frame of a generated clip, and the tile is the face, not background
    tiler = P.FaceTiler(cfg)
    img, n_faces = tiler(raw_tree / "Actor_02" / "01-01-05-02-01-01-02.mp4")
    assert n_faces == 4
    assert img.shape == (64, 64, 3) and img.std() > 20


def test_bad_files_are_named_and_skipped_and_rerun_reuses(features, raw_tree, cfg):
    dest, result, messages = features
    text = "\n".join(result["skipped"])
    assert "03-01-02-02-01-01-01.wav" in text and "cannot read audio" in text
    assert "01-01-04-02-01-01-01.mp4" in text and "no face" in text
    assert "notes-about-this-actor.wav" in text
    assert len(result["skipped"]) == 3 and messages[:3] == result["skipped"][:3]
    again = P.preprocess(raw_tree, dest, cfg, log=lambda m: None, progress=False)
    assert again["written"] == 0 and again["reused"] == result["written"] == 12


def test_both_layouts_give_identical_tensors(features, raw_tree, cfg):
    dest, _, _ = features
    ds = D.AudioImageDataset(dest, cfg, "val")
    i = 2
    aud, img, label = ds.rows[i]
    item = ds[i]
    raw = P.load_raw_sample(raw_tree / "Actor_02" / aud.replace(".npy", ".wav"),
                            raw_tree / "Actor_02" / img.replace(".png", ".mp4"), cfg)
    assert item["audio"].shape == (1, 40, 32) and item["image"].shape == (3, 64, 64)
    assert torch.equal(item["audio"], raw["audio"]) and torch.equal(item["image"], raw["image"])
    assert int(item["label"]) == label
    # normalisation as specified: audio (x + 10.59) / 85.66, image RGB ImageNet-normalised
    a = np.load(dest / "aud_features" / aud)
    torch.testing.assert_close(item["audio"][0], (torch.from_numpy(a) + 10.59) / 85.66)


def test_parity_swaps_time_frames(cfg):
    a = np.arange(40 * 32, dtype=np.float32).reshape(40, 32)
    fixed, ref = D.audio_tensor(a, cfg), D.audio_tensor(a, {**cfg, "parity": True})
    assert torch.equal(ref[..., 0], fixed[..., 2]) and torch.equal(ref[..., 3:], fixed[..., 3:])


def test_bad_feature_files_raise_one_line_errors(tmp_path, cfg):
    (tmp_path / "data_file").mkdir()
    (tmp_path / "aud_features").mkdir()
    (tmp_path / "vid_features").mkdir()
    with pytest.raises(DataError, match="spa_dl.csv: split file not found"):
        D.AudioImageDataset(tmp_path, cfg, "train")
    with open(tmp_path / "data_file" / "spa_dl.csv", "w", newline="") as f:
        csv.writer(f).writerows([["a", "i", "l"], ["x.npy", "x.png", "3"]])
    np.save(tmp_path / "aud_features" / "x.npy", np.zeros((40, 31), np.float32))
    ds = D.AudioImageDataset(tmp_path, cfg, "train")
    with pytest.raises(DataError, match=r"x.npy: expected a numeric 40×32 array"):
        ds[0]
    np.save(tmp_path / "aud_features" / "x.npy", np.zeros((40, 32), np.float32))
    with pytest.raises(DataError, match="x.png: image file not found"):
        ds[0]
    (tmp_path / "data_file" / "spa_dl.csv").write_text("a,i,l\nx.npy,x.png,9\n")
    with pytest.raises(DataError, match=r"spa_dl.csv:2: label must be in 0..7"):
        D.AudioImageDataset(tmp_path, cfg, "train")
