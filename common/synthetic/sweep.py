"""The sweep protocol gauss and sklearn_exp share: flags → config checks → the sweep cut into blocks of runs (worker
processes) → per-run results → rows (one per KD method, mask and setting), Deltas, the NTDH rank correlations and
the terminal tables.

The experiments supply what differs: how a block of runs is trained (`block_fn`), the extra columns of a row, the
table's columns. Everything else is here, once.
"""
from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from common import config as C
from common import divergence as D
from common.kd import available_losses
from common.kd.base import loss_class
from common.mask import omega as omega_weight
from common.mask import teacher_wrong
from common.metrics import spearman_summary
from common.synthetic import dispatch, fastfit, native, parallel
from common.train import NonFiniteLoss

MASKS = ("none", "omega")
#: the teacher–student divergence a sweep reports, by name: with two classes the renormalised non-target distribution
#: is a single point, so the JS of the mass [p_y, 1 − p_y] is reported under its own name (NTDH, arXiv 2409.02438,
#: Sec. 3 defines the non-target JS for C ≥ 3)
DIVERGENCES = {"target_mass_js": "JS of the target mass [p_y, 1 − p_y]", "ncjsd": "non-target JS"}
#: flag dest → dotted config key, for common.config.resolve
FLAGS = {"runs": "runs", "losses": "kd.losses", "masks": "kd.masks", "parity": "parity", "workers": "workers",
         "engine": "train.engine"}


def add_flags(p: argparse.ArgumentParser, parity_help: str) -> None:
    """The flags every synthetic sweep takes."""
    p.add_argument("--runs", type=int, help="independent runs (seeds) per setting")
    p.add_argument("--losses", help="comma-separated KD methods from kd.methods, or 'all'")
    p.add_argument("--masks", help="comma-separated masks: none, omega")
    p.add_argument("--workers", type=int, help="processes the runs are split over (CPU), one torch thread each")
    p.add_argument("--engine", help="trainer of the closed-form losses: auto, native or torch")
    p.add_argument("--parity", action="store_const", const=True, help=parity_help)


def split_lists(args: argparse.Namespace, methods: Sequence[str]) -> None:
    """--losses / --masks as lists ('all' = every method of the defaults)."""
    if args.losses is not None:
        args.losses = list(methods) if args.losses.strip() == "all" else \
            [s.strip() for s in args.losses.split(",") if s.strip()]
    if args.masks is not None:
        args.masks = [s.strip() for s in args.masks.split(",") if s.strip()]


def check_config(cfg: dict) -> None:
    """What a sweep's declared `_checks` cannot say, as one-line ConfigErrors: train.engine usable here (native needs
    the C kernel), kd.losses naming entries of kd.methods, each built of registered terms with options they accept."""
    kd = cfg["kd"]
    if not kd["losses"] or not kd["masks"]:
        raise C.ConfigError("kd.losses and kd.masks must not be empty")
    unknown = [m for m in kd["losses"] if m not in kd["methods"]]
    if unknown:
        raise C.ConfigError(f"kd.losses: unknown method(s) {unknown}; known: {', '.join(kd['methods'])}")
    problem = fastfit.engine_problem(cfg["train"]["engine"])
    if problem:
        raise C.ConfigError(f"train.engine: {problem}")
    for method in kd["losses"]:
        for term, options in kd["methods"][method].items():
            options = dict(options or {})
            name = options.pop("loss", term)
            where = f"kd.methods.{method}.{term}"
            if name not in available_losses():
                raise C.ConfigError(f"{where}: unknown KD loss {name!r}; available: {', '.join(available_losses())}")
            accepted = set(inspect.signature(loss_class(name).__init__).parameters) - {"self", "runs"}
            bad = sorted(set(options) - accepted - {"weight", "input"})
            if bad:
                raise C.ConfigError(f"{where}: unknown option(s) {', '.join(bad)} for loss {name!r}; it accepts "
                                    f"{', '.join(sorted(accepted))}")
        try:  # the terms' own value checks (e.g. kl reduction), on a tiny stand-in of the data
            context = {"student_dim": 2, "teacher_dim": 2, "n_data": 4, "dataset_labels": torch.tensor([0, 1, 0, 1])}
            dispatch.objective(kd, method, "none", runs=1, context=context)
        except (TypeError, ValueError) as err:
            raise C.ConfigError(f"kd.methods.{method}: {err}") from None


#: under parity, the options each term gets: the reference optimises the student's parameters only, so FitNet's
#: regressor (rebuilt untrained every step, NTDH gauss/main.py `train_kd`, mode hint) and CRD's embeddings stay at
#: their initial state
PARITY_OPTIONS = {"fitnet": {"trainable": False}, "crd": {"train_embeddings": False}}


def parity_methods(kd: dict, method: str, extra: dict | None = None) -> dict:
    """kd with the terms of `method` given PARITY_OPTIONS and an experiment's `extra` parity options (same layout,
    by loss name; a copy, kd itself is not changed)."""
    terms = {}
    for term, options in kd["methods"][method].items():
        options = dict(options or {})
        name = options.get("loss", term)
        terms[term] = {**options, **PARITY_OPTIONS.get(name, {}), **(extra or {}).get(name, {})}
    return {**kd, "methods": {**kd["methods"], method: terms}}


def objective_for(cfg: dict, method: str, mask: str, train_y: torch.Tensor, n_classes: int,
                  parity_extra: dict | None = None):
    """The Objective of one (method, mask) for every group of a sweep, with what only the sweep knows (its sizes and
    training labels (G, N)); under parity ω not detached, PARITY_OPTIONS and `parity_extra` (the reference's
    behaviour)."""
    context = {"student_dim": n_classes, "teacher_dim": n_classes, "n_data": train_y.shape[1],
               "dataset_labels": train_y}
    kd = parity_methods(cfg["kd"], method, parity_extra) if cfg["parity"] else cfg["kd"]
    return dispatch.objective(kd, method, mask, detach_omega=not cfg["parity"], runs=train_y.shape[0],
                              context=context)


def threads(cfg: dict):
    """Context: cfg["threads"] torch threads (0: torch's default) while a sweep runs; the caller's count after."""
    class _Threads:
        def __enter__(self):
            self.before = torch.get_num_threads()
            if cfg["threads"]:
                torch.set_num_threads(cfg["threads"])

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)   # process-wide: give the caller (tests, reproduce) its own back
    return _Threads()


def run_blocks(block_fn: Callable, cfg: dict, device: torch.device, log=print) -> tuple[dict, int, float]:
    """All runs of a sweep: block_fn(cfg, first_run, device, log) in this process or over cfg["workers"] CPU
    processes (common.synthetic.parallel); returns the blocks' per-run results concatenated along the runs axis
    (timing dicts summed), the number of processes and the wall-clock seconds."""
    started = time.perf_counter()
    parts, workers = parallel.run_sweep_blocks(block_fn, cfg, device, log)
    block = parallel.concat_runs([{k: v for k, v in p.items() if "timings" not in k} for p in parts])
    for key in ("timings", "cpu_timings"):   # stage seconds summed over the blocks
        if key in parts[0]:
            block[key] = {k: sum(p[key][k] for p in parts) for k in parts[0][key]}
    return block, workers, time.perf_counter() - started


def divergence_name(n_classes: int) -> str:
    """The divergence column of a sweep with n_classes classes: target_mass_js (C = 2) or ncjsd (C ≥ 3)."""
    return "target_mass_js" if n_classes == 2 else "ncjsd"


def divergences(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, variant: str, omega_cfg: dict) -> dict:
    """Per-group teacher–student divergence of (G, C, N) logits (common.divergence: target_js for C = 2, nontarget_js
    for C ≥ 3), the mean over all samples and over the samples NTDH's ω keeps (ω > 0, common.mask.omega with the
    sweep's threshold and space; NaN where ω keeps none), and the share of samples ω keeps — measured for every
    mask, so a masked and an unmasked student are compared on the same footing."""
    name = divergence_name(z_s.shape[1])
    per = (D.target_js if name == "target_mass_js" else D.nontarget_js)(z_s, z_t, y, variant, dim=1)
    kept = (omega_weight(z_t, y, z_s, threshold=omega_cfg["threshold"], space=omega_cfg["space"],
                         class_dim=1) > 0).to(per.dtype)
    count = kept.sum(-1)
    on_kept = torch.where(count > 0, (per * kept).sum(-1) / count.clamp_min(1), torch.full_like(count, float("nan")))
    return {name: per.mean(-1), f"{name}_kept": on_kept, "omega_kept_share": kept.mean(-1)}


def error_distribution(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor) -> dict:
    """The reference's `error_distribution` (NTDH gauss/main.py and sklearn/main.py, run on the training data in eval
    mode): over the samples of label 0 that the teacher gets wrong, the mean softmax vector of the student
    ("error_s") and of the teacher ("error_t"); (G, C, N) logits → (G, C), NaN rows where a group has no such
    sample."""
    pick = (teacher_wrong(z_t, y, class_dim=1) & (y == 0)).to(z_s.dtype).unsqueeze(1)   # (G, 1, N)
    n = pick.sum(-1)
    nan = torch.full_like(n, float("nan"))
    mean = lambda z: torch.where(n > 0, (z.softmax(1) * pick).sum(-1) / n.clamp_min(1), nan)
    return {"error_s": mean(z_s), "error_t": mean(z_t)}


def error_means(block: dict) -> dict:
    """Per (method, mask) and setting, the reference's printed mean_s / mean_t: the per-run error distributions
    averaged over the runs of that setting only (the reference never resets its lists between γ values; fixed here),
    runs without a wrong label-0 sample left out (`runs_with_errors` counts the others)."""
    out = {}
    for key, res in block["per_run"].items():
        if "error_s" not in res:
            continue
        out[key] = []
        for s, setting in enumerate(block["settings"]):
            ok = np.isfinite(res["error_s"][s]).all(-1)
            mean = lambda v: v[s][ok].mean(0).tolist() if ok.any() else None
            out[key].append({"setting": setting, "mean_s": mean(res["error_s"]), "mean_t": mean(res["error_t"]),
                             "runs_with_errors": int(ok.sum())})
    return out


def kd_rows(block: dict, row_extra: Callable[[str, dict, int], dict], table: Callable[[list[dict], str, str], str],
            log=print, divergence: str = "ncjsd") -> dict:
    """Rows (one per method, mask and setting: means over runs), Deltas and the NTDH rank correlations of the per-run
    results of a sweep. block: settings, teacher_acc, no_kd_acc ((S, R) arrays) and per_run {"method/mask": {kd_acc,
    <divergence>, <divergence>_kept, omega_kept_share, ...}}; row_extra(key, res, s) gives the experiment's own
    columns of row s; table(rows, method, mask) the text logged per (method, mask)."""
    settings, teacher_acc, no_kd_acc = block["settings"], block["teacher_acc"], block["no_kd_acc"]
    rows, per_run, correlations = [], {}, {}
    for key, res in block["per_run"].items():
        method, mask = key.split("/")
        if not (np.isfinite(res["kd_acc"]).all() and np.isfinite(res[divergence]).all()):
            raise NonFiniteLoss(f"{key}: non-finite results (accuracy or {divergence}) after training: a "
                                f"diverging training; lower train.lr or check the loss settings")
        delta = (res["kd_acc"] - no_kd_acc) * 100
        per_run[key] = {**res, "delta": delta}
        c = correlations[key] = {"divergence": divergence, **spearman_summary(res[divergence], delta)}
        for s, setting in enumerate(settings):
            within = c["within"][s]
            within["setting"] = setting
            ci = within["ci"] or [float("nan")] * 2
            rows.append({"loss": method, "mask": mask, **setting, "runs": teacher_acc.shape[1],
                         "teacher_acc": teacher_acc[s].mean(), "no_kd_acc": no_kd_acc[s].mean(),
                         "kd_acc": res["kd_acc"][s].mean(), "delta_mean": delta[s].mean(),
                         "delta_std": delta[s].std(), divergence: res[divergence][s].mean(),
                         f"{divergence}_kept": np.nanmean(res[f"{divergence}_kept"][s])
                         if np.isfinite(res[f"{divergence}_kept"][s]).any() else float("nan"),
                         "omega_kept_share": res["omega_kept_share"][s].mean(),
                         "rho_within": within["rho"], "rho_within_lo": ci[0], "rho_within_hi": ci[1],
                         **row_extra(key, res, s)})
        log(table([r for r in rows if r["loss"] == method and r["mask"] == mask], method, mask))
        log(correlation_line(key, c))
    return {"rows": rows, "per_run": per_run, "correlations": correlations, "settings": settings,
            "divergence": divergence, "error_distribution": error_means(block)}


def _ci(c: dict) -> str:
    return "[undefined]" if c["ci"] is None else f"[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]"


def correlation_line(key: str, c: dict) -> str:
    """The printed NTDH check of one (method, mask): pooled, within-setting and setting-controlled ρ."""
    within = ", ".join(f"{_setting_text(w['setting'])}: {w['rho']:+.2f} {_ci(w)}" for w in c["within"])
    return (f"NTDH check {key}: Spearman ρ({c['divergence']}, Delta) pooled over {c['n']} runs = {c['rho']:+.3f} "
            f"(p = {c['p']:.2g}; the setting drives it), over the setting means = {c['rho_means']:+.3f}; within "
            f"each setting (95 % bootstrap interval) {within}; setting-controlled partial ρ = "
            f"{c['partial']['rho']:+.3f} {_ci(c['partial'])}")


def _setting_text(setting: dict) -> str:
    return f"α={setting['alpha']:.2f}" if "alpha" in setting else f"γ={setting['gamma']:.2f}"


def format_table(rows: list[dict], title: str, columns: Sequence[tuple[str, int, Callable[[dict], str]]]) -> str:
    """A terminal table: title line, a header of right-aligned column names, a rule, one line per row.
    columns: (header, width, cell(row) → text)."""
    head = " ".join(f"{name:>{width}}" for name, width, _ in columns)
    lines = [f"\n{title}, {rows[0]['runs']} runs", head, "-" * len(head)]
    lines += [" ".join(f"{cell(r):>{width}}" for _, width, cell in columns) for r in rows]
    return "\n".join(lines)


def delta_cell(r: dict) -> str:
    return f"{r['delta_mean']:+7.2f} ± {r['delta_std']:5.2f}"


def ntdh_paragraphs(results: dict, sym: str, note: str = "") -> list[str]:
    """The report's "Delta vs divergence" paragraph of every (method, mask), numbers from the run."""
    div = results["divergence"]
    label = DIVERGENCES[div]
    lines = []
    for key, c in results["correlations"].items():
        v = results["per_run"][key]
        means, kept = v[div].mean(1), np.nanmean(v[f"{div}_kept"], 1)
        within = "; ".join(f"{_setting_text(w['setting'])}: {w['rho']:+.2f} {_ci(w)}" for w in c["within"])
        lines += [f"**Delta vs {label} (`{div}`), {key}.** Over all {c['n']} runs the Spearman rank correlation "
                  f"between the teacher–KD-student {label} and Delta is ρ = {c['rho']:+.3f} (p = {c['p']:.2g}); over "
                  f"the {sym} means ρ = {c['rho_means']:+.3f}. Pooled over {sym}, {sym} itself drives both; within "
                  f"each {sym} (95 % bootstrap interval): {within}; controlling for {sym}, the partial ρ = "
                  f"{c['partial']['rho']:+.3f} {_ci(c['partial'])}. The mean divergence ranges from {means.min():.4f} "
                  f"to {means.max():.4f} across {sym} on all samples, and from {np.nanmin(kept):.4f} to "
                  f"{np.nanmax(kept):.4f} on the samples ω keeps (ω > 0; on average "
                  f"{100 * v['omega_kept_share'].mean():.1f} % of them). NTDH predicts a negative ρ: the smaller the "
                  f"divergence, the larger the KD gain.{note}", ""]
    return lines


def ntdh_scatter(results: dict, path, xlabel: str):
    """The NTDH plot: Delta vs the teacher–KD-student divergence of every run, per (method, mask), with the pooled
    and the setting-controlled Spearman ρ in the legend and the per-setting means."""
    from common import plots   # matplotlib only where a plot is drawn
    div = results["divergence"]
    scatter, means = {}, {}
    for key, v in results["per_run"].items():
        c = results["correlations"][key]
        label = f"{key} (pooled ρ = {c['rho']:+.2f}, within-setting partial ρ = {c['partial']['rho']:+.2f})"
        scatter[label] = (v[div].ravel(), v["delta"].ravel())
        means[label] = (v[div].mean(1), v["delta"].mean(1), v["delta"].std(1))
    return plots.scatter_plot(path, scatter, means=means, xlabel=xlabel, ylabel="Delta (points)",
                              title=f"NTDH: KD gain vs {DIVERGENCES[div]} (`{div}`)")


def test_logits(sweep, teacher_test: torch.Tensor, baseline_test: torch.Tensor, labels: torch.Tensor) -> dict:
    """The pre-distillation logits the NTD advisor reads (common.ntd), per run: teacher and no-KD baseline (G, C, N)
    test logits → (S, R, N, C) float32 and the labels (S, R, N), runs on axis 1 so blocks concatenate."""
    S, R = len(sweep.settings), sweep.runs
    rows = lambda z: z.detach().transpose(1, 2).float().cpu().numpy().reshape(S, R, z.shape[2], z.shape[1])
    return {"teacher": rows(teacher_test), "probe": rows(baseline_test),
            "labels": labels.cpu().numpy().reshape(S, R, -1)}


def save_ntd_records(results: dict, run_dir, out_dir, source: str) -> list[dict]:
    """For the NTD advisor's check (common.ntd): per setting γ, the teacher's and the no-KD baseline's test logits of
    all runs of that γ stacked as rows (<run_dir>/ntd/{teacher,probe}_gamma<γ>.npz), and the Delta measured there,
    of the kl/none configuration (the reference default; else the first one run) — one record per γ in
    <out_dir>/advisor_records.json. Returns the records."""
    from common import ntd

    key = "kl/none" if "kl/none" in results["per_run"] else next(iter(results["per_run"]))
    lg, delta, records = results["logits"], results["per_run"][key]["delta"], []
    for s, setting in enumerate(results["settings"]):
        tag = f"gamma{setting['gamma']:.2f}"
        labels = lg["labels"][s].reshape(-1)
        for role in ("teacher", "probe"):
            z = lg[role][s]
            ntd.save_logits(run_dir, role, z.reshape(-1, z.shape[-1]), labels, tag=tag, split="test",
                            source=f"{source} {role}, γ = {setting['gamma']:.2f}, {z.shape[0]} runs stacked")
        records.append({"label": f"γ={setting['gamma']:.2f} ({key})", "teacher": Path(run_dir), "tag": tag,
                        "delta": float(delta[s].mean())})
    ntd.save_check_records(out_dir, records)
    return records


def ntdh_within_plot(results: dict, path, xlabel: str):
    """The within-setting NTDH check: Spearman ρ(divergence, Delta) over the runs of each setting, per (method, mask),
    with its bootstrap 95 % interval as (asymmetric) error bars; the partial ρ in the legend."""
    from common import plots
    div, xs, series = results["divergence"], None, {}
    for key, c in results["correlations"].items():
        xs = [w["setting"].get("alpha", w["setting"]["gamma"]) for w in c["within"]]
        rho = np.array([w["rho"] for w in c["within"]], dtype=float)
        ci = np.array([w["ci"] or [np.nan, np.nan] for w in c["within"]], dtype=float).T
        series[f"{key} (partial ρ = {c['partial']['rho']:+.2f} {_ci(c['partial'])})"] = \
            (rho, np.abs(np.stack([rho - ci[0], ci[1] - rho])))
    return plots.line_plot(path, xs, series, xlabel=xlabel, ylabel=f"Spearman ρ({div}, Delta) within setting",
                           title="NTDH check within each setting (95 % bootstrap interval)", hline=0.0)


def main(parse_args: Callable, resolve_config: Callable, run: Callable, argv=None) -> None:
    """An experiment's entry point: flags → validated config → run into a new run directory."""
    args = parse_args(argv)
    run(resolve_config(args), args.out, args.device)


def run_in_dir(cfg: dict, out, device: str, code_from, body: Callable) -> tuple:
    """A sweep into a new run directory (locked while it runs): the device resolved, seeds set, cfg["threads"]
    torch threads; body(cfg, rd, device, trainer) does the work and returns the results; then the closing log line.
    The trainer is described (and the C kernel loaded) before any worker process is forked."""
    from common.run import RunDir, seed_everything
    dev = C.resolve_device(device)
    seed_everything(cfg["seed"], cfg["deterministic"])
    with threads(cfg):
        rd = RunDir.create(out, cfg["name"], config=cfg, code_from=code_from)
        rd.lock()
        rd.log(f"run directory {rd.path}")
        trainer = native.describe(cfg["train"]["engine"], dev)
        rd.log(f"trainer: {trainer}")
        results = body(cfg, rd, dev, trainer)
        rd.log(f"done in {results['seconds']:.1f} s; summary.csv, summary.json and plots in {rd.path}")
        rd.close()
        return rd, results


def markdown_table(rows: list[dict], columns: Sequence[tuple[str, Callable[[dict], str]]]) -> str:
    """A markdown table for the report: columns (header, cell(row) → text), one line per row."""
    head = "| " + " | ".join(name for name, _ in columns) + " |\n|" + "---|" * len(columns)
    return "\n".join([head, *("| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows)])


def rho_cell(r: dict) -> str:
    """The within-setting Spearman ρ of a row with its 95 % interval."""
    return f"{r['rho_within']:+.2f} [{r['rho_within_lo']:+.2f}, {r['rho_within_hi']:+.2f}]"


def fmt(key: str, spec: str = ".4f") -> Callable[[dict], str]:
    """cell(row) = format(row[key], spec)."""
    return lambda r: format(r[key], spec)
