import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from common.run import cli
from nyu_ssc import engine, trainer
from nyu_ssc import main as ssc_main
from nyu_ssc import test as ssc_test
from tests.nyu_ssc.ssc_testutil import SSC, set_args


def _run_dirs(out: Path, prefix: str = "nyu_ssc_"):
    return sorted(p for p in out.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _err(capsys, fn) -> str:
    with pytest.raises(SystemExit) as e:
        cli(fn)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_demo_selects_on_val_tests_once_and_test_py_agrees(tmp_path, monkeypatch):
    """Selection on held-out training scenes, the test split evaluated once per model, both reported."""
    calls = []
    real = engine.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda m, loader, *a, **k: calls.append(loader.dataset) or
                        real(m, loader, *a, **k))
    out = tmp_path / "runs"
    ssc_main.main(["--demo", "--out", str(out), "--device", "cpu", *set_args(), "--set", "train.epochs=2"])
    (run,) = _run_dirs(out)
    summary = json.loads((run / "summary.json").read_text())
    res = summary["results"]["ddrnet"]
    for split in ("val", "test"):
        for agg in ("dataset", "per_sample"):
            assert 0 <= res[split][agg]["miou"] <= 1 and 0 <= res[split][agg]["sc_iou"] <= 1
    assert summary["selection"].startswith("best val miou")
    test_set = [d for d in calls if isinstance(d, engine.data.SSCNpz)]
    assert len(test_set) == 1 and test_set[0].files[0].parent.name == "test"    # test: once, at the end
    assert len(calls) == 4                                                       # val × 2 epochs, best val, test
    val = calls[0]                                                               # 1 of the 3 training scenes
    assert val.dataset.files[0].parent.name == "train" and len(val.indices) == 1
    hist = list(np.genfromtxt(run / "ddrnet_log.csv", delimiter=",", names=True)["epoch"])
    assert hist == [1, 2] and res["best_epoch"] in (1, 2)
    for name in ("slices_ddrnet.png", "val_miou.png", "results.csv", "log/console.log"):
        assert (run / name).is_file(), name
    res_t = ssc_test.main(["--demo", "--resume", str(run / "checkpoint" / "cpBest_ddrnet.pth"), "--out", str(out),
                           "--device", "cpu", *set_args()])
    assert np.isclose(res_t["dataset"]["miou"], res["test"]["dataset"]["miou"])


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch, capsys):
    """A run killed in epoch 2 (after the epoch-1 checkpoint) continues with --resume and ends exactly as an
    uninterrupted run; resuming with another model is refused naming the key; a locked run cannot be resumed."""
    args = ["--demo", "--device", "cpu", *set_args(), "--set", "train.epochs=3", "--set", "eval.viz_samples=0"]
    ssc_main.main([*args, "--out", str(tmp_path / "a")])
    (ref,) = _run_dirs(tmp_path / "a")
    real, n = trainer.step, {"calls": 0}

    def dying_step(*a, **k):
        n["calls"] += 1
        if n["calls"] == 2:                 # 1 step per epoch (2 train scenes, batch 2): epoch 2
            raise Interrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "step", dying_step)
    with pytest.raises(Interrupt):
        ssc_main.main([*args, "--out", str(tmp_path / "b")])
    monkeypatch.setattr(trainer, "step", real)
    (run,) = _run_dirs(tmp_path / "b")
    assert torch.load(run / "checkpoint" / "state_ddrnet.pth", weights_only=False)["epoch"] == 1
    err = _err(capsys, lambda: ssc_main.main(["--resume", str(run), "--model", "palnet", "--device", "cpu"]))
    assert "model.name ('ddrnet' -> 'palnet')" in err
    from common.run import RunDir
    holder = RunDir.open(run).lock()
    assert "in use" in _err(capsys, lambda: ssc_main.main(["--resume", str(run), "--device", "cpu"]))
    holder.close()
    ssc_main.main(["--resume", "--out", str(tmp_path / "b"), "--device", "cpu"])      # the newest run
    assert "resumed from" in (run / "log" / "console.log").read_text()
    a, b = (json.loads((r / "summary.json").read_text())["results"]["ddrnet"] for r in (ref, run))
    assert a["test"] == b["test"] and a["val"] == b["val"] and a["best_epoch"] == b["best_epoch"]
    wa = torch.load(ref / "checkpoint" / "cpBest_ddrnet.pth")["model"]
    wb = torch.load(run / "checkpoint" / "cpBest_ddrnet.pth")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _kd_args(*extra):
    return ["--demo", "--kd", *set_args(), "--set", "eval.viz_samples=0", *extra]


def test_kd_baseline_and_student_share_batches_omega_stats_and_ntd_logits(tmp_path):
    """With the KD term weighted 0 the student IS the baseline (same init, same batches in the same order); the
    ω statistics reach summary.json; teacher and baseline logits go to ntd/ for the NTD advisor."""
    cfg = ssc_main.resolve_config(ssc_main.parse_args(_kd_args("--set", "kd.loss.terms.kl.weight=0",
                                                               "--set", "train.epochs=2")))
    _, summary = ssc_main.run(cfg, tmp_path, "cpu")
    res = summary["results"]
    assert set(res) == {"teacher", "baseline", "student"}
    assert res["student"]["test"] == res["baseline"]["test"] and res["student"]["val"] == res["baseline"]["val"]
    assert 0 < res["student"]["omega_masked_share"] <= 1 and 0 <= res["student"]["omega_mean"] <= 1
    (run,) = _run_dirs(tmp_path)
    for role in ("teacher", "probe"):
        with np.load(run / "ntd" / f"{role}.npz") as z:
            assert z["logits"].shape[1] == 12 and len(z["labels"]) == len(z["logits"]) > 0
            assert set(np.unique(z["labels"])) <= set(range(12))
    log = (run / "student_log.csv").read_text().splitlines()[0]
    assert "train_kd_kl" in log and "omega_masked_share" in log


def test_kd_loaded_teacher_rgb_pair_dense_region_and_mask_ablation(tmp_path):
    """The RGB → depth pair from a loaded teacher checkpoint, the dense region, DKD unmasked, the ω ablation."""
    cfg = ssc_main.resolve_config(ssc_main.parse_args(_kd_args("--teacher", "ddrnet_rgb", "--set",
                                                               "kd.baseline=false", "--set", "kd.ablate_mask=true",
                                                               "--set", "train.max_steps_per_epoch=1")))
    _, s1 = ssc_main.run(cfg, tmp_path / "a", "cpu")
    assert set(s1["results"]) == {"teacher", "student", "student_none"}
    assert "omega_mean" in s1["results"]["student"] and "omega_mean" not in s1["results"]["student_none"]
    (run,) = _run_dirs(tmp_path / "a")
    cfg["kd"].update(teacher_checkpoint=str(run / "checkpoint" / "cpBest_teacher.pth"), region="all",
                     ablate_mask=False)
    cfg["kd"]["loss"] = {"terms": {"dkd": {"weight": 0.5, "alpha": 1.0, "beta": 2.0, "temperature": 2.0}},
                         "mask": "none", "omega": {"threshold": 0.996, "space": "logits"}}
    _, s2 = ssc_main.run(cfg, tmp_path / "b", "cpu")
    assert set(s2["results"]) == {"student"} and s2["history"]["student"][0]["train_kd_dkd"] > 0


@pytest.mark.parametrize("item, key", [
    ("train.batch_size=0", "train.batch_size"), ("kd.loss.terms.kl.temperature=0", "kd.loss.terms.kl.temperature"),
    ("kd.loss.mask=bogus", "kd.loss.mask"), ("train.lr=.nan", "train.lr"), ("train.lr=-1", "train.lr"),
    ("data.workers=-1", "data.workers"), ("eval.every=0", "eval.every"), ("train.epochs=-1", "train.epochs"),
    ("data.val_fraction=1.0", "data.val_fraction"), ("eval.select=ssc_iou", "eval.select"),
    ("kd.loss.terms.foo={weight: 1}", "unknown KD loss 'foo'"), ("kd.loss.terms.kl.bogus=1", "bogus"),
    ("grid.lr=[10,6,11]", "grid")])
def test_bad_config_is_one_line_error(tmp_path, capsys, item, key):
    err = _err(capsys, lambda: ssc_main.main(["--demo", "--set", item, "--out", str(tmp_path)]))
    assert key in err
    assert not list(tmp_path.iterdir())                          # refused before a run directory exists


def test_missing_data_and_non_finite_loss_are_one_line_errors(tmp_path, capsys, monkeypatch):
    err = _err(capsys, lambda: ssc_main.main(["--set", "data.root=nowhere", "--out", str(tmp_path / "x")]))
    assert "nowhere/NYUtrain_npz: dataset folder not found" in err
    real, n = trainer.step, {"calls": 0}

    def nan_step(*a, **k):
        n["calls"] += 1
        loss, parts = real(*a, **k)
        return (loss * float("nan"), {**parts, "ce": parts["ce"] * float("nan")}) if n["calls"] == 2 else (loss, parts)

    monkeypatch.setattr(trainer, "step", nan_step)
    err = _err(capsys, lambda: ssc_main.main(["--demo", "--device", "cpu", *set_args(), "--set", "train.epochs=2",
                                              "--out", str(tmp_path / "y")]))
    assert "ddrnet: non-finite loss at epoch 2, step 1: term 'ce' = nan" in err
    (run,) = _run_dirs(tmp_path / "y")
    assert torch.load(run / "checkpoint" / "state_ddrnet.pth", weights_only=False)["epoch"] == 1
    assert not (run / "summary.json").exists()


def test_lr_warning():
    t = {"lr": 0.01, "lr_adj_n": 1, "lr_adj_rate": 0.1}
    assert "1e-06" in trainer.lr_warning(t, 5, parity=False)     # the reference README's command, now stepped
    assert trainer.lr_warning(t, 5, parity=True) is None         # parity: constant LR
    assert trainer.lr_warning({**t, "lr_adj_n": 20}, 50, parity=False) is None


FAKE_PY = """#!/usr/bin/env bash
# records where and how the scripts call python, one argument per line
{ pwd; for a in "$@"; do echo "$a"; done; } > "$RECORD"
echo "Validate with TSDF: recorded"
"""


def _script(tmp_path, name, env, *args):
    return subprocess.run(["bash", str(SSC / name), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


def test_seed_shell_scripts_call_main_and_test(tmp_path):
    """`bash run_SSC_train.sh` / `bash run_SSC_test.sh` from any directory: main.py / test.py in the experiment
    folder with sensible defaults plus the caller's flags; torchrun with the multi-node settings of the environment."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "RECORD": str(tmp_path / "train.txt"), "LOG": str(tmp_path / "t.log")}
    r = _script(tmp_path, "run_SSC_train.sh", env, "--demo", "--set", "progress=false")
    assert r.returncode == 0, r.stderr
    cwd, script, *argv = (tmp_path / "train.txt").read_text().splitlines()
    assert Path(cwd).resolve() == SSC and script == "./main.py" and argv[-3:] == ["--demo", "--set", "progress=false"]
    cfg = ssc_main.resolve_config(ssc_main.parse_args(argv))
    assert cfg["train"]["epochs"] == 50 and cfg["train"]["lr_adj_n"] == 20 and cfg["name"] == "SSC_DDRNet"
    assert trainer.lr_warning(cfg["train"], 50, False) is None and cfg["data"]["dataset"] == "demo"
    r = _script(tmp_path, "run_SSC_train.sh", {**env, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7",
                                                "MASTER_PORT": "29511"})
    assert r.returncode == 0, r.stderr
    _, *argv = (tmp_path / "train.txt").read_text().splitlines()
    assert argv[:6] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--node_rank=1",
                        "--master_addr=10.0.0.7"] and "--master_port=29511" in argv and "./main.py" in argv
    r = _script(tmp_path, "run_SSC_train.sh", {**env, "NNODES": "4", "NPROC_PER_NODE": "8",
                                                "RDZV_ENDPOINT": "node1:29400"})
    _, *argv = (tmp_path / "train.txt").read_text().splitlines()
    assert "--rdzv_endpoint=node1:29400" in argv and "--rdzv_backend=c10d" in argv and "--nproc_per_node=8" in argv
    env.update(RECORD=str(tmp_path / "test.txt"), LOG=str(tmp_path / "test.log"))
    r = _script(tmp_path, "run_SSC_test.sh", {**env, "RESUME": "x/cpBest_ddrnet.pth"}, "--demo")
    assert r.returncode == 0, r.stderr
    cwd, script, *argv = (tmp_path / "test.txt").read_text().splitlines()
    assert Path(cwd).resolve() == SSC and script == "./test.py"
    assert argv == ["--model=ddrnet", "--dataset=nyu", "--batch_size=4", "--resume=x/cpBest_ddrnet.pth", "--demo"]


@pytest.mark.parametrize("model", ["aicnet", "grfnet", "palnet", "ddrnet_rgb"])
def test_every_model_runs_through_main(tmp_path, model):
    """The reference crashes for aicnet / grfnet (no x_rgb) and palnet needs the TSDF: all run here."""
    parity = ["--parity"] if model == "grfnet" else []          # the reference behaviours run as well
    ssc_main.main(["--demo", "--model", model, "--out", str(tmp_path), "--device", "cpu", *set_args(),
                   "--set", "train.max_steps_per_epoch=1", "--set", "eval.viz_samples=0", *parity])
    (run,) = _run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["headline"] == ("per_sample" if parity else "dataset")
    assert list(summary["results"]) == [model] and (run / "checkpoint" / f"cpBest_{model}.pth").is_file()
