"""The MNIST → MNIST-M setup and Algorithm 1 (the NTDH repository's MNIST/main.py and MNIST/utils/helper.py
`cal_overlap_tag`; MFH, Xue et al., ICLR 2023, Algorithm 1): data and loaders, the networks, the KD teacher (the
jointly trained one, or an independent CE-only one), and the saliency vector stored with its teacher's identity.
Distillation from the channel-removed teacher and the baseline are in distill.py, heat maps in heatmap.py."""
from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import plots
from common import saliency as alg1
from common.config import DataError, atomic_write, load_yaml
from common.train import holdout_split
from mnist import data as D
from mnist.losses import build_kd_objective
from mnist.models import MLP, first_nonfinite, load_model, save_model, state_hash
from mnist.trainer import FitContext, FitResult, evaluate, fit

TEACHER_CKPT = {"joint": "teacher_overlap.pth", "independent": "teacher_independent.pth"}
STUDENT_CKPT = "student_overlap.pth"
JOINT_STATE = "joint_state.pth"   # step 1's training state, for --resume of an interrupted joint training


def tag_name(place: int, teacher: str = "joint") -> str:
    """The saliency file: `saliency` (channels,) float32 and `teacher_sha256`, the identity of the teacher it was
    computed from (models.state_hash), so that --eval_tag never pairs it with another teacher."""
    return f"saliency_teacher_place{place}.npz" if teacher == "joint" else f"saliency_{teacher}_place{place}.npz"


@dataclass
class Setup:
    cfg: dict
    device: torch.device
    pair: D.Pair
    splits: dict            # train / val / test Splits
    loaders: dict           # train / val / test BatchLoaders
    tag_loader: D.BatchLoader
    prepare: D.Prepare
    ctx: FitContext
    log: Callable[[str], None]
    cache: dict             # results computed once per run (the baseline shared by eval_tag and base_line)

    @property
    def student_dim(self) -> int:
        return self.prepare.dims[0]

    @property
    def teacher_dim(self) -> int:
        return self.prepare.dims[1]


def _splits(cfg: dict, pair: D.Pair, log) -> dict:
    limit = cfg["data"]["max_train"]
    if 0 < limit < len(pair.train):
        # the subset is holdout_split's stratified carve-out of `limit` digits (its other part is not used)
        keep = holdout_split(len(pair.train), limit / len(pair.train), cfg["seed"] + 7, pair.train.labels)[1]
        log(f"data.max_train: a stratified subset of {len(keep)} of the {len(pair.train)} training digits")
        pair = D.Pair(pair.train.subset(keep), pair.test, pair.source)
    if cfg["parity"]:
        # NTDH MNIST/dataloader/dataset.py gen_data: the "val" loader is the test split, so selection happens on test.
        log("parity: model selection on the test split, as the reference (no validation split)")
        return {"train": pair.train, "val": pair.test, "test": pair.test}
    train_idx, val_idx = holdout_split(len(pair.train), cfg["data"]["val_fraction"], cfg["seed"], pair.train.labels)
    return {"train": pair.train.subset(train_idx), "val": pair.train.subset(val_idx), "test": pair.test}


def make_setup(cfg: dict, device, base: Path, rd, *, resume: bool = False) -> Setup:
    dc, log = cfg["data"], rd.log
    default_root = load_yaml(base / "config.yaml")["data"]["root"]
    pair = D.load_pair(dc, base, log, explicit_root=dc["root"] != default_root)
    seed = cfg["seed"]
    splits = _splits(cfg, pair, log)
    bs = cfg["train"]["batch_size"]
    es = dc["eval_noise_seed"]
    loaders = {"train": D.BatchLoader(splits["train"], bs, device, shuffle=True, seed=seed),
               "val": D.BatchLoader(splits["val"], bs, device, shuffle=False, noise_seed=es),
               "test": D.BatchLoader(pair.test, bs, device, shuffle=False, noise_seed=es + 1_000_000)}
    tag_loader = D.BatchLoader(splits["train"], cfg["cal"]["batch_size"], device, shuffle=False,
                               noise_seed=es + 2_000_000)
    prepare = D.Prepare(dc["noise_level"], dc["mnist_noise_factor"], cfg["stu_type"], device, seed + 1,
                        dc["quantize"])
    log(f"data: {pair.source}; train {len(splits['train'])}, val {len(splits['val'])}, test {len(pair.test)}; "
        f"student {prepare.stu_key} ({prepare.dims[0]}-d, noise {prepare.levels[prepare.stu_key]}), teacher "
        f"{prepare.tea_key} ({prepare.dims[1]}-d, noise {prepare.levels[prepare.tea_key]})")
    ctx = FitContext(loaders, prepare, rd, torch.device(device), seed, cfg["checkpoint_every"], resume,
                     cfg["progress"], log)
    return Setup(cfg, torch.device(device), pair, splits, loaders, tag_loader, prepare, ctx, log, {})


def new_mlp(cfg: dict, input_dim: int) -> MLP:
    m = cfg["model"]
    return MLP(input_dim, m["hidden"], 10, m["negative_slope"], logit_activation=cfg["parity"])


def train_net(s: Setup, tag: str, names: tuple, *, key: str = "student", teacher: MLP | None = None,
              distill: bool = False, init_seed: int = 0) -> tuple[MLP, FitResult]:
    """A fresh MLP on modality `key` ("student" or "teacher"), trained by mnist.trainer.fit with the train section's
    SGD: CE only, or the configured distillation from `teacher`. `init_seed` fixes its initial weights."""
    cfg, tc = s.cfg, s.cfg["train"]
    torch.manual_seed(cfg["seed"] + init_seed)
    net = new_mlp(cfg, s.student_dim if key == "student" else s.teacher_dim).to(s.device)
    objective = build_kd_objective(cfg, s.splits["train"].labels, distill=distill).to(s.device)
    optimizer = torch.optim.SGD(list(net.parameters()) + list(objective.parameters()), lr=tc["lr"],
                                momentum=tc["momentum"])
    result = fit(s.ctx, net, objective, optimizer, epochs=tc["epochs"], tag=tag, names=names, key=key,
                 teacher=teacher)
    return net, result


def _prepared(s: Setup, loader, limit: int = 0):
    """(x_teacher, x_student, y) batches for common.saliency."""
    for i, batch in enumerate(loader):
        if limit and i >= limit:
            break
        b = s.prepare(batch)
        yield b["teacher"], b["student"], b["label"]


def accuracies(s: Setup, model, key: str) -> dict:
    return {split: evaluate(model, s.loaders[split], key, s.prepare)[1] for split in ("train", "val", "test")}


def fmt(acc: dict) -> str:
    return " | ".join(f"{k} {v:.4f}" for k, v in acc.items())


def _newest(out_root: Path, rel: str, exclude: Path | None = None) -> Path | None:
    """The newest run directory under out_root (by name: <name>_<timestamp>) that holds `rel`."""
    if not Path(out_root).is_dir():
        return None
    runs = sorted((p for p in Path(out_root).iterdir() if p.is_dir() and (p / rel).is_file()),
                  key=lambda p: (p.stat().st_mtime, p.name))
    runs = [p for p in runs if exclude is None or p.resolve() != Path(exclude).resolve()]
    return runs[-1] / rel if runs else None


def locate(explicit: str, rd, rel: str, what: str, hint: str) -> Path:
    """An input file: the explicit path, else this run's copy, else the newest run under the same --out."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: {what} not found")
        return path
    if (rd.path / rel).is_file():
        return rd.path / rel
    found = _newest(rd.path.parent, rel, exclude=rd.path)
    if found is None:
        raise DataError(f"{rd.path.parent}: no run directory holds {rel} ({what}); {hint}")
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Algorithm 1


def _joint_nets(s: Setup, rd) -> tuple[MLP, MLP, Path, Path, list]:
    """Step 1: train the joint teacher / student (CE + CE + distance), or load them (this run's on a resume)."""
    cfg, cc = s.cfg, s.cfg["cal"]
    ckpt = rd.checkpoint_dir
    resumed = s.ctx.resume and (ckpt / TEACHER_CKPT["joint"]).is_file() and (ckpt / STUDENT_CKPT).is_file()
    if cc["first_time"] and not resumed:
        variant = "reference" if cfg["parity"] else cc["js_variant"]
        teacher, student = new_mlp(cfg, s.teacher_dim).to(s.device), new_mlp(cfg, s.student_dim).to(s.device)
        started = time.perf_counter()
        history = alg1.joint_train(teacher, student, lambda: _prepared(s, s.loaders["train"]), epochs=cc["epochs"],
                                   lr=cc["lr"], momentum=cc["momentum"], distance=cc["distance"], variant=variant,
                                   device=s.device, progress=cfg["progress"], checkpoint=ckpt / JOINT_STATE,
                                   checkpoint_every=cfg["checkpoint_every"], resume=s.ctx.resume,
                                   state={"train_shuffle": s.loaders["train"].generator,
                                          "noise": s.prepare.generator}, log=s.log)
        for epoch, loss in enumerate(history, 1):
            rd.scalar("joint/loss", loss, epoch)
        took = f"{time.perf_counter() - started:.1f} s" + (" since the resume" if s.ctx.resume else "")
        s.log(f"joint training: {cc['epochs']} epochs ({took}), loss {history[0]:.4f} -> {history[-1]:.4f}")
        teacher_path = save_model(rd, teacher, TEACHER_CKPT["joint"], role="teacher", stu_type=cfg["stu_type"])
        student_path = save_model(rd, student, STUDENT_CKPT, role="student", stu_type=cfg["stu_type"])
        s.log(f"saved {teacher_path} and {student_path}")
        return teacher, student, teacher_path, student_path, history
    hint = "run with --cal_tag --first-time first, or set cal.teacher / cal.student"
    teacher_path = locate("" if resumed else cc["teacher"], rd, f"checkpoint/{TEACHER_CKPT['joint']}",
                          "joint teacher", hint)
    student_path = locate("" if resumed else cc["student"], rd, f"checkpoint/{STUDENT_CKPT}", "joint student", hint)
    teacher, _ = load_model(teacher_path, s.device)
    student, _ = load_model(student_path, s.device)
    _check_inputs(s, teacher, student, teacher_path, student_path)
    s.log(f"loaded the joint teacher {teacher_path} and student {student_path}")
    if not resumed:  # copies in this run, so that the saliency computed here lies beside its teacher
        teacher_path = save_model(rd, teacher, TEACHER_CKPT["joint"], role="teacher", stu_type=cfg["stu_type"],
                                  copied_from=str(teacher_path))
        student_path = save_model(rd, student, STUDENT_CKPT, role="student", stu_type=cfg["stu_type"],
                                  copied_from=str(student_path))
    return teacher, student, teacher_path, student_path, []


def kd_teacher(s: Setup, rd, joint_teacher: MLP, joint_path: Path) -> tuple[MLP, Path]:
    """The teacher distilled from: the joint one, or (teacher: independent) a CE-only MLP trained on the teacher
    modality alone with the train section's recipe, selected on validation, saved beside the joint nets."""
    if s.cfg["teacher"] == "joint":
        return joint_teacher, joint_path
    teacher, result = train_net(s, "teacher_independent", ("teacher_independent",), key="teacher", init_seed=50)
    path = save_model(rd, teacher, TEACHER_CKPT["independent"], role="teacher_independent",
                      stu_type=s.cfg["stu_type"])
    s.log(f"independent teacher (CE only on {s.prepare.tea_key}): val acc {result.best_val_acc:.4f}, test acc "
          f"{result.test_acc:.4f} -> {path}")
    return teacher, path


def _saliency(s: Setup, teacher: MLP, student: MLP, place_name: str) -> tuple[torch.Tensor, float, int]:
    """Step 2 over the tag loader's batches: (saliency vector, seconds, samples)."""
    cfg, cc = s.cfg, s.cfg["cal"]
    batches = list(_prepared(s, s.tag_loader, cc["max_batches"]))
    if cfg["parity"]:
        batches = batches[-1:]  # helper.py cal_overlap_tag overwrites the tag per batch: only the last counts
    started = time.perf_counter()
    sal = alg1.saliency_vector(teacher, student, batches, place_name, op=cc["op"], distance=cc["distance"],
                               repeats=cc["num_permute"], chunk=cc["chunk"],
                               generator=torch.Generator().manual_seed(cfg["seed"] + 2),
                               variant="reference" if cfg["parity"] else cc["js_variant"],
                               progress=cfg["progress"], desc=f"saliency@{place_name}")
    return sal, time.perf_counter() - started, sum(len(b[2]) for b in batches)


def cal_tag(s: Setup, rd) -> dict:
    """Step 1 (joint training, or loading those nets), the KD teacher, step 2 (the saliency vector of the KD teacher
    against the joint student at `place`)."""
    cfg, cc = s.cfg, s.cfg["cal"]
    joint, student, joint_path, student_path, history = _joint_nets(s, rd)
    teacher, teacher_path = kd_teacher(s, rd, joint, joint_path)
    acc_t, acc_s = accuracies(s, teacher, "teacher"), accuracies(s, student, "student")
    s.log(f"{cfg['teacher']} teacher acc: {fmt(acc_t)}")
    s.log(f"joint student acc: {fmt(acc_s)}")
    place = cfg["place"]
    place_name = teacher.place_name(place)
    tag_path = rd.path / tag_name(place, cfg["teacher"])
    if s.ctx.resume and tag_path.is_file():
        sal, seconds = read_tag(tag_path, teacher, place, s.log), tag_seconds(tag_path)
        s.log(f"saliency computed before the resume: {tag_path}")
    else:
        sal, seconds, samples = _saliency(s, teacher, student, place_name)
        save_tag(tag_path, sal.cpu().numpy().astype(np.float32), teacher, seconds)
        s.log(f"saliency at place {place} ({place_name}, {sal.numel()} channels, op {cc['op']}, distance "
              f"{cc['distance']}) over {samples} samples in {seconds:.1f} s -> {tag_path}")
    sal_np = sal.cpu().numpy().astype(np.float32)
    plot_paths = []
    for mode in [m for m in cfg["eval"]["modes"] if m in (1, 2)] or [2]:
        removed = alg1.removal_indices(sal, mode, cfg["eval"]["ratio"]).cpu().numpy()
        plot_paths.append(plots.vector_plot(
            rd.path / f"saliency_place{place}_mode{mode}.png", sal_np, marked=removed,
            mark_label=f"removed by mode {mode} ({len(removed)} of {sal_np.size})",
            title=f"{cfg['teacher']} teacher saliency at place {place} ({place_name}), raw"))
    return {"history": history, "teacher_kind": cfg["teacher"], "teacher_acc": acc_t, "student_acc": acc_s,
            "tag": str(tag_path), "teacher": str(teacher_path), "student": str(student_path),
            "saliency_seconds": seconds, "saliency": sal_np.tolist(), "plots": [p.name for p in plot_paths]}


def _check_inputs(s: Setup, teacher: MLP, student: MLP | None, tpath, spath=None) -> None:
    if teacher.input_dim != s.teacher_dim:
        raise DataError(f"{tpath}: teacher takes {teacher.input_dim}-d inputs, but stu_type {s.cfg['stu_type']} "
                        f"gives the teacher {s.teacher_dim}-d inputs")
    if student is not None and student.input_dim != s.student_dim:
        raise DataError(f"{spath}: student takes {student.input_dim}-d inputs, expected {s.student_dim}")


# ----------------------------------------------------------------------------------------------------------------------
# The saliency file


def save_tag(path: Path, saliency: np.ndarray, teacher: MLP, seconds: float | None = None) -> Path:
    extra = {} if seconds is None else {"seconds": np.array(seconds)}
    return atomic_write(path, lambda f: np.savez(f, saliency=saliency, teacher_sha256=np.array(state_hash(teacher)),
                                                 **extra), mode="wb")


def tag_seconds(path: Path) -> float | None:
    """How long the saliency in a cal_tag .npz took to compute (None when the file does not say)."""
    with np.load(path, allow_pickle=False) as loaded:
        return float(loaded["seconds"]) if "seconds" in loaded.files else None


def read_tag(path: Path, teacher: MLP, place: int, log: Callable[[str], None] = print) -> torch.Tensor:
    """The saliency vector of `teacher` at `place`: a .npz written by cal_tag (its teacher identity must match), or a
    bare .npy (e.g. the reference's), whose teacher cannot be checked (said in the log)."""
    channels = teacher.feature_dim(place)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"saliency": loaded}
        else:
            with loaded:
                arrays = dict(loaded)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable saliency file (.npz with saliency and teacher_sha256, or .npy): "
                        f"{e}") from None
    tag = np.asarray(arrays.get("saliency"))
    if "saliency" not in arrays or tag.ndim != 1 or tag.shape[0] != channels:
        raise DataError(f"{path}: expected a saliency vector of {channels} channels (place {place}), got "
                        f"{'no saliency array' if 'saliency' not in arrays else f'shape {tag.shape}'}")
    bad = first_nonfinite(tag.astype(np.float64))
    if bad is not None:
        raise DataError(f"{path}: the saliency vector holds a non-finite value (NaN/inf), first at index {bad[0]}")
    if "teacher_sha256" in arrays:
        saved, actual = str(arrays["teacher_sha256"]), state_hash(teacher)
        if saved != actual:
            raise DataError(f"{path}: computed from another teacher (sha256 {saved[:12]}...) than the one loaded "
                            f"(sha256 {actual[:12]}...); give the matching --teacher / --tag pair")
    else:
        log(f"NOTE: {path} carries no teacher identity; it cannot be checked against the teacher")
    return torch.from_numpy(tag.astype(np.float32))


def load_saliency_teacher(s: Setup, rd) -> tuple[MLP, Path, Path]:
    """The KD teacher (eval.teacher, else this run's, else the newest run's under --out, of kind `teacher`) and the
    saliency file computed from it (eval.tag, else the one beside that teacher; read_tag checks the pairing)."""
    ec, kind = s.cfg["eval"], s.cfg["teacher"]
    hint = "run with --cal_tag --first-time first, or set --teacher / --tag"
    teacher_path = locate(ec["teacher"], rd, f"checkpoint/{TEACHER_CKPT[kind]}", f"{kind} saliency teacher", hint)
    teacher, _ = load_model(teacher_path, s.device)
    _check_inputs(s, teacher, None, teacher_path)
    if ec["tag"]:
        tag_path = locate(ec["tag"], rd, tag_name(s.cfg["place"], kind), "saliency vector", hint)
    else:
        tag_path = teacher_path.parent.parent / tag_name(s.cfg["place"], kind)
        if not tag_path.is_file():
            raise DataError(f"{tag_path}: missing; no saliency vector was computed from the teacher {teacher_path} "
                            f"(its run was interrupted?); {hint}")
    return teacher, teacher_path, tag_path
