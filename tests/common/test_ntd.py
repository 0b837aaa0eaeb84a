"""The NTD advisor (common.ntd): every quantity on constructed cases with known answers, the verdict, the ranking,
the advisor check, the file format and the CLI with its one-line errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import ntd
from common.config import ConfigError, DataError
from common.run import cli

ROOT = Path(__file__).resolve().parents[2]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def js_textbook(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * (kl(p, m) + kl(q, m))


def js_reference(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * (kl(m, p) + kl(m, q))


def logits_of(*probs):
    return np.log(np.array(probs, dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------------
# Quantities

def test_identical_distributions_give_zero_divergence_and_no_mask():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 5)) * 2
    y = rng.integers(0, 5, 64)
    r = ntd.advise(z, z.copy(), y)
    for key in ("ncjsd_textbook", "ncjsd_reference", "target_mass_js_textbook", "target_mass_js_reference"):
        assert r[key] == pytest.approx(0, abs=1e-12)
    assert r["agreement"] == 1.0
    assert r["teacher_accuracy"] == r["probe_accuracy"] == pytest.approx(np.mean(z.argmax(1) == y))
    # teacher wrong but probe identical: cos = 1 >= 0.996 -> omega = (1 + 1) / 2 = 1, nothing masked
    assert r["omega"]["dropped_share"] == 0 and r["omega"]["masked_share"] == 0
    assert r["omega"]["teacher_wrong_share"] > 0


def test_hand_computed_three_class_example_and_per_class_breakdown():
    teacher = logits_of([0.5, 0.3, 0.2], [0.1, 0.6, 0.3])
    probe = logits_of([0.2, 0.4, 0.4], [0.1, 0.6, 0.3])
    r = ntd.advise(teacher, probe, [0, 1], names=["a", "b", "c"])
    # sample 0, target 0: non-target [0.6, 0.4] vs [0.5, 0.5]; target mass [0.5, 0.5] vs [0.2, 0.8]
    nc_t, nc_r = js_textbook([0.6, 0.4], [0.5, 0.5]), js_reference([0.6, 0.4], [0.5, 0.5])
    tm_t, tm_r = js_textbook([0.5, 0.5], [0.2, 0.8]), js_reference([0.5, 0.5], [0.2, 0.8])
    assert r["ncjsd_textbook"] == pytest.approx(nc_t / 2, rel=1e-9)  # sample 1 is identical: mean over 2
    assert r["ncjsd_reference"] == pytest.approx(nc_r / 2, rel=1e-9)
    assert r["target_mass_js_textbook"] == pytest.approx(tm_t / 2, rel=1e-9)
    assert r["target_mass_js_reference"] == pytest.approx(tm_r / 2, rel=1e-9)
    assert nc_t != pytest.approx(nc_r)  # the two variants are different numbers
    assert r["quantity"] == "ncjsd" and r["divergence"] == r["ncjsd_textbook"] and r["score"] == -r["divergence"]
    a, b, c = r["per_class"]
    assert (a["name"], a["samples"], b["samples"], c["samples"]) == ("a", 1, 1, 0)
    assert a["ncjsd_textbook"] == pytest.approx(nc_t) and b["ncjsd_textbook"] == pytest.approx(0, abs=1e-12)
    assert c["ncjsd_textbook"] is None and c["teacher_accuracy"] is None
    assert r["agreement"] == 0.5  # sample 0: teacher says 0, probe 1 (tie 1/2 -> first)
    assert (r["teacher_accuracy"], r["probe_accuracy"]) == (1.0, 0.5)
    json.dumps(r)  # JSON-ready


def test_per_sample_divergences_match_common_divergence():
    from common.divergence import nontarget_js, target_js

    rng = np.random.default_rng(8)
    zt, zp = rng.normal(size=(200, 6)) * 3, rng.normal(size=(200, 6)) * 3
    y = rng.integers(0, 6, 200)
    r = ntd.advise(zt, zp, y)
    tt, tp, ty = torch.from_numpy(zt), torch.from_numpy(zp), torch.from_numpy(y)
    for variant in ("textbook", "reference"):
        assert r[f"ncjsd_{variant}"] == pytest.approx(nontarget_js(tp, tt, ty, variant).mean().item(), rel=1e-9)
        assert r[f"target_mass_js_{variant}"] == pytest.approx(target_js(tp, tt, ty, variant).mean().item(),
                                                               rel=1e-9)


def test_two_classes_use_target_mass_and_say_ncjsd_is_undefined():
    r = ntd.advise(logits_of([0.7, 0.3]), logits_of([0.4, 0.6]), [0])
    assert r["ncjsd_textbook"] is None and r["ncjsd_reference"] is None
    assert r["quantity"] == "target_mass_js"
    assert r["divergence"] == pytest.approx(js_textbook([0.7, 0.3], [0.4, 0.6]), rel=1e-9)
    assert r["target_mass_js_reference"] == pytest.approx(js_reference([0.7, 0.3], [0.4, 0.6]), rel=1e-9)
    assert any("undefined for C = 2" in n for n in r["notes"])
    assert "ncjsd is undefined" in r["verdict"]["text"]


def test_omega_statistics_on_a_constructed_case():
    # label 0 everywhere; rows: teacher right | wrong, probe almost collinear | wrong, orthogonal | wrong, opposite
    teacher = np.array([[3.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]])
    probe = np.array([[1.0, 0, 0], [0.05, 1, 0], [1, 0, 0], [0, 0, -1]])
    r = ntd.advise(teacher, probe, [0, 0, 0, 0], threshold=0.996)
    w = r["omega"]
    cos = 1 / math.sqrt(1 + 0.05 ** 2)  # 0.99875 >= 0.996: kept with weight (cos + 1) / 2
    assert w["dropped_share"] == 0.5 and w["downweighted_share"] == 0.25 and w["masked_share"] == 0.75
    assert w["teacher_wrong_share"] == 0.75 and w["kept_samples"] == 2
    assert w["mean"] == pytest.approx((1 + (cos + 1) / 2) / 4)
    assert r["per_class"][0]["omega_dropped_share"] == 0.5
    # a stricter threshold drops the almost-collinear row too
    assert ntd.advise(teacher, probe, [0, 0, 0, 0], threshold=0.9999)["omega"]["dropped_share"] == 0.75
    # without labels the teacher is never wrong: omega undefined, and said so
    unlabelled = ntd.advise(teacher, probe)
    assert unlabelled["omega"] is None and unlabelled["targets"] == "teacher_argmax"
    assert unlabelled["teacher_accuracy"] is None and any("no labels" in n for n in unlabelled["notes"])


def _pair(rng, n=2000, classes=10, noise=0.2):
    """Teacher and probe logits that differ by Gaussian noise of scale `noise`; labels mostly the teacher's argmax."""
    teacher = rng.normal(size=(n, classes)) * 2
    labels = teacher.argmax(1)
    labels[: n // 10] = rng.integers(0, classes, n // 10)
    probe = teacher + rng.normal(size=teacher.shape) * noise
    return teacher, probe, labels


def test_verdict_on_clearly_good_and_clearly_bad_pairs():
    rng = np.random.default_rng(1)
    teacher, good, labels = _pair(rng)
    bad = teacher.copy()
    others = np.arange(10)[None, :] != labels[:, None]
    bad[others] = rng.normal(size=others.sum()) * 6  # same targets, unrelated non-target distribution
    rg, rb = ntd.advise(teacher, good, labels), ntd.advise(teacher, bad, labels)
    assert rg["verdict"]["label"] == "help" and rb["verdict"]["label"] == "hurt"
    assert rg["divergence_normalised"] < 0.05 < 0.20 < rb["divergence_normalised"]
    assert "expect KD to hurt" in rb["verdict"]["text"] and "omega mask would drop" in rb["verdict"]["text"]
    # the thresholds are parameters: the same pair is "uncertain" between them
    mid = rb["divergence_normalised"]
    rule = ntd.VerdictRule(help_below=mid / 2, hurt_above=mid * 2)
    assert ntd.advise(teacher, bad, labels, rule=rule)["verdict"]["label"] == "uncertain"
    with pytest.raises(ConfigError, match="help_below <= hurt_above"):
        ntd.advise(teacher, good, labels, rule=ntd.VerdictRule(help_below=0.5, hurt_above=0.1))


def test_weaker_teacher_is_expected_to_hurt():
    rng = np.random.default_rng(2)
    probe = rng.normal(size=(500, 4)) * 3
    labels = probe.argmax(1)
    teacher = probe.copy()
    flip = rng.random(500) < 0.3  # the teacher prefers another class on 30 % of the samples
    teacher[flip, labels[flip]] -= 10
    r = ntd.advise(teacher, probe, labels, rule=ntd.VerdictRule(help_below=1.0, hurt_above=1.0))
    assert r["teacher_accuracy"] < r["probe_accuracy"] == 1.0
    assert r["verdict"]["label"] == "hurt" and "less accurate than the probe" in r["verdict"]["text"]
    # one sample's difference in 1000 is within noise: the guard does not fire
    probe = rng.normal(size=(1000, 4)) * 3
    labels = probe.argmax(1)
    teacher = probe.copy()
    teacher[0, labels[0]] -= 10
    r = ntd.advise(teacher, probe, labels)
    assert r["teacher_accuracy"] == 0.999 and r["accuracy_difference_se"] == pytest.approx(math.sqrt(0.001 / 1000),
                                                                                           rel=0.01)
    assert r["verdict"]["label"] == "help"
    strict = ntd.VerdictRule(accuracy_z=0.0)
    assert ntd.advise(teacher, probe, labels, rule=strict)["verdict"]["label"] == "hurt"


def test_rank_orders_candidates_by_non_target_divergence():
    rng = np.random.default_rng(3)
    cands = {}
    for name, noise in (("medium", 1.0), ("far", 3.0), ("near", 0.1)):
        cands[name] = _pair(np.random.default_rng(4), noise=noise)
    ranking = ntd.rank(cands)
    assert [e["name"] for e in ranking] == ["near", "medium", "far"]
    assert [e["rank"] for e in ranking] == [1, 2, 3]
    assert all(e["quantity"] == "ncjsd" for e in ranking)
    assert ranking[0]["divergence"] < ranking[1]["divergence"] < ranking[2]["divergence"]
    t2 = rng.normal(size=(10, 2))
    with pytest.raises(DataError, match="mix class counts"):
        ntd.rank({"three": cands["near"], "two": (t2, t2, None)})


# ----------------------------------------------------------------------------------------------------------------
# Input checks

def test_bad_inputs_are_one_line_data_errors():
    z = np.zeros((4, 3))
    cases = [
        ((z, np.zeros((4, 4)), None), "does not match"),
        ((np.full((4, 3), np.nan), z, None), "non-finite"),
        ((z, z, [0, 1, 2, 3]), r"outside \[0, 3\)"),
        ((z, z, [0, 1, 2]), "expected 4 labels"),
        ((np.zeros((4, 1)), np.zeros((4, 1)), None), "regression output"),
        ((np.zeros(4), np.zeros(4), None), "regression output"),
    ]
    for args, msg in cases:
        with pytest.raises(DataError, match=msg) as e:
            ntd.advise(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="expected 3 names"):
        ntd.advise(z, z, names=["a", "b"])


# ----------------------------------------------------------------------------------------------------------------
# The advisor check

def test_advisor_check_known_rho_intervals_and_small_n(tmp_path):
    recs = [("perfect", f"c{i}", i, 2.0 * i) for i in range(5)]
    recs += [("swapped", f"c{i}", i, d) for i, d in enumerate([1, 3, 2, 4, 5])]  # one swap: 1 - 6*2/120 = 0.9
    recs += [("tiny", "x", 1.0, 2.0), ("tiny", "y", 2.0, 1.0)]
    recs += [("flat", f"c{i}", i, 0.5) for i in range(4)]
    check = ntd.advisor_check(recs, plot=tmp_path / "check.png", n_resamples=500, seed=7)
    ex = check["experiments"]
    assert ex["perfect"]["rho"] == pytest.approx(1.0) and ex["perfect"]["ci"] == pytest.approx([1.0, 1.0])
    assert ex["swapped"]["rho"] == pytest.approx(0.9)
    lo, hi = ex["swapped"]["ci"]
    assert -1 <= lo < 0.9 <= hi <= 1
    assert ex["tiny"]["rho"] is None and "n = 2 < 3" in ex["tiny"]["note"]
    assert ex["flat"]["rho"] is None and "Deltas are all equal" in ex["flat"]["note"]
    assert check["pooled"]["experiments"] == ["perfect", "swapped", "flat"] and check["pooled"]["n"] == 14
    assert check["pooled_raw"]["n"] == 16
    again = ntd.advisor_check(recs, n_resamples=500, seed=7)
    assert again["experiments"]["swapped"]["ci"] == ex["swapped"]["ci"]  # seeded
    assert (tmp_path / "check.png").read_bytes()[:4] == b"\x89PNG"
    md = ntd.check_markdown(check, "check.png")
    assert "| swapped | 5 | +0.900 |" in md and "| tiny | 2 | undefined |" in md and "](check.png)" in md
    with pytest.raises(DataError, match="non-finite"):
        ntd.advisor_check([("e", "a", float("nan"), 1.0)])


def test_advisor_check_negative_relation():
    recs = [("e", str(i), float(i), float(-i * i)) for i in range(8)]
    assert ntd.advisor_check(recs, n_resamples=200)["experiments"]["e"]["rho"] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------------------------------
# The file format

def test_save_and_load_round_trip_with_tensors_and_meta(tmp_path):
    z = torch.randn(20, 4)
    y = torch.randint(0, 4, (20,))
    path = ntd.save_logits(tmp_path, "teacher", z, y, tag="mode1", split="val", source="test teacher")
    assert path == tmp_path / "ntd" / "teacher_mode1.npz"
    f = ntd.load_logits(tmp_path, "teacher", "mode1")
    assert f.logits.dtype == np.float32 and f.labels.dtype == np.int64
    np.testing.assert_array_equal(f.logits, z.numpy())
    np.testing.assert_array_equal(f.labels, y.numpy())
    assert f.meta["split"] == "val" and f.meta["source"] == "test teacher" and f.meta["rows"] == 20
    assert ntd.load_logits(tmp_path / "ntd", "teacher", "mode1").meta == f.meta  # the ntd folder itself
    ntd.save_logits(tmp_path, "teacher", z * 2, y, tag="mode1")  # its own file may be replaced
    np.testing.assert_allclose(ntd.load_logits(tmp_path, "teacher", "mode1").logits, z.numpy() * 2)


def test_save_subsamples_the_same_rows_for_every_role(tmp_path):
    z = np.arange(300 * 3, dtype=np.float32).reshape(300, 3)
    y = np.arange(300) % 3
    ntd.save_logits(tmp_path, "teacher", z, y, max_rows=50)
    ntd.save_logits(tmp_path, "probe", -z, y, max_rows=50)
    t, p = ntd.load_logits(tmp_path, "teacher"), ntd.load_logits(tmp_path, "probe")
    assert t.logits.shape == (50, 3) and t.meta["rows_total"] == 300 and t.meta["subsample_seed"] == 0
    np.testing.assert_array_equal(t.logits, -p.logits)
    np.testing.assert_array_equal(t.labels, p.labels)


def test_save_refuses_bad_input_and_foreign_files(tmp_path):
    z, y = np.zeros((5, 3)), np.array([0, 1, 2, 0, 1])
    with pytest.raises(DataError, match="teacher.npz: teacher logits: 3 non-finite"):
        ntd.save_logits(tmp_path, "teacher", np.where(np.eye(5, 3) > 0, np.inf, 0), y)
    with pytest.raises(DataError, match=r"teacher labels: 1 labels outside \[0, 3\)"):
        ntd.save_logits(tmp_path, "teacher", z, [0, 1, 2, 3, 0])
    with pytest.raises(DataError, match="role must be one of"):
        ntd.save_logits(tmp_path, "student", z, y)
    with pytest.raises(DataError, match="run directory not found"):
        ntd.save_logits(tmp_path / "absent", "teacher", z, y)
    foreign = tmp_path / "ntd" / "probe.npz"
    foreign.parent.mkdir(exist_ok=True)
    np.savez(foreign, logits=z)
    with pytest.raises(DataError, match="not written by save_logits"):
        ntd.save_logits(tmp_path, "probe", z, y)
    assert set(np.load(foreign).files) == {"logits"}
    with pytest.raises(DataError, match="teacher logits not found"):
        ntd.load_logits(tmp_path, "teacher")


def test_dense_rows_flattens_positions_and_drops_ignored_labels():
    z = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    y = np.array([[[0, 255], [1, 2]], [[2, 2], [255, 0]]])
    rows, labels = ntd.dense_rows(z, y, class_dim=1, ignore_index=255)
    assert rows.shape == (6, 3) and labels.tolist() == [0, 1, 2, 2, 2, 0]
    np.testing.assert_array_equal(rows[0], z[0, :, 0, 0])
    np.testing.assert_array_equal(rows[2], z[0, :, 1, 1])


# ----------------------------------------------------------------------------------------------------------------
# The command line

def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "common.ntd", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def _files(tmp_path):
    teacher, probe, labels = _pair(np.random.default_rng(5), n=300, classes=5)
    np.save(tmp_path / "t.npy", teacher)
    np.savez(tmp_path / "p.npz", logits=probe)
    torch.save(torch.from_numpy(labels), tmp_path / "y.pt")
    return teacher, probe, labels


def test_cli_advise_on_files(tmp_path):
    teacher, probe, labels = _files(tmp_path)
    res = _run("advise", "--teacher", "t.npy", "--probe", "p.npz", "--labels", "y.pt", "--names", "a,b,c,d,e",
               "--out", "advice.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "verdict: HELP" in res.stdout and "non-target JS (ncjsd)" in res.stdout
    out = json.loads((tmp_path / "advice.json").read_text())
    expected = ntd.advise(teacher, probe, labels)
    assert out["ncjsd_textbook"] == pytest.approx(expected["ncjsd_textbook"], rel=1e-5)
    assert out["class_names"] == list("abcde") and out["inputs"]["labels"] == "y.pt"
    np.save(tmp_path / "p4.npy", probe[:, :4])
    bad = _run("advise", "--teacher", "t.npy", "--probe", "p4.npy", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: p4.npy: shape (300, 4) does not match t.npy (300, 5) (the same samples " \
                                 "and classes, row by row)"


def test_cli_on_run_directories_advise_and_rank(tmp_path):
    teacher, probe, labels = _pair(np.random.default_rng(6), n=300, classes=4)
    run = tmp_path / "exp_20260101-000000"
    run.mkdir()
    ntd.save_logits(run, "probe", probe, labels)
    ntd.save_logits(run, "teacher", teacher, labels, tag="mode1")
    ntd.save_logits(run, "teacher", np.random.default_rng(7).normal(size=teacher.shape) * 3, labels, tag="mode2")
    res = _run("advise", str(run), "--tag", "mode1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "verdict: HELP" in res.stdout and "written: " in res.stdout
    assert json.loads((run / "ntd" / "advice_mode1.json").read_text())["targets"] == "labels"
    api = ntd.advise_files(run, tag="mode1")  # the same resolution from Python
    assert api["inputs"]["probe"].endswith("ntd/probe.npz") and api["divergence"] == pytest.approx(
        ntd.advise(teacher, probe, labels)["divergence"], rel=1e-5)
    ranking = ntd.main(["rank", str(run), "--out", str(tmp_path / "ranking.json")])  # in process: no 2nd start-up
    names = [e["name"] for e in json.loads((tmp_path / "ranking.json").read_text())["ranking"]]
    assert names == [e["name"] for e in ranking] == [f"{run.name}:mode1", f"{run.name}:mode2"]
    assert ranking[0]["divergence"] < ranking[1]["divergence"]


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli(lambda: ntd.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_one_line_errors(tmp_path, capsys):
    teacher, probe, labels = _files(tmp_path)
    d = str(tmp_path)
    np.save(tmp_path / "p4.npy", probe[:, :4])
    nan = teacher.copy()
    nan[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "y_bad.npy", labels + 5)
    np.save(tmp_path / "reg.npy", teacher[:, :1])
    (tmp_path / "junk.npz").write_text("not an archive")
    t, p = f"{d}/t.npy", f"{d}/p.npz"
    assert "p4.npy: shape (300, 4) does not match" in _cli_error(["advise", "--teacher", t, "--probe",
                                                                   f"{d}/p4.npy"], capsys)
    assert "nan.npy: teacher logits: 1 non-finite logits (NaN/inf), first in row 7" in _cli_error(
        ["advise", "--teacher", f"{d}/nan.npy", "--probe", p], capsys)
    assert "y_bad.npy: labels:" in _cli_error(["advise", "--teacher", t, "--probe", p, "--labels",
                                               f"{d}/y_bad.npy"], capsys)
    assert "absent.npy: teacher logits file not found" in _cli_error(["advise", "--teacher", f"{d}/absent.npy",
                                                                      "--probe", p], capsys)
    assert "junk.npz: not a .npz file" in _cli_error(["advise", "--teacher", f"{d}/junk.npz", "--probe", p], capsys)
    assert "regression output" in _cli_error(["advise", "--teacher", f"{d}/reg.npy", "--probe", f"{d}/reg.npy"],
                                             capsys)
    assert "ntd/teacher.npz: teacher logits not found" in _cli_error(["advise", d], capsys)
    assert "refusing to overwrite" in _cli_error(["advise", "--teacher", t, "--probe", p, "--out", t], capsys)
    assert "expected NAME=TEACHER,PROBE" in _cli_error(["rank", "x=only_one.npy"], capsys)
