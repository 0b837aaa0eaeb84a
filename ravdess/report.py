"""`make reproduce` section for RAVDESS: the `--demo` pipeline (tiny raw tree → preprocess → Algorithm 1 → modes
0/1/2), with every number taken from that run. The real dataset cannot be downloaded here (see README)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ravdess import experiment as X


def section(results: dict, cfg: dict, rel_to: Path) -> str:
    run_dir = Path(results["run_dir"])
    rel = lambda p: Path(p).resolve().relative_to(rel_to.resolve()).as_posix()
    cal, rows = results["cal"], results["modes"]
    acc, sal = cal["accuracy"], np.asarray(cal["saliency"])
    raw = np.asarray(cal["saliency_raw"])
    t, e, d = cfg["tag"], cfg["eval"], cfg["demo"]
    k = max(1, int(0.25 * sal.size))
    srt = np.sort(sal)
    n = results["counts"]
    sp = cfg["preprocess"]["splits"]
    v = cfg["preprocess"]["video"]
    runs = e["num_runs"]
    ranked = sorted(rows, key=lambda r: r["test_mean"], reverse=True)
    best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
    # "clearly" best: ahead of the runner-up by more than the larger of their run-to-run standard deviations
    clear = second is None or best["test_mean"] - second["test_mean"] > max(best["test_std"], second["test_std"])
    lines = [
        "## RAVDESS, audio teacher → face-image student, Algorithm 1 (`ravdess`)", "",
        f"The `--demo` pipeline (the RAVDESS release cannot be downloaded here): a raw tree of {d['actors']} actors × 8 "
        f"emotions × {d['repetitions']} takes in the real `Actor_XX/MM-VV-EE-II-SS-RR-AA.wav|.mp4` layout, written by "
        f"`ravdess/demo.py`. The synthesised voices carry every emotion (pitch, harmonic envelope, breathiness, "
        f"tremolo and loudness contour, over a per-actor voice and per-take jitter); the videos of scikit-image face "
        f"photos carry it only partly (a tint shared by two emotions, with a small tint shift and a tilt direction "
        f"leaning towards one of the two, all jittered per take, plus random lighting), so the face-only ceiling is "
        f"well below the voice's. Preprocessed "
        f"as real data: librosa MFCCs ({cfg['data']['n_mels']}×{cfg['data']['frames']}), MTCNN faces in "
        f"{v['tile_rows']}×{v['tile_cols']} tiles of {v['tile_size']} px ({cfg['data']['image_height']}×"
        f"{cfg['data']['image_width']}; the real sizes, 40×256 and 256×512, stay the defaults), split by actor: "
        f"train {n['train']} / val {n['val']} (actors {', '.join(map(str, sp['val_actors']))}) / test {n['test']} "
        f"clips (actors {', '.join(map(str, sp['test_actors']))}). Joint training {t['epochs']} epochs (distance "
        f"{t['distance']}, lr {t['lr']}), saliency at place {t['place']} over {t['num_permute']} permutations; per mode "
        f"{int(e['ratio'] * 100)} % of the channels removed ({e['fill']} fill) and {runs} student(s) trained "
        f"{e['epochs']} epochs (lr {e['lr']}) with `{cfg['kd']['distill']}` KD (gt-weight {cfg['kd']['gt_weight']}), "
        f"selected on val, tested once; mean ± std over the {runs} runs. Run directory: `{rel(run_dir)}`. Small "
        f"synthetic data: a check that the pipeline learns and that the modes can be compared, not a replication of "
        f"the paper's RAVDESS table.", "",
        f"Step-1 nets: audio teacher val / test accuracy {acc['teacher_val_acc']:.3f} / {acc['teacher_test_acc']:.3f}, "
        f"image student (trained jointly, with labels) {acc['student_val_acc']:.3f} / {acc['student_test_acc']:.3f} "
        f"(chance 0.125).", "",
        X.markdown_table(rows, results.get("baseline")), "",
        f"![saliency]({rel(cal['plot'])})", "",
        f"**Saliency vector.** {sal.size} channels of the teacher's place {t['place']}; before normalisation the "
        f"permutation distance ranges from {raw.min():.4g} to {raw.max():.4g}. After min-max normalisation the median "
        f"channel sits at {np.median(sal):.3f}, the lowest 25 % ({k} channels, red) lie below {srt[k - 1]:.3f} and "
        f"the highest 25 % (green) above {srt[-k]:.3f}: mode 1 removes the red end first, mode 2 the green end.", "",
        f"![compare modes]({rel(run_dir / 'compare_modes.png')})", "",
        "**Removal modes.** " + " ".join(
            f"Mode {r['mode']} ({X.MODE_NAMES[r['mode']]}) leaves the teacher at {r['teacher_test_acc']:.3f} test "
            f"accuracy and gives the student {r['test_mean']:.3f} ± {r['test_std']:.3f}." for r in rows)
        + f" The best student here comes from mode {best['mode']}"
        + ("" if second is None else
           (f", ahead of mode {second['mode']} by more than the run-to-run spread" if clear else
            f", but within the run-to-run spread of mode {second['mode']} ({n['test']} test clips, {runs} runs)"))
        + "; MFH expects mode 1." + _versus_baseline(rows, results.get("baseline")), "",
        f"*Results {results['features_note']}.*" if results.get("features_note") else "", ""]
    return "\n".join(lines)


def _versus_baseline(rows: list[dict], base: dict | None) -> str:
    if not base:
        return ""
    better = [r["mode"] for r in rows if r["test_mean"] > base["test_mean"]]
    return (f" The no-KD baseline (CE only, the same initial weights and batches) reaches {base['test_mean']:.3f} ± "
            f"{base['test_std']:.3f}; " + (f"mode(s) {', '.join(map(str, better))} beat it on average."
                                          if better else "no removal mode beats it on average."))


def reproduce(results_dir: Path, device: str = "auto") -> str:
    from ravdess import main as M
    results_dir = Path(results_dir)
    args = M.parse_args(["--demo", "--out", str(results_dir / "ravdess"), "--device", device])
    cfg = M.resolve_config(args)
    results = M.run_demo(cfg, args)
    advisor_records(results, results_dir / "ravdess")
    return section(results, cfg, results_dir)


def advisor_records(results: dict, out_dir: Path) -> None:
    """For the NTD advisor's check: per removal mode, the teacher after removal (ntd/teacher_mode<m>.npz) against the
    no-KD probe, and the measured Delta = KD student − no-KD baseline (test accuracy, points)."""
    from common import ntd

    base = results.get("baseline")
    if not base:
        return
    run_dir = Path(results["run_dir"])
    records = [{"label": f"mode {r['mode']}", "teacher": run_dir, "tag": f"mode{r['mode']}",
                "delta": 100 * (r["test_mean"] - base["test_mean"])}
               for r in results["modes"] if ntd.logits_path(run_dir, "teacher", f"mode{r['mode']}").is_file()]
    if records:
        ntd.save_check_records(out_dir, records)
