"""mnist's reproduction hands the NTD advisor one record per removal mode (teacher after removal vs the CE probe)."""
import json

import numpy as np

from common import ntd
from mnist.report import advisor_records


def test_advisor_records_per_mode(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 40)
    ntd.save_logits(run, "probe", rng.normal(size=(40, 10)), y)
    for m in ("0", "2"):
        ntd.save_logits(run, "teacher", rng.normal(size=(40, 10)), y, tag=f"mode{m}")
    results = {"eval_tag": {"baseline": {"test_mean": 0.5},
                            "modes": {"0": {"test_mean": 0.45}, "1": {"test_mean": 0.6}, "2": {"test_mean": 0.55}}}}
    advisor_records(results, run, tmp_path / "out")
    recs = json.loads((tmp_path / "out" / ntd.CHECK_RECORDS).read_text())
    assert [(r["label"], round(r["delta"], 6)) for r in recs] == [("mode 0", -5.0), ("mode 2", 5.0)]
    _, rows = ntd.check_from_records({"mnist": tmp_path / "out"})
    assert [r["label"] for r in rows] == ["mode 0", "mode 2"]
