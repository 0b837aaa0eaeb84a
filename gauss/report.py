"""The gauss presets' sections of results/REPORT.md (numbers taken from the run).

`make reproduce` runs the NTDH default, `--preset mfh_gamma` (MFH Figure 2) and `--preset mfh_modify_gamma` (MFH
Table 2) into results/gauss/ and writes one paragraph per plot.
"""
from __future__ import annotations

from pathlib import Path

from common.synthetic import sweep
from gauss import experiment
from gauss import main as gauss_main
from gauss.figures import by_method, modify_keys, sweep_axis



def markdown_table(rows, div: str = experiment.DIVERGENCE) -> str:
    """The sweep's table; `div` the divergence column (target_mass_js: the JS of the target mass [p_y, 1 − p_y],
    two classes), on all test samples and on those ω keeps, with the within-γ Spearman ρ(div, Delta)."""
    f = sweep.fmt
    return sweep.markdown_table(rows, [
        ("method", f("loss", "")), ("mask", f("mask", "")), ("γ", f("gamma", ".2f")), ("teacher", f("teacher_acc")),
        ("no-KD", f("no_kd_acc")), ("KD", f("kd_acc")),
        ("Delta (pts)", lambda r: f"{r['delta_mean']:+.2f} ± {r['delta_std']:.2f}"), ("CMD in", f("cmd_input", ".2f")),
        ("CMD out", f("cmd_output")), (f"`{div}` all", f(div)), (f"`{div}` ω > 0", f(div + "_kept")),
        ("ρ within γ [95 % CI]", sweep.rho_cell)])


def section(results: dict, run_dir: Path, rel_to: Path, title: str = "## NTDH synthetic Gaussian (`gauss`)") -> str:
    """Markdown for REPORT.md; image links relative to `rel_to` (the report's folder)."""
    rel = lambda name: (Path(run_dir) / name).relative_to(rel_to).as_posix()
    methods = by_method(results["rows"])
    key_x, word, _ = sweep_axis(results["rows"])
    sym = "α" if key_x == "alpha" else "γ"
    lines = [title, "",
             f"{results['rows'][0]['runs']} runs per {sym}, {len(results['settings'])} values of {sym}; "
             f"the whole sweep took {results['seconds']:.1f} s. Run directory: `{Path(run_dir).relative_to(rel_to.parent).as_posix()}`.",
             "", markdown_table(results["rows"]), "",
             f"![accuracy vs gamma]({rel(f'accuracy_vs_{word}.png')})", ""]
    for key, rows in methods.items():
        lo, hi = rows[0], rows[-1]
        lines.append(f"**Accuracy vs {sym}, {key}.** The teacher goes from {lo['teacher_acc']:.3f} to {hi['teacher_acc']:.3f} "
                     f"and the no-KD student stays at {lo['no_kd_acc']:.3f}, while the KD student goes from "
                     f"{lo['kd_acc']:.3f} ({sym} = {lo[key_x]:.2f}) to {hi['kd_acc']:.3f} ({sym} = {hi[key_x]:.2f}).")
        lines.append("")
    lines += [f"![delta vs gamma]({rel(f'delta_vs_{word}.png')})", ""]
    for key, rows in methods.items():
        lo, hi = rows[0], rows[-1]
        sign = lambda d: "hurts" if d < 0 else "helps"
        lines.append(f"**Delta vs {sym}, {key}.** Delta {('rises' if hi['delta_mean'] > lo['delta_mean'] else 'falls')} "
                     f"from {lo['delta_mean']:+.2f} ± {lo['delta_std']:.2f} points at {sym} = {lo[key_x]:.2f} (KD "
                     f"{sign(lo['delta_mean'])}) to {hi['delta_mean']:+.2f} ± {hi['delta_std']:.2f} at {sym} = "
                     f"{hi[key_x]:.2f} (KD {sign(hi['delta_mean'])}).")
        lines.append("")
    lines += [f"![delta vs divergence]({rel('delta_vs_ncjsd.png')})", "",
              f"![within-{sym} correlation]({rel(f'rho_within_{word}.png')})", ""]
    lines += sweep.ntdh_paragraphs(results, sym, " With two classes the renormalised non-target distribution is a "
                                                "single point, so the divergence is the JS of the target mass "
                                                "[p_y, 1 − p_y] (`target_mass_js`), a target quantity.")
    return "\n".join(lines)


def markdown_modify_table(rows) -> str:
    f = sweep.fmt
    diff = lambda key: (lambda r: f"{r[key + '_mean']:+.2f} ± {r[key + '_std']:.2f}")
    return sweep.markdown_table(rows, [
        ("method", lambda r: f"{r['loss']}/{r['mask']}"), ("mode", f("mode", "")), ("xs2", f("xs2_dim", "")),
        ("γ", f("gamma", ".2f")), ("teacher reg", f("regular_teacher_acc")), ("teacher mg", f("mg_teacher_acc")),
        ("no-KD", f("no_kd_acc")), ("KD reg", f("regular_kd_acc")), ("KD mg", f("mg_kd_acc")),
        ("teacher diff (pts)", diff("teacher_diff")), ("student diff (pts)", diff("student_diff")),
        ("Alg. 1 id x1", lambda r: "–" if r["alg1_x1_id_acc"] is None else format(r["alg1_x1_id_acc"], ".3f"))])


def section_modify(results: dict, run_dir: Path, rel_to: Path, title: str) -> str:
    """The MFH Table 2 section of REPORT.md: the table, then one paragraph per plot with the run's numbers."""
    rel = lambda name: (Path(run_dir) / name).relative_to(rel_to).as_posix()
    modes, settings = results["modes"], results["settings"]
    lines = [title, "", f"{results['rows'][0]['runs']} runs per xs2, {len(settings)} values of xs2, modes "
             f"{', '.join(modes)}; the whole table took {results['seconds']:.1f} s. Run directory: "
             f"`{Path(run_dir).relative_to(rel_to.parent).as_posix()}`.", "", markdown_modify_table(results["rows"]), ""]
    for key, suffix in modify_keys(results).items():
        res = results["per_run"][key]
        reg = res["regular_kd_acc"][0].mean(-1)
        diff = {m: res["student_diff"][i].mean(-1) for i, m in enumerate(modes)}
        wins = {m: int((res["student_diff"][i].mean(-1) > 0).sum()) for i, m in enumerate(modes)}
        best = max(modes, key=lambda m: diff[m].mean())
        lines += [f"![Table 2 students, {key}]({rel(f'table2_students{suffix}.png')})", "",
                  f"**Students, {key}.** Across xs2 = {settings[0]['xs2_dim']}…{settings[-1]['xs2_dim']} the no-KD "
                  f"student goes from {res['no_kd_acc'][0].mean(-1)[0]:.3f} to {res['no_kd_acc'][0].mean(-1)[-1]:.3f} "
                  f"and the regular-KD student from {reg[0]:.3f} to {reg[-1]:.3f}; the bars are each KD student's "
                  f"gain over no-KD, {(reg - res['no_kd_acc'][0].mean(-1)).mean() * 100:+.2f} points on average for "
                  f"regular KD. "
                  + " ".join(f"Distilling from the {m} teacher instead changes the student by {diff[m].mean():+.2f} "
                             f"points on "
                             f"average (from {diff[m].min():+.2f} to {diff[m].max():+.2f} per xs2; better than regular "
                             f"KD at {wins[m]} of {len(settings)} values of xs2)." for m in modes)
                  + f" The largest average gain is with the {best} columns; MFH's claim is that a teacher restricted "
                  f"to the modality-general (shared) columns distils better than the regular one, and a random "
                  f"subset does not.", ""]
        t_reg = res["regular_teacher_acc"][0].mean(-1)
        t_mg = {m: res["mg_teacher_acc"][i].mean(-1) for i, m in enumerate(modes)}
        lines += [f"![Table 2 teachers, {key}]({rel(f'table2_teachers{suffix}.png')})", "",
                  f"**Teachers.** The regular teacher (all {results['x1_dim']} columns of x1) reaches "
                  f"{t_reg.min():.3f}–{t_reg.max():.3f}; "
                  + "; ".join(f"the {m} teacher {t_mg[m].min():.3f}–{t_mg[m].max():.3f} (on average "
                              f"{(t_mg[m] - t_reg).mean() * 100:+.2f} points)" for m in modes)
                  + ". " + ("Every modality-general teacher is less accurate than the regular one, so a better "
                            "modality-general student does not come from a more accurate teacher."
                            if all((t_mg[m] < t_reg).all() for m in modes) else
                            "Not every modality-general teacher is less accurate than the regular one."), ""]
        break  # the teacher and identification paragraphs do not depend on the KD method
    ident = results["identification"]
    if ident["x1"] is not None:
        x1 = ident["x1"].mean(1)
        chance = results["chance"]
        extra = ""
        if ident["x2"] is not None:
            extra = f" For x2 it finds {ident['x2'].mean():.3f} on average."
        lines += [f"![Algorithm 1 identification]({rel('alg1_identification.png')})", "",
                  f"**Algorithm 1.** Of the xs2 columns with the highest saliency, a share of {x1.min():.3f}–"
                  f"{x1.max():.3f} (mean {x1.mean():.3f}) are the true shared columns of x1, against {chance[0]:.2f}–"
                  f"{chance[-1]:.2f} expected from random columns.{extra}", ""]
    return "\n".join(lines)


def reproduce(results_dir: Path, device: str = "auto", workers: int | None = None) -> str:
    """The `make reproduce` entry: the NTDH default sweep, then the mfh_gamma and mfh_modify_gamma presets, into
    results/gauss, returning the report section. `workers` (None: the config's) goes to the two γ sweeps; the
    modify-γ table is one process."""
    out = Path(results_dir) / "gauss"
    parts = []
    for preset, title in ((None, None), ("mfh_gamma", "### MFH increase γ (`--preset mfh_gamma`, MFH Figure 2)"),
                          ("mfh_modify_gamma", "### MFH modify γ (`--preset mfh_modify_gamma`, MFH Table 2)")):
        argv = [] if preset is None else ["--preset", preset]
        if workers is not None and preset != "mfh_modify_gamma":
            argv += ["--workers", str(max(1, workers))]
        args = gauss_main.parse_args(argv)
        cfg = gauss_main.resolve_config(args)
        run_dir, results = gauss_main.run(cfg, out, device)
        if preset is None:
            sweep.save_ntd_records(results, run_dir.path, out, "gauss (NTDH default)")
            parts.append(section(results, run_dir.path, Path(results_dir)))
        elif preset == "mfh_gamma":
            parts.append(section(results, run_dir.path, Path(results_dir), title))
        else:
            parts.append(section_modify(results, run_dir.path, Path(results_dir), title))
    return "\n".join(parts)
