"""End to end on a tiny demo tree in the real layout: steps 1-6, skip-on-rerun, unreadable inputs named and
skipped, and the quality bar (the audio+visual teacher beats the visual baseline on dev by a margin)."""
import csv
import json
import shutil

import numpy as np
import pytest

from m2pkd import data as D
from m2pkd import pipeline as PL
from m2pkd import train as T

SETS = ["progress=false", "data.train=[train_1,train_2,train_3]", "data.dev=[dev_1]",
        "selection.holdout=[train_3]", "demo.seconds=4.0", "train.val_every=20"]


def cfg_for(root, *extra):
    args = PL.parser("t", flags=("train",)).parse_args(
        ["--demo", "--data", str(root), *sum((["--set", s] for s in SETS + list(extra)), [])])
    return PL.resolve(args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("recola")
    cfg = cfg_for(root)
    D.make_demo(root, cfg)
    logs = []
    reps = {s: PL.run_step(s, cfg, logs.append) for s in ("faces", "audio", "melspec", "csv")}
    return root, cfg, reps, logs


def test_demo_tree_is_in_the_real_format(prepared):
    root, cfg, reps, _ = prepared
    import cv2
    cap = cv2.VideoCapture(str(root / "recordings_video" / "train_1.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 100
    t, g = D.read_arff(root / "ratings_gold_standard" / "valence" / "dev_1.arff")
    gold_csv = D.read_gold_csv(root / "ratings_gold_standard" / "dev_1.csv")
    assert len(t) == 101 and np.allclose(np.diff(t), 0.04) and np.allclose(gold_csv[:, 1], g, atol=1e-5)
    for rep in reps.values():
        assert rep["failed"] == {} and len(rep["done"]) == 4


def test_steps_outputs_and_rerun_skips(prepared):
    root, cfg, _, logs = prepared
    work = root / "processed"
    assert len(list((work / "Cropped_Aligned" / "dev_1").glob("image*.jpg"))) == 100
    assert any("0 without a detected face" in m for m in logs)          # MTCNN finds the real faces
    segs = sorted((work / "audio_segments" / "train_2").glob("*_train_2.wav"))
    assert [p.name for p in segs][:2] == ["1_train_2.wav", "2_train_2.wav"] and len(segs) == 4
    db = np.load(work / "specs" / "train_2" / "1_train_2.npy")
    assert db.shape == (32, 44) and db.max() == 0 and db.min() >= -80
    rows = list(csv.DictReader(open(work / "Annotations" / "Val_Set" / "dev_1.csv")))
    assert list(rows[0]) == D.CSV_COLUMNS and len(rows) == 100
    assert rows[24]["spec_name"] == "1_dev_1.npy" and rows[25]["spec_name"] == "2_dev_1.npy"
    for step in ("faces", "audio", "melspec", "csv"):
        rep = PL.run_step(step, cfg, lambda m: None)
        assert rep["done"] == [] and len(rep["skipped"]) == 4


def test_unreadable_video_and_audio_are_named_and_skipped(prepared, tmp_path):
    root, _, _, _ = prepared
    broken = tmp_path / "broken"
    for sub in ("recordings_video", "recordings_audio"):
        (broken / sub).mkdir(parents=True)
    shutil.copy(root / "recordings_video" / "train_1.mp4", broken / "recordings_video" / "train_1.mp4")
    (broken / "recordings_video" / "train_2.mp4").write_bytes(b"garbage")
    (broken / "recordings_audio" / "train_1.wav").write_bytes(b"RIFF....garbage")
    cfg = cfg_for(broken, "data.train=[train_1,train_2]", "data.dev=[]", "demo.seconds=1.0")
    logs = []
    rep = PL.run_step("audio", cfg, logs.append)
    assert "train_1" in rep["failed"] and "train_1.wav" in rep["failed"]["train_1"]
    cfg["data"]["train"] = ["train_2"]
    rep = PL.run_step("faces", cfg, logs.append)
    assert list(rep["failed"]) == ["train_2"] and "train_2.mp4" in rep["failed"]["train_2"]


def test_teacher_beats_baseline_and_student_distils(prepared, tmp_path):
    root, _, _, _ = prepared
    summaries = {}
    for role, steps in (("baseline", 40), ("teacher", 40)):
        rd, summaries[role] = PL.train(cfg_for(root, f"train.steps={steps}"), role, tmp_path, "cpu")
    teacher_dir = rd.path
    base, teach = summaries["baseline"], summaries["teacher"]
    assert teach["dev_ccc"] > base["dev_ccc"] + 0.3, (teach["dev_ccc"], base["dev_ccc"])
    assert "honest" in teach["protocol"]
    # student: KD from the teacher's checkpoint, a few steps; outputs, post-processing and plots
    cfg = cfg_for(root, "train.steps=6", "train.val_every=3", f"kd.teacher={teacher_dir}")
    rd, s = PL.train(cfg, "student", tmp_path, "cpu")
    hist = list(csv.DictReader(open(rd.path / "history.csv")))
    assert len(hist) == 6 and all(0 <= float(r["beta"]) <= 1 and float(r["alpha"]) == 1 for r in hist)
    assert all(0 <= float(r["kd"]) <= 2 for r in hist)
    tab = PL.plot_ccc(rd.path, cfg, lambda m: None)
    assert set(tab) >= {"raw", "authors", "avec"} and np.isfinite(tab["raw"]["mean"])
    assert (rd.path / "pred_dev_dev_1.png").stat().st_size > 1000
    assert json.loads((rd.path / "summary.json").read_text())["kd_weighting"] == "sane"
    preds = T.load_predictions(rd.path)
    assert set(preds["selection"]) == {"train_3"} and len(preds["dev"]["dev_1"][0]) == 100
