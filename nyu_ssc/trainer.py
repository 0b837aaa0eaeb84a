"""The SSC training loop: one `fit` per network (teacher, no-KD baseline, KD student), its `step`, nothing else.

Built on `common.train`: a training-state `Checkpoint` every `train.checkpoint_every` epochs (resumed by
`--resume`), `check_finite` every step, `Selector` on the scenes held out of the training split, the test split
evaluated once with the selected weights, `EpochLog` for the per-term losses and the ω statistics, and a loader
generator per role so the baseline and the KD student see the same batches in the same order. Under torchrun the
model is wrapped in DDP, the training scenes are sharded and the metrics all-reduced (`common.ddp`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from common import ddp
from common.run import RunDir, derived_seed, seed_everything
from common.train import Checkpoint, EpochLog, Selector, check_finite, due
from nyu_ssc import config as SC
from nyu_ssc.engine import KD, autocast, build, eval_loader, evaluate, forward, headline, train_loader

METRICS = ("precision", "recall", "sc_iou", "miou", "pixel_acc")


@dataclass
class Context:
    """What every fit of one run shares: config, device, run directory, the datasets (train / val / test)."""
    cfg: dict
    device: torch.device
    rd: RunDir
    sets: dict
    log: Callable[[str], None] = print


def lr_warning(train_cfg: dict, epochs: int, parity: bool) -> str | None:
    """A warning when StepLR brings the last epoch's LR to 1e-4 × the initial one or lower (the reference README's
    `--lr_adj_n=1 --lr_adj_rate=0.1` over 5 epochs: 0.01 → 1e-6; the reference never stepped its scheduler)."""
    if parity:
        return None
    decays = (epochs - 1) // train_cfg["lr_adj_n"]
    ratio = train_cfg["lr_adj_rate"] ** decays
    if ratio > 1e-4 * (1 + 1e-9):
        return None
    return (f"warning: StepLR(step {train_cfg['lr_adj_n']}, gamma {train_cfg['lr_adj_rate']}) over {epochs} epochs "
            f"ends at lr {train_cfg['lr'] * ratio:.3g} ({ratio:.1e} × the initial {train_cfg['lr']}): the last epochs "
            f"barely learn; raise train.lr_adj_n (--lr_adj_n) or train.lr_adj_rate")


def step(net, batch, ctx: Context, weights, kd: KD | None) -> tuple[torch.Tensor, dict]:
    """Weighted CE over every voxel (255 ignored) plus, for a student, kd.ce_weight · CE + the KD objective."""
    target = batch["target"].to(ctx.device)
    with autocast(ctx.cfg, ctx.device):
        logits = forward(net, batch, ctx.device)
    ce = F.cross_entropy(logits.float(), target, weight=weights, ignore_index=SC.IGNORE)
    if kd is None:
        return ce, {"ce": ce.detach()}
    kd_total, kd_parts = kd(logits, batch, target, ctx.device)
    return kd.ce_weight * ce + kd_total, {"ce": ce.detach(), **{f"kd_{k}": v for k, v in kd_parts.items()}}


def _sync_objective_grads(kd: KD | None) -> None:
    """Terms with parameters (FitNet regressor, CRD embeddings) sit outside the DDP model: average their gradients."""
    if kd is None or ddp.world_size() == 1:
        return
    for p in kd.objective.parameters():
        if p.grad is not None:
            p.grad.copy_(ddp.all_reduce_mean(p.grad))


def _optimiser(ctx: Context, model, kd):
    t = ctx.cfg["train"]
    params = list(model.parameters()) + (list(kd.objective.parameters()) if kd else [])
    opt = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=t["lr_adj_n"], gamma=t["lr_adj_rate"])
    scaler = torch.amp.GradScaler("cuda", enabled=t["amp"] and t["amp_dtype"] == "float16"
                                  and ctx.device.type == "cuda")
    return opt, sched, scaler


def _validate(ctx, net, loader, tag, epoch) -> dict:
    res, _ = evaluate(net, loader, ctx.cfg, ctx.device, desc=f"{tag} val")
    head = headline(res, ctx.cfg)
    ctx.log(f"{tag} epoch {epoch} val: " + ", ".join(f"{k} {head[k]:.4f}" for k in METRICS))
    return {f"val_{k}": head[k] for k in METRICS}


def fit(ctx: Context, name: str, tag: str, role: str, kd: KD | None = None, epochs: int | None = None) -> dict:
    """Train network `name` as `tag` (files checkpoint/state_<tag>.pth, cpBest_<tag>.pth, <tag>_log.csv) with the
    data order of `role`; select on the validation scenes, then evaluate val and test once with the best weights."""
    cfg, t = ctx.cfg, ctx.cfg["train"]
    epochs = epochs or t["epochs"]
    seed_everything(derived_seed(cfg["seed"], "init", role) % 2 ** 32, cfg["deterministic"])   # same init per role
    model = build(cfg, name, ctx.device)
    net = ddp.wrap_model(model, ctx.device)
    opt, sched, scaler = _optimiser(ctx, model, kd)
    loader, gen = train_loader(cfg, ctx.sets["train"], role)
    val_loader = eval_loader(cfg, ctx.sets["val"])
    weights = torch.tensor(t["class_weights"], dtype=torch.float32, device=ctx.device)
    selector, log = Selector("max", path=ctx.rd.checkpoint_dir / f"cpBest_{tag}.pth"), EpochLog(ctx.rd, tag)
    ckpt = Checkpoint(ctx.rd.checkpoint_dir / f"state_{tag}.pth", model=model, optimizer=opt, scheduler=sched,
                      scaler=scaler, generator=gen, selector=selector, log=log,
                      objective=kd.objective if kd is not None and list(kd.objective.parameters()) else None)
    start, n_step = 1, 0
    if ckpt.exists():
        st = ckpt.load(ctx.device)
        start, n_step = st["epoch"] + 1, st["step"]
        ctx.log(f"{tag}: resumed from {ckpt.path} after epoch {st['epoch']} (step {n_step})")
    ctx.log(f"{tag}: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), epochs "
            f"{start}..{epochs}, {len(ctx.sets['train'])} train / {len(ctx.sets['val'])} val / "
            f"{len(ctx.sets['test'])} test scenes" + (f", KD ({', '.join(kd.objective.terms)}, mask "
                                                      f"{kd.objective.mask}, region {kd.region})" if kd else ""))
    for epoch in range(start, epochs + 1):
        ddp.set_epoch(loader.sampler, epoch)
        net.train()
        t0 = time.perf_counter()
        for i, batch in enumerate(loader):
            if t["max_steps_per_epoch"] and i >= t["max_steps_per_epoch"]:
                break
            loss, parts = step(net, batch, ctx, weights, kd)
            check_finite(loss, parts, epoch=epoch, step=i + 1, where=tag)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            _sync_objective_grads(kd)
            scaler.step(opt)
            scaler.update()
            n_step += 1
            log.add(parts)
            if kd is not None:
                log.add_omega(kd.objective.last_omega)
        metrics = {"lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if not cfg["parity"]:           # the reference builds a StepLR each epoch and never steps it
            sched.step()
        if due(epoch, cfg["eval"]["every"]) or epoch == epochs:
            metrics.update(_validate(ctx, net, val_loader, tag, epoch))
            if selector.update(metrics[f"val_{cfg['eval']['select']}"], epoch, model):
                ctx.log(f"{tag}: new best val {cfg['eval']['select']} at epoch {epoch}")
        log.end_epoch(epoch, **metrics)
        if due(epoch, t["checkpoint_every"]) or epoch == epochs:
            ckpt.save(epoch=epoch, step=n_step)
    return _finish(ctx, net, model, selector, log, tag, val_loader)


def _finish(ctx, net, model, selector, log, tag, val_loader) -> dict:
    """Restore the selected weights, evaluate the validation and (once) the test scenes with them."""
    selector.restore(model)
    val, _ = evaluate(net, val_loader, ctx.cfg, ctx.device, desc=f"{tag} best val")
    test, kept = evaluate(net, eval_loader(ctx.cfg, ctx.sets["test"]), ctx.cfg, ctx.device,
                          keep=ctx.cfg["eval"]["viz_samples"], desc=f"{tag} test")
    ctx.log(f"{tag}: best epoch {selector.best_epoch} (val {ctx.cfg['eval']['select']} {selector.best_score:.4f})")
    return {"val": val, "test": test, "kept": kept, "best_epoch": selector.best_epoch, "history": log.history,
            "omega": log.omega_summary(), "best_path": ctx.rd.checkpoint_dir / f"cpBest_{tag}.pth", "model": model}
