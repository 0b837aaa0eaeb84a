import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common import ntd
from common import saliency as S
from common.run import cli, load_checkpoint
from ravdess import data as D
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


BAD = [(["--distill", "nope", "--eval_tag"], "kd.distill"), (["--place", "9", "--cal_tag"], "tag.place"),
       (["--place", "0", "--cal_tag"], "tag.place"),
       (["--mode", "3", "--eval_tag"], "eval.mode"), ([], "nothing to do"),
       (["--set", "data.frames=abc", "--cal_tag"], "data.frames"),
       # hyper-parameters: finite and in range (issue: NaN results with exit 0)
       (["--lr", "nan", "--cal_tag"], "'tag.lr' must be a finite number"),
       (["--lr", "-0.1", "--cal_tag"], "'tag.lr' expects a value in (0, inf)"),
       (["--set", "eval.lr=0", "--eval_tag"], "'eval.lr' expects a value in (0, inf)"),
       (["--set", "kd.methods.kl.kl.temperature=0", "--eval_tag"], "'kd.methods.kl.kl.temperature' expects"),
       (["--set", "eval.ratio=1.5", "--eval_tag"], "'eval.ratio' expects a value in [0, 1]"),
       # negative or zero epochs / steps
       (["--num-epochs", "-1", "--cal_tag"], "'tag.epochs' expects a value in [1, inf)"),
       (["--set", "eval.epochs=0", "--eval_tag"], "'eval.epochs' expects a value in [1, inf)"),
       (["--set", "checkpoint_every=0", "--eval_tag"], "'checkpoint_every'"),
       (["--num-runs", "0", "--eval_tag"], "'eval.num_runs'"),
       (["--num-workers", "-2", "--eval_tag"], "'data.num_workers'"),
       # unknown loss, loss option, mask, teacher
       (["--set", "kd.methods.kl.nosuch={weight: 1}", "--eval_tag"], "kd.methods.kl: unknown KD loss 'nosuch'"),
       (["--set", "kd.methods.kl.kl.bogus=1", "--eval_tag"], "kd.methods.kl: KD loss 'kl'"),
       (["--set", "kd.methods.kl.kl.reduction=sum", "--eval_tag"], "'kd.methods.kl.kl.reduction' must be one of"),
       (["--mask", "sometimes", "--eval_tag"], "'kd.mask' must be one of none, omega"),
       (["--teacher", "both", "--cal_tag"], "'teacher' must be one of joint, independent")]


@pytest.mark.parametrize("argv, what", BAD, ids=[" ".join(a) or "empty" for a, _ in BAD])
def test_bad_flags_are_one_line_errors(argv, what, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli(lambda: M.main(argv + ["--out", str(tmp_path / "never")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and what in err and "\n" not in err
    assert not (tmp_path / "never").exists()


def test_demo_dir_never_overwrites_files_it_did_not_write(tmp_path, capsys):
    keep = tmp_path / "mine"
    wav = keep / "raw" / "Actor_01" / "03-01-01-01-01-01-01.wav"
    wav.parent.mkdir(parents=True)
    wav.write_bytes(b"a real recording")
    with pytest.raises(SystemExit) as e:
        cli(lambda: M.main(["--demo", "--demo-dir", str(keep), "--out", str(tmp_path / "runs")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: refusing to write the RAVDESS demo tree into {keep}")
    assert wav.read_bytes() == b"a real recording" and sorted(p.name for p in keep.iterdir()) == ["raw"]


def test_preprocess_never_writes_into_a_folder_it_did_not_make(raw_tree, cfg, tmp_path):
    from common.config import DataError
    from ravdess import preprocess
    (tmp_path / "data_file").mkdir()
    (tmp_path / "data_file" / "spa_dl.csv").write_text("MFH's own split\n")
    with pytest.raises(DataError, match="refusing to write preprocessed RAVDESS features"):
        preprocess.preprocess(raw_tree, tmp_path, cfg, log=lambda m: None, progress=False)
    assert (tmp_path / "data_file" / "spa_dl.csv").read_text() == "MFH's own split\n"


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


def test_steps_1_2_3_and_compare_modes(features, cfg_file, cfg, tmp_path):
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
    # preprocessed features: results carry the label; the no-KD baseline and the NTD advisor's logits (val split)
    assert summary["features_note"].startswith("not comparable with MFH's published features")
    assert summary["baseline"]["mode"] == "baseline" and len(summary["baseline"]["test_acc"]) == 1
    n_val = r2["counts"]["val"]
    for role, tag in (("teacher", "mode1"), ("probe", None)):
        z = ntd.load_logits(r2["run_dir"], role, tag)
        assert z.logits.shape == (n_val, 8) and z.meta["split"] == "val"
        np.testing.assert_array_equal(z.labels, [r[2] for r in D.read_split(dest, cfg, "val")])
    log_csv = (Path(r2["run_dir"]) / "mode1_run0_log.csv").read_text().splitlines()
    assert log_csv[0].split(",")[:2] == ["epoch", "train_ce"] and "val_acc" in log_csv[0]

    r3 = M.main(["compare_modes", "--distill", "dkd", "--mask", "omega", *common])
    rows = r3["modes"]
    assert [r["mode"] for r in rows] == [0, 1, 2]
    # ω statistics per epoch (mean ω, share of samples with ω < 1) in the summary and the per-term log
    om = rows[1]["omega"][0]
    assert 0 <= om["omega_mean"] <= 1 and 0 <= om["omega_masked_share"] <= 1 and len(om["omega_per_epoch"]) == 1
    assert "omega_masked_share" in (Path(r3["run_dir"]) / "mode1_run0_log.csv").read_text().splitlines()[0]
    assert "no KD" in (Path(r3["run_dir"]) / "compare_modes.csv").read_text()
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
