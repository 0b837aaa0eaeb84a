"""`make reproduce` (reproduce.py): every experiment takes part, a bad --only is one line, and the gauss section is
written into results/REPORT.md with its plots."""
import reproduce


def test_every_experiment_has_a_report_entry():
    assert reproduce.experiments() == ["gauss", "sklearn_exp", "mnist", "ravdess", "m2pkd", "semantic_kitti",
                                       "nyu_ssc"]


def test_unknown_experiment_is_refused(tmp_path, capsys):
    assert reproduce.main(["--only", "nope", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --only") and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_gauss_section_end_to_end(tmp_path):
    assert reproduce.main(["--only", "gauss", "--results", str(tmp_path), "--device", "cpu", "--workers", "1"]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "MFH modify γ" in report and "Spearman" in report
    pngs = list((tmp_path / "gauss").glob("*/*.png"))
    assert len(pngs) >= 6 and all(p.stat().st_size > 1000 for p in pngs)
    for ref in [line.split("](")[1].split(")")[0] for line in report.splitlines() if line.startswith("![")]:
        assert (tmp_path / ref).exists(), ref


def _records(root, exp, deltas, seed):
    import numpy as np
    from common import ntd
    rng = np.random.default_rng(seed)
    recs = []
    for k, delta in enumerate(deltas):
        run = root / exp / f"run{k}"
        run.mkdir(parents=True)
        y = rng.integers(0, 3, 200)
        t = rng.normal(size=(200, 3))
        t[np.arange(200), y] += 3
        ntd.save_logits(run, "teacher", t, y)
        ntd.save_logits(run, "probe", t + rng.normal(scale=0.5 * (k + 1), size=t.shape), y)  # farther with k
        recs.append({"label": f"cfg{k}", "teacher": f"run{k}", "delta": delta})
    ntd.save_check_records(root / exp, recs)


def test_advisor_section_scores_logits_against_deltas(tmp_path):
    # the probe drifts away from the teacher with k: predicted benefit falls with k
    _records(tmp_path, "agree", [0.0, -1.0, -2.0, -3.0], seed=0)      # Deltas fall too: rho = +1
    _records(tmp_path, "disagree", [-3.0, -2.0, -1.0, 0.0], seed=1)   # Deltas rise: rho = -1
    text = reproduce.advisor_section(tmp_path, ["agree", "disagree", "m2pkd"])
    assert "| agree | 4 | +1.000 |" in text and "| disagree | 4 | -1.000 |" in text
    assert "No advisor records from: m2pkd" in text and (tmp_path / "advisor_check.png").stat().st_size > 1000
    assert reproduce.advisor_section(tmp_path, ["m2pkd"]).count("No experiment wrote advisor records") == 1
