import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import ddp
from common.config import ConfigError
from common.run import cli
from semantic_kitti import main as sk_main
from semantic_kitti.option import Option

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "semantic_kitti" / "main.py"
DEMO_YAML = ROOT / "semantic_kitti" / "configs" / "demo.yaml"


def tiny(root, *extra, demo=True):
    """Flags for a seconds-long demo run: 2 train frames, 2 val frames, 32×64 crops, tiny networks, 1 iteration.
    demo=True: --demo (writes the synthetic sequence under root/data first); False: the same configs/demo.yaml
    through --config, reusing the sequence already written there."""
    sets = [f"save_path={root / 'exp'}", f"data_root={root / 'data' / 'sequences'}",
            "demo.frames={train: 2, val: 2}", "demo.image_size=[32, 96]", "demo.beams=16", "demo.azimuths=360",
            "data.train_crop=[32, 64]", "data.val_size=[32, 64]", "batch_size=[1, 1]", "iters_per_epoch=1",
            "n_epochs=1", "student.base_channels=8", "teacher.image_backbone=resnet18", *extra]
    return (["--demo"] if demo else ["--config", str(DEMO_YAML)]) + [f"--set={s}" for s in sets]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One end-to-end --demo run (synthetic sequence written, teacher, then distilled student), shared by the tests
    of this module: its data tree and teacher checkpoint are reused instead of generated / trained again."""
    root = tmp_path_factory.mktemp("sk_demo")
    return root, sk_main.main(tiny(root, "train.warmup_epochs=0"))


def test_demo_teacher_then_student_with_kd_and_resume(demo_run):
    root, out = demo_run
    assert sorted(p.name for p in (root / "data" / "sequences").iterdir()) == ["00", "08"]
    t, s = out["teacher"], out["student"]
    tdir, sdir = Path(t["experiment_dir"]), Path(s["experiment_dir"])
    assert tdir.name == "log_SemanticKitti_CameraNet-resnet18_bs1-lr0.02_demo"
    assert sdir.name == "log_SemanticKitti_LidarNet-b8_bs1-lr0.01_demo"
    for d in (tdir, sdir):
        for name in ("checkpoint/checkpoint.pth", "checkpoint/best_IOU_model.pth", "checkpoint/best_Precision_model.pth",
                     "checkpoint/best_Recall_model.pth", "log/console.log", "log/config.yaml", "code/main.py",
                     "code/run.sh", "summary.json"):
            assert (d / name).is_file(), name
        assert list(d.glob("events.out.tfevents.*"))
    row = s["history"][0]
    assert row["train_LossKD"] > 0 and row["val_LossKD"] > 0  # the student receives the distillation
    assert 0 <= s["last_val"]["IOU"] <= 1 and s["last_val"]["pixels"] > 0
    assert "Val E[1|1]" in (sdir / "log" / "console.log").read_text()
    # resume the student for a second epoch (on the same data tree): model, optimiser, scheduler and epoch come back
    again = sk_main.main(tiny(root, "stage=student", "n_epochs=2", f"checkpoint={sdir / 'checkpoint' / 'checkpoint.pth'}",
                              f"teacher_checkpoint={t['best_checkpoint']}", demo=False))["student"]
    assert Path(again["experiment_dir"]) == sdir
    assert [r["epoch"] for r in again["history"]] == [1, 2]
    assert "resumed from" in (sdir / "log" / "console.log").read_text()


def test_option_validation():
    cfg = sk_main.resolve_config(sk_main.parse_args([]))
    Option(cfg)
    for key, value, needle in [("data", {**cfg["data"], "train_crop": [250, 1024]}, "divisible by 16"),
                               ("kd", {**cfg["kd"], "kd_loss": "rkd"}, "not a per-pixel"),
                               ("gpu", "0,0", "distinct"), ("stage", "students", "stage: expected")]:
        with pytest.raises(ConfigError, match=needle):
            Option({**cfg, key: value})


def test_cli_and_run_sh_refuse_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(lambda: sk_main.main(["--set", "kd.kd_wieght=1", "--out", str(tmp_path)]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown key 'kd.kd_wieght'" in err and err.strip().count("\n") == 0
    # the server YAML lists GPUs 0,1: with none visible run.sh refuses (one interpreter start, no training)
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "semantic_kitti" / "run.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert 'gpu list is "0,1"' in proc.stderr and "no GPU is available" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_torchrun_two_processes_gloo(demo_run, tmp_path):
    """One real 2-process torchrun / gloo training step per stage on the demo data, with an all-reduced metric."""
    root, _ = demo_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = tiny(root, "gpu=cpu", f"save_path={tmp_path / 'exp'}", demo=False)  # the module's data tree, own outputs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={ddp.free_port()}",
           str(MAIN), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dirs = sorted((tmp_path / "exp").glob("log_*"))
    assert [d.name for d in dirs] == ["log_SemanticKitti_CameraNet-resnet18_bs2-lr0.02_demo",
                                      "log_SemanticKitti_LidarNet-b8_bs2-lr0.01_demo"]  # bs = 1 per rank × 2 ranks
    for d in dirs:
        s = json.loads((d / "summary.json").read_text())
        assert s["world_size"] == 2
        v = s["last_val"]
        # each rank evaluated its own val frame; the all-reduced confusion matrix holds both ranks' pixels
        assert len(v["pixels_per_rank"]) == 2 and min(v["pixels_per_rank"]) > 0
        assert v["pixels"] == sum(v["pixels_per_rank"]) == sum(map(sum, v["confusion"]))
    assert s["history"][0]["train_LossKD"] > 0
