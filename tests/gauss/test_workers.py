"""Issue 15 item 11 (gauss and sklearn_exp share common.synthetic.parallel): the worker processes of a sweep (workers ≥ 2) die with their parent — kill -9 included — and
stop promptly on SIGTERM / SIGINT."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is pid, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()   # state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("exp,sig", [("gauss", signal.SIGKILL), ("gauss", signal.SIGTERM), ("gauss", signal.SIGINT),
                                     ("sklearn_exp", signal.SIGKILL)],
                         ids=["gauss-kill-9", "gauss-term", "gauss-int", "sklearn_exp-kill-9"])
def test_workers_end_with_the_parent(tmp_path, exp, sig):
    """The sweep's parent is signalled while both workers train; within 5 s no worker is left."""
    proc = subprocess.Popen([sys.executable, str(ROOT / exp / "main.py"), "--out", str(tmp_path), "--workers", "2",
                             "--runs", "4", "--set", "train.epochs=100000000", "--set", "progress=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # a test runner started in the background ignores SIGINT, and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120   # start-up (imports) on a loaded machine
        workers = []
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) >= 2, f"no workers started: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
        time.sleep(0.5)   # inside the training
        os.kill(proc.pid, sig)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), f"workers {workers} outlived their parent ({sig.name})"
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and "interrupted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)
