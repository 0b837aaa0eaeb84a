"""bench/gpu_check.py (`make gpu-check`) on a machine without CUDA, and how it reads the benchmarks' ratios."""
import importlib.util
import json
from pathlib import Path

import torch

SPEC = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_check)


def test_without_cuda_one_line_and_exit_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ok"] is True and "no CUDA GPU" in lines[0]


def test_ratio_lines_of_every_benchmark():
    for line, want in [("ratio = ours / baseline = 0.26", 0.26), ("ratio = ours / baseline = 2.31x (target ≥ 2x)", 2.31),
                       ("ratio = 12.3× (baseline / ours; > 1: ours is faster)", 12.3),
                       ("ratio = ours / baseline = 0.150 (epoch time; speed-up 6.7x)", 0.15)]:
        assert float(gpu_check.RATIO.search(line).group(1)) == want
    for name in gpu_check.BENCHES:
        assert (Path(gpu_check.ROOT) / "bench" / f"{name}.py").is_file()
