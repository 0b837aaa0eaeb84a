"""Plots of a sklearn_exp sweep and its section of results/REPORT.md (numbers taken from the run)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import plots
from common.plots import figure


def _by_method(rows):
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(f"{r['loss']}/{r['mask']}", []).append(r)
    return methods


def saliency_plot(path, results: dict, run: int = 0) -> Path:
    """Saliency of every x1 / x2 column for one run at every γ: decisive columns red, shared ones hatched, the kept
    (selected) columns marked with a triangle."""
    sal, settings = results["saliency"], results["settings"]
    n = len(settings)
    fig, axes = figure(n, 2, figsize=(12, 1.9 * n + 0.6), squeeze=False, sharex=True)
    for s, setting in enumerate(settings):
        for m, (mod, truth) in enumerate((("x1", sal["x1_decisive"][s]), ("x2", sal["x2_decisive"][s]))):
            ax = axes[s, m]
            v = sal[mod][s, run]
            cols = np.arange(len(v))
            colors = np.where(np.isin(cols, truth), "C3", "C0")
            bars = ax.bar(cols, v, color=colors, width=0.9)
            for c in sal["shared"][s]:
                bars[c].set_hatch("///")
            kept = sal[f"kept_{mod}"][s, run]
            ax.scatter(kept, v[kept] + 0.08, marker="v", color="k", s=18, zorder=3)
            ax.set_ylim(0, 1.2)
            ax.set_ylabel(f"γ={setting['gamma']:.2f}")
            if s == 0:
                ax.set_title(f"{mod} columns ({'teacher' if mod == 'x1' else 'student'}): red = decisive, "
                             f"hatched = shared, ▼ = kept ({results['mode']})", fontsize=9)
            if s == n - 1:
                ax.set_xlabel("input column")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot(results: dict, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    methods = _by_method(results["rows"])
    first = next(iter(methods.values()))
    gammas = [r["gamma"] for r in first]
    acc = {"teacher (x1)": ([r["teacher_acc"] for r in first],), "no-KD student (x2)": ([r["no_kd_acc"] for r in first],),
           f"masked teacher ({results['mask_dim']} cols)": ([r["masked_teacher_acc"] for r in first],)}
    acc.update({f"KD {k}": ([r["kd_acc"] for r in v],) for k, v in methods.items()})
    acc.update({f"KD {k} from masked teacher": ([r["masked_student_acc"] for r in v],) for k, v in methods.items()})
    paths = [plots.line_plot(out_dir / "accuracy_vs_gamma.png", gammas, acc,
                             xlabel="γ (fraction of the teacher's decisive columns the student sees)",
                             ylabel="test accuracy", title="Accuracy vs γ")]
    delta = {k: ([r["delta_mean"] for r in v], [r["delta_std"] for r in v]) for k, v in methods.items()}
    for k in methods:
        d = results["per_run"][k]["delta_masked"]
        delta[f"{k} from masked teacher"] = (d.mean(1), d.std(1))
    paths.append(plots.line_plot(out_dir / "delta_vs_gamma.png", gammas, delta, xlabel="γ",
                                 ylabel="Delta = KD − no-KD (points)", title="KD gain vs γ (mean ± std over runs)",
                                 hline=0.0))
    scatter, means = {}, {}
    for key, v in results["per_run"].items():
        rho = results["correlations"][key]["rho"]
        label = f"{key} (ρ = {rho:+.2f})"
        scatter[label] = (v["ncjsd"].ravel(), v["delta"].ravel())
        means[label] = (v["ncjsd"].mean(1), v["delta"].mean(1), v["delta"].std(1))
    paths.append(plots.scatter_plot(out_dir / "delta_vs_ncjsd.png", scatter, means=means,
                                    xlabel="non-target JS(teacher, KD student)", ylabel="Delta (points)",
                                    title="NTDH: KD gain vs non-target divergence"))
    paths.append(saliency_plot(out_dir / "saliency_run0.png", results, 0))
    return paths


def markdown_table(rows, mask_dim: int) -> str:
    head = ("| method | mask | γ | teacher | no-KD | KD | Delta (pts) | nc-JS | CMD in | masked T | masked S | "
            "hits x1 | hits x2 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    body = [f"| {r['loss']} | {r['mask']} | {r['gamma']:.2f} | {r['teacher_acc']:.4f} | {r['no_kd_acc']:.4f} | "
            f"{r['kd_acc']:.4f} | {r['delta_mean']:+.2f} ± {r['delta_std']:.2f} | {r['ncjsd']:.4f} | "
            f"{r['cmd_input']:.2f} | {r['masked_teacher_acc']:.4f} | {r['masked_student_acc']:.4f} | "
            f"{r['saliency_hits_x1']:.2f}/{mask_dim} | {r['saliency_hits_x2']:.2f}/{mask_dim} |" for r in rows]
    return "\n".join([head, *body])


def section(results: dict, run_dir: Path, rel_to: Path) -> str:
    """Markdown for REPORT.md; image links relative to `rel_to` (the report's folder)."""
    rel = lambda name: (Path(run_dir) / name).relative_to(rel_to).as_posix()
    methods = _by_method(results["rows"])
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
    lines += [f"![delta vs non-target JS]({rel('delta_vs_ncjsd.png')})", ""]
    for key, c in results["correlations"].items():
        per = results["per_run"][key]
        lines.append(f"**Delta vs non-target JS, {key}.** Over all {c['n']} runs the Spearman rank correlation "
                     f"between the teacher–KD-student non-target JS and Delta is ρ = {c['rho']:+.3f} "
                     f"(p = {c['p']:.2g}); over the γ means ρ = {c['rho_means']:+.3f}. The mean divergence ranges "
                     f"from {per['ncjsd'].mean(1).min():.4f} to {per['ncjsd'].mean(1).max():.4f} across γ. NTDH "
                     f"predicts a negative ρ: the smaller the non-target divergence, the larger the KD gain.")
        lines.append("")
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
    from sklearn_exp import main as sk_main
    workers = max(1, workers) if resolve_device(device).type == "cpu" else 1
    args = sk_main.parse_args(["--set", "progress=false", "--workers", str(workers)])
    cfg = sk_main.resolve_config(args)
    run_dir, results = sk_main.run(cfg, Path(results_dir) / "sklearn_exp", device)
    return section(results, run_dir.path, Path(results_dir))
