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
