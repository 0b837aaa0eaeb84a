"""`make gpu-check`: does the project run on this machine's GPU(s)? One JSON line per check, within ~5 minutes.

    python bench/gpu_check.py [--budget 300] [--skip-benches]

Checks, each in its own process, on tiny configs:
  semantic_kitti_torchrun_1gpu   bash semantic_kitti/run.sh --demo (torchrun, 1 process on GPU 0), bf16 autocast +
                                 channels_last, teacher then distilled student; the run's summary is checked
  semantic_kitti_torchrun_2gpu   the same with 2 processes over NCCL (only when two GPUs are visible)
  nyu_ssc_torchrun_1gpu          nyu_ssc/main.py --demo under torchrun (1 process), bf16 autocast + channels_last_3d
  bench_<name>                   the GPU benchmarks (bench/*.py with a CUDA mode); "ratio" is the one they print
Each line: {"name", "ok", "seconds", "ratio" (benchmarks), "detail"}. Without CUDA: one line saying so, exit 0.
Exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = {  # benchmark script -> its arguments for a short GPU measurement
    "semantic_kitti_train_speed": ["--iters", "10"],
    "nyu_ssc_speed": ["--steps", "3", "--warmup", "1"],
    "m2pkd_inference": [],
    "mnist_loading": [],
    "ravdess_saliency": [],
}
TINY_KITTI = ["demo.frames={train: 4, val: 2}", "demo.image_size=[64, 192]", "demo.beams=16", "demo.azimuths=360",
              "data.train_crop=[64, 128]", "data.val_size=[64, 192]", "batch_size=[2, 1]", "iters_per_epoch=2",
              "n_epochs=2", "val_frequency=1", "train.amp=true", "train.channels_last=true", "n_threads=2"]


def tail(text: str, n: int = 400) -> str:
    return " ".join(text.strip().split())[-n:]


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT):
    """(return code or None on timeout, stdout + stderr, seconds)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), cwd=cwd,
                           env={**os.environ, **(env or {})})
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, time.perf_counter() - t0


def report(name: str, ok: bool, seconds: float, detail: str = "", ratio: float | None = None) -> bool:
    line = {"name": name, "ok": ok, "seconds": round(seconds, 1)}
    if ratio is not None or name.startswith("bench_"):
        line["ratio"] = ratio
    line["detail"] = detail
    print(json.dumps(line), flush=True)
    return ok


def check_kitti(gpus: str, tmp: Path, timeout: float) -> tuple[bool, float, str]:
    out = tmp / f"kitti_{gpus.replace(',', '')}"
    sets = TINY_KITTI + [f'gpu="{gpus}"', f"save_path={out / 'exp'}", f"data_root={out / 'data' / 'sequences'}"]
    code, text, sec = run(["bash", str(ROOT / "semantic_kitti" / "run.sh"), "--demo", *[f"--set={s}" for s in sets]],
                          timeout, env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "2"})
    if code != 0:
        return False, sec, f"exit {code}: {tail(text)}"
    want = len(gpus.split(","))
    found = []
    for summary in sorted((out / "exp").glob("log_*/summary.json")):
        s = json.loads(summary.read_text())
        log = (summary.parent / "log" / "console.log").read_text()
        if s["world_size"] != want or "device cuda" not in log or "CPU run" in log:
            return False, sec, f"{summary.parent.name}: world_size {s['world_size']}, not on CUDA as asked"
        found.append(f"{s['role']} val mIoU {s['best']['IOU']:.3f} (epoch {s['best_epoch']})")
    if len(found) != 2:
        return False, sec, f"expected a teacher and a student summary, found {len(found)}"
    return True, sec, f"{want} process(es), bf16 + channels_last: " + "; ".join(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nyu(tmp: Path, timeout: float) -> tuple[bool, float, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(ROOT / "nyu_ssc" / "main.py"), "--demo", "--epochs", "1", "--amp", "--channels-last",
           "--set", "train.amp_dtype=bfloat16", "--device", "cuda", "--out", str(tmp / "nyu")]
    code, text, sec = run(cmd, timeout, env={"OMP_NUM_THREADS": "2"})
    if code != 0:
        return False, sec, f"exit {code}: {tail(text)}"
    return bool(list((tmp / "nyu").rglob("summary.json"))), sec, tail(text, 200)


RATIO = re.compile(r"ratio[^\n]*?=\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


def check_bench(name: str, timeout: float):
    code, text, sec = run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *BENCHES[name]], timeout)
    m = RATIO.search(text)
    ratio = float(m.group(1)) if m else None
    if code != 0 or ratio is None or "no GPU" in text:
        return False, sec, f"exit {code}: {tail(text)}", ratio
    line = next(ln for ln in text.splitlines() if RATIO.search(ln))
    return True, sec, line.strip()[:200], ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=300, help="seconds for all checks (later ones are skipped)")
    p.add_argument("--skip-benches", action="store_true")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(json.dumps({"name": "gpu_check", "ok": True, "seconds": 0.0,
                          "detail": "no CUDA GPU visible: nothing to check (exit 0)"}))
        return 0
    n = torch.cuda.device_count()
    deadline = time.perf_counter() + args.budget
    checks = [("semantic_kitti_torchrun_1gpu", lambda tmp, t: check_kitti("0", tmp, t))]
    if n >= 2:
        checks.append(("semantic_kitti_torchrun_2gpu", lambda tmp, t: check_kitti("0,1", tmp, t)))
    checks.append(("nyu_ssc_torchrun_1gpu", check_nyu))
    if not args.skip_benches:
        checks += [(f"bench_{b}", lambda tmp, t, b=b: check_bench(b, t)) for b in BENCHES]
    print(json.dumps({"name": "gpu", "ok": True, "seconds": 0.0,
                      "detail": f"{n} GPU(s): {torch.cuda.get_device_name(0)}, torch {torch.__version__}"}),
          flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for i, (name, fn) in enumerate(checks):
            left = deadline - time.perf_counter()
            if left < 10:
                failed += not report(name, False, 0.0, "skipped: the time budget is spent")
                continue
            result = fn(Path(tmp), min(left, 150))
            failed += not report(name, *result[:3], *(result[3:] or [None]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
