"""One rank of the 2-process gloo test in test_ddp.py. Usage: torchrun --nproc_per_node=2 ddp_worker.py OUT.json

Exercises the helpers of common.ddp the way an experiment does and has rank 0 write what it saw to OUT.json.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, so `common` imports without install

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from common import ddp  # noqa: E402
from common.metrics import ConfusionMatrix  # noqa: E402
from common.train import EpochLog  # noqa: E402


def main(out_path: str) -> None:
    env = ddp.init_distributed("cpu")
    assert env.distributed and env.world_size == 2 and env.rank in (0, 1) and env.local_rank == env.rank
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    assert ddp.is_main() == (env.rank == 0) and ddp.device_for(env, "cpu") == torch.device("cpu")

    total = ddp.all_reduce_sum(torch.tensor([env.rank + 1.0]))
    mean = ddp.all_reduce_mean(torch.tensor([env.rank + 1.0]))

    # Tiny regression: the same dataset on both ranks, each rank trains on its sampler's shard.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    data = TensorDataset(x, y)
    sampler = ddp.make_sampler(data, shuffle=True, seed=5)
    assert isinstance(sampler, DistributedSampler)
    ddp.set_epoch(sampler, 1)
    loader = DataLoader(data, batch_size=2, sampler=sampler)

    torch.manual_seed(100 + env.rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = ddp.wrap_model(nn.Linear(3, 1), "cpu")
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    init = {k: v.clone() for k, v in ddp.unwrap(model).state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    my_indices = list(iter(sampler))
    steps = 0
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()
        steps += 1
        if steps == 2:
            break

    params = [p.detach().tolist() for p in ddp.unwrap(model).parameters()]
    all_params = ddp.all_gather_object(params)
    all_indices = ddp.all_gather_object(my_indices)

    # Single-process reference: each DDP step averages the ranks' gradients of equal-sized batch means, which is
    # the gradient of the mean over the union of both ranks' batches.
    ref = nn.Linear(3, 1)
    ref.load_state_dict(init)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        idx = [i for rank_idx in all_indices for i in rank_idx[2 * step:2 * step + 2]]
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x[idx]), y[idx]).backward()
        ref_opt.step()
    matches_reference = all(torch.allclose(p.detach(), torch.tensor(q), atol=1e-6)
                            for p, q in zip(ref.parameters(), params))

    # Rank-dependent predictions; the reduced matrix must be the sum of both ranks' matrices.
    target = torch.tensor([0, 1, 2, 2, 255])
    pred = torch.tensor([0, 1, 1, 2, 0]) if env.rank == 0 else torch.tensor([1, 1, 2, 0, 2])
    cm = ConfusionMatrix(3, ignore_index=255).update(pred, target)
    local = cm.mat.tolist()
    cm.all_reduce()

    # NCCL's device rule, checked on CPU: the shared reductions move their tensors to the group's device; a direct
    # all_reduce of a CPU tensor (what NCCL rejects) is caught.
    with ddp.device_rule_check("nccl"):
        nccl_sum = ddp.all_reduce_sum(torch.tensor([env.rank + 1.0])).item()
        log = EpochLog(None, "t")
        log.add({"ce": torch.tensor(2.0 * (env.rank + 1))})
        log.add_omega(torch.tensor([1.0, 0.5]) if env.rank == 0 else torch.tensor([1.0, 1.0]))
        nccl_record = log.end_epoch(1)
        cm_nccl = ConfusionMatrix(3, ignore_index=255).update(pred, target).all_reduce().mat.tolist()
        try:
            torch.distributed.all_reduce(torch.tensor([1.0]))
            raw_cpu_rejected = False
        except RuntimeError:
            raw_cpu_rejected = True

    token = ddp.broadcast_object({"from": env.rank})
    gathered_ranks = ddp.all_gather_object(env.rank)
    ddp.barrier()
    if env.is_main:
        result = {"world_size": env.world_size, "sum": total.item(), "mean": mean.item(), "steps": steps,
                  "params_equal": all_params[0] == all_params[1], "matches_reference": matches_reference,
                  "shards_disjoint": not set(all_indices[0]) & set(all_indices[1]),
                  "confusion_local0": local, "confusion": cm.mat.tolist(), "miou": cm.mean_iou(),
                  "gathered_ranks": gathered_ranks, "broadcast": token, "nccl_sum": nccl_sum,
                  "nccl_record": nccl_record, "nccl_confusion": cm_nccl, "raw_cpu_rejected": raw_cpu_rejected}
        Path(out_path).write_text(json.dumps(result))
    ddp.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
