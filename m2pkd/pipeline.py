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
from common.run import RunDir, seed_everything
from m2pkd import data as D
from m2pkd import postprocess as PP
from m2pkd import preprocess as P
from m2pkd import train as T

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yaml"
DEMO_CONFIG = HERE / "configs" / "demo.yaml"
FLAGS = {"data": "data.root", "work": "data.work", "dim": "dim", "parity": "parity",
         "frame_retention": "faces.frame_retention", "teacher": "kd.teacher", "visual_weights": "model.visual_weights",
         "audio_weights": "model.audio_weights", "steps": "train.steps", "seed": "seed"}


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
        p.add_argument("--visual-weights", help="FER2013 VGG19 checkpoint (model.visual_weights)")
        p.add_argument("--audio-weights", help="torchvision ResNet18 state dict (model.audio_weights)")
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
    rep = fn(cfg, log=log)
    log(f"{step}: {len(rep['done'])} done, {len(rep['skipped'])} already done (skipped), "
        f"{len(rep['failed'])} unreadable or missing" + (f": {', '.join(rep['failed'])}" if rep["failed"] else ""))
    return rep


def train(cfg: dict, role: str, out, device) -> tuple[RunDir, dict]:
    D.root_dir(cfg)
    if role == "student" and not cfg["kd"]["teacher"]:
        raise C.ConfigError("kd.teacher: the student needs a teacher checkpoint (--teacher RUN_DIR_OR_FILE)")
    seed_everything(cfg["seed"], cfg["deterministic"])
    rd = RunDir.create(out, f"{role}_{cfg['dim']}", config=cfg, code_from=HERE)
    rd.log(f"run directory {rd.path}")
    try:
        summary = T.run(cfg, role, rd, device)
    finally:
        rd.close()
    return rd, summary


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


def demo(cfg: dict, out, device, dims=None, data_dir=None, log=print) -> dict:
    """Write the demo tree, run steps 1-6, return {"run": demo dir, "rows": CCC table rows, "runs": {...}}."""
    dims = list(dims or [cfg["dim"]])
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="m2pkd_demo_"))
    cfg = {**cfg, "data": {**cfg["data"], "root": str(root), "work": None}}
    if not (root / "recordings_video").is_dir():
        D.make_demo(root, cfg)
    log(f"demo data: {root}")
    for step in ("faces", "audio", "melspec", "csv"):
        run_step(step, cfg, log)
    top = RunDir.create(out, "demo", config=cfg, code_from=HERE)
    rows, runs = [], {}
    try:
        for dim in dims:
            c = {**cfg, "dim": dim}
            for role in ("baseline", "teacher", "student"):
                if role == "student":
                    c = {**c, "kd": {**c["kd"], "teacher": str(runs[(dim, "teacher")]["dir"])}}
                rd, summ = train(c, role, top.path, device)
                tab = plot_ccc(rd.path, c, log)
                runs[(dim, role)] = {"dir": rd.path, "summary": summ, "table": tab}
                rows.append({"dim": dim, "model": role, "selection_ccc": summ["selection_ccc"],
                             "dev_raw": tab["raw"]["mean"], "dev_raw_concat": tab["raw"]["concat"],
                             "dev_authors": tab["authors"]["mean"], "dev_avec": tab["avec"]["mean"],
                             "best_step": summ["best_step"], "seconds": summ["seconds"]})
        top.write_csv("ccc_table.csv", rows)
        plots.grouped_bars(top.file("ccc_dev.png"), [f"{r['model']}\n{r['dim']}" for r in rows],
                           {"raw": ([r["dev_raw"] for r in rows],), "authors": ([r["dev_authors"] for r in rows],),
                            "AVEC": ([r["dev_avec"] for r in rows],)},
                           ylabel="dev CCC (mean over recordings)", title="M2PKD demo: dev CCC")
        top.write_summary({"experiment": "m2pkd", "demo_data": str(root), "protocol": T.splits(cfg)["protocol"],
                           "rows": rows, "runs": {f"{d}/{r}": str(v["dir"]) for (d, r), v in runs.items()}})
        log(table_text(rows, T.splits(cfg)["protocol"]))
    finally:
        top.close()
    return {"run": top.path, "rows": rows, "runs": runs, "data": root}


def table_text(rows, protocol) -> str:
    lines = [f"dev CCC (mean over recordings; {protocol})",
             f"{'dim':8} {'model':9} {'select':>7} {'raw':>7} {'concat':>7} {'authors':>8} {'avec':>7}"]
    lines += [f"{r['dim']:8} {r['model']:9} {r['selection_ccc']:7.4f} {r['dev_raw']:7.4f} {r['dev_raw_concat']:7.4f} "
              f"{r['dev_authors']:8.4f} {r['dev_avec']:7.4f}" for r in rows]
    return "\n".join(lines)
