import csv
import json

import numpy as np
import pytest

from common.run import worker_error
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
                            raw_tree / "Actor_02" / img.replace(".png", ".mp4"), cfg, ds.norm)
    assert item["audio"].shape == (1, 40, 32) and item["image"].shape == (3, 64, 64)
    assert torch.equal(item["audio"], raw["audio"]) and torch.equal(item["image"], raw["image"])
    assert int(item["label"]) == label
    # preprocessed features are normalised with the training split's statistics stored beside them
    n = ds.norm["audio"]
    assert ds.norm["source"].endswith(D.NORM_FILE) and n["mean"] != -10.59
    a = np.load(dest / "aud_features" / aud)
    torch.testing.assert_close(item["audio"][0], (torch.from_numpy(a) - n["mean"]) / n["std"])


def test_normalisation_is_the_training_splits_and_stored(features, cfg):
    dest, result, _ = features
    stats = json.loads((dest / D.NORM_FILE).read_text())
    train = D.read_split(dest, cfg, "train")
    a = np.stack([np.load(dest / "aud_features" / r[0]) for r in train]).astype(np.float64)
    assert np.isclose(stats["audio"]["mean"], a.mean()) and np.isclose(stats["audio"]["std"], a.std())
    im = np.stack([D.load_image_array(dest / "vid_features" / r[1], cfg)[..., ::-1] / 255.0 for r in train])
    np.testing.assert_allclose(stats["image"]["mean"], im.reshape(-1, 3).mean(0), rtol=1e-6)
    # not the val or test split's: those differ
    val = np.stack([np.load(dest / "aud_features" / r[0]) for r in D.read_split(dest, cfg, "val")])
    assert not np.isclose(stats["audio"]["mean"], val.mean())
    # data.normalization: config keeps MFH's constants, stored demands the file
    assert D.normalization(dest, {**cfg, "data": {**cfg["data"], "normalization": "config"}})["audio"] == \
        {"mean": -10.59, "std": 85.66}
    with pytest.raises(DataError, match="normalization.json: not found"):
        D.normalization(dest / "data_file", {**cfg, "data": {**cfg["data"], "normalization": "stored"}})


def test_parity_swaps_time_frames(cfg):
    a = np.arange(40 * 32, dtype=np.float32).reshape(40, 32)
    norm = cfg["data"]["audio_norm"]
    fixed, ref = D.audio_tensor(a, norm), D.audio_tensor(a, norm, parity=True)
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


def test_non_finite_audio_is_refused_naming_file_and_index(tmp_path, cfg):
    a = np.zeros((40, 32), np.float32)
    a[3, 7], a[5, 1] = np.nan, np.inf
    np.save(tmp_path / "bad.npy", a)
    with pytest.raises(DataError, match=r"bad.npy: non-finite value nan at index \(3, 7\) \(row, frame\) and 1 more"):
        D.load_audio_array(tmp_path / "bad.npy", cfg)


def test_a_workers_error_is_its_one_line(features, cfg, tmp_path):
    """With num_workers 2 a bad file's DataError comes back as the worker's line, not a flattened traceback."""
    import shutil
    dest, _, _ = features
    root = tmp_path / "copy"
    shutil.copytree(dest, root)
    aud = D.read_split(root, cfg, "val")[1][0]
    np.save(root / "aud_features" / aud, np.full((40, 32), np.nan, np.float32))
    loader = D.make_loader(D.AudioImageDataset(root, cfg, "val"), 2, False, 2, "cpu")
    with pytest.raises(DataError) as e:
        list(loader)
    msg = str(worker_error(e.value))  # what common.run.cli prints
    assert "\n" not in msg and msg.startswith(str(root / "aud_features" / aud)) and "non-finite value nan" in msg
    assert "Traceback" not in msg and "Caught DataError" not in msg


def test_zero_byte_npy_and_non_utf8_csv_are_one_line_errors(tmp_path, cfg):
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.npy: not a readable .npy array \(EOFError"):
        D.load_audio_array(tmp_path / "empty.npy", cfg)
    (tmp_path / "data_file").mkdir()
    (tmp_path / "data_file" / "spa_dl.csv").write_bytes("audio,image,label\nä.npy,x.png,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"spa_dl.csv: not UTF-8 text \(byte 18\)"):
        D.read_split(tmp_path, cfg, "train")
