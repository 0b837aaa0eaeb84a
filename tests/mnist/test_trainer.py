"""mnist.trainer on the shared mechanics of common.train: a run interrupted mid-fit and resumed ends with the same
numbers as an uninterrupted one; a non-finite loss stops the run naming epoch, step and term with the last
checkpoint intact; the no-KD baseline and a KD student see the same batches and noise; ntd logits; the independent
teacher."""
import json

import numpy as np
import pytest
import torch

from common import ntd
from common.config import ConfigError
from common.train import NonFiniteLoss
from mnist import main as M
from mnist import trainer as T
from tests.mnist.helpers import TINY, run

RUN = ["--mode", "1", "--set", "train.epochs=3", "--set", "cal.epochs=1"]


def _args(dataset, out, *extra):
    return ["--out", str(out), "--device", "cpu", "--data-root", str(dataset),
            "--set", f"data.backgrounds={dataset / 'bg'}", *TINY, *RUN, *extra]


def _failing_step(after: int, error):
    real, calls = T.step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after:
            if error == "nan":
                return torch.tensor(float("nan")), {"ce": torch.tensor(float("nan"))}
            raise error
        return real(*args, **kwargs)
    return step


def _fit_numbers(summary):
    ev = summary["eval_tag"]
    pick = lambda r: (r["val_acc"], r["test_acc"], r["best_epochs"],
                      [[h["train_total"] for h in run] for run in r["history"]])
    return pick(ev["modes"]["1"]), pick(ev["baseline"])


def test_interrupted_run_resumes_to_the_same_result(dataset, tmp_path, monkeypatch):
    _, _, whole = run(dataset, tmp_path / "a", *RUN)
    # 120 train samples / batch 32 = 4 steps an epoch: mode 1 (12 steps), then the baseline dies at epoch 2, step 2
    monkeypatch.setattr(T, "step", _failing_step(12 + 4 + 2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        M.main(_args(dataset, tmp_path / "b"))
    monkeypatch.undo()
    (rd,) = (tmp_path / "b").glob("mnist_*")
    assert (rd / "fits" / "mode1_run0.json").is_file() and not (rd / "fits" / "baseline_run0.json").exists()
    assert torch.load(rd / "checkpoint" / "train_baseline_run0.pth", weights_only=False)["epoch"] == 1
    M.main(_args(dataset, tmp_path / "b", "--resume"))
    log = (rd / "log" / "console.log").read_text()
    assert "mode1/run0: finished before the resume" in log and "baseline/run0: resumed from" in log
    resumed = json.loads((rd / "summary.json").read_text())
    assert _fit_numbers(resumed) == _fit_numbers(whole)
    # the saliency was computed before the interruption: its time is the one measured then, not 0
    from mnist.experiment import tag_seconds
    measured = tag_seconds(rd / "saliency_teacher_place1.npz")
    assert measured is not None and measured > 0 and resumed["cal_tag"]["saliency_seconds"] == measured
    csv = (rd / "baseline_run0_log.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("epoch,")  # header + the 3 epochs, none twice


def test_resume_refuses_a_changed_config(dataset, tmp_path):
    rd, _, _ = run(dataset, tmp_path, *RUN, "--set", "train.epochs=1")
    with pytest.raises(ConfigError, match=r"train.lr \(0.001 -> 0.5\)"):
        M.main(_args(dataset, tmp_path, "--set", "train.epochs=1", "--lr", "0.5", "--resume", str(rd)))
    with pytest.raises(ConfigError, match="give no action flags"):
        M.main(_args(dataset, tmp_path, "--set", "train.epochs=1", "--base_line", "--resume", str(rd)))


def test_nonfinite_loss_stops_with_the_last_checkpoint_intact(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "step", _failing_step(4 + 1, "nan"))  # epoch 2, step 1 of the first fit
    with pytest.raises(NonFiniteLoss, match=r"mode1/run0: non-finite loss at epoch 2, step 1: term 'ce' = nan"):
        M.main(_args(dataset, tmp_path))
    (rd,) = tmp_path.glob("mnist_*")
    assert torch.load(rd / "checkpoint" / "train_mode1_run0.pth", weights_only=False)["epoch"] == 1
    assert "nan" not in (rd / "summary.json").read_text().lower()


def test_baseline_and_student_see_the_same_batches(dataset, tmp_path, monkeypatch):
    seen = []
    real = T.step

    def record(student, teacher, objective, optimizer, batch, key, teacher_key):
        seen.append((teacher is not None, batch["index"].tolist(), float(batch["student"].sum())))
        return real(student, teacher, objective, optimizer, batch, key, teacher_key)
    monkeypatch.setattr(T, "step", record)
    rd, _, summary = run(dataset, tmp_path, *RUN, "--set", "train.epochs=2")
    kd = [(i, x) for t, i, x in seen if t]
    ce = [(i, x) for t, i, x in seen if not t]
    assert len(kd) == len(ce) == 8 and kd == ce and kd[0][0] != kd[4][0]  # same order, new shuffle per epoch
    # the NTD advisor's files: teacher (unmodified and per mode) and the CE-only probe, rows aligned on val
    t, t1, p = ntd.load_logits(rd, "teacher"), ntd.load_logits(rd, "teacher", "mode1"), ntd.load_logits(rd, "probe")
    assert t.logits.shape == p.logits.shape == (summary["sizes"]["val"], 10)
    np.testing.assert_array_equal(t.labels, p.labels)
    assert not np.allclose(t.logits, t1.logits)


def test_independent_teacher(dataset, tmp_path):
    rd, res, summary = run(dataset, tmp_path, *RUN, "--set", "teacher=independent", "--set", "eval.baseline=false")
    assert res["cal_tag"]["teacher_kind"] == "independent" and res["eval_tag"]["teacher_kind"] == "independent"
    assert res["eval_tag"]["teacher"].endswith("teacher_independent.pth")
    assert (rd / "saliency_independent_place1.npz").is_file() and (rd / "fits" / "teacher_independent.json").is_file()
    fit = json.loads((rd / "fits" / "teacher_independent.json").read_text())
    assert set(fit["history"][0]) >= {"train_ce", "val_acc"} and "train_kl" not in fit["history"][0]
    assert "baseline" not in res["eval_tag"]


def test_omega_statistics_reach_the_summary(dataset, tmp_path):
    _, res, summary = run(dataset, tmp_path, *RUN, "--set", "train.epochs=1", "--distill", "kl", "--mask", "omega",
                          "--set", "eval.baseline=false")
    (omega,) = summary["eval_tag"]["modes"]["1"]["omega"]
    assert 0 <= omega["omega_mean"] <= 1 and 0 <= omega["omega_masked_share"] <= 1
    assert len(omega["omega_per_epoch"]) == 1


def test_standin_runs_say_smoke_test_only(tmp_path):
    args = M.parse_args(["--out", str(tmp_path), "--device", "cpu", "--base_line", "--set", "data.source=standin",
                         *TINY, "--set", "train.epochs=1", "--set", "model.hidden=[8,8]"])
    cfg, actions = M.resolve_config(args)
    rd, results = M.run(cfg, actions, args.out, "cpu")
    assert json.loads((rd.path / "summary.json").read_text())["data_note"] == "stand-in: smoke test only"
    assert "smoke test only" in (rd.path / "log" / "console.log").read_text()


def test_interrupted_joint_training_resumes_to_the_same_result(dataset, tmp_path, monkeypatch):
    """Algorithm 1's step 1 keeps its own training state (both nets, the optimiser, the shuffle and noise
    generators, the RNGs, the loss history) every epoch: a run killed mid-way through it resumes to the same
    joint loss history, saliency and students as the uninterrupted run."""
    import common.saliency.joint as J
    joint = ["--set", "cal.epochs=3"]
    _, _, whole = run(dataset, tmp_path / "a", *RUN, *joint)
    real, calls = J.agreement, {"n": 0, "die_at": 4 + 3}   # 4 steps an epoch: dies at epoch 2, step 3

    def agreement(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt()
        return real(*args, **kwargs)
    monkeypatch.setattr(J, "agreement", agreement)
    with pytest.raises(KeyboardInterrupt):
        M.main(_args(dataset, tmp_path / "b", *joint))
    monkeypatch.undo()
    (rd,) = (tmp_path / "b").glob("mnist_*")
    state = torch.load(rd / "checkpoint" / "joint_state.pth", weights_only=False)
    assert state["epoch"] == 1 and len(state["extra"]["history"]) == 1
    assert not (rd / "checkpoint" / "teacher_overlap.pth").exists()
    calls.update(n=0, die_at=None)   # counts the steps of the resumed run, never raises
    monkeypatch.setattr(J, "agreement", agreement)
    M.main(_args(dataset, tmp_path / "b", *joint, "--resume"))
    assert calls["n"] == 2 * 4   # only epochs 2 and 3 were trained again
    assert "joint training: resuming after epoch 1 of 3" in (rd / "log" / "console.log").read_text()
    resumed = json.loads((rd / "summary.json").read_text())
    assert resumed["cal_tag"]["history"] == whole["cal_tag"]["history"] and len(whole["cal_tag"]["history"]) == 3
    assert resumed["cal_tag"]["teacher_acc"] == whole["cal_tag"]["teacher_acc"]
    assert _fit_numbers(resumed) == _fit_numbers(whole)
