"""The NTDH sklearn sweep (NTDH sklearn/main.py): for every γ and run, a teacher on x1, a no-KD baseline and one KD student per
(method, mask) on x2, then Algorithm 1 on the inputs — joint CE + CE + ncjsd training, permutation saliency of every
input column of both modalities, `mask_dim` teacher columns kept by mode alg1 | random | reverse, a teacher retrained
on them and every KD student distilled again from it. All runs of all γ are one batched computation; the models'
training is in sklearn_exp/trainer.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common import divergence as D
from common.synthetic.fastfit import joint_ncjsd_grad
from common.saliency import removal_indices
from common.synthetic import dispatch
from common.synthetic import sweep as sweep_protocol
from common.synthetic.vectorized import accuracy, cross_entropy_sum
from sklearn_exp import data
from sklearn_exp.models import two_layer_nn
from sklearn_exp.trainer import init_seeds, train_ce, train_students

CSV_COLUMNS = ["loss", "mask", "gamma", "overlap_dim", "runs", "teacher_acc", "no_kd_acc", "kd_acc", "delta_mean",
               "delta_std", "ncjsd", "ncjsd_kept", "omega_kept_share", "rho_within", "rho_within_lo",
               "rho_within_hi", "cmd_input", "masked_teacher_acc", "masked_student_acc", "saliency_hits_x1",
               "saliency_hits_x2"]
# Alg. 1 selection mode → common.saliency.removal_indices mode (which columns are *removed*)
MODES = {"random": 0, "alg1": 1, "reverse": 2}


@dataclass
class Sweep:
    """Every (setting, run) stacked on one axis of S·R groups, setting-major."""
    settings: list[dict]
    runs: int
    train: data.Split
    test: data.Split
    layout: data.Layout
    first_run: int = 0                                # index of this block's first run in the whole sweep
    timings: dict = field(default_factory=dict)       # wall-clock seconds per stage
    cpu_timings: dict = field(default_factory=dict)   # CPU seconds (time.process_time) per stage

    def timed(self, name: str, fn):
        """Run fn(), adding its wall-clock and CPU seconds to stage `name`."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        self.cpu_timings[name] = self.cpu_timings.get(name, 0.0) + time.process_time() - c0
        return out

    @property
    def groups(self) -> int:
        return len(self.settings) * self.runs

    def per_setting(self, v) -> np.ndarray:
        """(S·R,) → (S, R) numpy."""
        v = v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        return v.reshape(len(self.settings), self.runs).numpy()


def data_seeds(cfg: dict, first_run: int = 0) -> list[int]:
    d = cfg["data"]
    if cfg["parity"] or d["same_data_every_run"]:
        return [d["seed"]] * cfg["runs"]
    return [d["seed"] + first_run + r for r in range(cfg["runs"])]


def build_sweep(cfg: dict, first_run: int = 0) -> Sweep:
    """Runs first_run … first_run + cfg["runs"] − 1 (a block of a sweep split over worker processes)."""
    d = cfg["data"]
    layout = data.Layout(x_dim=d["x_dim"], fixed_dim=d["fixed_dim"])
    train, test = data.build(data_seeds(cfg, first_run), d["overlaps"], layout, n_samples=d["n_samples"],
                             n_features=d["n_features"], n_classes=d["n_classes"],
                             n_clusters_per_class=d["n_clusters_per_class"], test_size=d["test_size"],
                             scaler_fit="all" if cfg["parity"] else d["scaler_fit"])
    settings = [{"gamma": data.gamma_of(ov, d["fixed_dim"]), "overlap_dim": ov} for ov in d["overlaps"]]
    return Sweep(settings, cfg["runs"], train, test, layout, first_run)


def nontarget_divergence(z_s, z_t, y, variant) -> torch.Tensor:
    """Per-group mean non-target JS between (G, C, N) logits (C ≥ 3 here, so the non-target JS proper)."""
    return D.nontarget_js(z_s, z_t, y, variant, dim=1).mean(-1)


def kept_columns(saliency: torch.Tensor, mode: str, k: int, generator: torch.Generator,
                 replace: bool = False) -> torch.Tensor:
    """(G, k) column ids to keep, increasing: alg1 the k most salient, reverse the k least, random k distinct — or,
    with `replace` (parity), k drawn uniformly with replacement, as the reference's random mode
    (`np.random.randint(0, 50, mask_dim)`, NTDH sklearn/main.py, cal_overlap_tag), so a column can repeat."""
    g, d = saliency.shape
    if not 1 <= k <= d:
        raise ValueError(f"mask_dim must lie in [1, {d}], got {k}")
    if replace and mode == "random":
        drawn = torch.randint(0, d, (g, k), generator=generator).to(saliency.device)
        return drawn.sort(1).values
    removed = removal_indices(saliency, MODES[mode], (d - k + 0.5) / d, generator)  # exactly d − k removed
    keep = torch.ones(g, d, dtype=torch.bool, device=saliency.device)
    keep.scatter_(1, removed, False)
    return torch.arange(d, device=saliency.device).expand(g, d)[keep].view(g, k)


def hits(kept: torch.Tensor, truth_per_setting: list[list[int]], runs: int) -> np.ndarray:
    """(S, R) number of kept columns that lie in the setting's ground-truth set."""
    out = np.zeros((len(truth_per_setting), runs))
    kept = kept.cpu().numpy().reshape(len(truth_per_setting), runs, -1)
    for s, truth in enumerate(truth_per_setting):
        out[s] = np.isin(kept[s], truth).sum(-1)
    return out


def algorithm1(cfg: dict, sweep: Sweep, variant: str, log=print) -> dict:
    """Alg. 1 steps 1–2 on the inputs of both modalities; returns saliencies, kept columns and their hits."""
    a, tr = cfg["alg1"], sweep.train
    n_classes, hidden, x_dim = int(cfg["data"]["n_classes"]), cfg["model"]["hidden"], tr.x1.shape[1]
    seeds_t = init_seeds(cfg, sweep)
    # The reference builds both joint nets from seed 42, i.e. with identical weights (NTDH sklearn/main.py, run_exp).
    seeds_s = seeds_t if cfg["parity"] else init_seeds(cfg, sweep, offset=a["student_seed_offset"])
    teacher = two_layer_nn(x_dim, hidden, n_classes, sweep.groups, seeds_t).to(tr.x1.device)
    student = two_layer_nn(tr.x2.shape[1], hidden, n_classes, sweep.groups, seeds_s).to(tr.x1.device)

    def joint_loss(z_t, z_s, y):
        return (cross_entropy_sum(z_t, y) + cross_entropy_sum(z_s, y)
                + a["distance_weight"] * nontarget_divergence(z_s, z_t, y, variant).sum())

    # the textbook JS has a closed-form gradient (fastfit.joint_ncjsd_grad); the reference's goes by autograd
    closed = variant == "textbook" and cfg["train"]["closed_form"]
    sweep.timed("alg1_joint", lambda: dispatch.joint_train(
        teacher, student, tr.x1, tr.x2, tr.y, grad=joint_ncjsd_grad(tr.y, n_classes, a["distance_weight"]) if closed
        else None, loss_fn=joint_loss, epochs=a["epochs"], lr=a["lr"], momentum=a["momentum"],
        chunk=cfg["train"]["chunk_runs"], progress=cfg["progress"], desc="alg1 joint training",
        engine=cfg["train"]["engine"]))
    gen = torch.Generator().manual_seed(cfg["seed"])
    # common.saliency at place "input"; `alg1.rank1` builds the permuted copies by a rank-1 update of the first
    # layer's output (same numbers and permutations as copying the input, several times faster)
    sal_args = dict(op="permute", distance="ncjsd", repeats=a["repeats"], chunk=a["chunk_channels"],
                    group_chunk=a["group_chunk"], generator=gen, variant=variant, fast=a["rank1"],
                    progress=cfg["progress"])
    sal_x1, sal_x2 = sweep.timed("alg1_saliency", lambda: (
        dispatch.saliency(teacher, student, tr.x1, tr.x2, tr.y, desc="saliency x1", **sal_args),
        # x2's columns: the same measurement with the roles swapped (the non-target JS is symmetric)
        dispatch.saliency(student, teacher, tr.x2, tr.x1, tr.y, desc="saliency x2", **sal_args)))
    with torch.no_grad():
        joint_acc_t = sweep.per_setting(accuracy(teacher(sweep.test.x1), sweep.test.y))
        joint_acc_s = sweep.per_setting(accuracy(student(sweep.test.x2), sweep.test.y))
    k = a["mask_dim"]
    kept_x1 = kept_columns(sal_x1, a["mode"], k, gen, replace=cfg["parity"])
    kept_x2 = kept_columns(sal_x2, a["mode"], k, gen, replace=cfg["parity"])
    ovs = [s["overlap_dim"] for s in sweep.settings]
    lay = sweep.layout
    out = {"saliency_x1": sal_x1, "saliency_x2": sal_x2, "kept_x1": kept_x1, "kept_x2": kept_x2,
           "hits_x1": hits(kept_x1, [lay.x1_decisive(ov) for ov in ovs], sweep.runs),
           "hits_x2": hits(kept_x2, [lay.x2_decisive(ov) for ov in ovs], sweep.runs),
           "general_hits_x1": hits(kept_x1, [lay.shared(ov) for ov in ovs], sweep.runs),
           "general_hits_x2": hits(kept_x2, [lay.shared(ov) for ov in ovs], sweep.runs),
           "joint_teacher_acc": joint_acc_t, "joint_student_acc": joint_acc_s}
    log(f"Alg. 1 ({a['mode']}, mask_dim {k}): joint training {sweep.timings['alg1_joint']:.1f} s, saliency "
        f"{sweep.timings['alg1_saliency']:.1f} s; kept x1 columns that are decisive per γ: "
        + ", ".join(f"γ={s['gamma']:.2f}: {h:.2f}/{k}" for s, h in zip(sweep.settings, out["hits_x1"].mean(1))))
    return out


def gather_columns(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(G, D, N) → (G, k, N) with each group's own kept columns."""
    return x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def run_sweep(cfg: dict, device: torch.device, log=print) -> dict:
    """The whole sweep: in this process, or cut into blocks of runs over `workers` processes (CPU); then the tables,
    correlations and timings of all runs."""
    cpu_started = time.process_time()
    block, workers, seconds = sweep_protocol.run_blocks(sweep_block, cfg, device, log)
    cpu = time.process_time() - cpu_started
    if workers > 1:   # the workers' CPU time is not this process's
        cpu += sum(block["cpu_timings"].values())
    return summarize(cfg, block, seconds, cpu, log, workers)


def sweep_block(cfg: dict, first_run: int = 0, device: torch.device | str = "cpu", log=None) -> dict:
    """Train and evaluate runs first_run … first_run + cfg["runs"] − 1; every result as a numpy array with the runs
    on axis 1 ((S, R) or (S, R, D)), so blocks concatenate (common.synthetic.parallel.concat_runs)."""
    log = log or (lambda *_: None)
    device = torch.device(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    sweep = build_sweep(cfg, first_run)
    sweep.timings["data"], sweep.cpu_timings["data"] = time.perf_counter() - started, time.process_time() - cpu_started
    sweep.train, sweep.test = sweep.train.to(device), sweep.test.to(device)
    tr, te = sweep.train, sweep.test
    variant = "reference" if cfg["parity"] else cfg["analysis"]["js_variant"]
    R, S = sweep.runs, len(sweep.settings)
    log(f"{S} settings × {R} runs = {sweep.groups} groups of {tr.y.shape[1]} train / {te.y.shape[1]} test samples, "
        f"{cfg['train']['epochs']} full-batch epochs per model, device {device}")

    timed = sweep.timed
    seeds = init_seeds(cfg, sweep)
    teacher = timed("teacher", lambda: train_ce(cfg, tr.x1, tr.y, seeds, "teacher"))
    # x2 does not depend on γ, so the no-KD baseline of run r is the same model at every γ: train R, not S·R.
    baseline = timed("no_kd", lambda: train_ce(cfg, tr.x2[:R], tr.y[:R], seeds[:R], "no-KD baseline"))
    split = tr if cfg["analysis"]["ncjsd_split"] == "train" else te
    with torch.no_grad():
        teacher_train = teacher(tr.x1)
        teacher_split = teacher(split.x1)
        teacher_acc = sweep.per_setting(accuracy(teacher(te.x1), te.y))
        no_kd_acc = np.tile(accuracy(baseline(te.x2[:R]), te.y[:R]).cpu().numpy(), (S, 1))
        logits = sweep_protocol.test_logits(sweep, teacher(te.x1), baseline(te.x2[:R]).repeat(S, 1, 1), te.y)
        cmd_input = sweep.per_setting(D.cmd(tr.x1.transpose(1, 2), tr.x2.transpose(1, 2),
                                            cfg["analysis"]["cmd_moments"]))

    alg = algorithm1(cfg, sweep, variant, log)   # times its stages alg1_joint and alg1_saliency itself
    kept = alg["kept_x1"]
    x1_masked_train, x1_masked_test = gather_columns(tr.x1, kept), gather_columns(te.x1, kept)
    masked_teacher = timed("masked_teacher", lambda: train_ce(cfg, x1_masked_train, tr.y, seeds, "masked teacher"))
    with torch.no_grad():
        masked_teacher_train = masked_teacher(x1_masked_train)
        masked_teacher_acc = sweep.per_setting(accuracy(masked_teacher(x1_masked_test), te.y))

    per_run = {}
    for method in cfg["kd"]["losses"]:
        for mask in cfg["kd"]["masks"]:
            key = f"{method}/{mask}"
            student, masked_student = train_students(cfg, sweep, method, mask, teacher_train, masked_teacher_train,
                                                     seeds)
            with torch.no_grad():
                divs = sweep_protocol.divergences(student(split.x2), teacher_split, split.y, variant,
                                                  cfg["kd"]["omega"])
                errors = sweep_protocol.error_distribution(student(tr.x2), teacher_train, tr.y)
                per_run[key] = {
                    "kd_acc": sweep.per_setting(accuracy(student(te.x2), te.y)),
                    **{k: sweep.per_setting(v) for k, v in divs.items()},
                    **{k: v.cpu().numpy().reshape(S, R, -1) for k, v in errors.items()},
                    "masked_student_acc": sweep.per_setting(accuracy(masked_student(te.x2), te.y))}
            log(f"{key}: KD students trained")
    as_runs = lambda t: t.cpu().numpy().reshape(S, R, -1)
    saliency = {"x1": as_runs(alg["saliency_x1"]), "x2": as_runs(alg["saliency_x2"]),
                "kept_x1": as_runs(alg["kept_x1"]), "kept_x2": as_runs(alg["kept_x2"]),
                "x1_decisive": [sweep.layout.x1_decisive(s["overlap_dim"]) for s in sweep.settings],
                "x2_decisive": [sweep.layout.x2_decisive(s["overlap_dim"]) for s in sweep.settings],
                "shared": [sweep.layout.shared(s["overlap_dim"]) for s in sweep.settings],
                **{k: alg[k] for k in ("hits_x1", "hits_x2", "general_hits_x1", "general_hits_x2",
                                       "joint_teacher_acc", "joint_student_acc")}}
    return {"settings": sweep.settings, "teacher_acc": teacher_acc, "no_kd_acc": no_kd_acc, "cmd_input": cmd_input,
            "masked_teacher_acc": masked_teacher_acc, "per_run": per_run, "saliency": saliency, "logits": logits,
            "timings": dict(sweep.timings), "cpu_timings": dict(sweep.cpu_timings)}


def summarize(cfg: dict, block: dict, seconds: float, cpu_seconds: float, log=print, workers: int = 1) -> dict:
    """Rows (one per loss, mask, γ: means over runs), Deltas, the NTDH rank correlations and the stage timings of the
    per-run results of `sweep_block` (one block, or the concatenation of all)."""
    sal, no_kd_acc = block["saliency"], block["no_kd_acc"]

    def extra(key, res, s):
        return {"cmd_input": block["cmd_input"][s].mean(), "masked_teacher_acc": block["masked_teacher_acc"][s].mean(),
                "masked_student_acc": res["masked_student_acc"][s].mean(),
                "saliency_hits_x1": sal["hits_x1"][s].mean(), "saliency_hits_x2": sal["hits_x2"][s].mean()}

    out = sweep_protocol.kd_rows(block, extra, lambda rows, method, mask: format_table(
        rows, method, mask, cfg["alg1"]["mask_dim"]), log)
    for res in out["per_run"].values():
        res["delta_masked"] = (res["masked_student_acc"] - no_kd_acc) * 100
    timings, cpu_timings = block["timings"], block["cpu_timings"]
    threads = cfg["threads"] or torch.get_num_threads()
    log("time per stage (s, wall / CPU" + (", summed over the workers" if workers > 1 else "") + "): "
        + ", ".join(f"{k} {v:.1f} / {cpu_timings[k]:.1f}" for k, v in timings.items())
        + f"; total {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU ({workers} process(es), "
        f"{threads} thread(s) each)")
    return {**out, "saliency": sal, "logits": block["logits"], "mode": cfg["alg1"]["mode"], "mask_dim": cfg["alg1"]["mask_dim"],
            "teacher_acc": block["teacher_acc"], "no_kd_acc": no_kd_acc,
            "masked_teacher_acc": block["masked_teacher_acc"], "timings": timings, "cpu_timings": cpu_timings,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "threads": threads, "workers": workers}


def format_table(rows: list[dict], method: str, mask: str, mask_dim: int) -> str:
    f4 = lambda key: (lambda r: f"{r[key]:.4f}")
    columns = [("gamma", 6, lambda r: f"{r['gamma']:.2f}"), ("teacher", 8, f4("teacher_acc")),
               ("no-KD", 8, f4("no_kd_acc")), ("KD", 8, f4("kd_acc")), ("Delta (pts)", 15, sweep_protocol.delta_cell),
               ("nc-JS", 8, lambda r: f"{r['ncjsd']:.5f}"),
               ("nc-JS ω>0", 9, lambda r: f"{r['ncjsd_kept']:.5f}"),
               ("ρ within [95 % CI]", 20, lambda r: f"{r['rho_within']:+.2f} [{r['rho_within_lo']:+.2f}, "
                                                     f"{r['rho_within_hi']:+.2f}]"), ("CMD in", 8, lambda r: f"{r['cmd_input']:.2f}"),
               ("mask-T", 8, f4("masked_teacher_acc")), ("mask-S", 8, f4("masked_student_acc")),
               ("hits x1", 8, lambda r: f"{r['saliency_hits_x1']:5.2f}/{mask_dim}"),
               ("hits x2", 8, lambda r: f"{r['saliency_hits_x2']:5.2f}/{mask_dim}")]
    return sweep_protocol.format_table(rows, f"{method} (mask {mask})", columns)
