"""Plots of a sklearn_exp sweep and its section of results/REPORT.md (numbers taken from the run)."""
from __future__ import annotations

from pathlib import Path

from common.synthetic import sweep
from sklearn_exp import main as sk_main
from sklearn_exp.figures import by_method



def markdown_table(rows, mask_dim: int) -> str:
    f = sweep.fmt
    hits = lambda key: (lambda r: f"{r[key]:.2f}/{mask_dim}")
    return sweep.markdown_table(rows, [
        ("method", f("loss", "")), ("mask", f("mask", "")), ("γ", f("gamma", ".2f")), ("teacher", f("teacher_acc")),
        ("no-KD", f("no_kd_acc")), ("KD", f("kd_acc")),
        ("Delta (pts)", lambda r: f"{r['delta_mean']:+.2f} ± {r['delta_std']:.2f}"), ("`ncjsd` all", f("ncjsd")),
        ("`ncjsd` ω > 0", f("ncjsd_kept")), ("ρ within γ [95 % CI]", sweep.rho_cell), ("CMD in", f("cmd_input", ".2f")),
        ("masked T", f("masked_teacher_acc")), ("masked S", f("masked_student_acc")),
        ("hits x1", hits("saliency_hits_x1")), ("hits x2", hits("saliency_hits_x2"))])


def section(results: dict, run_dir: Path, rel_to: Path) -> str:
    """Markdown for REPORT.md; image links relative to `rel_to` (the report's folder)."""
    rel = lambda name: (Path(run_dir) / name).relative_to(rel_to).as_posix()
    methods = by_method(results["rows"])
    k, mode = results["mask_dim"], results["mode"]
    runs = results["rows"][0]["runs"]
    lines = ["## NTDH sklearn `make_classification` with Algorithm 1 (`sklearn_exp`)", "",
             f"{runs} runs per γ, {len(results['settings'])} values of γ (two-layer MLPs, 1000 full-batch epochs; "
             f"Algorithm 1 in mode `{mode}` keeps {k} teacher columns); the whole sweep took "
             f"{results['seconds']:.1f} s wall-clock ({results['cpu_seconds']:.1f} s of CPU time, "
             f"{results.get('workers', 1)} process(es) × {results['threads']} torch thread(s), on a machine shared "
             f"with other jobs; trainer: {results['trainer']}). Run directory: "
             f"`{Path(run_dir).relative_to(rel_to.parent).as_posix()}`.",
             "", markdown_table(results["rows"], k), "",
             f"![accuracy vs gamma]({rel('accuracy_vs_gamma.png')})", ""]
    for key, rows in methods.items():
        hi, lo = max(rows, key=lambda r: r["gamma"]), min(rows, key=lambda r: r["gamma"])
        lines.append(f"**Accuracy vs γ, {key}.** The teacher on x1 scores {lo['teacher_acc']:.3f} at γ = "
                     f"{lo['gamma']:.2f} and {hi['teacher_acc']:.3f} at γ = {hi['gamma']:.2f}; the no-KD student on "
                     f"x2 stays at {lo['no_kd_acc']:.3f}; the KD student goes from {lo['kd_acc']:.3f} to "
                     f"{hi['kd_acc']:.3f}. The teacher retrained on the {k} selected columns drops to "
                     f"{lo['masked_teacher_acc']:.3f} … {hi['masked_teacher_acc']:.3f}, and its KD student reaches "
                     f"{lo['masked_student_acc']:.3f} … {hi['masked_student_acc']:.3f}.")
        lines.append("")
    lines += [f"![delta vs gamma]({rel('delta_vs_gamma.png')})", ""]
    for key, rows in methods.items():
        hi, lo = max(rows, key=lambda r: r["gamma"]), min(rows, key=lambda r: r["gamma"])
        dm = results["per_run"][key]["delta_masked"]
        order = [r["gamma"] for r in rows]
        i_lo, i_hi = order.index(lo["gamma"]), order.index(hi["gamma"])
        lines.append(f"**Delta vs γ, {key}.** Delta is {lo['delta_mean']:+.2f} ± {lo['delta_std']:.2f} points at "
                     f"γ = {lo['gamma']:.2f} and {hi['delta_mean']:+.2f} ± {hi['delta_std']:.2f} at γ = "
                     f"{hi['gamma']:.2f} ({'rising' if hi['delta_mean'] > lo['delta_mean'] else 'not rising'} with "
                     f"γ). Distilling from the masked teacher gives {dm[i_lo].mean():+.2f} ± {dm[i_lo].std():.2f} at "
                     f"γ = {lo['gamma']:.2f} and {dm[i_hi].mean():+.2f} ± {dm[i_hi].std():.2f} at γ = {hi['gamma']:.2f}.")
        lines.append("")
    lines += [f"![delta vs non-target JS]({rel('delta_vs_ncjsd.png')})", "",
              f"![within-γ correlation]({rel('rho_within_gamma.png')})", ""]
    lines += sweep.ntdh_paragraphs(results, "γ")
    sal = results["saliency"]
    rows0 = next(iter(methods.values()))
    hit_text = "; ".join(f"γ = {r['gamma']:.2f}: x1 {r['saliency_hits_x1']:.2f}/{k} decisive "
                         f"({sal['general_hits_x1'][i].mean():.2f} shared), x2 {r['saliency_hits_x2']:.2f}/{k}"
                         for i, r in enumerate(rows0))
    lines += [f"![saliency vectors]({rel('saliency_run0.png')})", "",
              f"**Saliency vectors (run 0).** Permutation saliency (non-target JS between the jointly trained "
              f"teacher and student, 10 permutations per column, min-max normalised) of every input column; red "
              f"bars are the truly decisive columns, hatched ones are shared by both modalities. Over all runs, "
              f"the {k} columns kept by `{mode}` that are truly decisive: {hit_text}. The jointly trained nets "
              f"reach {sal['joint_teacher_acc'].mean():.3f} (teacher) and {sal['joint_student_acc'].mean():.3f} "
              f"(student) test accuracy on average.", ""]
    t = results["timings"]
    lines += ["Time per stage (s): " + ", ".join(f"{name} {v:.1f}" for name, v in t.items()) + ".", ""]
    return "\n".join(lines)


def reproduce(results_dir: Path, device: str = "auto", workers: int = 1) -> str:
    """The `make reproduce` entry: the default sweep into results/sklearn_exp, returning the report section; its
    runs split over `workers` processes when it runs on CPU (the same numbers)."""
    from common.config import resolve_device
    workers = max(1, workers) if resolve_device(device).type == "cpu" else 1
    args = sk_main.parse_args(["--set", "progress=false", "--workers", str(workers)])
    cfg = sk_main.resolve_config(args)
    run_dir, results = sk_main.run(cfg, Path(results_dir) / "sklearn_exp", device)
    sweep.save_ntd_records(results, run_dir.path, Path(results_dir) / "sklearn_exp", "sklearn_exp")
    return section(results, run_dir.path, Path(results_dir))
