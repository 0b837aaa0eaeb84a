import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.nyu_ssc.ssc_testutil import SSC, set_args
from nyu_ssc import main as ssc_main
from nyu_ssc import test as ssc_test


def _run_dirs(out: Path, prefix: str):
    return sorted(p for p in out.iterdir() if p.name.startswith(prefix) and p.is_dir())


def test_demo_train_resume_and_test(tmp_path):
    out = tmp_path / "runs"
    ssc_main.main(["--demo", "--out", str(out), "--device", "cpu", *set_args()])
    (run,) = _run_dirs(out, "nyu_ssc_")
    summary = json.loads((run / "summary.json").read_text())
    res = summary["results"]["ddrnet"]
    for agg in ("dataset", "per_sample"):
        assert 0 <= res[agg]["miou"] <= 1 and 0 <= res[agg]["ssc_iou"] <= 1
    assert summary["headline"] == "dataset"
    for name in ("slices_ddrnet.png", "val_miou.png", "results.csv", "history_ddrnet.csv", "log/console.log"):
        assert (run / name).is_file(), name
    assert (run / "checkpoint" / "cp_ddrnet.pth").is_file() and (run / "checkpoint" / "cpBest_ddrnet.pth").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    # resume: the same run continues with epoch 2 only (the LR was stepped once per epoch: StepLR step 2 in the demo)
    ssc_main.main(["--resume", str(run), "--device", "cpu", "--epochs", "2"])
    hist = json.loads((run / "summary.json").read_text())["history"]["ddrnet"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert "resumed from" in (run / "log" / "console.log").read_text()
    # test.py on the best checkpoint: the same demo validation scenes give the same numbers
    res_t = ssc_test.main(["--demo", "--resume", str(run / "checkpoint" / "cpBest_ddrnet.pth"), "--out", str(out),
                           "--device", "cpu", *set_args()])
    best = json.loads((run / "summary.json").read_text())["results"]["ddrnet"]
    assert np.isclose(res_t["dataset"]["miou"], best["dataset"]["miou"])
    assert np.isclose(res_t["per_sample"]["ssc_iou"], best["per_sample"]["ssc_iou"])


def test_kd_teacher_distils_into_depth_student(tmp_path):
    out = tmp_path / "runs"
    _, summary = ssc_main.run(_kd_cfg(), out, "cpu")
    res = summary["results"]
    assert set(res) == {"teacher", "student"}
    run = _run_dirs(out, "nyu_ssc_")[0]
    log = (run / "log" / "console.log").read_text()
    assert "KD from SSCDDRNet (kl, mask omega, region labelled)" in log
    hist = summary["history"]["student"][0]
    assert hist["kd_kl"] > 0 and hist["ce"] > 0
    # a loaded teacher checkpoint instead of training one, with the dense region and an unmasked DKD term
    cfg = _kd_cfg()
    cfg["kd"].update(teacher_checkpoint=str(run / "checkpoint" / "cpBest_teacher.pth"), baseline=False, region="all")
    cfg["kd"]["loss"] = {"terms": {"dkd": {"weight": 0.5, "alpha": 1.0, "beta": 2.0, "temperature": 2.0}},
                         "mask": "none", "omega": {"threshold": 0.996, "space": "logits"}}
    _, s2 = ssc_main.run(cfg, tmp_path / "runs2", "cpu")
    assert set(s2["results"]) == {"student"} and s2["history"]["student"][0]["kd_dkd"] > 0


def _kd_cfg():
    args = ssc_main.parse_args(["--demo", "--kd", *set_args(), "--set", "train.max_steps_per_epoch=1",
                                "--set", "kd.baseline=false", "--set", "eval.viz_samples=0"])
    return ssc_main.resolve_config(args)


def test_bad_config_is_one_line_error(tmp_path, capsys):
    from common.run import cli
    with pytest.raises(SystemExit) as e:
        cli(lambda: ssc_main.main(["--set", "grid.lr=[10,6,11]", "--out", str(tmp_path)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: grid:") and "\n" not in err
    with pytest.raises(SystemExit):
        cli(lambda: ssc_main.main(["--set", "data.root=nowhere", "--out", str(tmp_path)]))
    err = capsys.readouterr().err.strip()
    assert "nowhere/NYUtrain_npz: dataset folder not found" in err


FAKE_PY = """#!/usr/bin/env bash
# records where and how the scripts call python, one argument per line
{ pwd; for a in "$@"; do echo "$a"; done; } > "$RECORD"
echo "Validate with TSDF: recorded"
"""


def test_seed_shell_scripts_call_main_and_test(tmp_path):
    """The seed's `bash run_SSC_train.sh` / `bash run_SSC_test.sh`: from any directory they run main.py / test.py
    in the experiment folder with the seed's flags plus the caller's ("$@"); env vars override. The recorded
    command lines must parse and resolve (main.py and test.py run end to end in test_demo_train_resume_and_test)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "RECORD": str(tmp_path / "train.txt"), "EPOCHS": "2",
           "LOG": str(tmp_path / "train.log")}
    r = subprocess.run(["bash", str(SSC / "run_SSC_train.sh"), "--demo", "--set", "progress=false"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cwd, script, *argv = (tmp_path / "train.txt").read_text().splitlines()
    assert Path(cwd).resolve() == SSC and script == "./main.py"
    assert argv[:3] == ["--model=ddrnet", "--dataset=nyu", "--epochs=2"] and argv[-3:] == ["--demo", "--set", "progress=false"]
    cfg = ssc_main.resolve_config(ssc_main.parse_args(argv))
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["lr_adj_n"] == 1 and cfg["name"] == "SSC_DDRNet"
    assert cfg["data"]["dataset"] == "demo" and cfg["train"]["batch_size"] == 4
    assert "recorded" in (tmp_path / "train.log").read_text()
    # test: no checkpoint anywhere → a one-line error, exit 2; with RESUME it calls test.py
    env.update(RECORD=str(tmp_path / "test.txt"), LOG=str(tmp_path / "test.log"))
    r = subprocess.run(["bash", str(SSC / "run_SSC_test.sh")], env={**env, "RESUME": ""}, capture_output=True,
                       text=True, timeout=60)
    if not list((SSC / "runs").glob("*/checkpoint/cpBest_*.pth")):
        assert r.returncode == 2 and r.stderr.startswith("error: no checkpoint")
    r = subprocess.run(["bash", str(SSC / "run_SSC_test.sh"), "--demo"], env={**env, "RESUME": "x/cpBest_ddrnet.pth"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cwd, script, *argv = (tmp_path / "test.txt").read_text().splitlines()
    assert Path(cwd).resolve() == SSC and script == "./test.py"
    assert argv == ["--model=ddrnet", "--dataset=nyu", "--batch_size=4", "--resume=x/cpBest_ddrnet.pth", "--demo"]
    args = ssc_test.parse_args(argv)
    assert args.resume == "x/cpBest_ddrnet.pth" and args.batch_size == 4


@pytest.mark.parametrize("model", ["aicnet", "grfnet", "palnet", "ddrnet_rgb"])
def test_every_model_runs_through_main(tmp_path, model):
    """The reference crashes for aicnet / grfnet (no x_rgb) and palnet needs the TSDF: all run here."""
    parity = ["--parity"] if model == "grfnet" else []          # the reference behaviours run as well
    ssc_main.main(["--demo", "--model", model, "--out", str(tmp_path), "--device", "cpu", *set_args(),
                   "--set", "train.max_steps_per_epoch=1", "--set", "eval.viz_samples=0", *parity])
    (run,) = _run_dirs(tmp_path, "nyu_ssc_")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["headline"] == ("per_sample" if parity else "dataset")
    assert list(summary["results"]) == [model] and (run / "checkpoint" / f"cpBest_{model}.pth").is_file()
