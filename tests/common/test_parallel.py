"""common.synthetic.parallel: blocks of runs, their concatenation, and a real two-process run."""
import numpy as np
import pytest

from common.synthetic import parallel


def test_split_runs_covers_every_run_once_in_near_equal_blocks():
    assert parallel.split_runs(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert parallel.split_runs(2, 5) == [(0, 1), (1, 1)]          # never an empty block
    assert parallel.split_runs(7, 1) == [(0, 7)]
    with pytest.raises(ValueError, match="runs and workers"):
        parallel.split_runs(0, 2)


def test_concat_runs_joins_arrays_on_the_runs_axis_and_keeps_the_rest():
    a = {"acc": np.zeros((2, 3)), "per": {"kl": np.ones((2, 3, 4))}, "settings": [1, 2], "flat": np.arange(2)}
    b = {"acc": np.ones((2, 1)), "per": {"kl": np.zeros((2, 1, 4))}, "settings": [1, 2], "flat": np.arange(2)}
    m = parallel.concat_runs([a, b])
    assert m["acc"].shape == (2, 4) and m["per"]["kl"].shape == (2, 4, 4) and m["acc"][:, 3].tolist() == [1, 1]
    assert m["settings"] == [1, 2] and m["flat"].tolist() == [0, 1]   # 1-d: no runs axis, taken from block 0


def _block(cfg, first_run):
    import torch
    return {"runs": np.arange(first_run, first_run + cfg["runs"])[None], "threads": torch.get_num_threads(),
            "progress": cfg["progress"]}


def test_run_blocks_in_processes_returns_results_in_block_order():
    lines = []
    parts = parallel.run_blocks(_block, {"runs": 5, "progress": True}, 2, log=lines.append)
    assert np.concatenate([p["runs"] for p in parts], 1).tolist() == [[0, 1, 2, 3, 4]]
    assert all(p["threads"] == 1 and p["progress"] is False for p in parts)
    assert len(lines) == 2
