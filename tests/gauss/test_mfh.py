"""MFH presets of gauss/: the increase-α and modify-γ generators, column choice, Algorithm 1, and short preset runs."""
import copy
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_yaml
from gauss import data, experiment, modify
from gauss import main as gauss_main

ROOT = Path(__file__).resolve().parents[2]


def preset_cfg(name, *extra):
    cfg = gauss_main.resolve_config(gauss_main.parse_args(["--preset", name, *extra]))
    cfg["progress"] = False
    return cfg


def _corr(a, b):
    return abs(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def test_increase_alpha_columns():
    seeds, excl = [5, 6], [0, 20, 40]
    train, test = data.increase_alpha(seeds, excl, n_train=400, n_test=30)
    assert train.x1.shape == (6, 50, 400) and train.x2.shape == (6, 50, 400) and test.y.shape == (6, 30)
    for k, xs1 in enumerate(excl):
        for r in range(2):
            g = k * 2 + r
            x1, x2 = train.x1[g], train.x2[g]
            for c in range(10):                       # x2's decisive columns are shared with x1 at the same index
                torch.testing.assert_close(x1[c], x2[c])
            assert not any(torch.allclose(x1[c], x2[c]) for c in range(10, 50))
            # x1's columns 10..10+xs1−1 are latent dims too: identical across settings of the same run
            torch.testing.assert_close(x1[10:10 + xs1], train.x1[2 * 2 + r, 10:10 + xs1])
            if xs1 < 40:                              # beyond them, x1 is noise (differs from the all-latent x1)
                assert not torch.allclose(x1[10 + xs1], train.x1[2 * 2 + r, 10 + xs1])
    # the label depends on every latent dim: at xs1 = 40 x1 holds all of them, so y is a linear function of x1
    np.random.seed(5)
    a = np.random.randn(500)
    y = (train.x1[4].numpy().T.astype(np.float64) @ a[:50] > 0).astype(np.int64)
    np.testing.assert_array_equal(y, train.y[4].numpy())
    assert data.alpha_of(0, 10) == 0 and data.alpha_of(40, 10) == 0.8
    with pytest.raises(ValueError, match="exclusive"):
        data.increase_alpha([0], [41])


def test_modify_gamma_columns_and_stream():
    seed, xs2 = 42, 15
    (train,), (test,), (fresh,) = data.modify_gamma([seed], [xs2], n_train=300, n_test=40)
    x1, x2, y = train.x1[0], train.x2[0], train.y[0]
    for c in range(xs2):                              # shared: x1 and x2 columns 0..xs2−1
        torch.testing.assert_close(x1[c], x2[c])
    assert not any(torch.allclose(x1[c], x2[c]) for c in range(xs2, 50))
    # a = ones: the label is the sign of the sum of x1's 10 + xs2 decisive columns
    np.testing.assert_array_equal(y.numpy(), (x1[:10 + xs2].double().sum(0) > 0).long().numpy())
    # the reference's stream: train, test, fresh train from one RandomState(seed), each drawn xs, x1, x2
    rng = np.random.RandomState(seed)
    for split, n in ((train, 300), (test, 40), (fresh, 300)):
        xs = rng.randn(n, 10 + xs2)
        ref_x1 = rng.randn(n, 50)
        ref_x1[:, :10 + xs2] = xs
        ref_x2 = rng.randn(n, 50)
        ref_x2[:, :xs2] = xs[:, :xs2]
        np.testing.assert_allclose(split.x1[0].numpy().T, ref_x1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(split.x2[0].numpy().T, ref_x2, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(train.x1, fresh.x1)


def test_gt_picks_shared_and_random_does_not_repeat():
    cfg = preset_cfg("mfh_modify_gamma", "--runs", "3")
    for k in (5, 30):
        cols = [np.arange(k)] * 3
        assert modify.identification(cols, [k] * 3).tolist() == [1.0] * 3
        x = torch.arange(3 * 50 * 4, dtype=torch.float32).reshape(3, 50, 4)
        sel = modify.select_columns(x, [np.arange(k), np.arange(k), np.arange(2)])
        torch.testing.assert_close(sel[0], x[0, :k])      # gt keeps exactly the shared columns, in order
        assert sel.shape == (3, k, 4) and (sel[2, 2:] == 0).all()
        for r in range(3):
            c = modify.random_columns(cfg, k, r)
            assert len(c) == k and len(set(c.tolist())) == k and c.max() < 50
    parity = copy.deepcopy(cfg)
    parity["parity"] = True   # the reference's randint: with replacement, so repeats appear
    assert any(len(set(modify.random_columns(parity, 30, r).tolist())) < 30 for r in range(5))


def test_padded_teacher_equals_a_model_of_its_own_width():
    """Zero-padding the selected columns trains each run exactly as a model of its own width."""
    from common.synthetic.vectorized import fit
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 6, 40, generator=gen), torch.randint(0, 2, (2, 40), generator=gen)
    cols = [np.array([1, 4]), np.array([0, 2, 3, 5])]
    padded = modify.linear(4, 2, [11, 12], widths=[2, 4])
    fit(padded, modify.select_columns(x, cols), y, epochs=50, lr=0.1)
    for g, c in enumerate(cols):
        alone = modify.linear(len(c), 2, [11 + g])
        fit(alone, x[g:g + 1, c], y[g:g + 1], epochs=50, lr=0.1)
        torch.testing.assert_close(padded.weight[g, :, :len(c)], alone.weight[0])
        torch.testing.assert_close(padded.bias[g], alone.bias[0])


def test_closed_form_algorithm1_equals_common_saliency():
    """The closed-form engine gives common.saliency's joint training and saliency (same permutations)."""
    cfg = preset_cfg("mfh_modify_gamma", "--runs", "2", "--set", "modify.alg1.epochs=40",
                     "--set", "modify.alg1.repeats=3")
    train, _, _ = data.modify_gamma([42, 43], [5, 20], n_train=100, n_test=10)
    split = data.concat(train)
    out = {}
    for engine in modify.ENGINES:
        c = copy.deepcopy(cfg)
        c["modify"]["alg1"]["engine"] = engine
        out[engine] = modify.algorithm1(c, split, 2, False)
    for a, b in zip(out["closed_form"], out["autograd"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_algorithm1_finds_the_shared_columns():
    """On mfh_modify_gamma data the xs2 most salient x1 columns are the shared ones, far above chance (xs2 / 50)."""
    cfg = preset_cfg("mfh_modify_gamma", "--runs", "4", "--set", "modify.alg1.repeats=20")
    ks = [5, 15, 30]
    train, _, _ = data.modify_gamma([42 + r for r in range(4)], ks, n_train=200, n_test=10)
    sal_x1, sal_x2 = modify.algorithm1(cfg, data.concat(train), len(ks), False)
    per_group = [k for k in ks for _ in range(4)]
    acc = modify.identification(modify.top_columns(sal_x1, per_group), per_group).reshape(3, 4)
    chance = np.array(ks) / 50
    assert (acc.mean(1) > chance + 0.35).all() and acc.mean() > 0.85, acc
    acc2 = modify.identification(modify.top_columns(sal_x2, per_group), per_group)
    assert acc2.mean() > 0.85


@pytest.mark.parametrize("preset", ["ntdh", "mfh_gamma", "mfh_alpha", "mfh_modify_gamma"])
def test_short_run_of_each_preset(preset, tmp_path):
    cfg = preset_cfg(preset, "--runs", "2", "--set", "train.epochs=20", "--set", "modify.alg1.epochs=20",
                     "--set", "modify.alg1.repeats=3", "--out", str(tmp_path))
    run_dir, results = gauss_main.run(cfg, tmp_path, "cpu")
    rows = list(csv.DictReader(open(run_dir.path / "summary.csv")))
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["generator"] == cfg["data"]["generator"]
    if preset == "mfh_modify_gamma":
        assert list(rows[0]) == modify.CSV_COLUMNS and len(rows) == 3 * 6
        assert {r["mode"] for r in rows} == {"random", "gt", "alg1"}
        for r in rows:
            assert 0.4 < float(r["mg_teacher_acc"]) <= 1 and 0.4 < float(r["regular_kd_acc"]) <= 1
            assert (r["alg1_x1_id_acc"] != "") == (r["mode"] == "alg1")
        gt = [r for r in rows if r["mode"] == "gt"]
        assert [int(r["xs2_dim"]) for r in gt] == [5, 10, 15, 20, 25, 30]
        names = ["table2_students.png", "table2_teachers.png", "alg1_identification.png"]
    else:
        assert list(rows[0]) == experiment.csv_columns(cfg["data"]["generator"])
        word = "alpha" if preset == "mfh_alpha" else "gamma"
        names = [f"accuracy_vs_{word}.png", f"delta_vs_{word}.png", "delta_vs_ncjsd.png"]
        if preset == "mfh_alpha":
            assert [float(r["alpha"]) for r in rows] == pytest.approx([0, 0.5, 2 / 3, 0.75, 0.8])
            teacher = [float(r["teacher_acc"]) for r in rows]
            assert teacher[-1] > teacher[0]
        if preset == "mfh_gamma":
            assert all(r["cmd_input"] == "nan" for r in rows)  # 25-d vs 50-d: no input CMD
    for name in names:
        assert (run_dir.path / name).stat().st_size > 1000, name
    assert torch.get_num_threads() >= 1


def test_presets_resolve_as_documented():
    default = gauss_main.resolve_config(gauss_main.parse_args([]))
    assert preset_cfg("ntdh") == {**default, "progress": False}
    g = preset_cfg("mfh_gamma")
    assert (g["runs"], g["data"]["x1_dim"], g["data"]["x2_dim"]) == (10, 25, 50)
    assert g["kd"]["methods"]["kl"]["kl"] == {"weight": 1.0, "temperature": 1.0, "reduction": "mean"}
    m = preset_cfg("mfh_modify_gamma")
    assert m["data"]["decision"] == "ones" and m["modify"]["alg1"]["repeats"] == 100 and m["seed"] == 42
    assert m["modify"]["alg1"]["distance"] == "mse" and m["data"]["xs2_dims"] == [5, 10, 15, 20, 25, 30]
    # layers: preset < --config < --set < flags
    over = preset_cfg("mfh_gamma", "--set", "runs=3", "--set", "kd.methods.kl.kl.temperature=2")
    assert over["runs"] == 3 and over["kd"]["methods"]["kl"]["kl"]["reduction"] == "mean"
    assert over["kd"]["methods"]["kl"]["kl"]["temperature"] == 2
    assert preset_cfg("mfh_gamma", "--set", "runs=3", "--runs", "4")["runs"] == 4
    for path in (ROOT / "gauss" / "configs").glob("*.yaml"):
        assert load_yaml(path)  # every preset is a non-empty mapping of known keys (resolve validates them)


def test_parity_swaps_the_regular_kd_inputs(tmp_path):
    """Under parity the "regular KD" student is trained on x1 with the teacher fed x2 (the reference's bug)."""
    args = ["--runs", "2", "--set", "train.epochs=150", "--set", "modify.modes=[gt]", "--set", "data.xs2_dims=[5]"]
    fixed = modify.run_table(preset_cfg("mfh_modify_gamma", *args), torch.device("cpu"), log=lambda *_: None)
    parity = modify.run_table(preset_cfg("mfh_modify_gamma", *args, "--parity"), torch.device("cpu"),
                              log=lambda *_: None)
    a, b = fixed["per_run"]["kl/none"], parity["per_run"]["kl/none"]
    np.testing.assert_array_equal(a["no_kd_acc"], b["no_kd_acc"])      # the rest is unchanged
    np.testing.assert_array_equal(a["mg_kd_acc"], b["mg_kd_acc"])
    # trained on x1 (15 decisive columns) and tested on x2 (5 of them at the same indices): far from the fixed student
    assert np.abs(a["regular_kd_acc"] - b["regular_kd_acc"]).mean() > 0.01


@pytest.mark.parametrize("extra, needle", [
    (["--preset", "mfh_gama"], "unknown preset 'mfh_gama'"),
    (["--preset", "mfh_modify_gamma", "--set", "modify.modes=[alg2]"], "modify.modes"),
    (["--preset", "mfh_modify_gamma", "--set", "modify.alg1.distance=ncjsd"], "modify.alg1.distance"),
    (["--preset", "mfh_modify_gamma", "--set", "modify.alg1.engine=fast"], "modify.alg1.engine"),
    (["--preset", "mfh_gamma", "--set", "train.engine=fast"], "'train.engine' must be one of auto, native, torch"),
    (["--preset", "mfh_alpha", "--set", "data.exclusive_dims=[45]"], "exclusive dims"),
    (["--preset", "mfh_modify_gamma", "--set", "data.xs2_dims=[45]"], "xs2_dim 45 does not fit"),
    (["--preset", "mfh_gamma", "--set", "data.generator=gamma"], "data.generator"),
    (["--preset", "mfh_gamma", "--set", "modify.alg1.repeat=3"], "unknown key 'modify.alg1.repeat'"),
    (["--preset", "mfh_modify_gamma", "--parity", "--set", "data.x2_dim=40"], "x1_dim == x2_dim")])
def test_bad_preset_input_is_a_config_error(extra, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        gauss_main.resolve_config(gauss_main.parse_args(extra))


def test_cli_bad_preset_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "gauss" / "main.py"), "--out", str(tmp_path), "--preset",
                           "mfh_modify_gamma", "--set", "modify.modes=[alg2]"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "modify.modes" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written
