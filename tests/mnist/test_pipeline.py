"""mnist model places, Algorithm 1 on the MLP, channel removal modes, and every subcommand end to end (tiny data
written in the real IDX format, MNIST-M composed from a folder of background images)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import saliency as alg1
from common.divergence import nontarget_js
from mnist import main as M
from mnist.models import MLP
from tests.mnist.helpers import TINY, run as _run

ROOT = Path(__file__).resolve().parents[2]

def test_places_and_dims():
    m = MLP(784, [16, 8])
    assert [m.place_name(p) for p in range(4)] == ["input", "act1", "act2", "fc3"]
    assert [m.feature_dim(p) for p in range(4)] == [784, 16, 8, 10]
    assert MLP(784, [16, 8], logit_activation=True).place_name(3) == "act3"
    seen = {}
    for p in range(4):
        name = m.place_name(p)
        n = alg1.channel_count(m, name, torch.zeros(2, 784))
        seen[p] = n
    assert seen == {0: 784, 1: 16, 2: 8, 3: 10}


def test_saliency_place1_matches_direct_zeroing():
    """The hook-based saliency at place 1 equals zeroing one post-LeakyReLU unit by hand, averaged over batches."""
    torch.manual_seed(0)
    teacher, student = MLP(20, [6, 5]), MLP(30, [6, 5])
    batches = [(torch.randn(8, 20), torch.randn(8, 30), torch.randint(0, 10, (8,))) for _ in range(3)]
    sal = alg1.saliency_vector(teacher, student, batches, teacher.place_name(1), op="zero", distance="ncjsd",
                               repeats=4, normalize=False, chunk=4)
    manual = torch.zeros(6)
    with torch.no_grad():
        for x_t, x_s, y in batches:
            h_s = student(x_s)
            for c in range(6):
                h = teacher.act1(teacher.fc1(x_t))
                h[:, c] = 0
                h_t = teacher.fc3(teacher.act2(teacher.fc2(h)))
                manual[c] += nontarget_js(h_s, h_t, y).mean() * len(y)
    torch.testing.assert_close(sal, manual / 24)
    normalized = alg1.saliency_vector(teacher, student, batches, "act1", op="zero", distance="ncjsd")
    assert normalized.min() == 0 and normalized.max() == 1


def test_modes_remove_the_right_channels():
    sal = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.0])
    assert alg1.removal_indices(sal, 1, 0.75).tolist() == [0, 1, 3, 4, 5, 7]      # the 6 lowest
    assert alg1.removal_indices(sal, 2, 0.75).tolist() == [0, 2, 3, 4, 5, 6]      # the 6 highest
    r0 = alg1.removal_indices(sal, 0, 0.75, generator=torch.Generator().manual_seed(0))
    assert len(set(r0.tolist())) == 6 and r0.max() < 8
    assert alg1.removal_indices(sal, -1, 0.75).numel() == 0
    torch.manual_seed(0)
    m = MLP(12, [8, 4])
    x = torch.randn(5, 12)
    removed = alg1.removal_indices(sal, 2, 0.75)
    seen = []
    hook = m.act1.register_forward_hook(lambda mod, a, out: seen.append(out.clone()))
    handle = alg1.remove_channels(m, m.place_name(1), removed, fill="zero")
    out = m(x)
    handle.remove()
    hook.remove()
    h = m.act1(m.fc1(x))
    h[:, removed] = 0
    torch.testing.assert_close(out, m.fc3(m.act2(m.fc2(h))))
    kept = [c for c in range(8) if c not in removed.tolist()]
    assert kept == [1, 7]  # the two least salient survive mode 2


def test_every_subcommand_end_to_end(dataset, tmp_path):
    out = tmp_path / "runs"
    cal_dir, res, summary = _run(dataset, out, "--cal_tag", "--first-time", "--mode", "1,2")
    assert "IDX files" in summary["data_source"] and "composed in memory" in summary["data_source"]
    assert summary["sizes"] == {"train": 120, "val": 40, "test": 64}
    tag = np.load(cal_dir / "saliency_teacher_place1.npz")["saliency"]
    assert tag.shape == (24,) and tag.min() == 0 and tag.max() == 1
    assert (cal_dir / "checkpoint" / "teacher_overlap.pth").is_file()
    assert (cal_dir / "saliency_place1_mode1.png").is_file() and (cal_dir / "saliency_place1_mode2.png").is_file()
    assert len(res["cal_tag"]["history"]) == 2

    # eval_tag in a new run finds the saliency teacher of the newest run under the same --out
    ev_dir, res, summary = _run(dataset, out, "--eval_tag", "--mode", "0,1,2", "--num-runs", "2")
    modes = summary["eval_tag"]["modes"]
    assert set(modes) == {"0", "1", "2"} and summary["eval_tag"]["tag"] == str(cal_dir / "saliency_teacher_place1.npz")
    order = np.argsort(tag, kind="stable")
    assert modes["1"]["removed"] == sorted(order[:18].tolist())
    for m in modes.values():
        assert len(m["removed"]) == 18 and len(m["test_acc"]) == 2 and 0 <= m["test_mean"] <= 1
        assert {"train_ce", "train_sp", "train_kl"} <= set(m["history"][0][0])

    # the reference cannot select plain kl; ω masking; a registry loss with parameters and dataset indices (crd)
    _, res, _ = _run(dataset, out, "--eval_tag", "--mode", "1", "--distill", "kl", "--mask", "omega",
                     "--set", "eval.baseline=false",
                     "--teacher", str(cal_dir / "checkpoint" / "teacher_overlap.pth"))
    assert "train_kl" in res["eval_tag"]["modes"]["1"]["history"][0][0]
    _, res, _ = _run(dataset, out, "--eval_tag", "--mode", "2", "--distill", "crd", "--set", "eval.baseline=false",
                     "--set", "distill.methods.crd.crd.nce_k=64")
    assert "train_crd" in res["eval_tag"]["modes"]["2"]["history"][0][0]

    # Algorithm 1 again from the saved joint nets (no --first-time), with a random intervention
    again, res, _ = _run(dataset, out, "--cal_tag", "--op", "permute", "--num-permute", "2")
    assert res["cal_tag"]["history"] == [] and len(res["cal_tag"]["saliency"]) == 24
    assert res["cal_tag"]["teacher"] == str(again / "checkpoint" / "teacher_overlap.pth")  # beside its saliency

    bl_dir, res, _ = _run(dataset, out, "--base_line")
    assert set(res["base_line"]["history"][0][0]) >= {"train_ce"} and "train_kl" not in res["base_line"]["history"][0][0]

    hm_dir, res, _ = _run(dataset, out, "--heat_map", "--mode", "0,2")
    assert (hm_dir / "heat_maps.png").is_file()


def test_heat_map_gradients_any_batch_size():
    from mnist.heatmap import input_gradients
    torch.manual_seed(0)
    m = MLP(784, [16, 8])
    x, y = torch.randn(5, 784), torch.randint(0, 10, (5,))
    g = input_gradients(m, x, y)
    x1 = x[2:3].clone().requires_grad_(True)
    m(x1)[0, y[2]].backward()
    torch.testing.assert_close(g[2], x1.grad[0].abs())
    assert all(p.requires_grad for p in m.parameters())


def test_cli_errors_are_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "mnist" / "main.py"), "--out", str(tmp_path), "--set", "eval.ratio=2.0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --set: key 'eval.ratio'") and len(r.stderr.splitlines()) == 1
    from common.config import ConfigError
    with pytest.raises(ConfigError, match="distill.method: unknown 'nope'"):
        M.resolve_config(M.parse_args(["--eval_tag", "--distill", "nope"]))
    with pytest.raises(ConfigError, match="--mode: expected comma-separated integers"):
        M.parse_args(["--mode", "1,x"])


def test_bad_data_leaves_no_run_directory(tmp_path):
    """A run that fails on its input before producing anything deletes the run directory it just created."""
    from common.config import DataError
    (tmp_path / "data").mkdir()
    args = M.parse_args(["--out", str(tmp_path / "runs"), "--device", "cpu", "--data-root", str(tmp_path / "data"),
                         "--set", "data.source=pickle"])
    cfg, actions = M.resolve_config(args)
    with pytest.raises(DataError, match="pickle"):
        M.run(cfg, actions, args.out, args.device)
    assert not any((tmp_path / "runs").glob("*/"))


def test_report_section_from_a_tiny_run(dataset, tmp_path):
    from mnist import report
    args = M.parse_args(["--out", str(tmp_path / "mnist"), "--device", "cpu", "--data-root", str(dataset),
                         "--set", f"data.backgrounds={dataset / 'bg'}", *TINY, "--mode", "0,1,2",
                         "--set", "cal.epochs=1", "--set", "train.epochs=1"])
    cfg, _ = M.resolve_config(args)
    rd, results = M.run(cfg, ["cal_tag", "eval_tag", "base_line", "heat_map"], args.out, "cpu")
    md = report.section(results, cfg, rd.path, tmp_path)
    links = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 4 and all((tmp_path / link).is_file() for link in links)
    for m in "012":
        assert f"{results['eval_tag']['modes'][m]['test_mean']:.4f}" in md
    assert f"{results['base_line']['test_mean']:.4f}" in md


def test_parity_switch(dataset, tmp_path):
    """parity: LeakyReLU on the logits (place 3 = act3), selection on the test split, last-batch saliency."""
    rd_path, res, summary = _run(dataset, tmp_path, "--parity", "--cal_tag", "--first-time", "--place", "3")
    assert summary["sizes"]["val"] == summary["sizes"]["test"] == 64
    assert summary["config"]["parity"] is True and len(res["cal_tag"]["saliency"]) == 10
    ckpt = torch.load(rd_path / "checkpoint" / "teacher_overlap.pth", weights_only=True)
    assert ckpt["spec"]["logit_activation"] is True
    assert "over 32 samples" in (rd_path / "log" / "console.log").read_text()  # all 160 train digits = 64 + 64 + 32: the last batch


@pytest.mark.parametrize("mask", ["none", "omega"])
def test_every_registry_loss_and_method_builds_and_backpropagates(mask):
    from common.kd import available_losses, build_objective
    from mnist.losses import loss_config
    cfg = M.resolve_config(M.parse_args(["--set", "progress=false"]))[0]
    names = sorted(set(available_losses()) | set(cfg["distill"]["methods"]))
    torch.manual_seed(0)
    for name in names:
        cfg["distill"]["method"], cfg["distill"]["mask"] = name, mask
        lc = loss_config(cfg)
        assert lc["terms"]["ce"]["weight"] == 0.5 and lc["mask"] == mask
        obj = build_objective(lc, context={"student_dim": 10, "teacher_dim": 10, "n_data": 50,
                                           "dataset_labels": torch.arange(50) % 10})
        zs = torch.randn(16, 10, requires_grad=True)
        total, parts = obj(zs, torch.randn(16, 10), torch.randint(0, 10, (16,)), index=torch.arange(16))
        total.backward()
        assert torch.isfinite(total) and zs.grad.abs().sum() > 0, name
        assert set(parts) == set(lc["terms"]), name


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "mnist" / "configs").glob("*.yaml")))
def test_shipped_configs_resolve(name):
    """Every config in mnist/configs passes the config checks; the real-MNIST ones keep the reference's model,
    optimiser and removal, and the full one the reference's sizes (all digits, 50 + 50 epochs, all batches)."""
    cfg, actions = M.resolve_config(M.parse_args(["--config", str(ROOT / "mnist" / "configs" / name)]))
    assert actions == ["cal_tag", "eval_tag"]
    if name.startswith("real_"):
        assert cfg["model"]["hidden"] == [1024, 256] and cfg["train"]["lr"] == 0.001
        assert cfg["eval"]["modes"] == [0, 1, 2] and cfg["eval"]["ratio"] == 0.75 and cfg["train"]["num_runs"] == 3
    if name == "real_full.yaml":
        assert cfg["data"]["max_train"] == 0 and cfg["cal"]["max_batches"] == 0
        assert cfg["train"]["epochs"] == 50 and cfg["cal"]["epochs"] == 50
