import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common import saliency as S
from common.run import cli, load_checkpoint
from ravdess import main as M
from ravdess import models


def _cfg(argv):
    return M.resolve_config(M.parse_args(argv))


def test_readme_commands_parse_both_spellings():
    for flag in ("--first_time", "--first-time"):
        args = M.parse_args(["--place", "5", "--num-permute", "10", flag, "--cal_tag"])
        cfg = M.resolve_config(args)
        assert args.cal_tag and not args.eval_tag
        assert cfg["tag"]["first_time"] is True and cfg["tag"]["place"] == 5 and cfg["tag"]["num_permute"] == 10
    for mode in (0, 1, 2):
        args = M.parse_args(["--ratio", "0.75", "--mode", str(mode), "--eval_tag"])
        cfg = M.resolve_config(args)
        assert args.eval_tag and cfg["eval"]["mode"] == mode and cfg["eval"]["ratio"] == 0.75
        assert cfg["tag"]["first_time"] is False
    args = M.parse_args(["plot_tag"])
    assert args.command == "plot_tag"
    cfg = _cfg(["--num_permute", "3", "--num-epochs", "7", "--distill", "dkd", "--mask", "omega", "--gt-weight", "0.5"])
    assert cfg["tag"]["num_permute"] == 3 and cfg["tag"]["epochs"] == cfg["eval"]["epochs"] == 7
    assert cfg["kd"]["distill"] == "dkd" and cfg["kd"]["mask"] == "omega" and cfg["kd"]["gt_weight"] == 0.5
    # defaults: MFH's KL, pure distillation
    cfg = _cfg([])
    assert cfg["kd"]["distill"] == "kl" and cfg["kd"]["gt_weight"] == 0.0 and cfg["kd"]["pl_weight"] == 1.0


def test_bad_flags_are_one_line_errors(capsys):
    for argv, what in [(["--distill", "nope", "--eval_tag"], "kd.distill"), (["--place", "9", "--cal_tag"], "place"),
                       (["--mode", "3", "--eval_tag"], "eval.mode"), ([], "nothing to do"),
                       (["--set", "data.frames=abc", "--cal_tag"], "data.frames")]:
        with pytest.raises(SystemExit) as e:
            cli(lambda: M.main(argv + ["--out", "/nonexistent-never-created"]))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and what in err and "\n" not in err


def test_places_map_to_real_channel_counts():
    a, i = models.AudioNet(), models.ImageNet()
    xa, xi = torch.zeros(2, 1, 40, 256), torch.zeros(2, 3, 256, 512)
    assert a(xa).shape == (2, 8) and i(xi).shape == (2, 8)
    got = [models.place_channels(a, p, xa) for p in range(1, 7)]
    assert got == [32, 64, 128, 1024, 128, 8]
    assert models.place_channels(i, 0, xi) == 3
    with pytest.raises(ValueError, match="has 1 channel"):
        models.place_channels(a, 0, xa)
    # the shape the reference listed wrongly: stage1 of AudioNet is 32×18×126
    seen = []
    h = a.stage1.register_forward_hook(lambda m, i_, o: seen.append(tuple(o.shape)))
    a(xa)
    h.remove()
    assert seen == [(2, 32, 18, 126)]


def test_steps_1_2_3_and_compare_modes(features, cfg_file, tmp_path):
    dest, _, _ = features
    out = tmp_path / "runs"
    common = ["--config", str(cfg_file), "--data", str(dest), "--out", str(out), "--device", "cpu"]
    r1 = M.main(["--place", "5", "--num-permute", "2", "--first_time", "--cal_tag", *common])
    cal = r1["cal"]
    sal = cal["saliency"]
    assert sal.shape == (16,) and np.isclose(sal.min(), 0) and np.isclose(sal.max(), 1)
    ck = load_checkpoint(cal["checkpoint"])
    assert ck["place"] == 5 and torch.equal(ck["saliency"], torch.from_numpy(sal))
    run1 = Path(r1["run_dir"])
    assert (run1 / "overlap_tag_teacher_place5_repeat2.npy").is_file() and (run1 / "saliency_place5.png").is_file()
    # step 2 again without --first_time reuses the step-1 nets and, with the same seed, gives the same saliency
    r1b = M.main(["--place", "5", "--num-permute", "2", "--cal_tag", *common])
    np.testing.assert_allclose(r1b["cal"]["saliency"], sal, rtol=1e-5, atol=1e-6)

    r2 = M.main(["--ratio", "0.75", "--mode", "1", "--eval_tag", "--checkpoint", str(cal["checkpoint"]), *common])
    row = r2["modes"][0]
    assert row["removed"] == 12 and row["channels"] == 16
    assert sorted(row["removed_channels"]) == sorted(np.argsort(sal, kind="stable")[:12].tolist())
    assert 0 <= row["test_mean"] <= 1 and len(row["val_acc"]) == 1
    assert re.fullmatch(r"Student Val Acc \d+\.\d\d ± \d+\.\d\d \| Test Acc \d+\.\d\d ± \d+\.\d\d", row["line"])
    summary = json.loads((Path(r2["run_dir"]) / "summary.json").read_text())
    assert summary["modes"][0]["mode"] == 1
    assert list(Path(r2["run_dir"]).glob("events.out.tfevents*"))

    r3 = M.main(["compare_modes", "--distill", "dkd", "--mask", "omega", *common])
    rows = r3["modes"]
    assert [r["mode"] for r in rows] == [0, 1, 2]
    # the 12 most salient, ties (e.g. dead ReLU channels of these tiny nets) to the lower index
    assert set(rows[2]["removed_channels"]) == set(np.argsort(-sal, kind="stable")[:12].tolist())
    assert (Path(r3["run_dir"]) / "compare_modes.csv").is_file() and (Path(r3["run_dir"]) / "compare_modes.png").is_file()

    r4 = M.main(["plot_tag", *common])
    assert Path(r4["plot"]).is_file()


def test_removal_changes_the_teacher_only_at_the_chosen_channels(cfg):
    torch.manual_seed(0)
    a = models.AudioNet(channels=(4, 8, 8), fc=(32, 16))
    x = torch.randn(5, 1, 40, 32)
    seen = []
    h_obs = a.fc3.register_forward_pre_hook(lambda m, i: seen.append(i[0].clone()))  # what fc3 receives
    a(x)
    h = S.remove_channels(a, models.place_name(5), [0, 3], "zero")
    a(x)
    h.remove()
    h_obs.remove()
    assert torch.all(seen[1][:, [0, 3]] == 0)
    keep = [c for c in range(16) if c not in (0, 3)]
    assert torch.equal(seen[1][:, keep], seen[0][:, keep])


def test_eval_without_any_checkpoint_is_a_data_error(features, cfg_file, tmp_path, capsys):
    dest, _, _ = features
    with pytest.raises(SystemExit) as e:
        cli(lambda: M.main(["--eval_tag", "--config", str(cfg_file), "--data", str(dest), "--out", str(tmp_path)]))
    assert e.value.code == 2 and "run step 1 first" in capsys.readouterr().err
