"""The pieces the SSC trainer (`trainer.py`) and `test.py` share: config checks, datasets and loaders (held-out
validation scenes, per-role shuffles, sharded evaluation under torchrun), models, evaluation and the KD objective."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common import ddp
from common.config import ConfigError, DataError
from common.kd import build_objective
from common.run import derived_seed, generator_dir, load_checkpoint
from common.train import freeze, holdout_split, loader_generator, seed_worker
from nyu_ssc import config as SC
from nyu_ssc import data, synth
from nyu_ssc.metrics import SSCMetrics
from nyu_ssc.models import make_model, to_channels_last_3d

KD_CONTEXT = {"student_dim": SC.NUM_CLASSES, "teacher_dim": SC.NUM_CLASSES}


def check_config(cfg: dict) -> None:
    """What config.yaml's `_checks` cannot say: grid shapes, the class-weight count, a buildable KD objective."""
    g = cfg["grid"]
    for key in ("hr", "lr"):
        if not (isinstance(g[key], list) and len(g[key]) == 3 and all(isinstance(v, int) and v > 0 for v in g[key])):
            raise ConfigError(f"grid.{key}: expected three positive ints (W, H, D), got {g[key]!r}")
    if any(h != 4 * l for h, l in zip(g["hr"], g["lr"])) or any(l % 2 for l in g["lr"]):
        raise ConfigError(f"grid: the networks downsample 4×, so grid.hr must be 4 × grid.lr with even grid.lr; "
                          f"got hr {g['hr']}, lr {g['lr']}")
    if len(g["image"]) != 2 or len(g["intrinsics"]) != 4:
        raise ConfigError("grid.image expects [H, W] and grid.intrinsics [fx, fy, cx, cy]")
    if len(cfg["train"]["class_weights"]) != SC.NUM_CLASSES:
        raise ConfigError(f"train.class_weights: expected {SC.NUM_CLASSES} values, got "
                          f"{len(cfg['train']['class_weights'])}")
    try:
        build_objective(cfg["kd"]["loss"], context=KD_CONTEXT)
    except (KeyError, TypeError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        raise ConfigError(f"kd.loss: {msg}") from None


# ---------------------------------------------------------------------------------------------------------------
# data

def data_dirs(cfg: dict, run_path: Path | None = None, log=print) -> dict:
    """{train, test} folders; for the demo the scenes are generated (once) under <run>/demo_data."""
    ds = cfg["data"]["dataset"]
    if ds != "demo":
        return {s: SC.Path.db_root_dir(ds, cfg, s) for s in ("train", "test")}
    if run_path is None:
        raise ConfigError("data.dataset demo needs a run directory to write its scenes into")
    dm, root = cfg["data"]["demo"], Path(run_path) / "demo_data"
    out = {"train": root / "train", "test": root / "test"}
    if ddp.is_main():
        for split, n, seed in (("train", dm["train"], dm["seed"]), ("test", dm["test"], dm["seed"] + 10_000)):
            if not list(out[split].glob("*.npz")):
                synth.write_npz_split(generator_dir(out[split], "demo scenes"), n, seed, cfg)
                log(f"demo: wrote {n} synthetic {split} scenes to {out[split]}")
    ddp.barrier()
    return out


def models_used(cfg: dict) -> set:
    k = cfg["kd"]
    return {k["teacher"], k["student"]} if k["enabled"] else {cfg["model"]["name"]}


def datasets(cfg: dict, dirs: dict, splits=("train", "val", "test")) -> dict:
    """train / val = the training scenes split by `data.val_fraction` (seeded), test = the released test split."""
    g, d = cfg["grid"], cfg["data"]
    need_tsdf = any("tsdf" in make_model(m, grid=(4, 4, 4)).inputs for m in models_used(cfg))
    load = lambda folder: data.SSCNpz(folder, g["hr"], g["lr"], g["image"], d["max_items"], load_tsdf=need_tsdf)
    out = {}
    if "train" in splits or "val" in splits:
        full = load(dirs["train"])
        train_idx, val_idx = holdout_split(len(full), d["val_fraction"], cfg["seed"])
        out["train"], out["val"] = Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist())
    if "test" in splits:
        out["test"] = load(dirs["test"])
    return {k: v for k, v in out.items() if k in splits}


def train_loader(cfg: dict, dataset, role: str) -> tuple[DataLoader, torch.Generator | None]:
    """Shuffled batches from a generator seeded by (seed, role): a no-KD baseline and a KD student (role "student")
    see the same batches in the same order. Under torchrun a DistributedSampler with the same derived seed shards
    them; call `ddp.set_epoch(loader.sampler, epoch)` each epoch."""
    sampler = ddp.make_sampler(dataset, shuffle=True, seed=derived_seed(cfg["seed"], "loader", role))
    gen = None if sampler is not None else loader_generator(cfg["seed"], role)
    loader = DataLoader(dataset, batch_size=cfg["train"]["batch_size"], shuffle=sampler is None, sampler=sampler,
                        generator=gen, num_workers=cfg["data"]["workers"], worker_init_fn=seed_worker,
                        pin_memory=torch.cuda.is_available())
    return loader, gen


def eval_loader(cfg: dict, dataset) -> DataLoader:
    """In order; under torchrun each rank takes every world_size-th scene (no padding duplicates: the metrics are
    all-reduced over ranks afterwards)."""
    if ddp.world_size() > 1:
        dataset = Subset(dataset, list(range(ddp.rank(), len(dataset), ddp.world_size())))
    return DataLoader(dataset, batch_size=cfg["train"]["batch_size"], shuffle=False,
                      num_workers=cfg["data"]["workers"], pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------------------------
# models

def build(cfg: dict, name: str, device) -> torch.nn.Module:
    m = make_model(name, grid=tuple(cfg["grid"]["hr"]), parity=cfg["parity"],
                   invalid_position=cfg["model"]["project"]["invalid_position"]).to(device)
    if cfg["train"]["channels_last_3d"] and torch.device(device).type == "cuda":
        m = to_channels_last_3d(m)
    return m


def forward(model, batch: dict, device, non_blocking=True):
    kw = {k: batch[k].to(device, non_blocking=non_blocking) for k in ddp.unwrap(model).inputs}
    return model(position=batch["position"].to(device, non_blocking=non_blocking), **kw)


def autocast(cfg: dict, device):
    if cfg["train"]["amp"] and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, cfg["train"]["amp_dtype"]))
    return contextlib.nullcontext()


def load_weights(model: torch.nn.Module, path) -> dict:
    """A best-model file ({'model': ...}) or the reference's {'state_dict'} with 'module.' prefixes."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if state is None and isinstance(ckpt, dict):
        state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a checkpoint with 'model' or 'state_dict'")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        msg = "; ".join(s.strip() for s in str(e).splitlines() if s.strip())[:300]
        raise DataError(f"{path}: checkpoint does not match the model ({msg})") from None
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, loader, cfg, device, keep: int = 0, desc: str = "val") -> tuple[dict, list]:
    """Both aggregations (metrics.py), all-reduced over torchrun ranks, and up to `keep` (prediction, target,
    nonempty, name) of this rank's scenes for the plots."""
    model.eval()
    metrics, kept = SSCMetrics(), []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not cfg["progress"]):
        with autocast(cfg, device):
            logits = forward(model, batch, device)
        pred = logits.float().argmax(1).cpu()
        metrics.update(pred, batch["target"], batch["nonempty"])
        for i in range(pred.shape[0]):
            if len(kept) < keep:
                kept.append((pred[i].numpy(), batch["target"][i].numpy(), batch["nonempty"][i].numpy(),
                             batch["name"][i]))
    return metrics.all_reduce().result(), kept


@torch.no_grad()
def voxel_logits(model, loader, cfg, device, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 12) logits and (N,) labels of the labelled voxels (≠ 255) of `loader`'s scenes, gathered over ranks:
    what the NTD advisor (`common.ntd`) reads. Each scene gives at most max_rows / #scenes voxels, drawn with a seed
    derived from (seed, scene name), so the rows do not depend on the batch size or the number of ranks."""
    model.eval()
    per_scene = max(1, max_rows // max(1, len(loader.dataset) * ddp.world_size()))
    rows, labels = [np.zeros((0, SC.NUM_CLASSES), np.float32)], [np.zeros(0, np.int64)]   # a rank may hold no scene
    for batch in loader:
        with autocast(cfg, device):
            z = forward(model, batch, device).float().movedim(1, -1).cpu()
        for b, name in enumerate(batch["name"]):
            keep = (batch["target"][b] != SC.IGNORE).reshape(-1).numpy()
            idx = np.flatnonzero(keep)
            if len(idx) > per_scene:
                rng = np.random.default_rng(derived_seed(seed, "ntd_rows", name))
                idx = np.sort(rng.choice(idx, per_scene, replace=False))
            rows.append(z[b].reshape(-1, z.shape[-1]).numpy()[idx])
            labels.append(batch["target"][b].reshape(-1).numpy()[idx])
    parts = ddp.all_gather_object((np.concatenate(rows), np.concatenate(labels)))
    return (np.concatenate([p[0] for p in parts]).astype(np.float32),
            np.concatenate([p[1] for p in parts]).astype(np.int64))


def headline(res: dict, cfg: dict) -> dict:
    return res["per_sample" if cfg["parity"] else "dataset"]


# ---------------------------------------------------------------------------------------------------------------
# distillation

class KD:
    """Frozen teacher (`common.train.freeze`) + the common.kd objective, voxel-wise."""

    def __init__(self, cfg: dict, teacher: torch.nn.Module, mask: str | None = None):
        k, self.cfg = cfg["kd"], cfg
        self.teacher, self.region, self.ce_weight = freeze(teacher), k["region"], k["ce_weight"]
        loss = {**k["loss"], "mask": mask or k["loss"]["mask"],
                "omega": {**k["loss"]["omega"], "detach": not cfg["parity"]}}
        self.objective = build_objective(loss, context=KD_CONTEXT)

    def __call__(self, logits_s, batch, target, device):
        with torch.no_grad(), autocast(self.cfg, device):
            logits_t = forward(self.teacher, batch, device).float()
        zs = logits_s.float()
        if self.region == "labelled":       # rows = labelled voxels, (N, 12)
            keep = target != SC.IGNORE
            rows = lambda z: z.movedim(1, -1)[keep]
            return self.objective(rows(zs), rows(logits_t), target[keep])
        labels = torch.where(target == SC.IGNORE, torch.zeros_like(target), target)   # ω needs a class id
        return self.objective(zs, logits_t, labels)
