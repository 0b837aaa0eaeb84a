"""Training, cross-modal distillation and evaluation of SSC networks (one `fit` per model, checkpoints with resume)."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.config import ConfigError, DataError
from common.kd import build_objective
from common.run import load_checkpoint, load_training_state, save_training_state
from nyu_ssc import config as SC
from nyu_ssc import data, synth
from nyu_ssc.metrics import SSCMetrics, format_result
from nyu_ssc.models import MODELS, make_model, to_channels_last_3d


def check_config(cfg: dict) -> None:
    g = cfg["grid"]
    for key in ("hr", "lr"):
        if not (isinstance(g[key], list) and len(g[key]) == 3 and all(isinstance(v, int) and v > 0 for v in g[key])):
            raise ConfigError(f"grid.{key}: expected three positive ints (W, H, D), got {g[key]!r}")
    if any(h != 4 * l for h, l in zip(g["hr"], g["lr"])) or any(l % 2 for l in g["lr"]):
        raise ConfigError(f"grid: the networks downsample 4×, so grid.hr must be 4 × grid.lr with even grid.lr; "
                          f"got hr {g['hr']}, lr {g['lr']}")
    if len(g["image"]) != 2 or len(g["intrinsics"]) != 4:
        raise ConfigError("grid.image expects [H, W] and grid.intrinsics [fx, fy, cx, cy]")
    for key in ("model.name", "kd.student", "kd.teacher"):
        sec, k = key.split(".")
        if cfg[sec][k] not in MODELS:
            raise ConfigError(f"{key}: unknown model {cfg[sec][k]!r}; known: {', '.join(MODELS)}")
    if len(cfg["train"]["class_weights"]) != SC.NUM_CLASSES:
        raise ConfigError(f"train.class_weights: expected {SC.NUM_CLASSES} values, got {len(cfg['train']['class_weights'])}")
    if cfg["eval"]["select"] not in ("miou", "ssc_iou"):
        raise ConfigError(f"eval.select: expected miou or ssc_iou, got {cfg['eval']['select']!r}")
    if cfg["train"]["amp_dtype"] not in ("float16", "bfloat16"):
        raise ConfigError(f"train.amp_dtype: expected float16 or bfloat16, got {cfg['train']['amp_dtype']!r}")
    if cfg["kd"]["region"] not in ("labelled", "all"):
        raise ConfigError(f"kd.region: expected labelled or all, got {cfg['kd']['region']!r}")


# ---------------------------------------------------------------------------------------------------------------
# data

def data_dirs(cfg: dict, run_path: Path | None = None, log=print) -> dict:
    """{train, val} folders; for the demo the scenes are generated (once) under <run>/demo_data."""
    ds = cfg["data"]["dataset"]
    if ds == "demo":
        if run_path is None:
            raise ConfigError("data.dataset demo needs a run directory to write its scenes into")
        dm, root = cfg["data"]["demo"], Path(run_path) / "demo_data"
        out = {"train": root / "train", "val": root / "val"}
        for split, n, seed in (("train", dm["train"], dm["seed"]), ("val", dm["val"], dm["seed"] + 10_000)):
            if not list(out[split].glob("*.npz")):
                t = time.perf_counter()
                synth.write_npz_split(out[split], n, seed, cfg)
                log(f"demo: wrote {n} synthetic {split} scenes to {out[split]} ({time.perf_counter() - t:.1f} s)")
        return out
    return {s: SC.Path.db_root_dir(ds, cfg, s) for s in ("train", "val")}


def models_used(cfg: dict) -> set:
    k = cfg["kd"]
    return {k["teacher"], k["student"]} if k["enabled"] else {cfg["model"]["name"]}


def make_loaders(cfg: dict, dirs: dict, splits=("train", "val")) -> dict:
    g, d = cfg["grid"], cfg["data"]
    need_tsdf = any("tsdf" in make_model(m, grid=(4, 4, 4)).inputs for m in models_used(cfg))
    out = {}
    for split in splits:
        dset = data.SSCNpz(dirs[split], g["hr"], g["lr"], g["image"], d["max_items"], load_tsdf=need_tsdf)
        gen = torch.Generator().manual_seed(cfg["seed"])
        out[split] = DataLoader(dset, batch_size=cfg["train"]["batch_size"], shuffle=split == "train",
                                num_workers=d["workers"], generator=gen, drop_last=False,
                                pin_memory=torch.cuda.is_available())
    return out


# ---------------------------------------------------------------------------------------------------------------
# models

def build(cfg: dict, name: str, device) -> torch.nn.Module:
    m = make_model(name, grid=tuple(cfg["grid"]["hr"]), parity=cfg["parity"],
                   invalid_position=cfg["model"]["project"]["invalid_position"]).to(device)
    if cfg["train"]["channels_last_3d"] and torch.device(device).type == "cuda":
        m = to_channels_last_3d(m)
    return m


def forward(model, batch: dict, device, non_blocking=True):
    kw = {k: batch[k].to(device, non_blocking=non_blocking) for k in model.inputs}
    return model(position=batch["position"].to(device, non_blocking=non_blocking), **kw)


def autocast(cfg: dict, device):
    if cfg["train"]["amp"] and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, cfg["train"]["amp_dtype"]))
    return contextlib.nullcontext()


def load_weights(model: torch.nn.Module, path) -> dict:
    """Our training state ({'model': ...}), a best-model file, or the reference's {'state_dict'} with 'module.'."""
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
    """Both aggregations (metrics.py) and up to `keep` (prediction, target, nonempty, name) for the plots."""
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
    return metrics.result(), kept


def headline(res: dict, cfg: dict) -> dict:
    return res["per_sample" if cfg["parity"] else "dataset"]


# ---------------------------------------------------------------------------------------------------------------
# training

class KD:
    """Frozen teacher + the common.kd objective, voxel-wise."""

    def __init__(self, cfg: dict, teacher: torch.nn.Module):
        k, self.cfg = cfg["kd"], cfg
        self.teacher, self.region, self.ce_weight = teacher.eval(), k["region"], k["ce_weight"]
        for p in teacher.parameters():
            p.requires_grad_(False)
        loss = {**k["loss"], "omega": {**k["loss"]["omega"], "detach": not cfg["parity"]}}
        self.objective = build_objective(loss, context={"student_dim": SC.NUM_CLASSES,
                                                        "teacher_dim": SC.NUM_CLASSES})

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


def fit(cfg: dict, name: str, tag: str, loaders: dict, device, rd, kd: KD | None = None, epochs: int | None = None,
        log=print) -> dict:
    """Train `name` (checkpoint tag `tag`) for `epochs`, validating every eval.every epochs; resumes from
    <run>/checkpoint/cp_<tag>.pth when that exists. Returns {'best': ..., 'history': [...], 'best_path': ...}."""
    t = cfg["train"]
    epochs = epochs or t["epochs"]
    model = build(cfg, name, device)
    params = list(model.parameters()) + (list(kd.objective.parameters()) if kd else [])
    opt = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=t["lr_adj_n"], gamma=t["lr_adj_rate"])
    scaler = torch.amp.GradScaler("cuda", enabled=t["amp"] and t["amp_dtype"] == "float16"
                                  and torch.device(device).type == "cuda")
    weights = torch.tensor(t["class_weights"], dtype=torch.float32, device=device)
    cp, best_path = rd.checkpoint_dir / f"cp_{tag}.pth", rd.checkpoint_dir / f"cpBest_{tag}.pth"
    start, history, best = 1, [], None
    if cp.is_file():
        st = load_training_state(cp, model=model, optimizer=opt, scheduler=sched, map_location=device)
        start, history, best = st["epoch"] + 1, st.get("history", []), st.get("best")
        log(f"{tag}: resumed from {cp} after epoch {st['epoch']}")
    sel = cfg["eval"]["select"]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{tag}: {name} ({n_params / 1e6:.2f} M parameters), epochs {start}..{epochs}, "
        f"{len(loaders['train'].dataset)} train / {len(loaders['val'].dataset)} val scenes"
        + (f", KD from {kd.teacher.__class__.__name__} ({', '.join(kd.objective.terms)}, mask "
           f"{kd.objective.mask}, region {kd.region})" if kd else ""))
    step = (start - 1) * len(loaders["train"])
    for epoch in range(start, epochs + 1):
        model.train()
        t0, sums, n = time.perf_counter(), {}, 0
        for i, batch in enumerate(tqdm(loaders["train"], desc=f"{tag} {epoch}/{epochs}", leave=False,
                                       disable=not cfg["progress"])):
            if t["max_steps_per_epoch"] and i >= t["max_steps_per_epoch"]:
                break
            target = batch["target"].to(device)
            with autocast(cfg, device):
                logits = forward(model, batch, device)
            ce = F.cross_entropy(logits.float(), target, weight=weights, ignore_index=SC.IGNORE)
            parts = {"ce": ce.detach()}
            loss = ce
            if kd is not None:
                kd_total, kd_parts = kd(logits, batch, target, device)
                loss = kd.ce_weight * ce + kd_total
                parts.update({f"kd_{k}": v for k, v in kd_parts.items()})
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{tag}: non-finite loss at epoch {epoch}, step {i}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            step += 1
            rd.scalar(f"{tag}/train_loss", loss.item(), step)
        lr = opt.param_groups[0]["lr"]
        if not cfg["parity"]:           # the reference builds a StepLR each epoch and never steps it
            sched.step()
        row = {"epoch": epoch, "lr": lr, "seconds": time.perf_counter() - t0, **{k: v / max(n, 1) for k, v in sums.items()}}
        if epoch % cfg["eval"]["every"] == 0 or epoch == epochs:
            res, kept = evaluate(model, loaders["val"], cfg, device, keep=cfg["eval"]["viz_samples"],
                                 desc=f"{tag} val")
            for agg in ("dataset", "per_sample"):
                log(f"{tag} epoch {epoch}: " + format_result(res[agg], agg))
                for key in ("precision", "recall", "ssc_iou", "miou", "pixel_acc"):
                    rd.scalar(f"{tag}/{agg}/{key}", res[agg][key], epoch)
            head = headline(res, cfg)
            row.update({f"val_{k}": head[k] for k in ("precision", "recall", "ssc_iou", "miou", "pixel_acc")})
            if best is None or head[sel] > best["score"]:
                best = {"epoch": epoch, "score": head[sel], "result": res, "kept": kept}
                rd.save_checkpoint({"model": model.state_dict(), "epoch": epoch, "model_name": name,
                                    "result": res}, best_path.name)
        history.append(row)
        log(f"{tag} epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        if epoch % t["checkpoint_every"] == 0 or epoch == epochs:
            save_training_state(cp, model=model, optimizer=opt, scheduler=sched, epoch=epoch, history=history,
                                best={k: v for k, v in best.items() if k != "kept"} if best else None,
                                model_name=name)
    if best is None:
        raise DataError(f"{cp}: finished run without a best model record")
    if "kept" not in best:   # resumed after the best epoch: evaluate the best weights once for the plots
        load_weights(model, best_path)
        _, best["kept"] = evaluate(model, loaders["val"], cfg, device, keep=cfg["eval"]["viz_samples"],
                                   desc=f"{tag} best")
    return {"best": best, "history": history, "best_path": best_path, "model": model}
