"""gauss/compare_reference.py: run-by-run comparison of a sweep with another implementation's per-run CSV."""
import numpy as np
import pandas as pd
import pytest

from common.config import DataError
from gauss import compare_reference as cr


def _ours(tmp_path, runs=8, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for loss, mask in [("kl", "none"), ("kl", "omega")]:
        for ov, gamma in [(0, 0.0), (10, 1.0)]:
            for r in range(runs):
                t, b = rng.integers(600, 800) / 1000, rng.integers(700, 800) / 1000
                rows.append({"loss": loss, "mask": mask, "gamma": gamma, "overlap_dim": ov, "run": r, "seed": r,
                             "teacher_acc": t, "no_kd_acc": b, "kd_acc": b + rng.integers(-40, 20) / 1000})
    df = pd.DataFrame(rows)
    df.to_csv(tmp_path / "runs.csv", index=False)
    return df


def _as_reference(ours: pd.DataFrame) -> pd.DataFrame:
    """Our rows in the reference's naming (mode, run) -- the layout of a per-run dump of its run_mm."""
    names = {v: k for k, v in cr.REFERENCE_MODES.items()}
    ref = ours.copy()
    ref.insert(0, "mode", [names[(lo, m)] for lo, m in zip(ref["loss"], ref["mask"])])
    return ref.drop(columns=["loss", "mask", "gamma", "seed"])


def test_identical_runs_pass_with_every_run_counted_as_identical(tmp_path, capsys):
    ours = _ours(tmp_path)
    ref = _as_reference(ours)
    ref["kd_acc"] += 1e-7  # float32 rounding of the same count is still the same run
    for mode, part in ref.groupby("mode"):  # one file per method, as a reference run per mode writes them
        part.to_csv(tmp_path / f"{mode}.csv", index=False)
    assert cr.main([str(tmp_path / "KD_KL.csv"), str(tmp_path / "KD_KL_PSSM.csv"), str(tmp_path)]) == 0
    out = pd.read_csv(tmp_path / "reference_comparison.csv")
    assert len(out) == 4 and out["pass"].all()
    assert (out["identical_runs"] == 8).all() and (out["diff_mean"] == 0).all()
    assert "4 of 4 rows within 2.5 standard errors" in capsys.readouterr().out


def test_paired_difference_z_is_mean_over_standard_error(tmp_path):
    ours = _ours(tmp_path)
    ref = _as_reference(ours)
    offsets = np.tile([0.003, 0.002, 0.004, 0.0, 0.002, 0.003, 0.004, 0.003], 4)  # points: ×100
    ref["kd_acc"] = ref["kd_acc"] - offsets  # ours − ref = offsets (in fractions)
    rows = cr.compare(cr.load_reference_frame(ref), ours)
    d = offsets[:8] * 100
    z = d.mean() / (d.std(ddof=1) / np.sqrt(8))
    for r in rows:
        assert r["diff_mean"] == pytest.approx(d.mean()) and r["z"] == pytest.approx(z)
        assert r["identical_runs"] == 1 and r["pass"] == (abs(z) <= 2.5)
    assert abs(z) > 2.5  # this constructed shift is a real one: every row fails
    assert not any(r["pass"] for r in rows)


def test_a_shift_fails_and_exits_1(tmp_path):
    ours = _ours(tmp_path)
    ref = _as_reference(ours)
    ref.loc[ref["mode"] == "KD_KL_PSSM", "kd_acc"] -= 0.02  # one method two points off in every run
    ref.to_csv(tmp_path / "ref.csv", index=False)
    assert cr.main([str(tmp_path / "ref.csv"), str(tmp_path)]) == 1
    out = pd.read_csv(tmp_path / "reference_comparison.csv")
    assert out.loc[out["mask"] == "none", "pass"].all() and not out.loc[out["mask"] == "omega", "pass"].any()


def test_runs_missing_on_our_side_are_reported_not_invented(tmp_path):
    ours = _ours(tmp_path, runs=3)
    ref = _as_reference(ours)
    extra = ref[ref["run"] == 0].assign(run=7)  # a seed our sweep does not have
    rows = cr.compare(cr.load_reference_frame(pd.concat([ref, extra])), ours)
    assert all(r["runs"] == 3 for r in rows)  # only the runs both have are compared


def test_bad_reference_files_are_one_line_errors_naming_file_and_column(tmp_path):
    _ours(tmp_path)
    bad = tmp_path / "ref.csv"
    pd.DataFrame({"mode": ["KD_KL"], "overlap_dim": [0], "run": [0], "teacher_acc": [0.7]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"ref\.csv: missing column\(s\) kd_acc, no_kd_acc"):
        cr.main([str(bad), str(tmp_path)])
    pd.DataFrame({"mode": ["KL"], "overlap_dim": [0], "run": [0], "teacher_acc": [0.7], "no_kd_acc": [0.7],
                  "kd_acc": [0.7]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"ref\.csv: unknown mode\(s\) KL; expected one of KD_KL"):
        cr.main([str(bad), str(tmp_path)])
    _as_reference(_ours(tmp_path)).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"nowhere/runs\.csv: not found; expected the runs.csv of a gauss"):
        cr.main([str(bad), str(tmp_path / "nowhere")])


def test_parity_reproduces_the_reference_codes_own_runs():
    """gauss/reference_runs.csv holds per-run results of the NTDH repository's own gauss/main.py (run_mm, seeds 0-9;
    README "Checked against the reference code"). Under --parity, kl and dkd with and without ω give the same
    teacher, no-KD and KD accuracy as the reference in every run: same data, same initial weights, same training."""
    import torch

    from gauss import experiment
    from tests.gauss.test_gauss import small_cfg

    cfg = small_cfg(runs=2, parity=True, **{"kd.losses": ["kl", "dkd"], "kd.masks": ["none", "omega"]})
    results = experiment.run_sweep(cfg, torch.device("cpu"), log=lambda *_: None)
    ours = pd.DataFrame(experiment.run_rows(results, cfg["seed"]))
    ref = cr.load_reference(cr.HERE / "reference_runs.csv")
    ref = ref[ref["mode"].isin(["KD_KL", "KD_KL_PSSM", "dkd", "dkd_PSSM"])]
    rows = cr.compare(ref, ours)
    assert len(rows) == 4 * 6
    for r in rows:
        assert r["runs"] == 2 and r["identical_runs"] == 2 and r["diff_mean"] == 0, r


def test_a_non_numeric_cell_or_no_run_in_common_is_a_one_line_error(tmp_path):
    ours = _ours(tmp_path)
    ref = _as_reference(ours)
    ref["kd_acc"] = ref["kd_acc"].astype(object)
    ref.loc[3, "kd_acc"] = "abc"
    ref.to_csv(tmp_path / "ref.csv", index=False)
    with pytest.raises(DataError, match=r"ref\.csv: column kd_acc, data row 4: expected a number, got 'abc'"):
        cr.main([str(tmp_path / "ref.csv"), str(tmp_path)])
    ref.loc[3, "kd_acc"] = "n/a"   # pandas reads it as missing
    ref.to_csv(tmp_path / "ref.csv", index=False)
    with pytest.raises(DataError, match=r"data row 4: expected a number, got an empty cell"):
        cr.main([str(tmp_path / "ref.csv"), str(tmp_path)])
    _as_reference(ours).assign(run=lambda d: d["run"] + 50).to_csv(tmp_path / "ref.csv", index=False)
    with pytest.raises(DataError, match="no \\(loss, mask, overlap_dim, seed\\) in common"):
        cr.main([str(tmp_path / "ref.csv"), str(tmp_path)])
    assert not (tmp_path / "reference_comparison.csv").exists()  # nothing written from a failed comparison


def test_methods_the_run_did_not_train_are_skipped_and_one_differing_run_is_untestable(tmp_path, capsys):
    """A reference with more methods than the run: those are listed, not failed. A row whose only run differs has no
    standard error: untestable, not a failure; the exit status counts failures only. Every tested row carries the
    paired t-test's p-value."""
    ours = _ours(tmp_path, runs=4)
    ref = _as_reference(ours)
    ref = pd.concat([ref, ref[ref["mode"] == "KD_KL"].assign(mode="rkd")])   # a method the run did not train
    ref.loc[(ref["mode"] == "KD_KL") & (ref["overlap_dim"] == 10) & (ref["run"] > 0), "run"] += 100
    ref.loc[(ref["mode"] == "KD_KL") & (ref["overlap_dim"] == 10), "kd_acc"] -= 0.003   # its one run in common differs
    ref.loc[(ref["mode"] == "KD_KL") & (ref["overlap_dim"] == 0), "kd_acc"] -= [0.001, -0.002, 0.003, -0.001]
    ref.to_csv(tmp_path / "ref.csv", index=False)
    assert cr.main([str(tmp_path / "ref.csv"), str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "not in this run, skipped: rkd/none" in text and "untestable (1 run)" in text
    assert "3 of 3 rows within 2.5 standard errors" in text and "1 untestable" in text
    out = pd.read_csv(tmp_path / "reference_comparison.csv")
    assert set(out["loss"]) == {"kl"} and len(out) == 4
    kl0 = out[(out["mask"] == "none") & (out["overlap_dim"] == 0)].iloc[0]
    d = np.array([0.1, -0.2, 0.3, -0.1])
    assert kl0["p"] == pytest.approx(2 * __import__("scipy").stats.t.sf(d.mean() / (d.std(ddof=1) / 2), 3))
    assert pd.isna(out[(out["mask"] == "none") & (out["overlap_dim"] == 10)].iloc[0]["pass"])
