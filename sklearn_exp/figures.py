"""The plots of an sklearn_exp run, written into its run directory by main.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import plots
from common.synthetic import sweep
from common.plots import figure


def by_method(rows):
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
    methods = by_method(results["rows"])
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
    paths.append(sweep.ntdh_scatter(results, out_dir / "delta_vs_ncjsd.png",
                                    xlabel="non-target JS (`ncjsd`), teacher vs KD student"))
    paths.append(sweep.ntdh_within_plot(results, out_dir / "rho_within_gamma.png", xlabel="γ"))
    paths.append(saliency_plot(out_dir / "saliency_run0.png", results, 0))
    return paths
