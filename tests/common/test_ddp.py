import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from common import ddp

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_gloo(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={ddp.free_port()}",
           str(WORKER), str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["world_size"] == 2 and r["sum"] == 3.0 and r["mean"] == 1.5
    assert r["steps"] == 2 and r["shards_disjoint"]
    assert r["params_equal"] and r["matches_reference"]
    assert r["gathered_ranks"] == [0, 1] and r["broadcast"] == {"from": 0}
    # rank 0: pred [0,1,1,2] vs target [0,1,2,2]; rank 1: pred [1,1,2,0] vs the same target; target 255 ignored.
    assert r["confusion_local0"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 1, 2]]
    # under NCCL's device rule: the shared reductions pass, a raw CPU all_reduce is rejected
    assert r["nccl_sum"] == 3.0 and r["nccl_confusion"] == r["confusion"] and r["raw_cpu_rejected"]
    assert r["nccl_record"]["train_ce"] == 3.0  # (2 + 4) / 2 steps
    assert r["nccl_record"]["omega_mean"] == 3.5 / 4 and r["nccl_record"]["omega_masked_share"] == 0.25


def test_single_process_fallbacks():
    env = ddp.dist_env()
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0) and not env.distributed and env.is_main
    assert ddp.init_distributed("cpu") == env and not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 2.0])
    s = ddp.all_reduce_sum(t)
    assert torch.equal(s, t) and s is not t
    assert torch.equal(ddp.all_reduce_mean(t), t)
    assert ddp.all_gather_object({"a": 1}) == [{"a": 1}] and ddp.broadcast_object(5) == 5
    assert ddp.make_sampler(list(range(4)), shuffle=True) is None
    ddp.set_epoch(None, 3)
    ddp.barrier()
    ddp.destroy()
    assert ddp.is_main()
    model = nn.Linear(2, 2)
    assert ddp.wrap_model(model, "cpu") is model
    assert ddp.unwrap(nn.DataParallel(model)) is model and ddp.unwrap(model) is model
    assert ddp.device_for(env, "cpu") == torch.device("cpu")


def test_dist_env_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = ddp.dist_env()
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1) and env.distributed and not env.is_main


def test_rank0_logging(monkeypatch, caplog):
    monkeypatch.setenv("RANK", "1")
    quiet = ddp.rank0_logging(logging.getLogger("test_ddp.rank1"))
    monkeypatch.setenv("RANK", "0")
    loud = ddp.rank0_logging(logging.getLogger("test_ddp.rank0"))
    with caplog.at_level(logging.INFO):
        quiet.info("from rank 1")
        loud.info("from rank 0")
    assert [r.getMessage() for r in caplog.records] == ["from rank 0"]


def test_free_port_is_bindable():
    port = ddp.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
