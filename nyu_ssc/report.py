"""The REPORT.md section of `make reproduce`: the demo with both cross-modal pairs over several seeds.

Per seed, two runs of `main.run` on the same synthetic scenes: RGB-D teacher (`ddrnet_rgbd`) and RGB teacher
(`ddrnet_rgb`), each distilled into the depth `ddrnet` with the ω mask and without (kd.ablate_mask); the no-KD depth
baseline is trained in the first run (it does not depend on the teacher). Selection on held-out training scenes, the
test split once; the tables give mean ± sd over seeds (sample sd, n − 1). Imports the experiment, never the reverse.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nyu_ssc import main as ssc_main
from nyu_ssc.outputs import markdown_table

SEEDS = 3
PAIRS = (("ddrnet_rgbd", "RGB-D → depth"), ("ddrnet_rgb", "RGB → depth"))
ROLES = (("teacher", "teacher"), ("baseline", "no-KD baseline"), ("student", "KD student, ω mask"),
         ("student_none", "KD student, no mask"))


def _mean_sd(values) -> str:
    v = np.asarray(values, dtype=float) * 100
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.1f} ± {sd:.1f}"


def runs(results_dir: Path, device: str, seeds: int = SEEDS, extra: list[str] | None = None) -> list[dict]:
    """[{seed, teacher, summary, run_dir}] for every seed and pair (the baseline only in the first pair's run)."""
    out = []
    for i in range(seeds):
        for p, (teacher, _) in enumerate(PAIRS):
            argv = ["--demo", "--kd", "--teacher", teacher, "--set", "progress=false", "--set", "kd.ablate_mask=true",
                    "--set", f"kd.baseline={'true' if p == 0 else 'false'}", *(extra or [])]
            args = ssc_main.parse_args(argv)
            cfg = ssc_main.resolve_config(args)
            cfg["seed"] = cfg["seed"] + i
            rd, summary = ssc_main.run(cfg, Path(results_dir) / "nyu_ssc", device)
            out.append({"seed": cfg["seed"], "teacher": teacher, "summary": summary, "run_dir": rd.path})
    return out


def table(all_runs: list[dict], split: str = "test") -> str:
    """Mean ± sd over seeds of SC IoU and mIoU (dataset-level, %) per pair and role, with the student's ω stats."""
    lines = [f"| pair | model | {split} SC IoU | {split} mIoU | mIoU − baseline | mean ω | share ω < 1 | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["seed"]: r["summary"]["results"]["baseline"] for r in all_runs if "baseline" in r["summary"]["results"]}
    for teacher, label in PAIRS:
        mine = [r for r in all_runs if r["teacher"] == teacher]
        for role, name in ROLES:
            rows = [(r["seed"], r["summary"]["results"][role]) for r in mine if role in r["summary"]["results"]]
            if role == "baseline":
                rows = sorted(base.items())
            if not rows:
                continue
            sc = [res[split]["dataset"]["sc_iou"] for _, res in rows]
            miou = [res[split]["dataset"]["miou"] for _, res in rows]
            gain = [res[split]["dataset"]["miou"] - base[s][split]["dataset"]["miou"] for s, res in rows if s in base]
            om = [res.get("omega_mean") for _, res in rows if res.get("omega_mean") is not None]
            share = [res.get("omega_masked_share") for _, res in rows if res.get("omega_masked_share") is not None]
            omega = f"{np.mean(om):.3f} | {np.mean(share) * 100:.1f} %" if om else "– | –"
            gain_cell = _mean_sd(gain) if role.startswith("student") and gain else "–"
            lines.append(f"| {label} | {name} | {_mean_sd(sc)} | {_mean_sd(miou)} | {gain_cell} | {omega} | "
                         f"{len(rows)} |")
    return "\n".join(lines)


def section(all_runs: list[dict], rel_to: Path) -> str:
    first = all_runs[0]
    g = first["summary"]["grid"]
    rel = lambda name: (Path(first["run_dir"]) / name).relative_to(rel_to).as_posix()
    lines = ["## NYUDepthV2 semantic scene completion with cross-modal KD (`nyu_ssc`)", "",
             f"Demo on synthetic indoor scenes in the real npz layout (grid {g['hr']} → {g['lr']}, images "
             f"{g['image']}), {len({r['seed'] for r in all_runs})} seeds. Two cross-modal pairs into the depth-only "
             f"DDRNet: the RGB-D teacher (`ddrnet_rgbd`, the default, see nyu_ssc/README.md; it also sees the "
             f"student's depth) and the RGB-only teacher (`ddrnet_rgb`, the strictly cross-modal pair). The best "
             f"epoch is selected on held-out training scenes; the test split is evaluated once. Baseline and KD students see the same batches in the same order and start from the same "
             f"weights. Tiny CPU runs on synthetic data, not NYU numbers.", "",
             "Test, dataset-level (%; mean ± sd over seeds):", "", table(all_runs, "test"), "",
             "Validation (held-out training scenes, best epoch):", "", table(all_runs, "val"), "",
             f"One run in full (seed {first['seed']}, {first['teacher']} teacher; test, %):", "",
             markdown_table(first["summary"]["results"], "dataset"), ""]
    if "slices_student.png" in first["summary"]["plots"]:
        lines += [f"![student slices]({rel('slices_student.png')})", "",
                  "**KD student prediction vs truth** on test scenes (horizontal slice and top view).", ""]
    lines += [f"![val mIoU]({rel('val_miou.png')})", "", "**Validation mIoU per epoch** of that run.", ""]
    return "\n".join(lines)


def advisor_records(all_runs: list[dict], out_dir: Path) -> list[dict]:
    """Per seed, pair and mask: where the teacher's and the no-KD probe's validation logits are (ntd/ of the runs)
    and the test mIoU Delta (KD − no-KD, points) the student measured, for `common.ntd.save_check_records`."""
    base_dir = {r["seed"]: r["run_dir"] for r in all_runs if "baseline" in r["summary"]["results"]}
    base = {r["seed"]: r["summary"]["results"]["baseline"] for r in all_runs if r["seed"] in base_dir
            and r["run_dir"] == base_dir[r["seed"]]}
    rel = lambda p: Path(p).relative_to(out_dir).as_posix()
    records = []
    for r in all_runs:
        for role, mask in (("student", "ω"), ("student_none", "no mask")):
            res = r["summary"]["results"].get(role)
            if res is None or r["seed"] not in base:
                continue
            delta = (res["test"]["dataset"]["miou"] - base[r["seed"]]["test"]["dataset"]["miou"]) * 100
            records.append({"label": f"{r['teacher']} → ddrnet, KL {mask}, seed {r['seed']}",
                            "teacher": rel(r["run_dir"]), "probe": rel(base_dir[r["seed"]]), "delta": delta})
    return records


def reproduce(results_dir: Path, device: str = "auto") -> str:
    """`make reproduce`: both pairs × {ω, none} × SEEDS seeds into results/nyu_ssc, and the advisor records."""
    from common import ntd
    all_runs = runs(results_dir, device)
    out_dir = Path(results_dir) / "nyu_ssc"
    ntd.save_check_records(out_dir, advisor_records(all_runs, out_dir))
    return section(all_runs, Path(results_dir))
