"""ravdess/trainer.py: resume after an interruption, the non-finite guard, the independent teacher, and the parity
switches of steps 1-3."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import ConfigError
from common.divergence import full_js, nontarget_js
from common.run import RunDir, cli, load_checkpoint
from common.train import Checkpoint
from ravdess import data as D
from ravdess import experiment as X
from ravdess import main as M
from ravdess import models
from ravdess import trainer as T


def _args(features, cfg_file, out, *extra):
    return ["--config", str(cfg_file), "--data", str(features[0]), "--out", str(out), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def alg1(features, cfg_file, tmp_path_factory):
    """One step-1 checkpoint for the step-3 tests."""
    out = tmp_path_factory.mktemp("alg1")
    return M.main(_args(features, cfg_file, out, "--first_time", "--cal_tag"))["cal"]["checkpoint"]


def _step3(features, cfg_file, out, alg1, *extra):
    return _args(features, cfg_file, out, "--eval_tag", "--checkpoint", str(alg1), "--set", "eval.epochs=3", *extra)


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_result(features, cfg_file, alg1, tmp_path,
                                                                           monkeypatch):
    whole = M.main(_step3(features, cfg_file, tmp_path / "a", alg1))
    calls, real_step = [], T.step

    def failing_step(*a, **k):  # one batch per epoch here: call 5 is mode 1's second epoch (baseline: calls 1-3)
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected interruption")
        return real_step(*a, **k)

    monkeypatch.setattr(T, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        M.main(_step3(features, cfg_file, tmp_path / "b", alg1))
    run = next((tmp_path / "b").glob("ravdess_eval_mode1_*"))
    assert load_checkpoint(run / "checkpoint" / "mode1_run0.pth")["epoch"] == 1
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(T, "step", real_step)
    resumed = M.main(_step3(features, cfg_file, tmp_path / "b", alg1, "--resume"))
    assert Path(resumed["run_dir"]) == run
    log = (run / "log" / "console.log").read_text()
    assert "baseline_run0: finished earlier" in log and "mode1_run0: resuming after epoch 1" in log
    a, b = whole["modes"][0], resumed["modes"][0]
    assert (a["val_acc"], a["test_acc"], a["best_epoch"]) == (b["val_acc"], b["test_acc"], b["best_epoch"])
    hist_a = json.loads((Path(whole["run_dir"]) / "summary.json").read_text())["modes"][0]
    hist_b = json.loads((run / "summary.json").read_text())["modes"][0]
    assert hist_a["val_acc"] == hist_b["val_acc"] and whole["baseline"]["test_acc"] == resumed["baseline"]["test_acc"]
    rows = (run / "mode1_run0_log.csv").read_text().splitlines()
    assert len(rows) == 4 and rows == (Path(whole["run_dir"]) / "mode1_run0_log.csv").read_text().splitlines()
    # a resume that changes what the run is, is refused naming the key
    with pytest.raises(ConfigError, match=r"kd.distill \('kl' -> 'dkd'\)"):
        M.main(_step3(features, cfg_file, tmp_path / "b", alg1, "--resume", str(run), "--distill", "dkd"))


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(features, cfg_file, alg1, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(lambda: M.main(_step3(features, cfg_file, tmp_path, alg1, "--set", "eval.lr=1e30",
                                  "--set", "eval.baseline=false")))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("error: mode1_run0: non-finite loss at epoch ") and re.search(r"term '\w+' = (nan|inf)", err)
    run = next(tmp_path.glob("ravdess_eval_mode1_*"))
    assert not (run / "summary.json").exists()
    epoch = int(err.split("epoch ")[1].split(",")[0])
    if epoch > 1:
        assert load_checkpoint(run / "checkpoint" / "mode1_run0.pth")["epoch"] == epoch - 1


def test_independent_teacher_does_not_see_the_student(features, cfg):
    train = D.AudioImageDataset(features[0], cfg, "train")
    rd = RunDir(features[0].parent / "unused", enabled=False)

    def teacher_after(kind, student_seed):
        torch.manual_seed(0)
        teacher, _ = models.build(cfg)
        torch.manual_seed(student_seed)
        _, student = models.build(cfg)
        c = {**cfg, "teacher": kind, "tag": {**cfg["tag"], "epochs": 2}}
        T.joint_fit(teacher, student, train, cfg=c, device="cpu", rd=rd, tag=f"t{kind}{student_seed}")
        return torch.cat([p.flatten() for p in teacher.parameters()])

    assert torch.equal(teacher_after("independent", 1), teacher_after("independent", 2))
    assert not torch.equal(teacher_after("joint", 1), teacher_after("joint", 2))


def test_parity_saliency_from_the_last_batch_only(features, cfg):
    loader = D.make_loader(D.AudioImageDataset(features[0], cfg, "val"), 3, False, 0, "cpu")  # 4 clips: 3 + 1
    every = X.saliency_batches(loader, "cpu", last_only=False)
    last = X.saliency_batches(loader, "cpu", last_only=True)
    assert [b[0].shape[0] for b in every] == [3, 1] and len(last) == 1
    assert all(torch.equal(u, v) for u, v in zip(last[0], every[-1]))


def test_parity_reversed_js_for_the_tag_distance_and_the_js_term(cfg):
    torch.manual_seed(0)
    zs, zt, y = torch.randn(6, 8), torch.randn(6, 8), torch.randint(0, 8, (6,))
    par = {**cfg, "parity": True, "tag": {**cfg["tag"], "distance": "ncjsd"}}
    assert T.tag_variant(cfg) == "textbook" and T.tag_variant(par) == "reference"
    reference = nontarget_js(zs, zt, y, "reference", dim=1).mean()
    assert not torch.isclose(reference, nontarget_js(zs, zt, y, "textbook", dim=1).mean())
    teacher, student = torch.nn.Linear(2, 8), torch.nn.Linear(2, 8)
    teacher.forward = lambda x: zt  # the step sees these logits
    student.forward = lambda x: zs
    batch = {"audio": torch.zeros(6, 2), "image": torch.zeros(6, 2), "label": y}
    _, parts = T.joint_step(teacher, student, batch, "ncjsd", T.tag_variant(par))
    torch.testing.assert_close(parts["ncjsd"], reference)
    js = {**cfg["kd"], "distill": "js"}
    term = X.objective_for({**cfg, "kd": js, "parity": True}, 6, y, "js").terms["js"]
    assert term.variant == "reference"
    assert X.objective_for({**cfg, "kd": js}, 6, y, "js").terms["js"].variant == "textbook"


@pytest.mark.parametrize("distance", ["mse", "ncjsd", "js"])
def test_joint_step_agreement_term_per_distance(distance):
    """Each tag.distance adds its own agreement term to CE + CE (js: the full-distribution JS); none adds nothing."""
    torch.manual_seed(1)
    zs, zt, y = torch.randn(5, 8), torch.randn(5, 8), torch.randint(0, 8, (5,))
    teacher, student = torch.nn.Linear(2, 8), torch.nn.Linear(2, 8)
    teacher.forward, student.forward = (lambda x: zt), (lambda x: zs)
    batch = {"audio": torch.zeros(5, 2), "image": torch.zeros(5, 2), "label": y}
    total, parts = T.joint_step(teacher, student, batch, distance, "textbook")
    expected = {"mse": lambda: F.mse_loss(zt, zs), "ncjsd": lambda: nontarget_js(zs, zt, y, dim=1).mean(),
                "js": lambda: full_js(zs, zt, dim=1).mean()}[distance]()
    torch.testing.assert_close(parts[distance], expected)
    torch.testing.assert_close(total, F.cross_entropy(zt, y) + F.cross_entropy(zs, y) + expected)
    assert set(T.joint_step(teacher, student, batch, None, "textbook")[1]) == {"ce_audio", "ce_image"}


def test_parity_rkd_without_the_added_kl(cfg):
    y = torch.arange(8)
    assert set(X.objective_for(cfg, 8, y, "rkd").terms) == {"ce", "rkd", "kl"}
    assert set(X.objective_for({**cfg, "parity": True}, 8, y, "rkd").terms) == {"ce", "rkd"}
    assert set(X.objective_for({**cfg, "parity": True}, 8, y, "pkt").terms) == {"ce", "pkt", "kl"}


def test_mfh_default_reduction_and_the_ntdh_preset():
    cfg = M.resolve_config(M.parse_args([]))
    assert cfg["kd"]["methods"]["kl"]["kl"]["reduction"] == "mean" and cfg["kd"]["distill"] == "kl"
    ntdh = M.resolve_config(M.parse_args(["--config", str(M.HERE / "configs" / "ntdh.yaml")]))
    assert (ntdh["tag"]["epochs"], ntdh["eval"]["epochs"], ntdh["data"]["batch_size2"]) == (40, 40, 256)
    assert (ntdh["eval"]["mode"], ntdh["eval"]["fill"], ntdh["kd"]["distill"]) == (0, "zero", "hint")
    assert ntdh["kd"]["methods"]["hint"]["kl"]["reduction"] == "batchmean"


def test_step1_interrupted_resumes_to_the_same_nets(features, cfg, tmp_path):
    train = D.AudioImageDataset(features[0], cfg, "train")
    c = {**cfg, "tag": {**cfg["tag"], "epochs": 3}, "data": {**cfg["data"], "batch_size": 2}}  # 2 steps per epoch

    def nets():
        torch.manual_seed(0)
        return models.build(c)

    def stop(epoch, step):  # mid-epoch: the half epoch done is lost, the checkpoint of epoch 1 is used
        if (epoch, step) == (2, 2):
            raise RuntimeError("injected interruption")

    whole_t, whole_s = nets()
    whole = T.joint_fit(whole_t, whole_s, train, cfg=c, device="cpu", rd=RunDir.create(tmp_path, "a"))
    rd = RunDir.create(tmp_path, "b")
    with pytest.raises(RuntimeError, match="injected"):
        T.joint_fit(*nets(), train, cfg=c, device="cpu", rd=rd, on_step=stop)
    assert Checkpoint(rd.checkpoint_dir / "joint.pth").exists()
    assert load_checkpoint(rd.checkpoint_dir / "joint.pth")["epoch"] == 1
    teacher, student = nets()
    resumed = T.joint_fit(teacher, student, train, cfg=c, device="cpu", rd=rd)
    assert resumed == whole and len(whole) == 3
    for a, b in ((whole_t, teacher), (whole_s, student)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_run_being_written_cannot_be_resumed_by_a_second_process(tmp_path):
    from common.config import DataError
    args = M.parse_args(["--eval_tag", "--out", str(tmp_path)])
    cfg = M.resolve_config(args)
    first = M.open_run(cfg, args, tmp_path)
    try:
        again = M.parse_args(["--eval_tag", "--out", str(tmp_path), "--resume", str(first.path)])
        with pytest.raises(DataError, match="in use by another process"):
            M.open_run(cfg, again, tmp_path)
        other = M.parse_args(["--cal_tag", "--out", str(tmp_path), "--resume", str(first.path)])
        with pytest.raises(ConfigError, match="was not started by this command"):
            M.open_run(cfg, other, tmp_path)
    finally:
        first.close()
    M.open_run(cfg, again, tmp_path).close()  # free again once the first has finished


def test_step3_refuses_a_step1_run_of_the_other_teacher_kind(features, cfg_file, alg1, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(lambda: M.main(_step3(features, cfg_file, tmp_path, alg1, "--teacher", "independent")))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "holds a joint teacher, the config asks for 'independent'" in err
    assert not list(tmp_path.iterdir())  # refused before a run directory was made
