"""Algorithm 1 on RAVDESS (MFH, Xue et al. ICLR 2023, Alg. 1): step 1 joint training + step 2 saliency (`cal_tag`),
step 3 removal + KD (`eval_tag`), the no-KD baseline, `compare_modes` (modes 0/1/2 on one saliency) and the saliency
plot. The loops are in `ravdess/trainer.py`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import ntd, plots
from common import saliency as S
from common.config import ConfigError, DataError
from common.kd import build_objective
from common.run import RunDir, load_checkpoint, seed_everything
from common.train import freeze
from ravdess import data as D
from ravdess import models as M
from ravdess import preprocess as P
from ravdess import trainer as T

NOT_COMPARABLE = ("not comparable with MFH's published features: these features were made from the raw release by "
                  "ravdess/preprocess.py and normalised with their own training-split statistics")
CHECKPOINT = "alg1.pth"


def data_root(cfg: dict, log: Callable[[str], None] = print) -> Path:
    """The feature-layout directory; with layout `raw` the raw tree is preprocessed into it first."""
    d = cfg["data"]
    if d["layout"] == "raw":
        if not d["raw_dir"]:
            raise ConfigError("data.raw_dir: layout 'raw' needs the folder holding Actor_01 … Actor_24/")
        P.preprocess(d["raw_dir"], d["dir"], cfg, log=log, progress=cfg["progress"])
    root = Path(d["dir"])
    if not (root / "data_file").is_dir():
        raise DataError(f"{root}: no data_file/ folder (expected the feature layout: data_file/, aud_features/, "
                        f"vid_features/; or use data.layout raw with data.raw_dir)")
    return root


def features_note(root: Path, cfg: dict) -> str | None:
    """None for MFH's published features read with MFH's constants; else the label raw-path results carry."""
    if cfg["data"]["layout"] == "raw" or D.normalization(root, cfg)["source"] != "config":
        return NOT_COMPARABLE
    return None


def check(cfg: dict) -> None:
    """What `_checks` in config.yaml cannot say: the method exists, and its terms build (names and options)."""
    kd = cfg["kd"]
    if kd["distill"] not in kd["methods"]:
        raise ConfigError(f"kd.distill: unknown method {kd['distill']!r}; known: {', '.join(kd['methods'])}")
    for method in kd["methods"]:
        try:
            objective_for(cfg, n_data=8, labels=torch.arange(8), method=method)
        except (KeyError, TypeError, ValueError) as e:
            reason = str(e).strip("\"'")
            raise ConfigError(f"kd.methods.{method}: {reason}") from None
    if cfg["data"]["layout"] == "raw":
        P.check_geometry(cfg)


def _example(cfg: dict, which: str) -> torch.Tensor:
    d = cfg["data"]
    if which == "audio":
        return torch.zeros(2, 1, d["n_mels"], d["frames"])
    return torch.zeros(2, 3, d["image_height"], d["image_width"])


def saliency_batches(loader, device, last_only: bool) -> list:
    """(audio, image, label) batches for step 2: every batch of the loader (the saliency averages over all of
    them), or, with `last_only` (parity), only its last batch — the reference's `cal_overlap_tag` overwrote its tag
    array on every batch, so only the last one counted."""
    triples = [(b["audio"].to(device), b["image"].to(device), b["label"].to(device)) for b in loader]
    return triples[-1:] if last_only else triples


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
    kind = ck.get("teacher_kind", "joint")
    if kind != cfg["teacher"]:
        raise ConfigError(f"teacher: {path} holds a {kind} teacher, the config asks for {cfg['teacher']!r}; name a "
                          f"step-1 run of that kind or train one with --first_time")
    return ck


def nets_from(ck: dict, cfg: dict):
    teacher, student = M.build({**cfg, "model": ck["model"]})
    teacher.load_state_dict(ck["teacher"])
    student.load_state_dict(ck["student"])
    return teacher, student


def step1(cfg: dict, root: Path, rd: RunDir, device, out: str | Path):
    """(teacher, student, joint loss history, source): trained here (`tag.first_time`) or read from a step-1 run."""
    t = cfg["tag"]
    if t["first_time"]:
        teacher, student = M.build(cfg)
        what = f"distance {t['distance']}" if cfg["teacher"] == "joint" else "independently, CE only"
        rd.log(f"step 1: AudioNet + ImageNet trained {what}, {t['epochs']} epochs")
        history = T.joint_fit(teacher, student, D.AudioImageDataset(root, cfg, "train"), cfg=cfg, device=device,
                              rd=rd)
        return teacher, student, history, "joint training" if cfg["teacher"] == "joint" else "independent training"
    path = find_checkpoint(t["load_from"], out)
    teacher, student = nets_from(load_alg1(path, cfg), cfg)
    rd.log(f"step 1: reusing the nets of {path}")
    return teacher.to(device), student.to(device), [], str(path)


def cal_tag(cfg: dict, root: Path, rd: RunDir, device, out: str | Path) -> dict:
    """Alg. 1 steps 1 (joint training, or reuse) and 2 (saliency); saved as checkpoint/alg1.pth + .npy + plot.
    In a resumed run whose alg1.pth exists already, that result is read back."""
    t = cfg["tag"]
    done = rd.checkpoint_dir / CHECKPOINT
    if done.is_file():
        ck = load_alg1(done, cfg)
        rd.log(f"steps 1-2: done earlier in this run ({done})")
        return {"checkpoint": done, "saliency": ck["saliency"].numpy(), "saliency_raw": ck["saliency_raw"].numpy(),
                "accuracy": ck["accuracy"], "joint_history": ck["joint_history"], "source": ck["source"],
                "channels": int(ck["saliency"].numel()), "plot": rd.file(f"saliency_place{ck['place']}.png"),
                "teacher_kind": ck["teacher_kind"], "seconds": ck["seconds"]}
    started = time.perf_counter()
    teacher, student, history, source = step1(cfg, root, rd, device, out)
    ld = D.eval_loaders(root, cfg, device)
    acc = {}
    for name, net, key in (("teacher", teacher, "audio"), ("student", student, "image")):
        for split in ("val", "test"):
            acc[f"{name}_{split}_acc"] = T.evaluate(net, ld[split], key, device)[1]
    rd.log("step 1 nets: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))

    place = t["place"]
    n_ch = M.place_channels(teacher, place, _example(cfg, "audio").to(device))
    sal_loader = D.make_loader(D.AudioImageDataset(root, cfg, t["split"]), cfg["data"]["batch_size2"], False,
                               cfg["data"]["num_workers"], device)
    batches = saliency_batches(sal_loader, device, last_only=cfg["parity"])
    rd.log(f"step 2: saliency at place {place} ({M.place_name(place)}, {n_ch} channels), {t['op']} × "
           f"{t['num_permute']}, distance {t['distance']}, over {len(batches)} of {len(sal_loader)} batch(es) of "
           f"{t['split']}")
    raw = S.saliency_vector(teacher, student, batches, M.place_name(place), op=t["op"], distance=t["distance"],
                            repeats=t["num_permute"], chunk=t["chunk"],
                            generator=torch.Generator().manual_seed(cfg["seed"]), normalize=False,
                            variant=T.tag_variant(cfg), progress=cfg["progress"])
    if not torch.isfinite(raw).all():
        raise DataError(f"step 2: the saliency at place {place} is not finite (step-1 nets diverged?); nothing saved")
    sal = S.minmax_normalize(raw)
    d = cfg["data"]
    ck = {"teacher": teacher.state_dict(), "student": student.state_dict(), "model": cfg["model"],
          "data": {k: d[k] for k in ("n_mels", "frames", "image_height", "image_width")},
          "saliency": sal.cpu(), "saliency_raw": raw.cpu(), "place": place, "distance": t["distance"],
          "num_permute": t["num_permute"], "accuracy": acc, "joint_history": history, "source": source,
          "teacher_kind": cfg["teacher"], "seconds": time.perf_counter() - started}
    npy = rd.file(f"overlap_tag_teacher_place{place}_repeat{t['num_permute']}.npy")
    np.save(npy, sal.cpu().numpy())
    png = plot_saliency(sal.cpu().numpy(), rd.file(f"saliency_place{place}.png"), cfg["eval"]["ratio"],
                        title=f"Algorithm-1 saliency, place {place} ({M.place_name(place)})")
    path = rd.save_checkpoint(ck, CHECKPOINT)  # last: its presence means steps 1-2 are complete
    rd.log(f"saved {path} and {npy.name}; saliency min {float(raw.min()):.4g} max {float(raw.max()):.4g}")
    return {"checkpoint": path, "saliency": sal.cpu().numpy(), "saliency_raw": raw.cpu().numpy(), "accuracy": acc,
            "joint_history": history, "plot": png, "source": source, "channels": n_ch,
            "teacher_kind": cfg["teacher"], "seconds": ck["seconds"]}


def plot_saliency(sal: np.ndarray, path: Path, ratio: float, title: str = "") -> Path:
    """Raw and sorted saliency (normalised to [0, 1]) with the lowest and highest 25 % of the channels marked
    (the ones modes 1 and 2 remove first), as the reference's helper plot (utils/helper.py)."""
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

def method_terms(cfg: dict, method: str) -> dict:
    """The terms of a KD method, each weighted by kd.pl_weight, with the parity switches: the `js` term takes the
    reference's reversed JS (distiller_zoo/JS.py), and `rkd` loses the KL the other relational methods add (NTDH's
    utils/helper.py train_network_distill computes rkd alone)."""
    kd = cfg["kd"]
    terms = {}
    for name, term in kd["methods"][method].items():
        term = dict(term)
        loss = term.get("loss", name)
        if cfg["parity"] and method == "rkd" and loss == "kl":
            continue
        if cfg["parity"] and loss == "js":
            term["variant"] = "reference"
        term["weight"] = float(term.get("weight", 1.0)) * kd["pl_weight"]
        terms[name] = term
    return terms


def objective_for(cfg: dict, n_data: int, labels: torch.Tensor, method: str | None = None):
    """`ce` (kd.gt_weight) + the method's terms, masked by kd.mask; method None: the no-KD baseline, CE only."""
    kd = cfg["kd"]
    if method is None:
        terms, mask = {"ce": {"weight": 1.0}}, "none"
    else:
        terms, mask = {"ce": {"weight": kd["gt_weight"]}, **method_terms(cfg, method)}, kd["mask"]
    n_cls = cfg["model"]["classes"]
    context = {"student_dim": n_cls, "teacher_dim": n_cls, "n_data": n_data, "dataset_labels": labels}
    return build_objective({"terms": terms, "mask": mask, "omega": {**kd["omega"], "detach": True}}, context=context)


def _students(cfg: dict, root: Path, rd: RunDir, device, ck: dict, teacher, prefix: str) -> list[dict]:
    """eval.num_runs students of one setting (teacher None: the no-KD baseline). Run r of every setting starts
    from the same weights and sees the same batches in the same order."""
    train = D.AudioImageDataset(root, cfg, "train")
    ld = D.eval_loaders(root, cfg, device)
    results = []
    for run in range(cfg["eval"]["num_runs"]):
        seed_everything(cfg["seed"] + run, cfg["deterministic"])
        _, student = M.build({**cfg, "model": ck["model"]})
        objective = objective_for(cfg, len(train), train.labels, None if teacher is None else cfg["kd"]["distill"])
        results.append(T.fit(student.to(device), objective.to(device), train, ld, teacher=teacher, cfg=cfg,
                             names=("student", run), device=device, rd=rd, tag=f"{prefix}_run{run}"))
        if run == 0 and teacher is None:
            logits, labels = T.predict(student, ld["val"], "image", device)
            ntd.save_logits(rd.path, "probe", logits, labels, split="val",
                            source="ravdess image student without KD, run 0, selected weights")
    return results


def _row(results: list[dict], **fields) -> dict:
    vals, tests = [r["val_acc"] for r in results], [r["test_acc"] for r in results]
    (vm, vs), (tm, ts) = T.mean_std(vals), T.mean_std(tests)
    line = f"Student Val Acc {100 * vm:.2f} ± {100 * vs:.2f} | Test Acc {100 * tm:.2f} ± {100 * ts:.2f}"
    return {**fields, "val_acc": vals, "test_acc": tests, "val_mean": vm, "val_std": vs, "test_mean": tm,
            "test_std": ts, "best_epoch": [r["best_epoch"] for r in results],
            "omega": [r["omega"] for r in results if r["omega"]], "line": line}


def baseline(cfg: dict, root: Path, rd: RunDir, device, ck_path: Path) -> dict:
    """The no-KD baseline: eval.num_runs image students on CE only; run 0's validation logits are the NTD probe."""
    started = time.perf_counter()
    results = _students(cfg, root, rd, device, load_alg1(ck_path, cfg), None, "baseline")
    row = _row(results, mode="baseline", distill="none", mask="none", seconds=time.perf_counter() - started)
    rd.log(f"no-KD baseline: {row['line']}")
    return row


def eval_tag(cfg: dict, root: Path, rd: RunDir, device, ck_path: Path, mode: int | None = None) -> dict:
    """Remove channels of the step-1 teacher by `mode` and distil into eval.num_runs fresh image students."""
    e, kd = cfg["eval"], cfg["kd"]
    mode = e["mode"] if mode is None else mode
    started = time.perf_counter()
    ck = load_alg1(ck_path, cfg)
    teacher = freeze(nets_from(ck, cfg)[0].to(device))
    place, sal = ck["place"], ck["saliency"]
    g = torch.Generator().manual_seed(cfg["seed"] + 1000 * (mode + 1))
    idx = S.removal_indices(sal, mode, e["ratio"], generator=g)
    handle = S.remove_channels(teacher, M.place_name(place), idx, e["fill"])
    ld = D.eval_loaders(root, cfg, device)
    logits, labels = T.predict(teacher, ld["val"], "audio", device)
    t_val = float((logits.argmax(1) == labels).float().mean())
    t_test = T.evaluate(teacher, ld["test"], "audio", device)[1]
    ntd.save_logits(rd.path, "teacher", logits, labels, tag=f"mode{mode}", split="val",
                    source=f"ravdess {ck.get('teacher_kind', 'joint')} audio teacher, mode {mode}, {e['fill']} fill")
    rd.log(f"mode {mode}: removed {idx.numel()}/{sal.numel()} channels at place {place} ({e['fill']} fill); "
           f"teacher val acc {t_val:.4f}, test acc {t_test:.4f}")
    try:
        results = _students(cfg, root, rd, device, ck, teacher, f"mode{mode}")
    finally:
        handle.remove()
    row = _row(results, mode=mode, ratio=e["ratio"], fill=e["fill"], place=place, distill=kd["distill"],
               mask=kd["mask"], removed=int(idx.numel()), channels=int(sal.numel()), removed_channels=idx.tolist(),
               teacher_val_acc=t_val, teacher_test_acc=t_test, checkpoint=str(ck_path),
               seconds=time.perf_counter() - started)
    rd.log(f"mode {mode} ({kd['distill']}, mask {kd['mask']}): {row['line']}")
    return row


MODE_NAMES = {-1: "no removal", 0: "random", 1: "modality-general", 2: "modality-specific"}
CSV_COLUMNS = ["mode", "mode_name", "ratio", "fill", "place", "distill", "mask", "removed", "channels",
               "teacher_val_acc", "teacher_test_acc", "val_mean", "val_std", "test_mean", "test_std"]


def compare_modes(cfg: dict, root: Path, rd: RunDir, device, ck_path: Path, base: dict | None = None) -> list[dict]:
    rows = []
    for mode in cfg["eval"]["modes"]:
        r = eval_tag(cfg, root, rd, device, ck_path, mode)
        rows.append({**r, "mode_name": MODE_NAMES[mode]})
    all_rows = rows + ([{**base, "mode_name": "no KD"}] if base else [])
    rd.write_csv("compare_modes.csv", all_rows, CSV_COLUMNS)
    labels = [f"{r['mode']}: {r['mode_name']}" for r in rows] + (["no KD"] if base else [])
    plots.grouped_bars(rd.file("compare_modes.png"), labels,
                       {"student val": ([r["val_mean"] for r in all_rows], [r["val_std"] for r in all_rows]),
                        "student test": ([r["test_mean"] for r in all_rows], [r["test_std"] for r in all_rows]),
                        "teacher test (after removal)": ([r.get("teacher_test_acc", np.nan) for r in all_rows],)},
                       ylabel="accuracy", title=f"Removal modes, ratio {cfg['eval']['ratio']}")
    rd.log("\n" + markdown_table(rows, base))
    return rows


def markdown_table(rows: list[dict], base: dict | None = None) -> str:
    head = ("| mode | removed | teacher test (after removal) | student val | student test |\n"
            "|---|---|---|---|---|")
    body = [f"| {r['mode']} ({MODE_NAMES[r['mode']]}) | {r['removed']}/{r['channels']} | {r['teacher_test_acc']:.4f} "
            f"| {r['val_mean']:.4f} ± {r['val_std']:.4f} | {r['test_mean']:.4f} ± {r['test_std']:.4f} |"
            for r in rows]
    if base:
        body.append(f"| no KD (CE only) | – | – | {base['val_mean']:.4f} ± {base['val_std']:.4f} "
                    f"| {base['test_mean']:.4f} ± {base['test_std']:.4f} |")
    return "\n".join([head, *body])
