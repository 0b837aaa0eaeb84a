"""MFH Table 2 ("modify γ", MFH gauss/main_modify_gamma.py): does a teacher retrained on the modality-general columns distil better?

Per xs2 (shared decisive dims) and run: a regular teacher on all of x1, a no-KD baseline and a regular KD student on
x2; then, per mode, x1 columns are chosen — `random` (xs2 random columns), `gt` (the true shared columns 0..xs2−1) or
`alg1` (the xs2 most salient columns of MFH Algorithm 1 on the inputs, through common.saliency) — a
"modality-general" teacher is retrained on those columns only and a second KD student distils from it.

Everything is one batched computation per role (common.synthetic.vectorized): the regular models over S settings × R runs, the
modality-general ones over M modes × S × R. The settings select different numbers of columns, so the selected
inputs are zero-padded to the widest selection: a zero input column has a zero gradient and adds nothing to the
output, and each run's teacher is initialised as an nn.Linear of its own width, so every run trains exactly as a
model of its own width would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from common.synthetic import dispatch
from common.synthetic import sweep as sweep_protocol
from common.synthetic.fastfit import joint_logit_grad
from common.run import derived_seed
from common.synthetic.vectorized import BatchedLinear, accuracy, cross_entropy_sum
from gauss import data

MODES = ("random", "gt", "alg1")
ENGINES = ("closed_form", "autograd")
OPS = ("permute", "zero", "mean")
DISTANCES = ("mse", "l1")   # the non-target JS of common.saliency is identically 0 with two classes
CSV_COLUMNS = ["loss", "mask", "mode", "xs2_dim", "gamma", "runs", "regular_teacher_acc", "mg_teacher_acc",
               "no_kd_acc", "regular_kd_acc", "mg_kd_acc", "teacher_diff_mean", "teacher_diff_std",
               "student_diff_mean", "student_diff_std", "alg1_x1_id_acc", "alg1_x2_id_acc"]
# Model-init roles: each run r seeds role k with N_ROLES·(seed + r) + k, shared by every setting and mode (as the
# reference reseeds with the run's seed for every xs2 and mode), so the comparisons are paired.
ROLES = {"teacher": 0, "kd_student": 1, "baseline": 2, "mg_teacher": 3, "mg_student": 4, "joint_t": 5, "joint_s": 6}
N_ROLES = len(ROLES)


@dataclass
class Stage:
    """G = len(settings)·runs groups, setting-major; its training split is what common.synthetic.sweep.objective_for needs."""
    settings: list
    runs: int
    train: data.Split

    @property
    def groups(self) -> int:
        return len(self.settings) * self.runs


def seeds_for(cfg: dict, n_settings: int, role: str) -> list[int]:
    return [N_ROLES * (cfg["seed"] + r) + ROLES[role] for _ in range(n_settings) for r in range(cfg["runs"])]


def linear(in_dim: int, n_classes: int, seeds: list[int], widths: list[int] | None = None) -> BatchedLinear:
    """BatchedLinear over len(seeds) runs; with `widths`, run g is initialised exactly as nn.Linear(widths[g], C)
    from its seed (U(±1/√width) for weight then bias) and its weights on the padding columns are 0."""
    model = BatchedLinear(in_dim, n_classes, runs=len(seeds), seeds=seeds)
    if widths is not None:
        with torch.no_grad():
            model.weight.zero_()
            for g, (seed, w) in enumerate(zip(seeds, widths)):
                gen, bound = torch.Generator().manual_seed(seed), 1.0 / np.sqrt(w)
                model.weight[g, :, :w].copy_(torch.empty(n_classes, w).uniform_(-bound, bound, generator=gen))
                model.bias[g, :, 0].copy_(torch.empty(n_classes).uniform_(-bound, bound, generator=gen))
    return model


def select_columns(x: torch.Tensor, columns: list[np.ndarray]) -> torch.Tensor:
    """(G, D, N) → (G, K, N), K = the widest selection: group g holds x[g, columns[g]] then zero rows."""
    width = max(len(c) for c in columns)
    index = torch.zeros(len(columns), width, dtype=torch.long)
    keep = torch.zeros(len(columns), width, 1, dtype=x.dtype)
    for g, c in enumerate(columns):
        index[g, :len(c)] = torch.as_tensor(c, dtype=torch.long)
        keep[g, :len(c)] = 1
    index, keep = index.to(x.device), keep.to(x.device)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2])) * keep


def random_columns(cfg: dict, xs2: int, r: int) -> np.ndarray:
    """xs2 random x1 columns for run r: without replacement, or with it (the reference's randint) under parity."""
    rng = np.random.RandomState([cfg["seed"] + r, xs2, 7])
    d = cfg["data"]["x1_dim"]
    return rng.randint(0, d, xs2) if cfg["parity"] else np.sort(rng.choice(d, xs2, replace=False))


def _joint_loss(distance: str):
    """MFH's Alg. 1 step-1 loss for R runs: Σ_runs CE(a) + CE(b) + mean over classes and samples of (a − b)² or
    |a − b| (common.saliency.joint_train's default distance is not run-summed)."""
    def loss_fn(out_t, out_s, y):
        diff = out_t - out_s
        agree = (diff.pow(2) if distance == "mse" else diff.abs()).mean((1, 2)).sum()
        return cross_entropy_sum(out_t, y) + cross_entropy_sum(out_s, y) + agree
    return loss_fn


def algorithm1(cfg: dict, split: data.Split, n_settings: int, progress: bool):
    """Algorithm 1 on the inputs for every group: joint training (step 1), then the permutation saliency of every x1
    column (and x2 column) against the other modality's fixed output (step 2, common.saliency.saliency_vector at
    place "input"). Returns (sal_x1, sal_x2 or None).

    engine `closed_form`: step 1 by the loss's closed-form gradient, step 2 by the rank-1 path (a destroyed column c
    moves a linear model's output by W[:, c]·(x̃_c − x_c)); `autograd`: the references, common.saliency's joint_train
    and saliency_vector's copy path. The same numbers, ~20× apart in time (common.synthetic.dispatch decides)."""
    a = cfg["modify"]["alg1"]
    n_classes = int(split.y.max()) + 1
    net_t = linear(split.x1.shape[1], n_classes, seeds_for(cfg, n_settings, "joint_t")).to(split.x1.device)
    net_s = linear(split.x2.shape[1], n_classes, seeds_for(cfg, n_settings, "joint_s")).to(split.x1.device)
    fast = a["engine"] == "closed_form"
    dispatch.joint_train(net_t, net_s, split.x1, split.x2, split.y, epochs=a["epochs"], lr=a["lr"],
                         momentum=a["momentum"], grad=joint_logit_grad(split.y, n_classes, a["distance"]) if fast
                         else None, loss_fn=_joint_loss(a["distance"]), engine=cfg["train"]["engine"],
                         progress=progress, desc="alg1 joint")
    kw = dict(op=a["op"], distance=a["distance"], repeats=a["repeats"], fast=fast,
              generator=torch.Generator().manual_seed(cfg["seed"]), chunk=a["chunk_channels"], progress=progress)
    sal_x1 = dispatch.saliency(net_t, net_s, split.x1, split.x2, split.y, desc="saliency x1", **kw)
    sal_x2 = None
    if a["tag_student"]:
        sal_x2 = dispatch.saliency(net_s, net_t, split.x2, split.x1, split.y, desc="saliency x2", **kw)
    return sal_x1, sal_x2


def top_columns(sal: torch.Tensor, ks: list[int]) -> list[np.ndarray]:
    """The k_g most salient columns of each group's saliency row (ties to the lower index), sorted."""
    order = torch.sort(sal.cpu(), dim=-1, descending=True, stable=True).indices.numpy()
    return [np.sort(order[g, :k]) for g, k in enumerate(ks)]


def identification(columns: list[np.ndarray], ks: list[int]) -> np.ndarray:
    """|chosen ∩ {0..k−1}| / k per group: the share of the true shared columns among the chosen ones."""
    return np.array([np.isin(np.arange(k), c).mean() for c, k in zip(columns, ks)])


def mode_columns(cfg: dict, train: data.Split, ks: list[int]) -> tuple[dict, dict]:
    """Which x1 columns each mode keeps, per (setting, run) group (ks: the shared dims of each group), and Alg. 1's
    identification accuracy of the x1 (and x2) columns (None when alg1 is not among the modes)."""
    d, R, S = cfg["data"], cfg["runs"], len(cfg["data"]["xs2_dims"])
    columns: dict[str, list[np.ndarray]] = {}
    id_acc = {"x1": None, "x2": None}
    for mode in cfg["modify"]["modes"]:
        if mode == "random":
            columns[mode] = [random_columns(cfg, k, r) for k in d["xs2_dims"] for r in range(R)]
        elif mode == "gt":
            columns[mode] = [np.arange(k) for k in ks]
        else:
            sal_x1, sal_x2 = algorithm1(cfg, train, S, cfg["progress"])
            columns[mode] = top_columns(sal_x1, ks)
            id_acc["x1"] = identification(columns[mode], ks)
            if sal_x2 is not None:
                id_acc["x2"] = identification(top_columns(sal_x2, ks), ks)
    return columns, id_acc


def table_rows(method: str, mask: str, res: dict, modes, xs2s, gammas, id_acc: dict, runs: int) -> list[dict]:
    """The rows of one (method, mask): one per (mode, xs2), means and stds over the runs of res's (M, S, R) arrays."""
    rows = []
    for i, mode in enumerate(modes):
        for s, k in enumerate(xs2s):
            ids = {f"alg1_{x}_id_acc": (id_acc[x].reshape(len(xs2s), runs)[s].mean()
                                        if mode == "alg1" and id_acc[x] is not None else None)
                   for x in ("x1", "x2")}
            rows.append({"loss": method, "mask": mask, "mode": mode, "xs2_dim": k, "gamma": gammas[s],
                         "runs": runs, **{c: res[c][i, s].mean() for c in CSV_COLUMNS[6:11]},
                         "teacher_diff_mean": res["teacher_diff"][i, s].mean(),
                         "teacher_diff_std": res["teacher_diff"][i, s].std(),
                         "student_diff_mean": res["student_diff"][i, s].mean(),
                         "student_diff_std": res["student_diff"][i, s].std(), **ids})
    return rows


def modality_general_teachers(cfg: dict, kd_train: data.Split, test: data.Split, columns: dict, n_classes: int,
                              device) -> tuple:
    """One teacher per (mode, setting, run) group on its mode's x1 columns (zero-padded to the widest selection):
    its training inputs and labels, its test accuracy per group and its outputs on the training inputs."""
    t, modes = cfg["train"], cfg["modify"]["modes"]
    all_columns = [c for mode in modes for c in columns[mode]]
    mg_train = select_columns(kd_train.x1.repeat(len(modes), 1, 1), all_columns)
    mg_test = select_columns(test.x1.repeat(len(modes), 1, 1), all_columns)
    mg_y = kd_train.y.repeat(len(modes), 1)
    seeds = seeds_for(cfg, len(modes) * len(cfg["data"]["xs2_dims"]), "mg_teacher")
    mg_teacher = linear(mg_train.shape[1], n_classes, seeds, [len(c) for c in all_columns]).to(device)
    dispatch.train(mg_teacher, mg_train, mg_y, epochs=t["epochs"], lr=t["lr"], momentum=t["momentum"],
                   desc="modality-general teachers", progress=cfg["progress"], engine=t["engine"])
    with torch.no_grad():
        acc = accuracy(mg_teacher(mg_test), test.y.repeat(len(modes), 1)).detach().cpu().numpy()
        return mg_train, mg_y, acc, mg_teacher(mg_train)


def splits(cfg: dict, device) -> tuple[data.Split, data.Split, data.Split]:
    """Training, test and KD-stage training data of every (setting, run) group, setting-major."""
    d = cfg["data"]
    seeds = [cfg["seed"] + r for r in range(cfg["runs"])]
    trains, tests, freshes = data.modify_gamma(seeds, d["xs2_dims"], n_train=d["n_train"], n_test=d["n_test"],
                                               x1_dim=d["x1_dim"], x2_dim=d["x2_dim"], xs1_dim=d["xs1_dim"],
                                               a_dim=d["a_dim"], decision=d["decision"])
    train, test = data.concat(trains).to(device), data.concat(tests).to(device)
    return train, test, (data.concat(freshes).to(device) if d["fresh_train"] else train)


def result_arrays(regular_teacher_acc, mg_teacher_acc, no_kd_acc, regular_kd_acc, mg_kd_acc, shape) -> dict:
    """Per-run results of one (method, mask) as (modes, settings, runs) arrays, and the differences in points."""
    modes, settings, runs = shape
    res = {"regular_teacher_acc": np.broadcast_to(regular_teacher_acc.reshape(settings, runs), shape),
           "mg_teacher_acc": mg_teacher_acc.reshape(shape),
           "no_kd_acc": np.broadcast_to(no_kd_acc.reshape(settings, runs), shape),
           "regular_kd_acc": np.broadcast_to(regular_kd_acc.reshape(settings, runs), shape),
           "mg_kd_acc": mg_kd_acc.reshape(shape)}
    res["teacher_diff"] = (res["mg_teacher_acc"] - res["regular_teacher_acc"]) * 100
    res["student_diff"] = (res["mg_kd_acc"] - res["regular_kd_acc"]) * 100
    return res


def run_table(cfg: dict, device: torch.device, log=print) -> dict:
    """Train everything and return {"rows", "per_run", "settings", "seconds"}."""
    started = time.perf_counter()
    d, m, R = cfg["data"], cfg["modify"], cfg["runs"]
    train, test, kd_train = splits(cfg, device)
    xs2s, S, modes, progress = d["xs2_dims"], len(d["xs2_dims"]), m["modes"], cfg["progress"]
    ks = [k for k in xs2s for _ in range(R)]                       # shared dims per group, setting-major
    gammas = [k / (d["xs1_dim"] + k) for k in xs2s]               # shared / teacher's decisive dims
    n_classes = int(train.y.max()) + 1
    t = cfg["train"]
    log(f"MFH Table 2: {S} values of xs2 × {R} runs; regular models {S * R} groups, modality-general models "
        f"{len(modes)} modes × {S * R} groups, {t['epochs']} full-batch epochs each, device {device}")

    def train_model(x, role, n_settings, desc, objective=None, teacher_out=None, widths=None):
        model = linear(x.shape[1], n_classes, seeds_for(cfg, n_settings, role), widths).to(device)
        return dispatch.train(model, x, kd_train.y if role != "teacher" else train.y, epochs=t["epochs"],
                              lr=t["lr"], momentum=t["momentum"], objective=objective, teacher_out=teacher_out,
                              desc=desc, progress=progress, engine=t["engine"])

    per_group = lambda v: v.detach().cpu().numpy()
    teacher = train_model(train.x1, "teacher", S, "regular teacher")
    baseline = train_model(kd_train.x2, "baseline", S, "no-KD baseline")
    with torch.no_grad():
        regular_teacher_acc = per_group(accuracy(teacher(test.x1), test.y))
        no_kd_acc = per_group(accuracy(baseline(test.x2), test.y))

    columns, id_acc = mode_columns(cfg, train, ks)
    mg_train, mg_y, mg_teacher_acc, mg_teacher_out = modality_general_teachers(cfg, kd_train, test, columns,
                                                                               n_classes, device)
    with torch.no_grad():
        # parity: MFH's main_modify_gamma.run, its "regular KD" feeds x2 to the teacher and trains the student on x1
        regular_in_t, regular_in_s = (kd_train.x2, kd_train.x1) if cfg["parity"] else (kd_train.x1, kd_train.x2)
        regular_teacher_out = teacher(regular_in_t)

    stage_a = Stage([{} for _ in range(S)], R, kd_train)
    stage_b = Stage([{} for _ in range(len(modes) * S)], R, data.Split(mg_train, kd_train.x2.repeat(len(modes), 1, 1),
                                                                       mg_y))
    rows, per_run = [], {}
    for method in cfg["kd"]["losses"]:
        for mask in cfg["kd"]["masks"]:
            key = f"{method}/{mask}"
            torch.manual_seed(derived_seed(cfg["seed"], method, mask))   # its draws do not depend on the others
            objective = sweep_protocol.objective_for(cfg, method, mask, stage_a.train.y, n_classes).to(device)
            student = train_model(regular_in_s, "kd_student", S, f"{key} regular KD", objective, regular_teacher_out)
            objective = sweep_protocol.objective_for(cfg, method, mask, stage_b.train.y, n_classes).to(device)
            mg_student = linear(d["x2_dim"], n_classes, seeds_for(cfg, len(modes) * S, "mg_student")).to(device)
            dispatch.train(mg_student, stage_b.train.x2, mg_y, epochs=t["epochs"], lr=t["lr"], momentum=t["momentum"],
                           objective=objective, teacher_out=mg_teacher_out, desc=f"{key} modality-general KD",
                           progress=progress, engine=t["engine"])
            with torch.no_grad():
                regular_kd_acc = per_group(accuracy(student(test.x2), test.y))
                mg_kd_acc = per_group(accuracy(mg_student(test.x2.repeat(len(modes), 1, 1)),
                                               test.y.repeat(len(modes), 1)))
            res = result_arrays(regular_teacher_acc, mg_teacher_acc, no_kd_acc, regular_kd_acc, mg_kd_acc,
                                (len(modes), S, R))
            per_run[key] = res
            rows += table_rows(method, mask, res, modes, xs2s, gammas, id_acc, R)
            log(format_table([r for r in rows if r["loss"] == method and r["mask"] == mask], method, mask,
                             cfg["parity"]))
    settings = [{"xs2_dim": k, "gamma": g} for k, g in zip(xs2s, gammas)]
    ids = {x: (None if v is None else v.reshape(S, R)) for x, v in id_acc.items()}
    return {"rows": rows, "per_run": per_run, "settings": settings, "modes": list(modes), "identification": ids,
            "chance": [k / d["x1_dim"] for k in xs2s], "x1_dim": d["x1_dim"], "seconds": time.perf_counter() - started}


def format_table(rows: list[dict], method: str, mask: str, parity: bool = False) -> str:
    head = (f"\n{method} (mask {mask}), {rows[0]['runs']} runs — MFH Table 2"
            f"{' (parity: regular KD with swapped inputs)' if parity else ''}; accuracies on test, diffs in points\n"
            f"{'xs2':>4} {'gamma':>6} {'mode':>7} {'T reg':>7} {'T mg':>7} {'no-KD':>7} {'KD reg':>7} {'KD mg':>7} "
            f"{'T diff (mg-reg)':>16} {'S diff (mg-reg)':>16} {'alg1 id x1':>10} {'x2':>6}")
    lines = [head, "-" * len(head.splitlines()[-1])]
    fmt = lambda v, w: f"{'-':>{w}}" if v is None else f"{v:{w}.3f}"
    for r in rows:
        lines.append(f"{r['xs2_dim']:4d} {r['gamma']:6.2f} {r['mode']:>7} {r['regular_teacher_acc']:7.4f} "
                     f"{r['mg_teacher_acc']:7.4f} {r['no_kd_acc']:7.4f} {r['regular_kd_acc']:7.4f} "
                     f"{r['mg_kd_acc']:7.4f} {r['teacher_diff_mean']:+7.2f} ± {r['teacher_diff_std']:5.2f} "
                     f"{r['student_diff_mean']:+7.2f} ± {r['student_diff_std']:5.2f} "
                     f"{fmt(r['alg1_x1_id_acc'], 10)} {fmt(r['alg1_x2_id_acc'], 6)}")
    return "\n".join(lines)
