"""Plots of a gauss sweep and its section of results/REPORT.md (numbers taken from the run)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import plots


def _by_method(rows):
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(f"{r['loss']}/{r['mask']}", []).append(r)
    return methods


def plot(results: dict, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    methods = _by_method(results["rows"])
    first = next(iter(methods.values()))
    gammas = [r["gamma"] for r in first]
    acc = {"teacher (x1)": ([r["teacher_acc"] for r in first],), "no-KD student (x2)": ([r["no_kd_acc"] for r in first],)}
    acc.update({f"KD {k}": ([r["kd_acc"] for r in v],) for k, v in methods.items()})
    paths = [plots.line_plot(out_dir / "accuracy_vs_gamma.png", gammas, acc, xlabel="γ (shared / union decisive dims)",
                             ylabel="test accuracy", title="Accuracy vs γ")]
    delta = {k: ([r["delta_mean"] for r in v], [r["delta_std"] for r in v]) for k, v in methods.items()}
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
                                    xlabel="non-target JS(teacher, KD student) on test",
                                    ylabel="Delta (points)", title="NTDH: KD gain vs non-target divergence"))
    return paths


def markdown_table(rows) -> str:
    head = "| method | mask | γ | teacher | no-KD | KD | Delta (pts) | CMD in | CMD out | nc-JS |\n|---|---|---|---|---|---|---|---|---|---|"
    body = [f"| {r['loss']} | {r['mask']} | {r['gamma']:.2f} | {r['teacher_acc']:.4f} | {r['no_kd_acc']:.4f} | "
            f"{r['kd_acc']:.4f} | {r['delta_mean']:+.2f} ± {r['delta_std']:.2f} | {r['cmd_input']:.2f} | "
            f"{r['cmd_output']:.4f} | {r['ncjsd']:.4f} |" for r in rows]
    return "\n".join([head, *body])


def section(results: dict, run_dir: Path, rel_to: Path) -> str:
    """Markdown for REPORT.md; image links relative to `rel_to` (the report's folder)."""
    rel = lambda name: (Path(run_dir) / name).relative_to(rel_to).as_posix()
    methods = _by_method(results["rows"])
    lines = ["## NTDH synthetic Gaussian (`gauss`)", "",
             f"{results['rows'][0]['runs']} runs per γ, {len(results['settings'])} values of γ; "
             f"the whole sweep took {results['seconds']:.1f} s. Run directory: `{Path(run_dir).relative_to(rel_to.parent).as_posix()}`.",
             "", markdown_table(results["rows"]), "",
             f"![accuracy vs gamma]({rel('accuracy_vs_gamma.png')})", ""]
    for key, rows in methods.items():
        lo, hi = rows[0], rows[-1]
        trend = "rises" if hi["delta_mean"] > lo["delta_mean"] else "does not rise"
        lines.append(f"**Accuracy vs γ, {key}.** The teacher goes from {lo['teacher_acc']:.3f} to {hi['teacher_acc']:.3f} "
                     f"and the no-KD student stays at {lo['no_kd_acc']:.3f}, while the KD student goes from "
                     f"{lo['kd_acc']:.3f} (γ = {lo['gamma']:.2f}) to {hi['kd_acc']:.3f} (γ = {hi['gamma']:.2f}).")
        lines.append("")
    lines += [f"![delta vs gamma]({rel('delta_vs_gamma.png')})", ""]
    for key, rows in methods.items():
        lo, hi = rows[0], rows[-1]
        sign = lambda d: "hurts" if d < 0 else "helps"
        lines.append(f"**Delta vs γ, {key}.** Delta {('rises' if hi['delta_mean'] > lo['delta_mean'] else 'falls')} "
                     f"from {lo['delta_mean']:+.2f} ± {lo['delta_std']:.2f} points at γ = {lo['gamma']:.2f} (KD "
                     f"{sign(lo['delta_mean'])}) to {hi['delta_mean']:+.2f} ± {hi['delta_std']:.2f} at γ = "
                     f"{hi['gamma']:.2f} (KD {sign(hi['delta_mean'])}).")
        lines.append("")
    lines += [f"![delta vs non-target JS]({rel('delta_vs_ncjsd.png')})", ""]
    for key, c in results["correlations"].items():
        per = results["per_run"][key]
        lines.append(f"**Delta vs non-target JS, {key}.** Over all {c['n']} runs the Spearman rank correlation "
                     f"between the teacher–student non-target JS and Delta is ρ = {c['rho']:+.3f} (p = {c['p']:.2g}); "
                     f"over the γ means ρ = {c['rho_means']:+.3f}. The mean divergence goes from "
                     f"{np.mean(per['ncjsd'][0]):.4f} to {np.mean(per['ncjsd'][-1]):.4f} across γ. A negative ρ is "
                     f"what NTDH predicts: the smaller the non-target divergence, the larger the KD gain. With two "
                     f"classes the divergence is that of the non-target mass 1 − p_y (see README).")
        lines.append("")
    return "\n".join(lines)


def reproduce(results_dir: Path, device: str = "auto") -> str:
    """The `make reproduce` entry: the default sweep into results/gauss, returning the report section."""
    from gauss import main as gauss_main
    args = gauss_main.parse_args([])
    cfg = gauss_main.resolve_config(args)
    run_dir, results = gauss_main.run(cfg, Path(results_dir) / "gauss", device)
    return section(results, run_dir.path, Path(results_dir))
