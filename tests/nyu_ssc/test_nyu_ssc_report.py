"""The make-reproduce tables: mean ± sd over seeds per pair and role, the KD gain against the same seed's baseline."""
from nyu_ssc import report


def _res(miou, sc=0.9, omega=None):
    split = {"dataset": {"miou": miou, "sc_iou": sc}}
    out = {"val": split, "test": split}
    if omega is not None:
        out.update(omega_mean=omega, omega_masked_share=1 - omega)
    return out


def test_table_mean_sd_and_gain_per_seed():
    runs = []
    for seed, b in ((1, 0.30), (2, 0.34), (3, 0.32)):
        runs.append({"seed": seed, "teacher": "ddrnet_rgbd", "summary": {"results": {
            "teacher": _res(0.4), "baseline": _res(b), "student": _res(b + 0.02, omega=0.8),
            "student_none": _res(b - 0.01)}}})
        runs.append({"seed": seed, "teacher": "ddrnet_rgb", "summary": {"results": {
            "teacher": _res(0.2), "student": _res(b - 0.03, omega=0.6), "student_none": _res(b)}}})
    lines = report.table(runs).splitlines()
    row = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
           for line in lines[2:]}
    assert row[("RGB-D → depth", "no-KD baseline")][1] == "32.0 ± 2.0"
    assert row[("RGB-D → depth", "KD student, ω mask")][2] == "2.0 ± 0.0"
    assert row[("RGB-D → depth", "KD student, ω mask")][3:5] == ["0.800", "20.0 %"]
    assert row[("RGB → depth", "KD student, ω mask")][2] == "-3.0 ± 0.0"
    assert row[("RGB → depth", "no-KD baseline")][1] == "32.0 ± 2.0"          # the RGB-D run's baseline, same seeds
    assert row[("RGB → depth", "KD student, no mask")][3] == "–"
    assert len(lines) == 2 + 8


def test_advisor_records_point_to_the_logits_and_measure_delta(tmp_path):
    """Each student's record: the teacher's run (its ntd/teacher.npz), the seed's baseline run (ntd/probe.npz), and
    Delta = student − baseline test mIoU in points."""
    runs = [{"seed": 1, "teacher": "ddrnet_rgbd", "run_dir": tmp_path / "a", "summary": {"results": {
                "teacher": _res(0.4), "baseline": _res(0.30), "student": _res(0.32, omega=0.8),
                "student_none": _res(0.29)}}},
            {"seed": 1, "teacher": "ddrnet_rgb", "run_dir": tmp_path / "b", "summary": {"results": {
                "teacher": _res(0.2), "student": _res(0.25, omega=0.6)}}}]
    recs = report.advisor_records(runs, tmp_path)
    assert [(r["teacher"], r["probe"]) for r in recs] == [("a", "a"), ("a", "a"), ("b", "a")]
    assert [round(r["delta"], 6) for r in recs] == [2.0, -1.0, -5.0]
    assert recs[2]["label"] == "ddrnet_rgb → ddrnet, KL ω, seed 1"
