"""Algorithm 1 on RAVDESS: step 1 joint training + step 2 saliency (`cal_tag`), step 3 removal + KD (`eval_tag`),
`compare_modes` (modes 0/1/2 on one saliency) and the saliency plot."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import classify, plots
from common import saliency as S
from common.config import ConfigError, DataError
from common.kd import build_objective
from common.run import RunDir, load_checkpoint, seed_everything
from ravdess import data as D
from ravdess import models as M
from ravdess import preprocess as P

CHECKPOINT = "alg1.pth"


def data_root(cfg: dict, log: Callable[[str], None] = print) -> Path:
    """The feature-layout directory; with layout `raw` the raw tree is preprocessed into it first."""
    d = cfg["data"]
    if d["layout"] == "raw":
        if not d["raw_dir"]:
            raise ConfigError("data.raw_dir: layout 'raw' needs the folder holding Actor_01 … Actor_24/")
        P.preprocess(d["raw_dir"], d["dir"], cfg, log=log, progress=cfg["progress"])
    elif d["layout"] != "features":
        raise ConfigError(f"data.layout: expected features or raw, got {d['layout']!r}")
    root = Path(d["dir"])
    if not (root / "data_file").is_dir():
        raise DataError(f"{root}: no data_file/ folder (expected the feature layout: data_file/, aud_features/, "
                        f"vid_features/; or use data.layout raw with data.raw_dir)")
    return root


def _check(cfg: dict) -> None:
    t, e, kd = cfg["tag"], cfg["eval"], cfg["kd"]
    try:
        M.place_name(t["place"])
    except ValueError as err:
        raise ConfigError(f"tag.place: {err}") from None
    if t["distance"] not in ("mse", "ncjsd"):
        raise ConfigError(f"tag.distance: expected mse or ncjsd, got {t['distance']!r}")
    if t["op"] not in S.INTERVENTIONS:
        raise ConfigError(f"tag.op: expected one of {S.INTERVENTIONS}, got {t['op']!r}")
    if e["mode"] not in S.REMOVAL_MODES or any(m not in S.REMOVAL_MODES for m in e["modes"]):
        raise ConfigError(f"eval.mode / eval.modes: expected values in {S.REMOVAL_MODES}")
    if not 0.0 <= e["ratio"] <= 1.0:
        raise ConfigError(f"eval.ratio: expected a value in [0, 1], got {e['ratio']}")
    if e["fill"] not in S.REMOVAL_FILLS:
        raise ConfigError(f"eval.fill: expected one of {S.REMOVAL_FILLS}, got {e['fill']!r}")
    if kd["distill"] not in kd["methods"]:
        raise ConfigError(f"kd.distill: unknown method {kd['distill']!r}; known: {', '.join(kd['methods'])}")
    if kd["mask"] not in ("none", "omega"):
        raise ConfigError(f"kd.mask: expected none or omega, got {kd['mask']!r}")
    if t["num_permute"] < 1 or e["num_runs"] < 1:
        raise ConfigError("tag.num_permute and eval.num_runs must be ≥ 1")


def _example(cfg: dict, which: str) -> torch.Tensor:
    d = cfg["data"]
    if which == "audio":
        return torch.zeros(2, 1, d["n_mels"], d["frames"])
    return torch.zeros(2, 3, d["image_height"], d["image_width"])


def _triples(loader, device):
    for b in loader:
        yield b["audio"].to(device), b["image"].to(device), b["label"].to(device)


# ----------------------------------------------------------------------------------------------------------------------
# Steps 1 and 2

def find_checkpoint(spec: str | None, out: str | Path) -> Path:
    """A step-1 checkpoint: the given file, the one in the given run directory, or the newest under `out`."""
    if spec:
        p = Path(spec)
        p = p / "checkpoint" / CHECKPOINT if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"{spec}: no Algorithm-1 checkpoint there (expected {CHECKPOINT} or a run directory "
                            f"holding checkpoint/{CHECKPOINT})")
        return p
    found = sorted(Path(out).glob(f"*/checkpoint/{CHECKPOINT}"), key=lambda q: q.stat().st_mtime)
    if not found:
        raise DataError(f"{out}: no run directory with checkpoint/{CHECKPOINT}; run step 1 first "
                        f"(--cal_tag --first_time) or name one with --checkpoint")
    return found[-1]


def load_alg1(path: Path, cfg: dict) -> dict:
    ck = load_checkpoint(path)
    need = {"teacher", "student", "model", "data", "saliency", "place"}
    if not isinstance(ck, dict) or not need <= set(ck):
        raise DataError(f"{path}: not an Algorithm-1 checkpoint (expected keys {sorted(need)})")
    d = cfg["data"]
    shape = {k: d[k] for k in ("n_mels", "frames", "image_height", "image_width")}
    if ck["data"] != shape:
        raise DataError(f"{path}: made for inputs {ck['data']}, but the config has {shape}")
    return ck


def nets_from(ck: dict, cfg: dict):
    teacher, student = M.build({**cfg, "model": ck["model"]})
    teacher.load_state_dict(ck["teacher"])
    student.load_state_dict(ck["student"])
    return teacher, student


def cal_tag(cfg: dict, root: Path, rd: RunDir, device, out: str | Path) -> dict:
    """Alg. 1 steps 1 (joint training, or reuse) and 2 (saliency); saved as checkpoint/alg1.pth + .npy + plot."""
    t = cfg["tag"]
    started = time.perf_counter()
    ld = D.loaders(root, cfg, device)
    if t["first_time"]:
        teacher, student = M.build(cfg)
        rd.log(f"step 1: joint training of AudioNet + ImageNet, {t['epochs']} epochs, distance {t['distance']}")
        history = S.joint_train(teacher, student, lambda: _triples(ld["train"], device), epochs=t["epochs"],
                                lr=t["lr"], momentum=t["momentum"], distance=t["distance"],
                                variant=t["js_variant"], device=device, progress=cfg["progress"])
        for i, v in enumerate(history):
            rd.scalar("joint/loss", v, i + 1)
        source = "joint training"
    else:
        path = find_checkpoint(t["load_from"], out)
        teacher, student = nets_from(load_alg1(path, cfg), cfg)
        teacher.to(device), student.to(device)
        history, source = [], str(path)
        rd.log(f"step 1: reusing the jointly trained nets of {path}")
    acc = {}
    for name, net, key in (("teacher", teacher, "audio"), ("student", student, "image")):
        for split in ("val", "test"):
            acc[f"{name}_{split}_acc"] = classify.evaluate(net, ld[split], key, device)[1]
    rd.log("step 1 nets: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))

    place = t["place"]
    n_ch = M.place_channels(teacher, place, _example(cfg, "audio").to(device))
    sal_loader = D.make_loader(D.AudioImageDataset(root, cfg, t["split"]), cfg["data"]["batch_size2"], False,
                               cfg["data"]["num_workers"], cfg["seed"], device)
    g = torch.Generator().manual_seed(cfg["seed"])
    rd.log(f"step 2: saliency at place {place} ({M.place_name(place)}, {n_ch} channels), {t['op']} × "
           f"{t['num_permute']}, distance {t['distance']}, over all {len(sal_loader)} batch(es) of {t['split']}")
    raw = S.saliency_vector(teacher, student, _triples(sal_loader, device), M.place_name(place), op=t["op"],
                            distance=t["distance"], repeats=t["num_permute"], chunk=t["chunk"], generator=g,
                            normalize=False, variant=t["js_variant"], progress=cfg["progress"])
    sal = S.minmax_normalize(raw) if raw.numel() else raw
    sal_np = sal.cpu().numpy()
    d = cfg["data"]
    ck = {"teacher": teacher.state_dict(), "student": student.state_dict(), "model": cfg["model"],
          "data": {k: d[k] for k in ("n_mels", "frames", "image_height", "image_width")},
          "saliency": sal.cpu(), "saliency_raw": raw.cpu(), "place": place, "distance": t["distance"],
          "num_permute": t["num_permute"], "accuracy": acc, "joint_history": history}
    path = rd.save_checkpoint(ck, CHECKPOINT)
    npy = rd.file(f"overlap_tag_teacher_place{place}_repeat{t['num_permute']}.npy")
    np.save(npy, sal_np)
    png = plot_saliency(sal_np, rd.file(f"saliency_place{place}.png"), cfg["eval"]["ratio"],
                        title=f"Algorithm-1 saliency, place {place} ({M.place_name(place)})")
    rd.log(f"saved {path} and {npy.name}; saliency min {float(raw.min()):.4g} max {float(raw.max()):.4g}")
    return {"checkpoint": path, "saliency": sal_np, "saliency_raw": raw.cpu().numpy(), "accuracy": acc,
            "joint_history": history, "plot": png, "source": source, "channels": n_ch,
            "seconds": time.perf_counter() - started}


def plot_saliency(sal: np.ndarray, path: Path, ratio: float, title: str = "") -> Path:
    """Raw and sorted saliency (normalised to [0, 1]) with the lowest and highest 25 % of the channels marked
    (the ones modes 1 and 2 remove first), as the reference's helper plot."""
    sal = np.asarray(sal, dtype=float)
    n = sal.size
    k = max(1, int(0.25 * n))
    order = np.argsort(sal, kind="stable")
    colors = np.full(n, "C0", dtype=object)
    colors[order[:k]], colors[order[-k:]] = "C3", "C2"
    fig, axes = plots.figure(1, 2, figsize=(12.8, 3.6))
    axes[0].bar(np.arange(n), sal, color=list(colors), width=1.0)
    axes[0].set(xlabel="channel", ylabel="saliency (normalised)", title=title or "raw")
    axes[1].bar(np.arange(n), sal[order], color=list(colors[order]), width=1.0)
    axes[1].set(xlabel="rank (ascending)", ylabel="saliency (normalised)", title="sorted")
    from matplotlib.patches import Patch
    axes[1].legend(handles=[Patch(color="C3", label="lowest 25 %"), Patch(color="C2", label="highest 25 %")],
                   fontsize=8)
    return plots._save(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# Step 3

def objective_for(cfg: dict, train: D.AudioImageDataset):
    kd = cfg["kd"]
    terms = {"ce": {"weight": kd["gt_weight"]}}
    for name, term in kd["methods"][kd["distill"]].items():
        term = dict(term)
        term["weight"] = float(term.get("weight", 1.0)) * kd["pl_weight"]
        if cfg["parity"] and term.get("loss", name) == "kl":
            term["reduction"] = "mean"  # MFH: KLDivLoss(reduction='mean'), KD averaged over B·C
        terms[name] = term
    n_cls = cfg["model"]["classes"]
    context = {"student_dim": n_cls, "teacher_dim": n_cls, "n_data": len(train), "dataset_labels": train.labels}
    return build_objective({"terms": terms, "mask": kd["mask"], "omega": {**kd["omega"], "detach": True}},
                           context=context)


def eval_tag(cfg: dict, root: Path, rd: RunDir, device, ck_path: Path, mode: int | None = None) -> dict:
    """Remove channels of the step-1 teacher by `mode` and distil into eval.num_runs fresh image students."""
    e, kd = cfg["eval"], cfg["kd"]
    mode = e["mode"] if mode is None else mode
    started = time.perf_counter()
    ck = load_alg1(ck_path, cfg)
    teacher, _ = nets_from(ck, cfg)
    teacher.to(device).eval()
    place = ck["place"]
    sal = ck["saliency"]
    g = torch.Generator().manual_seed(cfg["seed"] + 1000 * (mode + 1))
    idx = S.removal_indices(sal, mode, e["ratio"], generator=g)
    handle = S.remove_channels(teacher, M.place_name(place), idx, e["fill"])
    ld = D.loaders(root, cfg, device)
    t_val = classify.evaluate(teacher, ld["val"], "audio", device)[1]
    t_test = classify.evaluate(teacher, ld["test"], "audio", device)[1]
    rd.log(f"mode {mode}: removed {idx.numel()}/{sal.numel()} channels at place {place} ({e['fill']} fill); "
           f"teacher val acc {t_val:.4f}, test acc {t_test:.4f}")
    vals, tests = [], []
    for run in range(e["num_runs"]):
        seed_everything(cfg["seed"] + run, cfg["deterministic"])
        _, student = M.build({**cfg, "model": ck["model"]})
        student.to(device)
        objective = objective_for(cfg, ld["train"].dataset).to(device)
        opt = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=e["lr"], momentum=e["momentum"])
        res = classify.fit(student, ld, objective, opt, epochs=e["epochs"], device=device, student_key="image",
                           teacher=teacher, teacher_key="audio", log=rd.log, writer=rd.writer,
                           tag=f"mode{mode}/run{run}", progress=cfg["progress"])
        vals.append(res.best_val_acc)
        tests.append(res.test_acc)
    handle.remove()
    v, t = 100 * np.array(vals), 100 * np.array(tests)
    line = f"Student Val Acc {v.mean():.2f} ± {v.std():.2f} | Test Acc {t.mean():.2f} ± {t.std():.2f}"
    rd.log(f"mode {mode} ({kd['distill']}, mask {kd['mask']}): {line}")
    return {"mode": mode, "ratio": e["ratio"], "fill": e["fill"], "place": place, "distill": kd["distill"],
            "mask": kd["mask"], "removed": int(idx.numel()), "channels": int(sal.numel()),
            "removed_channels": idx.tolist(), "teacher_val_acc": t_val, "teacher_test_acc": t_test,
            "val_acc": vals, "test_acc": tests, "val_mean": float(v.mean() / 100), "val_std": float(v.std() / 100),
            "test_mean": float(t.mean() / 100), "test_std": float(t.std() / 100), "line": line,
            "checkpoint": str(ck_path), "seconds": time.perf_counter() - started}


MODE_NAMES = {-1: "no removal", 0: "random", 1: "modality-general", 2: "modality-specific"}
CSV_COLUMNS = ["mode", "mode_name", "ratio", "fill", "place", "distill", "mask", "removed", "channels",
               "teacher_val_acc", "teacher_test_acc", "val_mean", "val_std", "test_mean", "test_std"]


def compare_modes(cfg: dict, root: Path, rd: RunDir, device, ck_path: Path) -> list[dict]:
    rows = []
    for mode in cfg["eval"]["modes"]:
        r = eval_tag(cfg, root, rd, device, ck_path, mode)
        rows.append({**r, "mode_name": MODE_NAMES[mode]})
    rd.write_csv("compare_modes.csv", rows, CSV_COLUMNS)
    labels = [f"{r['mode']}: {r['mode_name']}" for r in rows]
    plots.grouped_bars(rd.file("compare_modes.png"), labels,
                       {"student val": ([r["val_mean"] for r in rows], [r["val_std"] for r in rows]),
                        "student test": ([r["test_mean"] for r in rows], [r["test_std"] for r in rows]),
                        "teacher test (after removal)": ([r["teacher_test_acc"] for r in rows],)},
                       ylabel="accuracy", title=f"Removal modes, ratio {cfg['eval']['ratio']}")
    rd.log("\n" + markdown_table(rows))
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| mode | removed | teacher test (after removal) | student val | student test |\n"
            "|---|---|---|---|---|")
    body = [f"| {r['mode']} ({MODE_NAMES[r['mode']]}) | {r['removed']}/{r['channels']} | {r['teacher_test_acc']:.4f} "
            f"| {r['val_mean']:.4f} ± {r['val_std']:.4f} | {r['test_mean']:.4f} ± {r['test_std']:.4f} |"
            for r in rows]
    return "\n".join([head, *body])
