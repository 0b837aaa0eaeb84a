"""The command-line side shared by the step scripts (face_detector.py, audio_extract.py, audio_melspec.py,
create_csv.py, mmpkd.py, plot_ccc.py, main.py): config layering, the run of each step, plot_ccc, and the demo."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import config as C
from common import plots
from common.run import RunDir, generator_dir
from common.train import add_resume_flag
from m2pkd import data as D
from m2pkd import postprocess as PP
from m2pkd import preprocess as P
from m2pkd import trainer as T

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yaml"
DEMO_CONFIG = HERE / "configs" / "demo.yaml"
FLAGS = {"data": "data.root", "work": "data.work", "dim": "dim", "parity": "parity",
         "frame_retention": "faces.frame_retention", "teacher": "kd.teacher", "visual_weights": "model.visual_weights",
         "audio_weights": "model.audio_weights", "allow_random_init": "model.allow_random_init",
         "steps": "train.steps", "seed": "seed"}


def parser(doc: str, flags=()) -> argparse.ArgumentParser:
    p = C.base_parser(doc)
    p.set_defaults(out=str(HERE / "runs"))
    p.add_argument("--demo", action="store_true", help="use configs/demo.yaml (the small demo's sizes)")
    p.add_argument("--data", help="RECOLA root (data.root)")
    p.add_argument("--work", help="derived files (data.work; default <data>/processed)")
    p.add_argument("--parity", action="store_const", const=True, help="the reference's number-changing behaviours")
    if "faces" in flags:
        p.add_argument("--frame-retention", action="store_const", const=True,
                       help="no face: keep the last detected face instead of a black frame")
    if "train" in flags:
        p.add_argument("--dim", choices=D.DIMS, help="arousal or valence (dim)")
        p.add_argument("--teacher", help="teacher run directory or checkpoint (kd.teacher), for the student")
        p.add_argument("--visual-weights", help="FER2013 VGG19 checkpoint or imagenet (model.visual_weights)")
        p.add_argument("--audio-weights", help="torchvision ResNet18 state dict or imagenet (model.audio_weights)")
        p.add_argument("--allow-random-init", action="store_const", const=True,
                       help="train from random weights where no pretrained weights are given")
        add_resume_flag(p)
        p.add_argument("--steps", type=int, help="training steps (train.steps)")
        p.add_argument("--seed", type=int)
    return p


def resolve(args) -> dict:
    """defaults ← configs/demo.yaml (with --demo) ← --config ← --set ← flags."""
    cfg = C.resolve(CONFIG, args, FLAGS, layers=[DEMO_CONFIG] if getattr(args, "demo", False) else [])
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    return cfg


def run_step(step: str, cfg: dict, log=print) -> dict:
    fn = {"faces": P.extract_faces, "audio": P.extract_audio, "melspec": P.make_specs, "csv": P.make_csvs}[step]
    D.root_dir(cfg)
    recs = D.recordings(cfg)
    if not recs:
        raise C.ConfigError("data.train, data.dev: no recordings named; nothing to process")
    rep = fn(cfg, log=log)
    log(f"{step}: {len(rep['done'])} done, {len(rep['skipped'])} already done (skipped), "
        f"{len(rep['failed'])} failed" + (f": {', '.join(rep['failed'])}" if rep["failed"] else ""))
    if rep["failed"]:
        first = next(iter(rep["failed"].values()))
        raise C.DataError(f"{step}: {len(rep['failed'])} of {len(recs)} recordings failed "
                          f"({len(rep['done']) + len(rep['skipped'])} processed); first: {first}")
    return rep


def train(cfg: dict, role: str, out, device, resume=None) -> tuple[RunDir, dict]:
    D.root_dir(cfg)
    return T.fit(cfg, role, out, device, resume=resume)


def plot_ccc(run_dir, cfg: dict, log=print) -> dict:
    """CCC table (raw / authors / AVEC) of one training run, written to ccc_postprocessed.csv, plus a PNG of
    prediction vs gold standard per dev recording; returns the table."""
    run_dir = Path(run_dir)
    preds = T.load_predictions(run_dir)
    tab = PP.ccc_table(preds, cfg)
    rows = []
    for chain in ("raw", "authors", "avec"):
        r = tab[chain]
        rows.append({"chain": chain, "mean_over_recordings": r["mean"], "concatenated": r["concat"],
                     **{f"ccc_{k}": v for k, v in r["per_recording"].items()}})
    import csv
    with open(run_dir / "ccc_postprocessed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    fps = 1000.0 / cfg["data"]["frame_ms"]
    for rec, (p, g) in preds["dev"].items():
        t = np.arange(len(g)) / fps
        fig, ax = plots.figure(figsize=(7, 3))
        ax.plot(t, g, "k", lw=1.5, label="gold standard")
        ax.plot(t, p, lw=1, label=f"raw (CCC {tab['raw']['per_recording'][rec]:.3f})")
        ax.plot(t, tab["avec"]["series"][rec][0], lw=1, label=f"AVEC chain ({tab['avec']['per_recording'][rec]:.3f})")
        ax.set(xlabel="time (s)", ylabel=run_dir.name.split("_")[1] if "_" in run_dir.name else "",
               title=f"{run_dir.name}: {rec}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / f"pred_dev_{rec}.png", dpi=100)
    a = cfg["postprocess"]["authors"]
    log(f"{run_dir.name}: dev CCC raw {tab['raw']['mean']:.4f} (concatenated {tab['raw']['concat']:.4f}); "
        f"authors ×{a['scale']}, shift {a['shift']}, box {a['box']}: {tab['authors']['mean']:.4f}; "
        f"AVEC chain {({k: v for k, v in tab['avec_params'].items() if k != 'fitted_ccc'})}: "
        f"{tab['avec']['mean']:.4f}")
    return tab


def demo_models(cfg) -> list[tuple[str, str | None]]:
    """(role, KD weighting) of each model the demo trains per seed: baseline, teacher, one student per weighting."""
    return [("baseline", None), ("teacher", None)] + [("student", w) for w in cfg["demo"]["weightings"]]


def model_name(role: str, weighting: str | None) -> str:
    return f"student_{weighting}" if weighting else role


def demo_data(cfg, data_dir, log) -> Path:
    """The demo tree: a new temporary directory, or `data_dir` (new, empty, or written by an earlier demo)."""
    root = Path(tempfile.mkdtemp(prefix="m2pkd_demo_")) if data_dir is None else Path(data_dir)
    reuse = (root / "recordings_video").is_dir()
    generator_dir(root, "m2pkd demo data")
    if not reuse:
        D.make_demo(root, cfg)
    log(f"demo data: {root}" + (" (written by an earlier demo; reused)" if reuse else ""))
    return root


def demo(cfg: dict, out, device, dims=None, data_dir=None, log=print) -> dict:
    """Write the demo tree, run steps 1-3 once, then for every dimension and every seed of demo.seeds train the
    baseline, the teacher and one student per weighting of demo.weightings, and post-process each (step 6).
    Returns {"run": demo dir, "data": tree, "results": {dim: {model: {seed: row}}}, "summary": summary.json}."""
    dims = list(dims or [cfg["dim"]])
    root = demo_data(cfg, data_dir, log)
    cfg = {**cfg, "data": {**cfg["data"], "root": str(root), "work": None}}
    for step in ("faces", "audio", "melspec", "csv"):
        run_step(step, cfg, log)
    top = RunDir.create(out, "demo", config=cfg, code_from=HERE)
    results: dict = {}
    try:
        for dim in dims:
            for seed in cfg["demo"]["seeds"]:
                c = {**cfg, "dim": dim, "seed": seed}
                for role, w in demo_models(cfg):
                    cr = c if role != "student" else {**c, "kd": {**c["kd"], "weighting": w, "teacher": str(
                        results[dim]["teacher"][seed]["dir"])}}
                    rd, summ = train(cr, role, top.path, device)
                    tab = plot_ccc(rd.path, cr, log)
                    results.setdefault(dim, {}).setdefault(model_name(role, w), {})[seed] = {
                        "dir": rd.path, "selection_ccc": summ["selection_ccc"], "dev_raw": tab["raw"]["mean"],
                        "dev_raw_concat": tab["raw"]["concat"], "dev_authors": tab["authors"]["mean"],
                        "dev_avec": tab["avec"]["mean"], "best_step": summ["best_step"], "seconds": summ["seconds"]}
        summary = demo_summary(cfg, results, root)
        top.write_csv("ccc_table.csv", summary["table"])
        demo_plot(top.file("ccc_dev.png"), summary["table"])
        top.write_summary(summary)
        text = table_text(summary)
        top.file("ccc_table.txt").write_text(text + "\n")
        log(text)
    finally:
        top.close()
    return {"run": top.path, "data": root, "results": results, "summary": summary}


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def demo_summary(cfg, results: dict, root) -> dict:
    """summary.json of the demo: seeds, per dimension and model (with its KD weighting) the per-seed dev CCC and its
    mean ± sd (sample sd over seeds), the table rows, and what KD did (student − baseline, paired by seed)."""
    seeds = list(cfg["demo"]["seeds"])
    per, table, verdict = {}, [], []
    for dim, models in results.items():
        per[dim] = {}
        for name, rows in models.items():
            entry = {"weighting": name.removeprefix("student_") if name.startswith("student_") else None}
            for col in ("dev_raw", "dev_authors", "dev_avec", "selection_ccc"):
                m, sd = _mean_sd(rows[s][col] for s in seeds)
                entry[col] = {"per_seed": {str(s): rows[s][col] for s in seeds}, "mean": m, "sd": sd}
            per[dim][name] = entry
            cols = {f"{c}_{k}": entry[c][k] for c in ("dev_raw", "dev_authors", "dev_avec") for k in ("mean", "sd")}
            table.append({"dim": dim, "model": name, **cols, **{f"dev_raw_seed{s}": rows[s]["dev_raw"] for s in seeds}})
        base = models["baseline"]
        for name in (n for n in models if n.startswith("student_")):
            diff = [models[name][s]["dev_raw"] - base[s]["dev_raw"] for s in seeds]
            m, sd = _mean_sd(diff)
            verdict.append(f"{dim}, {name}: dev CCC {m:+.3f} ± {sd:.3f} vs the visual-only baseline (paired by seed; "
                           f"higher in {sum(d > 0 for d in diff)} of {len(seeds)} seeds)")
    return {"experiment": "m2pkd", "demo_data": str(root), "protocol": T.splits(cfg)["protocol"], "seeds": seeds,
            "metric": "dev CCC, mean over dev recordings (raw, and after the authors' / the AVEC post-processing)",
            "results": per, "table": table, "kd_effect": verdict}


def demo_plot(path, table: list[dict]) -> None:
    labels = [f"{r['model']}\n{r['dim']}" for r in table]
    plots.grouped_bars(path, labels, {c: ([r[f"dev_{c}_mean"] for r in table], [r[f"dev_{c}_sd"] for r in table])
                                      for c in ("raw", "authors", "avec")},
                       ylabel="dev CCC (mean over recordings; ± sd over seeds)", title="M2PKD demo: dev CCC")


def table_text(summary: dict) -> str:
    seeds = summary["seeds"]
    lines = [f"dev CCC, mean over dev recordings, mean ± sd over seeds {seeds} ({summary['protocol']})",
             f"{'dim':8} {'model':15} {'raw':>15} {'authors':>15} {'avec':>15}   raw per seed"]
    for r in summary["table"]:
        cells = [f"{r[f'dev_{c}_mean']:7.3f} ± {r[f'dev_{c}_sd']:.3f}" for c in ("raw", "authors", "avec")]
        lines.append(f"{r['dim']:8} {r['model']:15} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}   "
                     + " ".join(f"{r[f'dev_raw_seed{s}']:.3f}" for s in seeds))
    lines += ["what KD did:"] + [f"  {v}" for v in summary["kd_effect"]]
    return "\n".join(lines)
