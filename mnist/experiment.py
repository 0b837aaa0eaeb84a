"""The MNIST → MNIST-M pipelines (the NTDH repository's MNIST/main.py and MNIST/utils/helper.py): Algorithm 1 (`cal_tag`), distillation from the channel-removed saliency
teacher (`eval_tag`), the no-KD baseline (`base_line`) and input-gradient heat maps (`heat_map`)."""
from __future__ import annotations

import copy
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import classify, plots
from common import saliency as alg1
from common.config import ConfigError, DataError, atomic_write, load_yaml
from common.kd import available_losses, build_objective
from mnist import data as D
from mnist.models import MLP, first_nonfinite, load_model, save_model, state_hash

TEACHER_CKPT = "teacher_overlap.pth"
STUDENT_CKPT = "student_overlap.pth"


def tag_name(place: int) -> str:
    """The saliency file: `saliency` (channels,) float32 and `teacher_sha256`, the identity of the teacher it was
    computed from (models.state_hash), so that --eval_tag never pairs it with another teacher."""
    return f"saliency_teacher_place{place}.npz"


@dataclass
class Setup:
    cfg: dict
    device: torch.device
    pair: D.Pair
    splits: dict            # train / val / test Splits
    loaders: dict           # train / val / test BatchLoaders
    tag_loader: D.BatchLoader
    prepare: D.Prepare
    log: Callable[[str], None]

    @property
    def student_dim(self) -> int:
        return self.prepare.dims[0]

    @property
    def teacher_dim(self) -> int:
        return self.prepare.dims[1]


def make_setup(cfg: dict, device, base: Path, log: Callable[[str], None] = print) -> Setup:
    dc = cfg["data"]
    default_root = load_yaml(base / "config.yaml")["data"]["root"]
    pair = D.load_pair(dc, base, log, explicit_root=dc["root"] != default_root)
    seed = cfg["seed"]
    if cfg["parity"]:
        # NTDH MNIST/dataloader/dataset.py gen_data: the "val" loader is the test split, so selection happens on test.
        train, val = pair.train, pair.test
        log("parity: model selection on the test split, as the reference (no validation split)")
    else:
        train, val = D.split_validation(pair.train, dc["val_fraction"], seed)
    splits = {"train": train, "val": val, "test": pair.test}
    bs = cfg["train"]["batch_size"]
    es = dc["eval_noise_seed"]
    loaders = {"train": D.BatchLoader(train, bs, device, shuffle=True, seed=seed),
               "val": D.BatchLoader(val, bs, device, shuffle=False, noise_seed=es),
               "test": D.BatchLoader(pair.test, bs, device, shuffle=False, noise_seed=es + 1_000_000)}
    tag_loader = D.BatchLoader(train, cfg["cal"]["batch_size"], device, shuffle=False, noise_seed=es + 2_000_000)
    prepare = D.Prepare(dc["noise_level"], dc["mnist_noise_factor"], cfg["stu_type"], device, seed + 1,
                        dc["quantize"])
    log(f"data: {pair.source}; train {len(train)}, val {len(val)}, test {len(pair.test)}; student "
        f"{prepare.stu_key} ({prepare.dims[0]}-d, noise {prepare.levels[prepare.stu_key]}), teacher "
        f"{prepare.tea_key} ({prepare.dims[1]}-d, noise {prepare.levels[prepare.tea_key]})")
    return Setup(cfg, torch.device(device), pair, splits, loaders, tag_loader, prepare, log)


def new_mlp(cfg: dict, input_dim: int) -> MLP:
    m = cfg["model"]
    return MLP(input_dim, m["hidden"], 10, m["negative_slope"], logit_activation=cfg["parity"])


def _prepared(s: Setup, loader, limit: int = 0):
    """(x_teacher, x_student, y) batches for common.saliency."""
    for i, batch in enumerate(loader):
        if limit and i >= limit:
            break
        b = s.prepare(batch)
        yield b["teacher"], b["student"], b["label"]


def _accuracies(s: Setup, model, key: str) -> dict:
    return {split: classify.evaluate(model, s.loaders[split], key, s.device, prepare=s.prepare)[1]
            for split in ("train", "val", "test")}


def _fmt(acc: dict) -> str:
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


def cal_tag(s: Setup, rd) -> dict:
    """Step 1 (joint training with CE + CE + distance, or loading those nets) and step 2 (the saliency vector)."""
    cfg, cc = s.cfg, s.cfg["cal"]
    variant = "reference" if cfg["parity"] else cc["js_variant"]
    if cc["first_time"]:
        teacher, student = new_mlp(cfg, s.teacher_dim).to(s.device), new_mlp(cfg, s.student_dim).to(s.device)
        started = time.perf_counter()
        history = alg1.joint_train(teacher, student, lambda: _prepared(s, s.loaders["train"]), epochs=cc["epochs"],
                                   lr=cc["lr"], momentum=cc["momentum"], distance=cc["distance"], variant=variant,
                                   device=s.device, progress=cfg["progress"])
        for epoch, loss in enumerate(history, 1):
            rd.scalar("joint/loss", loss, epoch)
        s.log(f"joint training: {cc['epochs']} epochs in {time.perf_counter() - started:.1f} s, loss "
              f"{history[0]:.4f} -> {history[-1]:.4f}")
        teacher_path = save_model(rd, teacher, TEACHER_CKPT, role="teacher", stu_type=cfg["stu_type"])
        student_path = save_model(rd, student, STUDENT_CKPT, role="student", stu_type=cfg["stu_type"])
        s.log(f"saved {teacher_path} and {student_path}")
    else:
        history = []
        hint = "run with --cal_tag --first-time first, or set cal.teacher / cal.student"
        teacher_path = locate(cc["teacher"], rd, f"checkpoint/{TEACHER_CKPT}", "joint teacher", hint)
        student_path = locate(cc["student"], rd, f"checkpoint/{STUDENT_CKPT}", "joint student", hint)
        teacher, _ = load_model(teacher_path, s.device)
        student, _ = load_model(student_path, s.device)
        _check_inputs(s, teacher, student, teacher_path, student_path)
        s.log(f"loaded the joint teacher {teacher_path} and student {student_path}")
    acc_t, acc_s = _accuracies(s, teacher, "teacher"), _accuracies(s, student, "student")
    s.log(f"joint teacher acc: {_fmt(acc_t)}")
    s.log(f"joint student acc: {_fmt(acc_s)}")

    place = cfg["place"]
    place_name = teacher.place_name(place)
    batches = list(_prepared(s, s.tag_loader, cc["max_batches"]))
    if cfg["parity"]:
        batches = batches[-1:]  # helper.py cal_overlap_tag overwrites the tag per batch: only the last counts
    generator = torch.Generator().manual_seed(cfg["seed"] + 2)
    started = time.perf_counter()
    sal = alg1.saliency_vector(teacher, student, batches, place_name, op=cc["op"], distance=cc["distance"],
                               repeats=cc["num_permute"], chunk=cc["chunk"], generator=generator, variant=variant,
                               progress=cfg["progress"], desc=f"saliency@{place_name}")
    seconds = time.perf_counter() - started
    sal_np = sal.cpu().numpy().astype(np.float32)
    tag_path = save_tag(rd.path / tag_name(place), sal_np, teacher)
    s.log(f"saliency at place {place} ({place_name}, {sal_np.size} channels, op {cc['op']}, distance "
          f"{cc['distance']}) over {sum(len(b[2]) for b in batches)} samples in {seconds:.1f} s -> {tag_path}")
    plot_paths = []
    shown = [m for m in cfg["eval"]["modes"] if m in (1, 2)] or [2]
    for mode in shown:
        removed = alg1.removal_indices(sal, mode, cfg["eval"]["ratio"]).cpu().numpy()
        plot_paths.append(plots.vector_plot(
            rd.path / f"saliency_place{place}_mode{mode}.png", sal_np, marked=removed,
            mark_label=f"removed by mode {mode} ({len(removed)} of {sal_np.size})",
            title=f"teacher saliency at place {place} ({place_name}), raw"))
    return {"history": history, "teacher_acc": acc_t, "student_acc": acc_s, "tag": str(tag_path),
            "teacher": str(teacher_path), "student": str(student_path), "saliency_seconds": seconds,
            "saliency": sal_np.tolist(), "plots": [p.name for p in plot_paths]}


def _check_inputs(s: Setup, teacher: MLP, student: MLP | None, tpath, spath=None) -> None:
    if teacher.input_dim != s.teacher_dim:
        raise DataError(f"{tpath}: teacher takes {teacher.input_dim}-d inputs, but stu_type {s.cfg['stu_type']} "
                        f"gives the teacher {s.teacher_dim}-d inputs")
    if student is not None and student.input_dim != s.student_dim:
        raise DataError(f"{spath}: student takes {student.input_dim}-d inputs, expected {s.student_dim}")


# ----------------------------------------------------------------------------------------------------------------------
# Distillation


def loss_config(cfg: dict) -> dict:
    """The `loss` section for common.kd.build_objective: ce (gt_weight) + the method's terms × pl_weight."""
    dc = cfg["distill"]
    method = dc["method"]
    if method in dc["methods"]:
        terms = copy.deepcopy(dc["methods"][method])
    elif method == "ce":  # the registry's supervised term: no distillation term beside distill.gt_weight·CE
        terms = {}
    elif method in available_losses():
        terms = {method: {"weight": 1.0}}
    else:
        raise ConfigError(f"distill.method: unknown {method!r}; expected one of "
                          f"{', '.join(sorted(set(dc['methods']) | set(available_losses())))}")
    out = {"ce": {"weight": dc["gt_weight"]}}
    if not isinstance(terms, dict):
        raise ConfigError(f"distill.methods.{method}: expected a mapping of KD terms, got {terms!r}")
    for name, term in terms.items():
        if term is not None and not isinstance(term, dict):
            raise ConfigError(f"distill.methods.{method}.{name}: expected a mapping of term options "
                              f"(weight, ...), got {term!r}")
        term = dict(term or {})
        term["weight"] = float(term.get("weight", 1.0)) * dc["pl_weight"]
        if name == "ce":
            raise ConfigError(f"distill.methods.{method}: 'ce' is added from distill.gt_weight; remove it")
        if term.get("loss", name) == "js" and cfg["parity"]:
            term["variant"] = "reference"
        out[name] = term
    return {"terms": out, "mask": dc["mask"], "omega": dc["omega"]}


def _context(cfg: dict, labels: np.ndarray) -> dict:
    return {"student_dim": 10, "teacher_dim": 10, "n_data": len(labels), "dataset_labels": torch.from_numpy(labels)}


def build_kd_objective(cfg: dict, labels: np.ndarray, distill: bool = True):
    """The student's Objective: CE only (no-KD baseline) or the configured distillation; a bad term option is a
    ConfigError naming the method."""
    loss_cfg = loss_config(cfg) if distill else {"terms": {"ce": {"weight": 1.0}}, "mask": "none"}
    try:
        return build_objective(loss_cfg, context=_context(cfg, labels))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"distill.methods.{cfg['distill']['method']}: {e}") from None


def check_objective(cfg: dict) -> None:
    """Build the distillation objective once at config time (unknown method, term or option: one-line error)."""
    build_kd_objective(cfg, np.arange(64) % 10)


def train_student(s: Setup, rd, teacher, tag: str, run: int) -> classify.FitResult:
    """One student (fresh MLP, seeded by run so every mode starts from the same weights) trained by fit()."""
    cfg, tc = s.cfg, s.cfg["train"]
    torch.manual_seed(cfg["seed"] + 100 + run)
    student = new_mlp(cfg, s.student_dim).to(s.device)
    objective = build_kd_objective(cfg, s.splits["train"].labels, distill=teacher is not None).to(s.device)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(objective.parameters()), lr=tc["lr"],
                                momentum=tc["momentum"])
    return classify.fit(student, s.loaders, objective, optimizer, epochs=tc["epochs"], device=s.device,
                        student_key="student", teacher=teacher, teacher_key="teacher", prepare=s.prepare,
                        log=s.log, writer=rd.writer, tag=tag, progress=cfg["progress"])


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std())  # population std, as the reference's np.std


def _report_runs(s: Setup, label: str, results: list[classify.FitResult]) -> dict:
    vals, tests = [r.best_val_acc for r in results], [r.test_acc for r in results]
    (vm, vs), (tm, ts) = _mean_std(vals), _mean_std(tests)
    s.log(f"{label}: Finish {len(results)} runs")
    s.log(f"{label}: Student Val Acc {100 * vm:.2f} ± {100 * vs:.2f} | Test Acc {100 * tm:.2f} ± {100 * ts:.2f}")
    return {"val_acc": vals, "test_acc": tests, "val_mean": vm, "val_std": vs, "test_mean": tm, "test_std": ts,
            "best_epochs": [r.best_epoch for r in results],
            "history": [r.history for r in results]}


def load_saliency_teacher(s: Setup, rd) -> tuple[MLP, Path, Path]:
    ec = s.cfg["eval"]
    hint = "run with --cal_tag --first-time first, or set --teacher / --tag"
    teacher_path = locate(ec["teacher"], rd, f"checkpoint/{TEACHER_CKPT}", "saliency teacher", hint)
    teacher, _ = load_model(teacher_path, s.device)
    _check_inputs(s, teacher, None, teacher_path)
    if ec["tag"]:
        tag_path = locate(ec["tag"], rd, tag_name(s.cfg["place"]), "saliency vector", hint)
    else:  # the one computed next to that teacher (read_tag checks that it is that teacher's)
        tag_path = teacher_path.parent.parent / tag_name(s.cfg["place"])
        if not tag_path.is_file():
            raise DataError(f"{tag_path}: missing; no saliency vector was computed from the teacher {teacher_path} "
                            f"(its run was interrupted?); {hint}")
    return teacher, teacher_path, tag_path


def save_tag(path: Path, saliency: np.ndarray, teacher: MLP) -> Path:
    return atomic_write(path, lambda f: np.savez(f, saliency=saliency, teacher_sha256=np.array(state_hash(teacher))),
                        mode="wb")


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


def eval_tag(s: Setup, rd) -> dict:
    """Remove channels of the saliency teacher by each mode, then distil `num_runs` students from it."""
    cfg, ec = s.cfg, s.cfg["eval"]
    base_teacher, teacher_path, tag_path = load_saliency_teacher(s, rd)
    place = cfg["place"]
    place_name = base_teacher.place_name(place)
    channels = base_teacher.feature_dim(place)
    sal = read_tag(tag_path, base_teacher, place, s.log)
    s.log(f"saliency teacher {teacher_path}, saliency {tag_path}")
    acc = _accuracies(s, base_teacher, "teacher")
    s.log(f"Teacher acc: {_fmt(acc)}")
    out = {"teacher": str(teacher_path), "tag": str(tag_path), "teacher_acc": acc, "modes": {}}
    for mode in ec["modes"]:
        if mode not in alg1.REMOVAL_MODES:
            raise ConfigError(f"eval.modes: expected values in {alg1.REMOVAL_MODES}, got {mode}")
        teacher = copy.deepcopy(base_teacher)
        gen = torch.Generator().manual_seed(cfg["seed"] + 3)
        removed = alg1.removal_indices(sal, mode, ec["ratio"], generator=gen)
        handle = alg1.remove_channels(teacher, place_name, removed, fill=ec["fill"])
        acc_mod = _accuracies(s, teacher, "teacher")
        s.log(f"mode {mode}: removed {removed.numel()} of {channels} channels at place {place} ({place_name}, "
              f"{ec['fill']} fill); teacher acc after modification: {_fmt(acc_mod)}")
        results = [train_student(s, rd, teacher, f"mode{mode}/run{r}", r) for r in range(cfg["train"]["num_runs"])]
        handle.remove()
        summary = _report_runs(s, f"mode {mode} ({cfg['distill']['method']}, mask {cfg['distill']['mask']})",
                               results)
        summary.update({"removed": removed.tolist(), "teacher_acc": acc_mod})
        out["modes"][str(mode)] = summary
    return out


def base_line(s: Setup, rd) -> dict:
    results = [train_student(s, rd, None, f"baseline/run{r}", r) for r in range(s.cfg["train"]["num_runs"])]
    return _report_runs(s, "baseline (CE only)", results)


# ----------------------------------------------------------------------------------------------------------------------
# Heat maps


def input_gradients(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|∂ logit_y / ∂ x| per sample (any batch size); the model's parameters get no gradient."""
    was = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        logits.gather(1, y.view(-1, 1)).sum().backward()
        return x.grad.abs()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was)


def _as_image(v: torch.Tensor) -> np.ndarray:
    """A flattened 784 / 2352 input (or gradient) as an HxW or HxWx3 array."""
    v = v.detach().cpu()
    return v.view(28, 28).numpy() if v.numel() == 784 else v.view(3, 28, 28).permute(1, 2, 0).numpy()


def heat_map(s: Setup, rd) -> dict:
    """Input-gradient saliency maps of the saliency teacher, without and with each mode's channel removal."""
    cfg, ec = s.cfg, s.cfg["eval"]
    base_teacher, teacher_path, tag_path = load_saliency_teacher(s, rd)
    place_name = base_teacher.place_name(cfg["place"])
    sal = read_tag(tag_path, base_teacher, cfg["place"], s.log)
    n = cfg["heat_map"]["num_images"]
    if n < 1:
        raise ConfigError(f"heat_map.num_images: expected a positive integer, got {n}")
    batch = s.prepare(next(iter(D.BatchLoader(s.splits["test"].subset(np.arange(min(n, len(s.splits["test"])))),
                                             n, s.device, shuffle=False, noise_seed=cfg["data"]["eval_noise_seed"]))))
    x, y = batch["teacher"], batch["label"]
    rows = [("input", x, "gray")]
    rows.append(("teacher", input_gradients(base_teacher, x, y), "hot"))
    for mode in ec["modes"]:
        teacher = copy.deepcopy(base_teacher)
        removed = alg1.removal_indices(sal, mode, ec["ratio"], generator=torch.Generator().manual_seed(cfg["seed"] + 3))
        handle = alg1.remove_channels(teacher, place_name, removed, fill=ec["fill"])
        rows.append((f"mode {mode}", input_gradients(teacher, x, y), "hot"))
        handle.remove()
    fig, axes = plots.figure(len(rows), len(y), figsize=(1.3 * len(y) + 0.6, 1.35 * len(rows)), squeeze=False)
    for r, (label, values, cmap) in enumerate(rows):
        for c in range(len(y)):
            img = _as_image(values[c])
            if img.ndim == 3:
                img = img.max(-1) if cmap == "hot" else (img + 1) / 2
            elif cmap == "gray":
                img = (img + 1) / 2
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap if img.ndim == 2 else None, vmin=0 if cmap == "gray" else None,
                      vmax=1 if cmap == "gray" else None)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"y={int(y[c])}", fontsize=8)
    fig.suptitle(f"teacher ({s.prepare.tea_key}) input-gradient maps |d logit_y / d x|", fontsize=9)
    fig.tight_layout()
    path = rd.path / "heat_maps.png"
    fig.savefig(path, dpi=110)
    s.log(f"heat maps of {len(y)} test images -> {path}")
    return {"plot": path.name, "teacher": str(teacher_path), "tag": str(tag_path)}
