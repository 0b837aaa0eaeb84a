"""The `make reproduce` entry: the demo (steps 1-6 on a generated RECOLA-layout tree, arousal, every seed of
demo.seeds, one student per weighting of demo.weightings) into results/m2pkd/, and its section of REPORT.md with
numbers from the run."""
from __future__ import annotations

import os
from pathlib import Path


def section(res: dict, results_dir: Path) -> str:
    results_dir = Path(results_dir)
    rel = lambda p: Path(os.path.relpath(p, results_dir)).as_posix()   # links relative to REPORT.md
    summ = res["summary"]
    lines = ["## M2PKD: privileged KD for arousal / valence (`m2pkd`)", "",
             f"Demo: a generated RECOLA-layout tree (`{rel(res['data'])}`: mp4v videos of scikit-image face photos "
             f"whose brightness follows arousal weakly under per-frame noise, wavs whose pitch and loudness follow "
             f"arousal strongly, ARFF and `;` CSV gold standards), run through MTCNN face crops, 1-s log-mel "
             f"spectrogram images (magma, as the reference), the per-recording CSVs, the trainings and the "
             f"post-processing. Small model sizes (configs/demo.yaml), random initial weights. Protocol: "
             f"{summ['protocol']}. Seeds {summ['seeds']} (the data stay the same; mean ± sample sd over seeds). "
             f"Run directory: `{rel(res['run'])}`.", "",
             "| dim | model | dev CCC raw | authors' chain | AVEC chain | raw per seed |", "|---|---|---|---|---|---|"]
    seeds = summ["seeds"]
    for r in summ["table"]:
        cells = [f"{r[f'dev_{c}_mean']:.3f} ± {r[f'dev_{c}_sd']:.3f}" for c in ("raw", "authors", "avec")]
        per = ", ".join(f"{r[f'dev_raw_seed{s}']:.3f}" for s in seeds)
        lines.append(f"| {r['dim']} | {r['model']} | {' | '.join(cells)} | {per} |")
    lines += ["", f"![dev CCC]({rel(Path(res['run']) / 'ccc_dev.png')})", "",
              "**What KD did** (student − visual-only baseline, raw dev CCC, paired by seed): "
              + "; ".join(summ["kd_effect"]) + ". The AVEC chain's bias and scale steps can raise the CCC of a weakly "
              "correlated prediction a lot, so the raw column is the one to compare models on.", ""]
    for dim, models in res["results"].items():
        for name in models:
            run = models[name][seeds[0]]["dir"]
            pngs = sorted(Path(run).glob("pred_dev_*.png"))
            if pngs:
                lines += [f"![{name} {dim}]({rel(pngs[0])})", "",
                          f"**{name}, {dim}, seed {seeds[0]}, {pngs[0].stem.removeprefix('pred_dev_')}.** Prediction "
                          f"vs gold standard over the recording (stateful GRU inference).", ""]
    return "\n".join(lines)


def reproduce(results_dir: Path, device: str = "auto") -> str:
    from common.config import resolve_device
    from m2pkd import pipeline as PL
    args = PL.parser("m2pkd demo", flags=("train",)).parse_args(["--demo", "--set", "progress=false"])
    cfg = PL.resolve(args)
    out = Path(results_dir) / "m2pkd"
    res = PL.demo(cfg, out, resolve_device(device), dims=["arousal"], data_dir=out / "demo_data")
    return section(res, Path(results_dir))
