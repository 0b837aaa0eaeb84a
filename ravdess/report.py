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
    best = max(rows, key=lambda r: r["test_mean"])
    lines = [
        "## RAVDESS, audio teacher → face-image student, Algorithm 1 (`ravdess`)", "",
        f"The `--demo` pipeline (the RAVDESS release cannot be downloaded here): a raw tree of {d['actors']} actors × 8 "
        f"emotions in the real `Actor_XX/MM-VV-EE-II-SS-RR-AA.wav|.mp4` layout (synthesised voices; scikit-image face "
        f"photos), preprocessed with librosa MFCCs ({cfg['data']['n_mels']}×{cfg['data']['frames']}) and MTCNN face "
        f"tiles ({cfg['data']['image_height']}×{cfg['data']['image_width']}), split by actor; joint training "
        f"{t['epochs']} epochs (distance {t['distance']}), saliency at place {t['place']} over {t['num_permute']} "
        f"permutations; {e['num_runs']} student(s) per mode, {e['epochs']} epochs of `{cfg['kd']['distill']}` KD, "
        f"{int(e['ratio'] * 100)} % of the channels removed ({e['fill']} fill). Run directory: "
        f"`{rel(run_dir)}`. Numbers on 8 test clips are a smoke test of the pipeline, not a replication of the "
        f"paper's RAVDESS table.", "",
        f"Step-1 nets: audio teacher val / test accuracy {acc['teacher_val_acc']:.3f} / {acc['teacher_test_acc']:.3f}, "
        f"image student {acc['student_val_acc']:.3f} / {acc['student_test_acc']:.3f} (chance 0.125).", "",
        X.markdown_table(rows), "",
        f"![saliency]({rel(cal['plot'])})", "",
        f"**Saliency vector.** {sal.size} channels of the teacher's place {t['place']}; before normalisation the "
        f"permutation distance ranges from {raw.min():.4g} to {raw.max():.4g}. After min-max normalisation the median "
        f"channel sits at {np.median(sal):.3f}, the lowest 25 % ({k} channels, red) lie below {srt[k - 1]:.3f} and "
        f"the highest 25 % (green) above {srt[-k]:.3f}: mode 1 removes the red end first, mode 2 the green end.", "",
        f"![compare modes]({rel(run_dir / 'compare_modes.png')})", "",
        "**Removal modes.** " + " ".join(
            f"Mode {r['mode']} ({X.MODE_NAMES[r['mode']]}) leaves the teacher at {r['teacher_test_acc']:.3f} test "
            f"accuracy and gives the student {r['test_mean']:.3f} ± {r['test_std']:.3f}." for r in rows)
        + f" The best student here comes from mode {best['mode']}; MFH expects mode 1.", ""]
    return "\n".join(lines)


def reproduce(results_dir: Path, device: str = "auto") -> str:
    from ravdess import main as M
    results_dir = Path(results_dir)
    args = M.parse_args(["--demo", "--out", str(results_dir / "ravdess"), "--device", device])
    cfg = M.resolve_config(args)
    results = M.run_demo(cfg, args)
    return section(results, cfg, results_dir)
