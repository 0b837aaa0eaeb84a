"""nyu_ssc under torchrun: two "nodes" × one process each, gloo, on this machine, launched by run_SSC_train.sh
with the multi-node settings in the environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT); KD (teacher, baseline,
student), with one validation scene, so the second rank evaluates an empty shard."""
import json
import os
import signal
import subprocess
import sys

from common.ddp import free_port
from tests.nyu_ssc.ssc_testutil import SSC, set_args


def test_two_nodes_one_process_each_with_gloo(tmp_path):
    port = str(free_port())
    out = tmp_path / "runs"
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHON": sys.executable, "NNODES": "2", "NODE_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "LOG": str(tmp_path / f"node{rank}.log"),
               "OMP_NUM_THREADS": "1", "EPOCHS": "2", "WORKERS": "0"}
        procs.append(subprocess.Popen(["bash", str(SSC / "run_SSC_train.sh"), "--demo", "--kd", "--device", "cpu",
                                       "--out", str(out), *set_args(),
                                       "--set", "eval.viz_samples=0", "--set", "data.demo.train=5"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:                     # on a timeout: SIGTERM reaches torchrun, which stops its worker
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], logs
    (run,) = [p for p in out.iterdir() if p.name.startswith("SSC_DDRNet_")]     # rank 0 alone writes
    assert "device cpu, 2 process(es)" in (run / "log" / "console.log").read_text()
    results = json.loads((run / "summary.json").read_text())["results"]
    assert set(results) == {"teacher", "baseline", "student"}
    res = results["student"]
    assert 0 <= res["test"]["dataset"]["miou"] <= 1 and res["best_epoch"] in (1, 2) and "omega_mean" in res
    assert (run / "ntd" / "teacher.npz").is_file() and (run / "ntd" / "probe.npz").is_file()  # rank 1: no val scene
    assert "torchrun, 2 node(s) × 1 process(es)" in logs[1]
