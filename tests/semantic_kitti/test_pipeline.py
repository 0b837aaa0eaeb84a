import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import ddp, ntd
from common.run import cli
from semantic_kitti import main as sk_main
from semantic_kitti import trainer as T

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "semantic_kitti" / "main.py"
RUN_SH = ROOT / "semantic_kitti" / "run.sh"
DEMO_YAML = ROOT / "semantic_kitti" / "configs" / "demo.yaml"


def tiny(root, *extra, demo=True):
    """Flags for a seconds-long demo run: 2 train frames, 2 val frames, 32×64 crops, tiny networks, 1 iteration per
    epoch, 2 epochs validated each. demo=True: --demo (writes the synthetic sequence under root/data first); False:
    the same configs/demo.yaml through --config, reusing the sequence already written there."""
    sets = [f"save_path={root / 'exp'}", f"data_root={root / 'data' / 'sequences'}",
            "demo.frames={train: 2, val: 2}", "demo.image_size=[32, 96]", "demo.beams=16", "demo.azimuths=360",
            "data.train_crop=[32, 64]", "data.val_size=[32, 64]", "batch_size=[1, 1]", "iters_per_epoch=1",
            "n_epochs=2", "val_frequency=1", "student.base_channels=8", "teacher.image_backbone=resnet18",
            "train.warmup_epochs=0", *extra]
    return (["--demo"] if demo else ["--config", str(DEMO_YAML)]) + [f"--set={s}" for s in sets]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One end-to-end --demo run (synthetic sequence written, teacher, then distilled student), shared by the tests
    of this module: its data tree and teacher checkpoint are reused instead of generated / trained again."""
    root = tmp_path_factory.mktemp("sk_demo")
    return root, sk_main.main(tiny(root))


def test_demo_teacher_then_student_best_and_last_omega_and_ntd(demo_run):
    root, out = demo_run
    assert sorted(p.name for p in (root / "data" / "sequences").iterdir()) == [".cmkd-generated", "00", "08"]
    t, s = out["teacher"], out["student"]
    tdir, sdir = Path(t["experiment_dir"]), Path(s["experiment_dir"])
    assert tdir.name == "log_SemanticKitti_CameraNet-resnet18_bs1-lr0.02_demo"
    assert sdir.name == "log_SemanticKitti_LidarNet-b8_bs1-lr0.01_demo"
    for d, role in ((tdir, "teacher"), (sdir, "student")):
        for name in ("checkpoint/training_state.pth", "checkpoint/best_IOU_model.pth", "log/console.log",
                     "log/config.yaml", "code/main.py", "code/run.sh", "summary.json", f"{role}_log.csv"):
            assert (d / name).is_file(), name
        assert list(d.glob("events.out.tfevents.*"))
    # selection on the val sequence: best and last epoch both in the summary and the log
    assert s["best_epoch"] in (1, 2) and s["last"]["epoch"] == 2
    assert s["best"]["IOU"] == pytest.approx(max(r["IOU"] for r in s["val_history"]))
    assert f"Selected (epoch {s['best_epoch']}, best val IOU)" in (sdir / "log" / "console.log").read_text()
    row = s["history"][-1]
    assert row["train_LossKD"] > 0 and row["val_LossKD"] > 0  # the student receives the distillation
    assert 0 <= row["omega_masked_share"] <= 1 and 0 <= s["omega_mean"] <= 1 and len(s["omega_per_epoch"]) == 2
    assert 0 <= s["best"]["IOU"] <= 1 and s["best"]["pixels"] > 0
    # the NTD advisor's teacher logits: one row per labelled val pixel
    z = ntd.load_logits(tdir, "teacher")
    assert z.logits.shape == (t["best"]["pixels"], 20) and (z.labels > 0).all()


def _student(root, teacher, *extra):
    return tiny(root, "stage=student", f"teacher_checkpoint={teacher}", *extra, demo=False)


def test_resume_after_interruption_matches_uninterrupted_run(demo_run, tmp_path, monkeypatch):
    root, out = demo_run
    teacher = out["teacher"]["best_checkpoint"]
    full = sk_main.main(_student(root, teacher, f"save_path={tmp_path / 'a'}"))["student"]
    real = T.Trainer.train_epoch

    def dies_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return real(self, epoch)

    monkeypatch.setattr(T.Trainer, "train_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        sk_main.main(_student(root, teacher, f"save_path={tmp_path / 'b'}"))
    monkeypatch.setattr(T.Trainer, "train_epoch", real)
    run = next((tmp_path / "b").glob("log_*"))
    assert torch.load(run / "checkpoint" / "training_state.pth", weights_only=False)["epoch"] == 1
    # a resume that changes what the run is (the loss) is refused, naming the key
    with pytest.raises(SystemExit) as e:
        cli(lambda: sk_main.main(_student(root, teacher, f"save_path={tmp_path / 'b'}", "kd.kd_weight=2.0")
                                 + ["--resume", str(run)]))
    assert e.value.code == 2
    again = sk_main.main(_student(root, teacher, f"save_path={tmp_path / 'b'}") + ["--resume"])["student"]
    assert Path(again["experiment_dir"]) == run
    assert "resumed" in (run / "log" / "console.log").read_text()
    assert [r["epoch"] for r in again["history"]] == [1, 2]
    assert again["history"] == full["history"]  # continued from the checkpoint: the same numbers as uninterrupted
    assert again["best"]["IOU"] == full["best"]["IOU"]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(demo_run, tmp_path, monkeypatch, capsys):
    root, out = demo_run
    from semantic_kitti.trainer_student import StudentTrainer
    real = StudentTrainer.step

    def nan_in_epoch_2(self, batch, train):
        loss, parts, logits = real(self, batch, train)
        if train and self.scheduler.last_epoch >= 1:  # the second training step = epoch 2
            parts["LossKD"] = parts["LossKD"] * float("nan")
            loss = loss * float("nan")
        return loss, parts, logits

    monkeypatch.setattr(StudentTrainer, "step", nan_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        cli(lambda: sk_main.main(_student(root, out["teacher"]["best_checkpoint"], f"save_path={tmp_path}")))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert "non-finite loss at epoch 2, step 1: term 'LossKD' = nan" in err
    run = next(tmp_path.glob("log_*"))
    assert torch.load(run / "checkpoint" / "training_state.pth", weights_only=False)["epoch"] == 1
    best = torch.load(run / "checkpoint" / "best_IOU_model.pth", weights_only=False)
    assert best["epoch"] == 1 and all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    assert not (run / "summary.json").exists()


def test_demo_never_writes_into_a_real_dataset(tmp_path, capsys):
    real = tmp_path / "data" / "sequences" / "00" / "velodyne"
    real.mkdir(parents=True)
    scan = np.arange(8, dtype=np.float32)
    scan.tofile(real / "000000.bin")
    with pytest.raises(SystemExit) as e:
        cli(lambda: sk_main.main(tiny(tmp_path)))
    assert e.value.code == 2 and "refusing to write SemanticKITTI demo data" in capsys.readouterr().err
    np.testing.assert_array_equal(np.fromfile(real / "000000.bin", dtype=np.float32), scan)
    assert sorted(p.name for p in (tmp_path / "data" / "sequences").iterdir()) == ["00"]


def test_run_sh_two_nodes_under_nccls_device_rule(demo_run, tmp_path):
    """run.sh takes torchrun's multi-node settings from the environment: two 'nodes' of one process each on
    localhost (gloo), both stages, with torch.distributed's collectives held to NCCL's rule (every reduced tensor on
    the process group's device; a sitecustomize enters common.ddp.device_rule_check in every process) and the
    metrics all-reduced over both ranks."""
    root, _ = demo_run
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # the module keeps the context open for the life of the process
        "import os\nfrom common import ddp\n_rule = ddp.device_rule_check('nccl')\n_rule.__enter__()\n"
        "open(os.path.join(os.environ['RULE_MARKS'], str(os.getpid())), 'w').close()\n")
    port = ddp.free_port()
    flags = tiny(root, "gpu=cpu", f"save_path={tmp_path / 'exp'}", "n_epochs=1", demo=False)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "NNODES": "2",
               "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "RULE_MARKS": str(hook)}
        procs.append(subprocess.Popen(["bash", str(RUN_SH), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=tmp_path))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-2000:]
    # the rule held in every python process of both nodes: run.sh's --print-gpu, torchrun's agent, the worker
    assert len([p for p in hook.iterdir() if p.name.isdigit()]) >= 6
    assert "--nnodes=2" in outs[0][0] and "--node_rank=0" in outs[0][0] and "--node_rank=1" in outs[1][0]
    dirs = sorted((tmp_path / "exp").glob("log_*"))
    assert [d.name for d in dirs] == ["log_SemanticKitti_CameraNet-resnet18_bs2-lr0.02_demo",
                                      "log_SemanticKitti_LidarNet-b8_bs2-lr0.01_demo"]  # bs = 1 per rank × 2 ranks
    for d in dirs:
        s = json.loads((d / "summary.json").read_text())
        assert s["world_size"] == 2
        v = s["best"]
        # each rank evaluated its own val frame; the all-reduced confusion matrix holds both ranks' pixels
        assert len(v["pixels_per_rank"]) == 2 and min(v["pixels_per_rank"]) > 0
        assert v["pixels"] == sum(v["pixels_per_rank"]) == sum(map(sum, v["confusion"]))
    assert s["history"][0]["train_LossKD"] > 0
    # the NTD logits gathered from both ranks: one row per labelled val pixel
    teacher = json.loads((dirs[0] / "summary.json").read_text())
    assert ntd.load_logits(dirs[0], "teacher").logits.shape[0] == teacher["best"]["pixels"]


def test_cli_and_run_sh_refuse_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(lambda: sk_main.main(["--set", "kd.kd_wieght=1", "--out", str(tmp_path)]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown key 'kd.kd_wieght'" in err and err.strip().count("\n") == 0
    # the server YAML lists GPUs 0,1: with none visible run.sh refuses (one interpreter start, no training)
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(RUN_SH), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2, proc.stderr
    assert 'gpu list is "0,1"' in proc.stderr and "no GPU is available" in proc.stderr
    assert not any(tmp_path.iterdir())
    proc = subprocess.run(["bash", str(RUN_SH), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**env, "NNODES": "2", "NODE_RANK": "2"})
    assert proc.returncode == 2 and "NODE_RANK must be in 0..1" in proc.stderr


def test_report_section_from_the_demo_summaries(demo_run, tmp_path):
    from semantic_kitti import report
    root, out = demo_run
    runs = {"teacher": out["teacher"], "student": out["student"], "baseline": out["student"],
            "config": sk_main.resolve_config(sk_main.parse_args(tiny(root)))}
    pngs = report.plot(runs, tmp_path)
    text = report.section(runs, tmp_path, tmp_path)
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert "| best epoch | val mIoU (best) | val mIoU (last epoch) |" in text and "ω < 1" in text
    assert "nan" not in text.lower()
    (rec,) = report.advisor_records(runs, root / "exp")
    assert (root / "exp" / rec["teacher"]).is_file() and rec["delta"] == 0.0  # the KD student stands in as baseline


def test_unwritable_save_path_is_a_one_line_error(demo_run, tmp_path, capsys):
    root, _ = demo_run
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SystemExit) as e:
        cli(lambda: sk_main.main(tiny(root, f"save_path={tmp_path / 'file' / 'exp'}", demo=False)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "cannot create the experiment directory" in err


def test_damaged_calib_is_a_one_line_error_at_start_up_with_workers(demo_run, tmp_path, capsys):
    root, _ = demo_run
    data = tmp_path / "sequences"
    shutil.copytree(root / "data" / "sequences", data)
    (data / "00" / "calib.txt").write_bytes(b"P2: 1 2\xff\n")
    with pytest.raises(SystemExit) as e:
        cli(lambda: sk_main.main(tiny(root, f"data_root={data}", f"save_path={tmp_path / 'exp'}", "n_threads=2",
                                      demo=False)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"error: {data / '00' / 'calib.txt'}: not UTF-8 text (byte 7); expected " \
                                        f"'KEY: 12 floats' lines"
    assert not list((tmp_path / "exp").glob("log_*"))  # no empty run directory left behind
