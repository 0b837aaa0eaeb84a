"""The Gaussian sweeps (NTDH / MFH γ sweep, MFH α sweep): for every setting, a teacher on x1, a no-KD baseline on x2
and one KD student per (method, mask) on x2 — all runs of all settings trained as one batched computation
(gauss/trainer.py) — then evaluated: accuracies, the teacher–student divergence (the JS of the target mass
[p_y, 1 − p_y] with two classes, `target_mass_js`; the non-target JS `ncjsd` with more) on all test samples and on
those ω keeps, CMD, the reference's error distribution, and the NTDH rank correlations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common import divergence as D
from common.synthetic import sweep as sweep_protocol
from common.synthetic.vectorized import accuracy
from gauss import data, trainer

#: the divergence column: two classes (the generators' labels), so the JS of the target mass, not the non-target JS
DIVERGENCE = sweep_protocol.divergence_name(2)
CSV_COLUMNS = ["loss", "mask", "gamma", "overlap_dim", "runs", "teacher_acc", "no_kd_acc", "kd_acc", "delta_mean",
               "delta_std", DIVERGENCE, f"{DIVERGENCE}_kept", "omega_kept_share", "rho_within", "rho_within_lo",
               "rho_within_hi", "cmd_input", "cmd_output"]
# increase_alpha: the swept quantity is α (and the teacher-exclusive dims xs1); γ = 1 − α and overlap_dim = xs2
ALPHA_CSV_COLUMNS = ["loss", "mask", "alpha", "gamma", "exclusive_dim", *CSV_COLUMNS[3:]]
SWEEP_GENERATORS = ("increase_gamma", "increase_alpha")


def csv_columns(generator: str) -> list[str]:
    return ALPHA_CSV_COLUMNS if generator == "increase_alpha" else CSV_COLUMNS


@dataclass
class Sweep:
    """Every (setting, run) of the sweep stacked on one axis of S·R groups, setting-major."""
    settings: list[dict]   # one dict per setting: gamma, overlap_dim
    runs: int
    train: data.Split
    test: data.Split
    first_run: int = 0     # index of this block's first run in the whole sweep (common.synthetic.parallel)

    @property
    def groups(self) -> int:
        return len(self.settings) * self.runs

    def per_setting(self, v: torch.Tensor) -> np.ndarray:
        """(S·R,) → (S, R) numpy."""
        return v.detach().cpu().reshape(len(self.settings), self.runs).numpy()


def build_sweep(cfg: dict, first_run: int = 0) -> Sweep:
    """Runs first_run … first_run + cfg["runs"] − 1 of every setting."""
    d = cfg["data"]
    seeds = [cfg["seed"] + first_run + r for r in range(cfg["runs"])]
    common = dict(n_train=d["n_train"], n_test=d["n_test"], x1_dim=d["x1_dim"], x2_dim=d["x2_dim"],
                  xs2_dim=d["xs2_dim"], a_dim=d["a_dim"], decision=d["decision"])
    if d["generator"] == "increase_gamma":
        train, test = data.increase_gamma(seeds, d["overlaps"], xs1_dim=d["xs1_dim"], **common)
        settings = [{"gamma": data.gamma_of(ov, d["xs1_dim"], d["xs2_dim"]), "overlap_dim": ov}
                    for ov in d["overlaps"]]
    elif d["generator"] == "increase_alpha":
        train, test = data.increase_alpha(seeds, d["exclusive_dims"], **common)
        settings = []
        for xs1 in d["exclusive_dims"]:
            alpha = data.alpha_of(xs1, d["xs2_dim"])
            settings.append({"alpha": alpha, "gamma": 1.0 - alpha, "exclusive_dim": xs1, "overlap_dim": d["xs2_dim"]})
    else:
        raise ValueError(f"data.generator {d['generator']!r} is not a sweep; expected one of {SWEEP_GENERATORS}")
    return Sweep(settings, cfg["runs"], train, test, first_run)


def run_sweep(cfg: dict, device: torch.device, log=print) -> dict:
    """Train everything — in this process, or with the runs cut into blocks over `workers` CPU processes — and
    return {"rows", "per_run", "correlations", "settings", "seconds", "workers"}."""
    block, workers, seconds = sweep_protocol.run_blocks(sweep_block, cfg, device, log)
    return {**summarize(block, log), "seconds": seconds, "workers": workers}


def sweep_block(cfg: dict, first_run: int = 0, device: torch.device | str = "cpu", log=None) -> dict:
    """Train and evaluate runs first_run … first_run + cfg["runs"] − 1 of every setting; every per-run result an
    (S, R) numpy array, so blocks concatenate along axis 1 (common.synthetic.parallel.concat_runs)."""
    log = log or (lambda *_: None)
    device = torch.device(device)
    sweep = build_sweep(cfg, first_run)
    sweep.train, sweep.test = sweep.train.to(device), sweep.test.to(device)
    tr, te = sweep.train, sweep.test
    variant = "reference" if cfg["parity"] else cfg["analysis"]["js_variant"]
    moments = cfg["analysis"]["cmd_moments"]
    log(f"{len(sweep.settings)} settings × {sweep.runs} runs = {sweep.groups} groups, "
        f"{cfg['train']['epochs']} full-batch epochs each, device {device}")

    teacher = trainer.train_teacher(cfg, sweep)
    baseline = trainer.train_baseline(cfg, sweep)
    with torch.no_grad():
        teacher_train = teacher(tr.x1)
        teacher_acc = sweep.per_setting(accuracy(teacher(te.x1), te.y))
        no_kd_acc = sweep.per_setting(accuracy(baseline(te.x2), te.y))
        logits = sweep_protocol.test_logits(sweep, teacher(te.x1), baseline(te.x2), te.y)
        cmd_input = input_cmd(tr, moments, sweep)

    per_run = {}
    for method in cfg["kd"]["losses"]:
        for mask in cfg["kd"]["masks"]:
            student = trainer.train_student(cfg, sweep, method, mask, teacher_train)
            with torch.no_grad():
                student_train = student(tr.x2)
                divs = sweep_protocol.divergences(student(te.x2), teacher(te.x1), te.y, variant, cfg["kd"]["omega"])
                errors = sweep_protocol.error_distribution(student_train, teacher_train, tr.y)
                per_run[f"{method}/{mask}"] = {
                    "kd_acc": sweep.per_setting(accuracy(student(te.x2), te.y)),
                    **{k: sweep.per_setting(v) for k, v in divs.items()},
                    **{k: v.cpu().numpy().reshape(len(sweep.settings), sweep.runs, -1) for k, v in errors.items()},
                    "cmd_output": sweep.per_setting(D.cmd(student_train.softmax(1).transpose(1, 2),
                                                          teacher_train.softmax(1).transpose(1, 2), moments))}
            log(f"{method}/{mask}: KD students trained")
    return {"settings": sweep.settings, "teacher_acc": teacher_acc, "no_kd_acc": no_kd_acc, "cmd_input": cmd_input,
            "per_run": per_run, "logits": logits}


def summarize(block: dict, log=print) -> dict:
    """Rows (one per loss, mask, setting: means over runs), Deltas and the NTDH rank correlations of the per-run
    results of `sweep_block` (one block, or the concatenation of all)."""
    def extra(key, res, s):
        return {"cmd_input": block["cmd_input"][s].mean(), "cmd_output": res["cmd_output"][s].mean()}
    out = sweep_protocol.kd_rows(block, extra, format_table, log, divergence=DIVERGENCE)
    keep = ("delta", "kd_acc", DIVERGENCE, f"{DIVERGENCE}_kept", "omega_kept_share")
    out["per_run"] = {k: {n: v[n] for n in keep} for k, v in out["per_run"].items()}
    out["logits"] = block["logits"]
    out["teacher_acc"], out["no_kd_acc"] = block["teacher_acc"], block["no_kd_acc"]
    return out


def run_rows(results: dict, first_seed: int) -> list[dict]:
    """One row per (loss, mask, setting, run) -- `runs.csv`: the per-run numbers behind every summary row, with the
    data seed of the run (the reference's `run_mm(seed + i, ...)`), so a run can be compared one to one with another
    implementation's (gauss/compare_reference.py)."""
    rows = []
    for key, res in results["per_run"].items():
        method, mask = key.split("/")
        for s, setting in enumerate(results["settings"]):
            for r in range(res["kd_acc"].shape[1]):
                rows.append({"loss": method, "mask": mask, **setting, "run": r, "seed": first_seed + r,
                             "teacher_acc": results["teacher_acc"][s, r], "no_kd_acc": results["no_kd_acc"][s, r],
                             "kd_acc": res["kd_acc"][s, r], "delta": res["delta"][s, r],
                             DIVERGENCE: res[DIVERGENCE][s, r], f"{DIVERGENCE}_kept": res[f"{DIVERGENCE}_kept"][s, r],
                             "omega_kept_share": res["omega_kept_share"][s, r]})
    return rows


def input_cmd(split: data.Split, moments: int, sweep: Sweep) -> np.ndarray:
    """CMD between the raw x1 and x2 per run; undefined (NaN) when the modalities have different widths (MFH's
    25-d teacher vs 50-d student)."""
    if split.x1.shape[1] != split.x2.shape[1]:
        return np.full((len(sweep.settings), sweep.runs), np.nan)
    return sweep.per_setting(D.cmd(split.x1.transpose(1, 2), split.x2.transpose(1, 2), moments))


def format_table(rows: list[dict], method: str, mask: str) -> str:
    columns = [("alpha", 6, lambda r: f"{r['alpha']:.2f}")] if "alpha" in rows[0] else []
    columns += [("gamma", 6, lambda r: f"{r['gamma']:.2f}"), ("teacher", 8, lambda r: f"{r['teacher_acc']:.4f}"),
                ("no-KD", 8, lambda r: f"{r['no_kd_acc']:.4f}"), ("KD", 8, lambda r: f"{r['kd_acc']:.4f}"),
                ("Delta (pts)", 15, sweep_protocol.delta_cell), ("CMD in", 8, lambda r: f"{r['cmd_input']:.2f}"),
                ("CMD out", 8, lambda r: f"{r['cmd_output']:.4f}"),
                ("tm-JS all", 9, lambda r: f"{r[DIVERGENCE]:.5f}"),
                ("tm-JS ω>0", 9, lambda r: f"{r[DIVERGENCE + '_kept']:.5f}"),
                ("ρ within [95 % CI]", 20, lambda r: f"{r['rho_within']:+.2f} [{r['rho_within_lo']:+.2f}, "
                                                      f"{r['rho_within_hi']:+.2f}]")]
    return sweep_protocol.format_table(rows, f"{method} (mask {mask}); tm-JS = JS of the target mass [p_y, 1 − p_y] "
                                             f"(two classes) on all test samples and on those ω keeps", columns)
