"""End to end on a tiny demo tree in the real layout: steps 1-6, skip-on-rerun, bad inputs refused by name (exit 2),
the student's KD weighting and frozen teacher, resume after an interruption, the non-finite guard, the demo table
over seeds. (Whether KD helps is the demo's question, answered by `mmpkd.py --demo`, not asserted here.)"""
import csv
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from common.config import ConfigError, DataError
from common.run import cli, generator_dir
from common.train import NonFiniteLoss
from m2pkd import data as D
from m2pkd import pipeline as PL
from m2pkd import trainer as T

SETS = ["progress=false", "data.train=[train_1,train_2,train_3]", "data.dev=[dev_1]",
        "selection.holdout=[train_3]", "demo.seconds=4.0", "train.val_every=20", "train.checkpoint_every=20"]


def cfg_for(root, *extra):
    args = PL.parser("t", flags=("train",)).parse_args(
        ["--demo", "--data", str(root), *sum((["--set", s] for s in SETS + list(extra)), [])])
    return PL.resolve(args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = generator_dir(tmp_path_factory.mktemp("recola"))
    cfg = cfg_for(root)
    D.make_demo(root, cfg)
    logs = []
    reps = {s: PL.run_step(s, cfg, logs.append) for s in ("faces", "audio", "melspec", "csv")}
    return root, cfg, reps, logs


@pytest.fixture(scope="module")
def teacher_run(prepared, tmp_path_factory):
    root = prepared[0]
    rd, summary = PL.train(cfg_for(root, "train.steps=6", "train.val_every=3", "train.checkpoint_every=3"), "teacher",
                           tmp_path_factory.mktemp("teacher"), "cpu")
    return rd.path, summary


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
    # the default audio input: the reference's magma picture of the log-mel spectrogram (JPEG, 4:3)
    import cv2
    img = cv2.imread(str(work / "specs" / "train_2" / "1_train_2.jpg"))
    assert img.shape == (120, 160, 3) and img[..., 0].mean() != img[..., 2].mean()   # colour-mapped, not grey
    x = D.load_spec(work / "specs" / "train_2" / "1_train_2.jpg", cfg)
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    rows = list(csv.DictReader(open(work / "Annotations" / "Val_Set" / "dev_1.csv")))
    assert list(rows[0]) == D.CSV_COLUMNS and len(rows) == 100
    assert rows[24]["spec_name"] == "1_dev_1.jpg" and rows[25]["spec_name"] == "2_dev_1.jpg"
    for step in ("faces", "audio", "melspec", "csv"):
        rep = PL.run_step(step, cfg, lambda m: None)
        assert rep["done"] == [] and len(rep["skipped"]) == 4


def run_script(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli(lambda: module.main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_step_scripts_exit_2_on_an_empty_or_missing_tree(tmp_path, capsys):
    from m2pkd import audio_extract, audio_melspec, create_csv, face_detector
    empty = tmp_path / "empty"
    empty.mkdir()
    expect = {face_detector: "recordings_video/train_1.mp4: missing",
              audio_extract: "recordings_audio/train_1.wav: missing",
              audio_melspec: "audio_segments/train_1: missing", create_csv: "Cropped_Aligned/train_1"}
    for module, needle in expect.items():
        err = run_script(module, ["--data", str(empty), "--set", "progress=false"], capsys)
        assert needle in err and "(0 processed)" in err
    err = run_script(face_detector, ["--data", str(tmp_path / "nowhere")], capsys)
    assert "nowhere: data.root does not exist" in err


def test_bad_audio_video_and_gold_are_refused_by_name(prepared, tmp_path):
    root, _, _, _ = prepared
    broken = tmp_path / "a_rather_long_directory_name_so_that_the_path_is_longer_than_eighty_characters" / "recola"
    for sub in ("recordings_video", "recordings_audio", "ratings_gold_standard"):
        shutil.copytree(root / sub, broken / sub)
    (broken / "recordings_video" / "train_2.mp4").write_bytes(b"garbage")
    (broken / "recordings_audio" / "train_1.wav").unlink()
    y, sr = sf.read(root / "recordings_audio" / "train_3.wav")
    sf.write(broken / "recordings_audio" / "train_3.wav", y[: sr // 2], sr)          # truncated: 0.5 s of 4 s
    y[100] = np.nan
    sf.write(broken / "recordings_audio" / "dev_1.wav", y.astype(np.float32), sr, subtype="FLOAT")
    cfg = cfg_for(broken, "data.train=[train_1,train_2,train_3]", "data.dev=[dev_1]")
    logs = []
    with pytest.raises(DataError) as e:
        PL.run_step("audio", cfg, logs.append)
    missing = broken / "recordings_audio" / "train_1.wav"
    assert f"{missing}: missing" in str(e.value) and "3 of 4 recordings failed (1 processed)" in str(e.value)
    assert any("dev_1.wav: unreadable audio (ParameterError: Audio buffer is not finite everywhere)" in m
               for m in logs), logs
    assert any("train_3.wav: audio lasts 0.50 s, shorter than the recording (video 4.00 s, gold standard 4.00 s)"
               in m for m in logs), logs
    cfg["data"]["train"], cfg["data"]["dev"] = ["train_2"], []
    with pytest.raises(DataError, match=r"faces: 1 of 1 recordings failed .*train_2.mp4"):
        PL.run_step("faces", cfg, logs.append)


def test_nan_gold_rows_refused_or_dropped(prepared, tmp_path):
    root, _, _, _ = prepared
    tree = tmp_path / "recola"
    shutil.copytree(root / "ratings_gold_standard", tree / "ratings_gold_standard")
    shutil.copytree(root / "processed", tree / "processed", ignore=shutil.ignore_patterns("Annotations"))
    arff = tree / "ratings_gold_standard" / "arousal" / "train_1.arff"
    lines = arff.read_text().splitlines()
    k = lines.index("@data") + 2 + 10                                              # row 11 → '?'
    lines[k] = lines[k].rsplit(",", 1)[0] + ",?"
    arff.write_text("\n".join(lines) + "\n")
    cfg = cfg_for(tree, "data.train=[train_1]", "data.dev=[]")
    with pytest.raises(DataError, match=r"train_1.arff: gold standard row 11 is not a number \(1 such rows"):
        PL.run_step("csv", cfg, lambda m: None)
    logs = []
    PL.run_step("csv", cfg_for(tree, "data.train=[train_1]", "data.dev=[]", "data.gold_nan=drop"), logs.append)
    rows = list(csv.DictReader(open(tree / "processed" / "Annotations" / "Train_Set" / "train_1.csv")))
    assert len(rows) == 99 and "image10.jpg" not in {r["image_name"] for r in rows}
    assert any("1 frames dropped" in m for m in logs)


def test_teacher_and_student_runs(prepared, teacher_run, tmp_path):
    root = prepared[0]
    teacher_dir, teach = teacher_run
    assert "honest" in teach["protocol"] and teach["best_step"] in (3, 6) and np.isfinite(teach["dev_ccc"])
    assert (teacher_dir / "checkpoint" / "best.pth").is_file() and (teacher_dir / "train_log.csv").is_file()
    # student: KD from the teacher's checkpoint with the paper's weighting; logs, post-processing and plots
    cfg = cfg_for(root, "train.steps=6", "train.val_every=3", "train.checkpoint_every=3", f"kd.teacher={teacher_dir}")
    rd, s = PL.train(cfg, "student", tmp_path, "cpu")
    log = list(csv.DictReader(open(rd.path / "train_log.csv")))
    assert [int(r["epoch"]) for r in log] == [3, 6]
    for r in log:   # the paper's rule: β = 0.2 + γ (γ ≤ θ) or 1 (θ < γ ≤ 1), α = 1 − β; α = 1, β = 0 (γ > 1)
        a, b = float(r["train_alpha"]), float(r["train_beta"])
        assert a + b == pytest.approx(1) and 0 <= b <= 1 and 0 <= float(r["train_kd"]) <= 2
    tab = PL.plot_ccc(rd.path, cfg, lambda m: None)
    assert set(tab) >= {"raw", "authors", "avec"} and np.isfinite(tab["raw"]["mean"])
    assert (rd.path / "pred_dev_dev_1.png").stat().st_size > 1000
    assert json.loads((rd.path / "summary.json").read_text())["kd_weighting"] == "paper"
    preds = T.load_predictions(rd.path)
    assert set(preds["selection"]) == {"train_3"} and len(preds["dev"]["dev_1"][0]) == 100


def test_frozen_teacher_stays_in_eval_mode(prepared, teacher_run):
    cfg = cfg_for(prepared[0], f"kd.teacher={teacher_run[0]}")
    st = T.build(cfg, "student", "cpu", lambda m: None)
    st["model"].train()
    st["teacher"].train()
    assert not st["teacher"].training and not any(p.requires_grad for p in st["teacher"].parameters())
    st = T.build({**cfg, "parity": True}, "student", "cpu", lambda m: None)
    st["teacher"].train()
    assert st["teacher"].training     # parity: the reference's teacher in train mode


def test_resume_after_an_interruption_ends_as_an_uninterrupted_run(prepared, tmp_path, monkeypatch):
    root = prepared[0]
    cfg = cfg_for(root, "train.steps=8", "train.val_every=2", "train.checkpoint_every=4")
    _, full = PL.train(cfg, "baseline", tmp_path / "full", "cpu")
    real_step = T.train_step

    def interrupted(st, c, role, step, device):
        if step == 7:
            raise KeyboardInterrupt("killed")
        return real_step(st, c, role, step, device)

    monkeypatch.setattr(T, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        PL.train(cfg, "baseline", tmp_path / "cut", "cpu")
    run = next((tmp_path / "cut").glob("baseline_arousal_*"))
    state = torch.load(run / "checkpoint" / "train_state.pth", weights_only=False)
    assert state["step"] == 4 and not (run / "summary.json").exists()
    monkeypatch.setattr(T, "train_step", real_step)
    # a resume that changes what the run is, is refused, naming the key
    changed = cfg_for(root, "train.steps=8", "train.val_every=2", "train.checkpoint_every=4", "model.gru_hidden=32")
    with pytest.raises(ConfigError, match=r"model.gru_hidden \(64 -> 32\)"):
        PL.train(changed, "baseline", tmp_path / "cut", "cpu", resume="latest")
    rd, resumed = PL.train(cfg, "baseline", tmp_path / "cut", "cpu", resume=str(run))
    assert rd.path == run and "resumed from" in (run / "log" / "console.log").read_text()
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "train_log.csv"))] == [2, 4, 6, 8]
    assert resumed["best_step"] == full["best_step"]
    assert resumed["dev_ccc"] == pytest.approx(full["dev_ccc"], abs=1e-6)
    assert resumed["selection_ccc"] == pytest.approx(full["selection_ccc"], abs=1e-6)


def test_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(prepared, tmp_path, monkeypatch):
    cfg = cfg_for(prepared[0], "train.steps=8", "train.val_every=2", "train.checkpoint_every=2")
    real = T.ccc_loss
    calls = {"n": 0}

    def poisoned(pred, y):
        calls["n"] += 1
        return real(pred, y) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(T, "ccc_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"baseline: non-finite loss at epoch 3, step 3: term 'gt' = nan"):
        PL.train(cfg, "baseline", tmp_path, "cpu")
    run = next(tmp_path.glob("baseline_arousal_*"))
    assert torch.load(run / "checkpoint" / "train_state.pth", weights_only=False)["step"] == 2
    assert not (run / "summary.json").exists() and not (run / "predictions.npz").exists()


def test_demo_table_over_seeds_and_weightings(prepared, tmp_path, capsys):
    root, cfg, _, _ = prepared
    cfg = cfg_for(root, "train.steps=4", "train.val_every=2", "train.checkpoint_every=2", "demo.seeds=[0,1]",
                  "demo.weightings=[sane]")
    res = PL.demo(cfg, tmp_path, "cpu", data_dir=root)
    summary = json.loads((res["run"] / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    models = summary["results"]["arousal"]
    assert set(models) == {"baseline", "teacher", "student_sane"}
    assert models["student_sane"]["weighting"] == "sane" and models["baseline"]["weighting"] is None
    for entry in models.values():
        per = list(entry["dev_raw"]["per_seed"].values())
        assert len(per) == 2 and entry["dev_raw"]["mean"] == pytest.approx(np.mean(per))
        assert entry["dev_raw"]["sd"] == pytest.approx(np.std(per, ddof=1))
    assert len(summary["kd_effect"]) == 1 and "student_sane: dev CCC" in summary["kd_effect"][0]
    text = (res["run"] / "ccc_table.txt").read_text()
    assert "student_sane" in text and "±" in text and text.strip() in capsys.readouterr().out
    from m2pkd.report import section
    md = section(res, tmp_path)
    assert "| arousal | student_sane |" in md and "**What KD did**" in md and "ccc_dev.png" in md
    with pytest.raises(DataError, match="refusing to write m2pkd demo data into"):
        PL.demo(cfg, tmp_path, "cpu", data_dir=root / "processed")   # holds files the generator did not make
