"""ravdess's reproduction hands the NTD advisor one record per removal mode (teacher after removal vs the probe)."""
import json

import numpy as np

from common import ntd
from ravdess.report import advisor_records


def test_advisor_records_per_mode(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 50)
    ntd.save_logits(run, "probe", rng.normal(size=(50, 8)), y)
    for m in (0, 1):  # mode 2's teacher logits are missing: no record for it
        ntd.save_logits(run, "teacher", rng.normal(size=(50, 8)), y, tag=f"mode{m}")
    results = {"run_dir": str(run), "baseline": {"test_mean": 0.30},
               "modes": [{"mode": 0, "test_mean": 0.25}, {"mode": 1, "test_mean": 0.40}, {"mode": 2, "test_mean": 0.2}]}
    advisor_records(results, tmp_path / "out")
    recs = json.loads((tmp_path / "out" / ntd.CHECK_RECORDS).read_text())
    assert [(r["label"], r["tag"], round(r["delta"], 6)) for r in recs] == [("mode 0", "mode0", -5.0),
                                                                          ("mode 1", "mode1", 10.0)]
    check, rows = ntd.check_from_records({"ravdess": tmp_path / "out"})
    assert [r["label"] for r in rows] == ["mode 0", "mode 1"] and check["experiments"]["ravdess"]["n"] == 2
