"""The plots of a gauss run (γ / α sweeps and MFH Table 2), written into its run directory by main.py."""
from __future__ import annotations

from pathlib import Path

from common import plots
from common.synthetic import sweep


def by_method(rows):
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(f"{r['loss']}/{r['mask']}", []).append(r)
    return methods


def sweep_axis(rows) -> tuple[str, str, str]:
    """(row key, file-name word, axis label) of the swept quantity: α for the increase-α sweep, else γ."""
    if "alpha" in rows[0]:
        return "alpha", "alpha", "α (teacher-exclusive / teacher decisive dims)"
    return "gamma", "gamma", "γ (shared / union decisive dims)"


def plot(results: dict, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    methods = by_method(results["rows"])
    first = next(iter(methods.values()))
    key, word, label = sweep_axis(first)
    sym = "α" if key == "alpha" else "γ"
    xs = [r[key] for r in first]
    acc = {"teacher (x1)": ([r["teacher_acc"] for r in first],), "no-KD student (x2)": ([r["no_kd_acc"] for r in first],)}
    acc.update({f"KD {k}": ([r["kd_acc"] for r in v],) for k, v in methods.items()})
    paths = [plots.line_plot(out_dir / f"accuracy_vs_{word}.png", xs, acc, xlabel=label,
                             ylabel="test accuracy", title=f"Accuracy vs {sym}")]
    delta = {k: ([r["delta_mean"] for r in v], [r["delta_std"] for r in v]) for k, v in methods.items()}
    paths.append(plots.line_plot(out_dir / f"delta_vs_{word}.png", xs, delta, xlabel=sym,
                                 ylabel="Delta = KD − no-KD (points)", title=f"KD gain vs {sym} (mean ± std over runs)",
                                 hline=0.0))
    div = results["divergence"]
    paths.append(sweep.ntdh_scatter(results, out_dir / "delta_vs_ncjsd.png",
                                    xlabel=f"{sweep.DIVERGENCES[div]} (`{div}`), teacher vs KD student, test"))
    paths.append(sweep.ntdh_within_plot(results, out_dir / f"rho_within_{word}.png", xlabel=label))
    return paths


def modify_keys(results: dict) -> dict[str, str]:
    """loss/mask → file-name suffix ("" when there is one combination)."""
    keys = list(results["per_run"])
    return {k: ("" if len(keys) == 1 else "_" + k.replace("/", "_")) for k in keys}


def plot_modify(results: dict, out_dir) -> list[Path]:
    """MFH Table 2 as grouped bars (students; teachers) per xs2, and Algorithm 1's identification accuracy."""
    out_dir = Path(out_dir)
    groups = [f"xs2={s['xs2_dim']}\nγ={s['gamma']:.2f}" for s in results["settings"]]
    modes, paths = results["modes"], []
    ms = lambda v: (v.mean(-1), v.std(-1))   # (S, R) → mean, std over runs
    for key, suffix in modify_keys(results).items():
        res = results["per_run"][key]
        gain = lambda acc: (acc - res["no_kd_acc"][0]) * 100   # points over the no-KD student, per run
        students = {"regular KD": ms(gain(res["regular_kd_acc"][0]))}
        students.update({f"modality-general KD ({m})": ms(gain(res["mg_kd_acc"][i])) for i, m in enumerate(modes)})
        paths.append(plots.grouped_bars(out_dir / f"table2_students{suffix}.png", groups, students,
                                        ylabel="student accuracy − no-KD (points)",
                                        title=f"MFH Table 2: KD students vs no-KD, {key} (mean ± std over runs)"))
        teachers = {"regular teacher (all x1)": ms(res["regular_teacher_acc"][0])}
        teachers.update({f"modality-general teacher ({m})": ms(res["mg_teacher_acc"][i]) for i, m in enumerate(modes)})
        paths.append(plots.grouped_bars(out_dir / f"table2_teachers{suffix}.png", groups, teachers,
                                        ylabel="teacher test accuracy (x1)",
                                        title="MFH Table 2: teachers (mean ± std over runs)"))
    ident = results["identification"]
    if ident["x1"] is not None:
        xs = [s["xs2_dim"] for s in results["settings"]]
        series = {"x1 (used for the teacher)": (ident["x1"].mean(1), ident["x1"].std(1))}
        if ident["x2"] is not None:
            series["x2"] = (ident["x2"].mean(1), ident["x2"].std(1))
        series["chance (random columns)"] = (results["chance"],)
        paths.append(plots.line_plot(out_dir / "alg1_identification.png", xs, series, xlabel="xs2 (shared decisive dims)",
                                     ylabel="share of the true shared columns found",
                                     title="Algorithm 1: identification accuracy (top-xs2 saliency)"))
    return paths
