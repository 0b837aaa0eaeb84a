"""Step 4-5: train one model for one dimension — `baseline` (visual only, 1−CCC), `teacher` (audio + visual,
1−CCC) or `student` (visual only, α·(1−CCC) + β·KD with the frozen teacher's 128-d embeddings) — select it on the
selection recordings, and evaluate dev once with stateful GRU inference over whole recordings."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.config import ConfigError, DataError
from common.kd import build_objective
from common.metrics import ccc_loss, ccc_np
from common.run import RunDir, load_checkpoint
from m2pkd import data as D
from m2pkd import models as M

ROLES = ("baseline", "teacher", "student")


def splits(cfg) -> dict:
    """{"train": [...], "selection": [...], "dev": [...], "protocol": label}."""
    train, dev = list(cfg["data"]["train"]), list(cfg["data"]["dev"])
    proto = "dev" if cfg["parity"] else cfg["selection"]["protocol"]
    if proto == "dev":
        return {"train": train, "selection": dev, "dev": dev,
                "protocol": "faithful: checkpoint selected on dev, the reported set (optimistic)"}
    if proto != "holdout":
        raise ConfigError(f"selection.protocol: expected holdout or dev, got {proto!r}")
    hold = list(cfg["selection"]["holdout"])
    bad = [r for r in hold if r not in train]
    if bad or not hold:
        raise ConfigError(f"selection.holdout: expected one or more of data.train {train}, got {hold}")
    rest = [r for r in train if r not in hold]
    if not rest:
        raise ConfigError("selection.holdout: holds out every training recording; keep at least one for training")
    return {"train": rest, "selection": hold, "dev": dev,
            "protocol": f"honest: checkpoint selected on held-out training recordings {hold}, dev reported once"}


def kd_weights(gamma: float, cfg) -> tuple[float, float]:
    """(α, β) from the teacher's batch loss γ = 1 − CCC(teacher, y).

    faithful (spec §4.3): β = 0.2 + γ if γ ≤ θ or γ > 1, else 1; α = 1 − β (α < 0 when the teacher anti-correlates).
    sane: α = 1, β = beta_max · clip(1 − γ, 0, 1) — more KD the more reliable the teacher, never a negative weight.
    fixed: α = fixed_alpha, β = fixed_beta.
    """
    k = cfg["kd"]
    mode = "faithful" if cfg["parity"] else k["weighting"]
    if mode == "faithful":
        beta = 0.2 + gamma if (gamma <= k["theta"] or gamma > 1) else 1.0
        return 1.0 - beta, beta
    if mode == "sane":
        return 1.0, k["beta_max"] * min(max(1.0 - gamma, 0.0), 1.0)
    if mode == "fixed":
        return k["fixed_alpha"], k["fixed_beta"]
    raise ConfigError(f"kd.weighting: expected faithful, sane or fixed, got {mode!r}")


def build_model(role: str, m: dict):
    return M.TeacherModel(m) if role == "teacher" else M.VisualModel(m)


def load_teacher(path, device, log) -> tuple[M.TeacherModel, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint" / "best.pth"
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("role") != "teacher" or "model" not in ckpt:
        raise DataError(f"{path}: expected a teacher checkpoint written by `mmpkd.py teacher`")
    teacher = M.TeacherModel(ckpt["model_cfg"])
    try:
        teacher.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise DataError(f"{path}: does not match its model config ({str(e)[:200]})") from None
    log(f"teacher: {path} ({ckpt['dim']}, selection CCC {ckpt['score']:.4f})")
    return teacher.to(device), ckpt


@torch.no_grad()
def predict(model, rec: D.Recording, cfg, device) -> np.ndarray:
    """Stateful inference over a whole recording: CNN features per frame (eval mode), then the GRU over chunks of
    train.eval_chunk frames with the hidden state carried from chunk to chunk; one output per frame."""
    model.eval()
    t = cfg["train"]
    feats = torch.cat([model.cnn(rec.frames[i:i + t["eval_batch"]].to(device).float() / 255.0)
                       for i in range(0, len(rec), t["eval_batch"])]).unsqueeze(0)
    afeats = None
    if isinstance(model, M.TeacherModel):
        afeats = model.audio(rec.specs.to(device))[rec.spec_index.to(device)].unsqueeze(0)
    h, outs = None, []
    for s in range(0, len(rec), t["eval_chunk"]):
        sl = slice(s, s + t["eval_chunk"])
        o = model.temporal(feats[:, sl], afeats[:, sl], h) if afeats is not None else model.temporal(feats[:, sl], h)
        h = o["h"]
        outs.append(o["out"][0])
    return torch.cat(outs).cpu().numpy().astype(np.float64)


def evaluate(model, recs: list[D.Recording], cfg, device) -> dict:
    preds = {r.name: predict(model, r, cfg, device) for r in recs}
    gold = {r.name: r.labels.numpy().astype(np.float64) for r in recs}
    per = {k: ccc_np(preds[k], gold[k]) for k in preds}
    return {"preds": preds, "gold": gold, "per_recording": per, "mean": float(np.mean(list(per.values()))),
            "concat": ccc_np(np.concatenate(list(preds.values())), np.concatenate(list(gold.values())))}


def run(cfg: dict, role: str, rd: RunDir, device, log: Callable[[str], None] | None = None) -> dict:
    """Train `role` for cfg["dim"] into run directory `rd`; returns the summary (also written to summary.json)."""
    log = log or rd.log
    if role not in ROLES:
        raise ConfigError(f"role: expected one of {ROLES}, got {role!r}")
    dim = cfg["dim"]
    if dim not in D.DIMS:
        raise ConfigError(f"dim: expected arousal or valence, got {dim!r}")
    t, parity = cfg["train"], cfg["parity"]
    sp = splits(cfg)
    if role == "student" and not cfg["kd"]["teacher"]:
        raise ConfigError("kd.teacher: the student needs a teacher checkpoint (--teacher RUN_DIR_OR_FILE)")
    log(f"{role} / {dim}: train {sp['train']}, selection {sp['selection']}, dev {sp['dev']}; {sp['protocol']}")
    load = lambda names: [D.load_recording(cfg, r, dim) for r in names]
    train_recs, sel_recs = load(sp["train"]), load(sp["selection"])
    dev_recs = sel_recs if sp["selection"] == sp["dev"] else load(sp["dev"])

    m = copy.deepcopy(cfg["model"])
    if parity:
        m["audio_dedupe"] = False
    model = build_model(role, m).to(device)
    if m["visual_weights"]:
        n, tot = M.load_visual_weights(model.cnn, m["visual_weights"])
        log(f"visual CNN: {n}/{tot} VGG19 feature tensors from {m['visual_weights']} (fc random)")
    else:
        log("visual CNN: no model.visual_weights (--visual-weights): VGG19-BN starts from random weights")
    if role == "teacher":
        if m["audio_weights"]:
            n, tot = M.load_audio_weights(model.audio, m["audio_weights"])
            log(f"audio CNN: {n}/{tot} ResNet18 tensors from {m['audio_weights']}")
        else:
            log("audio CNN: no model.audio_weights (--audio-weights): ResNet18 starts from random weights")

    teacher, objective, tinfo = None, None, None
    if role == "student":
        teacher, tinfo = load_teacher(cfg["kd"]["teacher"], device, log)
        if tinfo["dim"] != dim:
            raise ConfigError(f"kd.teacher: {cfg['kd']['teacher']} was trained for {tinfo['dim']}, not {dim}")
        for p in teacher.parameters():
            p.requires_grad_(False)
        objective = build_objective(cfg["loss"]).to(device)
    teacher_eval = cfg["kd"]["teacher_eval"] and not parity
    params = M.param_groups(model, t)
    if objective is not None and list(objective.parameters()):
        params.append({"params": list(objective.parameters()), "lr": t["rnn_lr"], "name": "kd"})
    opt = torch.optim.Adam(params)

    gen = torch.Generator().manual_seed(cfg["seed"])
    order: list[int] = []
    best = {"score": -float("inf"), "step": 0, "state": copy.deepcopy(model.state_dict())}
    history, started = [], time.perf_counter()
    steps = range(1, t["steps"] + 1)
    if cfg["progress"]:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"{role} {dim}", leave=False)
    for step in steps:
        model.train()
        frames, sidx, specs, y = D.sample_clips(train_recs, t["batch_size"], t["clip_length"], gen, order)
        frames, y = frames.to(device).float() / 255.0, y.to(device)
        sidx, specs = sidx.to(device), specs.to(device)
        out = model(frames, specs=specs, spec_idx=sidx)
        gt = ccc_loss(out["out"], y)
        row = {"step": step, "gt": gt.item()}
        if role == "student":
            teacher.train(not teacher_eval)
            with torch.no_grad():
                tout = teacher(frames, specs=specs, spec_idx=sidx)
            gamma = ccc_loss(tout["out"], y).item()
            alpha, beta = kd_weights(gamma, cfg)
            kd, parts = objective({"embed": out["embed"]}, {"embed": tout["embed"].detach()}, y)
            loss = alpha * gt + beta * kd
            row.update(kd=kd.item(), teacher_loss=gamma, alpha=alpha, beta=beta)
        else:
            loss = gt
        if not torch.isfinite(loss):
            raise DataError(f"{role}: loss became {loss.item()} at step {step} (check the inputs / learning rates)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row["loss"] = loss.item()
        for k, v in row.items():
            if k != "step":
                rd.scalar(f"train/{k}", v, step)
        if step % t["val_every"] == 0 or step == t["steps"]:
            ev = evaluate(model, sel_recs, cfg, device)
            row["selection_ccc"] = ev["mean"]
            rd.scalar("selection/ccc", ev["mean"], step)
            if ev["mean"] > best["score"]:
                best = {"score": ev["mean"], "step": step, "state": copy.deepcopy(model.state_dict())}
            log(f"step {step}: train loss {row['loss']:.4f} (1-CCC {row['gt']:.4f}"
                + (f", kd {row['kd']:.4f}, teacher 1-CCC {row['teacher_loss']:.3f}, α {row['alpha']:.2f}, "
                   f"β {row['beta']:.2f}" if role == "student" else "")
                + f"); selection CCC {ev['mean']:.4f} (best {best['score']:.4f} at step {best['step']})")
        history.append(row)
    seconds = time.perf_counter() - started

    model.load_state_dict(best["state"])
    rd.save_checkpoint({"model": best["state"], "model_cfg": m, "role": role, "dim": dim, "step": best["step"],
                        "score": best["score"], "config": cfg}, "best.pth")
    sel = evaluate(model, sel_recs, cfg, device)
    dev = sel if dev_recs is sel_recs else evaluate(model, dev_recs, cfg, device)
    save_predictions(rd.file("predictions.npz"), sel, dev)
    rd.write_csv("history.csv", history)
    summary = {"experiment": "m2pkd", "role": role, "dim": dim, "protocol": sp["protocol"],
               "selection_recordings": sp["selection"], "train_recordings": sp["train"],
               "best_step": best["step"], "steps": t["steps"], "seconds": seconds,
               "selection_ccc": sel["mean"], "dev_ccc": dev["mean"], "dev_ccc_concat": dev["concat"],
               "dev_per_recording": dev["per_recording"],
               "teacher": str(cfg["kd"]["teacher"]) if role == "student" else None,
               "kd_weighting": ("faithful" if parity else cfg["kd"]["weighting"]) if role == "student" else None}
    rd.write_summary(summary)
    log(f"{role} / {dim}: best step {best['step']}, selection CCC {sel['mean']:.4f}; dev CCC {dev['mean']:.4f} "
        f"(mean over recordings), {dev['concat']:.4f} (concatenated); {seconds:.1f} s")
    return summary


def save_predictions(path, sel: dict, dev: dict) -> None:
    arrays = {}
    for split, ev in (("selection", sel), ("dev", dev)):
        for rec in ev["preds"]:
            arrays[f"{split}/{rec}/pred"] = ev["preds"][rec]
            arrays[f"{split}/{rec}/gold"] = ev["gold"][rec]
    tmp = Path(path).with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_predictions(path) -> dict:
    """{"selection": {rec: (pred, gold)}, "dev": {...}} from a run's predictions.npz."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.npz"
    if not path.is_file():
        raise DataError(f"{path}: predictions not found (a run directory of `mmpkd.py` expected)")
    try:
        z = np.load(path)
        out: dict = {"selection": {}, "dev": {}}
        for key in z.files:
            split, rec, kind = key.split("/")
            out[split].setdefault(rec, {})[kind] = z[key]
    except Exception as e:
        raise DataError(f"{path}: not a predictions file ({e})") from None
    return {s: {r: (v["pred"], v["gold"]) for r, v in d.items()} for s, d in out.items()}
