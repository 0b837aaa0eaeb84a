"""Step 4-5: train one model for one dimension — `baseline` (visual only, 1−CCC), `teacher` (audio + visual,
1−CCC) or `student` (visual only, α·(1−CCC) + β·KD against the frozen teacher's 128-d embeddings) — select it on
the selection recordings, and evaluate dev once with stateful GRU inference over whole recordings.

The loop follows MMPKD mmpkd.py (one optimisation step per "epoch": a batch of clips, one per training recording of
a shuffled cycle) on the shared mechanics of common/train.py: a training-state checkpoint every
`train.checkpoint_every` steps (`--resume`), the non-finite guard, selection with `Selector`, per-interval loss
means with `EpochLog`, a loader generator shared by the baseline and the student, and the frozen teacher.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError, DataError, load_yaml
from common.kd import build_objective
from common.metrics import ccc_loss, ccc_np
from common.run import RunDir, load_checkpoint, seed_everything
from common.train import (Checkpoint, EpochLog, Selector, check_finite, check_resume_config, due, freeze,
                          loader_generator, resume_dir)
from m2pkd import data as D
from m2pkd import models as M

ROLES = ("baseline", "teacher", "student")
# what a run is: a resume may extend train.steps or change evaluation sizes, nothing here
IDENTITY_KEYS = ("dim", "seed", "parity", "data", "faces", "audio", "csv", "model", "selection", "kd", "loss",
                 "train.batch_size", "train.clip_length", "train.cnn_lr", "train.rnn_lr", "train.cnn_spec_lr",
                 "train.val_every", "train.checkpoint_every")


def splits(cfg) -> dict:
    """{"train": [...], "selection": [...], "dev": [...], "protocol": label}."""
    train, dev = list(cfg["data"]["train"]), list(cfg["data"]["dev"])
    if cfg["parity"] or cfg["selection"]["protocol"] == "dev":
        return {"train": train, "selection": dev, "dev": dev,
                "protocol": "reference: checkpoint selected on dev, the reported set (optimistic)"}
    hold = list(cfg["selection"]["holdout"])
    bad = [r for r in hold if r not in train]
    if bad or not hold:
        raise ConfigError(f"selection.holdout: expected one or more of data.train {train}, got {hold}")
    rest = [r for r in train if r not in hold]
    if not rest:
        raise ConfigError("selection.holdout: holds out every training recording; keep at least one for training")
    return {"train": rest, "selection": hold, "dev": dev,
            "protocol": f"honest: checkpoint selected on held-out training recordings {hold}, dev reported once"}


def weighting(cfg) -> str:
    """The KD weighting in force: `paper_exact` under parity (the reference's rule, negative GT weight included)."""
    return "paper_exact" if cfg["parity"] else cfg["kd"]["weighting"]


def kd_weights(gamma: float, cfg) -> tuple[float, float]:
    """(α, β) of the student loss α·(1 − CCC) + β·KD, from the teacher's batch loss γ = 1 − CCC(teacher, y).

    paper (MMPKD mmpkd.py, the student's training loop): β = beta_floor + γ if γ ≤ θ, β = 1 if θ < γ ≤ 1; α = 1 − β.
        For an anti-correlated teacher (γ > 1) the reference takes β = beta_floor + γ > 1, so α < 0 pushes the
        student *away* from the labels; here that regime is α = 1, β = 0 (the ground truth alone). parity: true
        (`paper_exact`) keeps the reference's rule.
    sane: α = 1, β = beta_max · clip(1 − γ, 0, 1) — more KD the more reliable the teacher.
    fixed: α = fixed_alpha, β = fixed_beta (MT-PKDOT biovid_pkd.py: GT + (1 − cos), both weight 1).
    """
    k, mode = cfg["kd"], weighting(cfg)
    if mode in ("paper", "paper_exact"):
        if gamma > 1 and mode == "paper":
            return 1.0, 0.0
        beta = k["beta_floor"] + gamma if (gamma <= k["theta"] or gamma > 1) else 1.0
        return 1.0 - beta, beta
    if mode == "sane":
        return 1.0, k["beta_max"] * min(max(1.0 - gamma, 0.0), 1.0)
    return k["fixed_alpha"], k["fixed_beta"]


# ----------------------------------------------------------------------------------------------------------------
# models

def backbones(role: str) -> list[tuple[str, str]]:
    """(what, config key) of the pretrained CNNs a role uses."""
    return [("visual", "visual_weights")] + ([("audio", "audio_weights")] if role == "teacher" else [])


def require_weights(cfg, role: str) -> None:
    """A run without pretrained weights needs model.allow_random_init (--allow-random-init; the demo sets it: no
    pretrained weights exist at its sizes). Checked before the run directory is made."""
    m = cfg["model"]
    if m["visual_weights"] and m["vgg_width_div"] != 1:
        raise ConfigError(f"model.visual_weights: pretrained VGG19 weights need model.vgg_width_div 1, got "
                          f"{m['vgg_width_div']}")
    for what, key in backbones(role):
        if not m[key] and not m["allow_random_init"]:
            raise ConfigError(f"model.{key}: no pretrained {what} weights given (--{key.replace('_', '-')} FILE or "
                              f"imagenet); pass --allow-random-init to train from random weights")


def init_backbones(model, role: str, m: dict, log) -> None:
    for what, key in backbones(role):
        net, load = (model.cnn, M.load_visual_weights) if what == "visual" else (model.audio, M.load_audio_weights)
        if m[key]:
            n, tot = load(net, m[key])
            log(f"{what} CNN: {n}/{tot} tensors from {m[key]}")
        else:
            log(f"{what} CNN: no model.{key}: starts from random weights (model.allow_random_init)")


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


def objective_for(cfg):
    """The KD objective of `loss` (common.kd); an unknown term or option is a one-line ConfigError."""
    try:
        return build_objective(cfg["loss"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"loss.terms: {str(e).strip(chr(34) + chr(39))}") from None


def build(cfg, role: str, device, log) -> dict:
    """Model, optimiser and (student) frozen teacher + KD objective for `role`."""
    m = copy.deepcopy(cfg["model"])
    if cfg["parity"]:
        m["audio_dedupe"] = False
    model = (M.TeacherModel(m) if role == "teacher" else M.VisualModel(m)).to(device)
    init_backbones(model, role, m, log)
    parts = {"model": model, "model_cfg": m, "teacher": None, "objective": None}
    params = M.param_groups(model, cfg["train"])
    if role == "student":
        teacher, tinfo = load_teacher(cfg["kd"]["teacher"], device, log)
        if tinfo["dim"] != cfg["dim"]:
            raise ConfigError(f"kd.teacher: {cfg['kd']['teacher']} was trained for {tinfo['dim']}, not {cfg['dim']}")
        if cfg["kd"]["teacher_eval"] and not cfg["parity"]:
            teacher = freeze(teacher)
        else:  # the reference: no gradient reaches it (outputs detached), but dropout and batch statistics run
            teacher.requires_grad_(False)
        objective = objective_for(cfg).to(device)
        if list(objective.parameters()):
            params.append({"params": list(objective.parameters()), "lr": cfg["train"]["rnn_lr"], "name": "kd"})
        parts.update(teacher=teacher, objective=objective)
    parts["optimizer"] = torch.optim.Adam(params)
    return parts


# ----------------------------------------------------------------------------------------------------------------
# evaluation

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


# ----------------------------------------------------------------------------------------------------------------
# the loop

def clip_generator(cfg, role: str) -> torch.Generator:
    """The clip sampler's generator: the baseline and the student of one seed draw the same clips in the same order
    (a fair comparison of KD against no KD); the teacher has its own."""
    return loader_generator(cfg["seed"], "teacher" if role == "teacher" else "visual")


def train_step(st: dict, cfg, role: str, step: int, device) -> dict:
    """One optimisation step on a fresh batch of clips; returns the step's loss parts (tensors, for EpochLog)."""
    t, model = cfg["train"], st["model"]
    model.train()
    frames, sidx, specs, y = D.sample_clips(st["train_recs"], t["batch_size"], t["clip_length"], st["gen"],
                                            st["order"])
    frames, y, sidx, specs = frames.to(device).float() / 255.0, y.to(device), sidx.to(device), specs.to(device)
    out = model(frames, specs=specs, spec_idx=sidx)
    gt = ccc_loss(out["out"], y)
    parts = {"gt": gt.detach()}
    loss = gt
    if role == "student":
        teacher = st["teacher"]
        if cfg["parity"] or not cfg["kd"]["teacher_eval"]:
            teacher.train()
        with torch.no_grad():
            tout = teacher(frames, specs=specs, spec_idx=sidx)
        gamma = ccc_loss(tout["out"], y).item()
        alpha, beta = kd_weights(gamma, cfg)
        kd, _ = st["objective"]({"embed": out["embed"]}, {"embed": tout["embed"]}, y)
        loss = alpha * gt + beta * kd
        parts.update(kd=kd.detach(), teacher_loss=gamma, alpha=alpha, beta=beta)
    check_finite(loss, parts, epoch=step, step=step, where=role)
    st["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    st["optimizer"].step()
    parts["loss"] = loss.detach()
    return parts


def loop(st: dict, cfg, role: str, start: int, device, log) -> None:
    """Steps start+1 .. train.steps; evaluation on the selection recordings every val_every steps (and at the
    end), a training-state checkpoint every checkpoint_every steps (and at the end)."""
    t = cfg["train"]
    steps = range(start + 1, t["steps"] + 1)
    if cfg["progress"]:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"{role} {cfg['dim']}", leave=False, initial=start, total=t["steps"])
    for step in steps:
        st["log"].add(train_step(st, cfg, role, step, device))
        last = step == t["steps"]
        if due(step, t["val_every"]) or last:
            ccc = evaluate(st["model"], st["sel_recs"], cfg, device)["mean"]
            st["selector"].update(ccc, step, st["model"])
            rec = st["log"].end_epoch(step, selection_ccc=ccc)
            log(f"step {step}: train loss {rec['train_loss']:.4f} (1-CCC {rec['train_gt']:.4f}"
                + (f", kd {rec['train_kd']:.4f}, teacher 1-CCC {rec['train_teacher_loss']:.3f}, "
                   f"α {rec['train_alpha']:.2f}, β {rec['train_beta']:.2f}" if role == "student" else "")
                + f"); selection CCC {ccc:.4f} (best {st['selector'].best_score:.4f} at step "
                  f"{st['selector'].best_epoch})")
        if due(step, t["checkpoint_every"]) or last:
            st["ckpt"].save(epoch=step, step=step, order=list(st["order"]), role=role)


def open_run(cfg, role: str, out, resume) -> tuple[RunDir, bool]:
    """A new run directory, or the one --resume names (its saved config must describe the same run); locked."""
    name = f"{role}_{cfg['dim']}"
    path = resume_dir(resume, out, name)
    if path is None:
        rd = RunDir.create(out, name, config=cfg, code_from=Path(__file__).resolve().parent)
        return rd.lock(), False
    if not path.name.startswith(f"{name}_"):
        raise ConfigError(f"--resume: {path} is not a {name} run")
    check_resume_config(load_yaml(path / "log" / "config.yaml"), cfg, IDENTITY_KEYS)
    return RunDir.open(path).lock(), (path / "checkpoint" / "train_state.pth").is_file()


def fit(cfg: dict, role: str, out, device, resume=None) -> tuple[RunDir, dict]:
    """Train `role` for cfg["dim"] (a new run under `out`, or continue the run `resume` names); returns the run
    directory and the summary (also written to summary.json)."""
    if role == "student" and not cfg["kd"]["teacher"]:
        raise ConfigError("kd.teacher: the student needs a teacher checkpoint (--teacher RUN_DIR_OR_FILE)")
    if cfg["train"]["checkpoint_every"] % cfg["train"]["val_every"]:
        raise ConfigError(f"train.checkpoint_every: expected a multiple of train.val_every "
                          f"({cfg['train']['val_every']}), got {cfg['train']['checkpoint_every']}")
    require_weights(cfg, role)
    if role == "student":
        objective_for(cfg)  # an unknown KD term or option is refused before the run directory is made
    sp = splits(cfg)
    seed_everything(cfg["seed"], cfg["deterministic"])
    rd, resuming = open_run(cfg, role, out, resume)
    try:
        return rd, _fit(cfg, role, rd, resuming, sp, device)
    finally:
        rd.close()


def _fit(cfg, role, rd, resuming, sp, device) -> dict:
    log, dim = rd.log, cfg["dim"]
    log(f"run directory {rd.path}; {role} / {dim}: train {sp['train']}, selection {sp['selection']}, "
        f"dev {sp['dev']}; {sp['protocol']}")
    load = lambda names: [D.load_recording(cfg, r, dim) for r in names]
    st = build(cfg, role, device, log)
    st.update(train_recs=load(sp["train"]), sel_recs=load(sp["selection"]), order=[],
              gen=clip_generator(cfg, role),
              selector=Selector("max"), log=EpochLog(rd, "train"))
    st["ckpt"] = Checkpoint(rd.checkpoint_dir / "train_state.pth", model=st["model"], optimizer=st["optimizer"],
                            generator=st["gen"], selector=st["selector"], epoch_log=st["log"],
                            objective=st["objective"])
    start, started = 0, time.perf_counter()
    if resuming:
        saved = st["ckpt"].load(device)
        if saved.get("role") != role:
            raise DataError(f"{st['ckpt'].path}: a {saved.get('role')} checkpoint, not {role}")
        start, st["order"] = saved["step"], list(saved["order"])
        log(f"resumed from {st['ckpt'].path} at step {start}")
    loop(st, cfg, role, start, device, log)
    return finish(st, cfg, role, rd, sp, device, time.perf_counter() - started)


def finish(st, cfg, role, rd, sp, device, seconds) -> dict:
    """Restore the selected weights, save them (best.pth), evaluate dev once, write predictions and summary."""
    model, sel_r = st["model"], st["selector"]
    if sel_r.best_state is None:
        raise DataError(f"{role}: no finite selection CCC in {cfg['train']['steps']} steps; nothing to select")
    sel_r.restore(model)
    rd.save_checkpoint({"model": sel_r.best_state, "model_cfg": st["model_cfg"], "role": role, "dim": cfg["dim"],
                        "step": sel_r.best_epoch, "score": sel_r.best_score, "config": cfg}, "best.pth")
    sel = evaluate(model, st["sel_recs"], cfg, device)
    dev = sel if sp["dev"] == sp["selection"] else evaluate(model, [D.load_recording(cfg, r, cfg["dim"])
                                                                    for r in sp["dev"]], cfg, device)
    save_predictions(rd.file("predictions.npz"), sel, dev)
    summary = {"experiment": "m2pkd", "role": role, "dim": cfg["dim"], "seed": cfg["seed"],
               "protocol": sp["protocol"], "selection_recordings": sp["selection"], "train_recordings": sp["train"],
               "best_step": sel_r.best_epoch, "steps": cfg["train"]["steps"], "seconds": seconds,
               "selection_ccc": sel["mean"], "dev_ccc": dev["mean"], "dev_ccc_concat": dev["concat"],
               "dev_per_recording": dev["per_recording"],
               "teacher": str(cfg["kd"]["teacher"]) if role == "student" else None,
               "kd_weighting": weighting(cfg) if role == "student" else None, **st["log"].omega_summary()}
    rd.write_summary(summary)
    rd.log(f"{role} / {cfg['dim']}: best step {sel_r.best_epoch}, selection CCC {sel['mean']:.4f}; dev CCC "
           f"{dev['mean']:.4f} (mean over recordings), {dev['concat']:.4f} (concatenated); {seconds:.1f} s")
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
