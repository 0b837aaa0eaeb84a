"""NTDH synthetic Gaussian experiment: `python main.py` (in this folder) or `python gauss/main.py`.

    python main.py                                   # reference default: KL, no mask, 100 runs × 6 γ
    python main.py --losses all --masks none,omega   # the full table
    python main.py --runs 20 --set train.epochs=500 --out /tmp/runs
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install: make `common` and `gauss` importable
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import config as C  # noqa: E402
from common.run import RunDir, cli, seed_everything  # noqa: E402
from gauss import experiment, report  # noqa: E402


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(out=str(HERE / "runs"))
    p.add_argument("--runs", type=int, help="independent runs (seeds) per γ")
    p.add_argument("--losses", help="comma-separated KD methods from kd.methods, or 'all'")
    p.add_argument("--masks", help="comma-separated masks: none, omega")
    p.add_argument("--parity", action="store_const", const=True,
                   help="reproduce the reference's number-changing behaviours (reversed JS, ω not detached)")
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    defaults = HERE / "config.yaml"
    methods = [k for k in C.load_yaml(defaults)["kd"]["methods"] if k != "_open"]
    if args.losses is not None:
        args.losses = methods if args.losses.strip() == "all" else [s.strip() for s in args.losses.split(",") if s]
    if args.masks is not None:
        args.masks = [s.strip() for s in args.masks.split(",") if s.strip()]
    cfg = C.resolve(defaults, args, {"runs": "runs", "losses": "kd.losses", "masks": "kd.masks", "parity": "parity"})
    unknown = [m for m in cfg["kd"]["losses"] if m not in cfg["kd"]["methods"]]
    if unknown:
        raise C.ConfigError(f"kd.losses: unknown method(s) {unknown}; known: {', '.join(cfg['kd']['methods'])}")
    bad = [m for m in cfg["kd"]["masks"] if m not in ("none", "omega")]
    if bad:
        raise C.ConfigError(f"kd.masks: unknown mask(s) {bad}; expected none or omega")
    if cfg["runs"] < 1:
        raise C.ConfigError(f"runs must be ≥ 1, got {cfg['runs']}")
    return cfg


def run(cfg: dict, out: str | Path, device: str = "auto") -> tuple[RunDir, dict]:
    """Run the sweep into a new run directory; returns it and the results."""
    dev = C.resolve_device(device)
    seed_everything(cfg["seed"], cfg["deterministic"])
    rd = RunDir.create(out, cfg["name"], config=cfg, code_from=HERE)
    rd.log(f"run directory {rd.path}")
    results = experiment.run_sweep(cfg, dev, log=rd.log)
    rd.write_csv("summary.csv", results["rows"], experiment.CSV_COLUMNS)
    plots = report.plot(results, rd.path)
    rd.write_summary({"experiment": "gauss", "config": cfg, "seconds": results["seconds"],
                      "rows": results["rows"], "correlations": results["correlations"],
                      "plots": [p.name for p in plots]})
    for r in results["rows"]:
        tag = f"{r['loss']}_{r['mask']}"
        rd.scalar(f"{tag}/delta_mean", r["delta_mean"], r["overlap_dim"])
        rd.scalar(f"{tag}/kd_acc", r["kd_acc"], r["overlap_dim"])
    rd.log(f"done in {results['seconds']:.1f} s; summary.csv, summary.json and plots in {rd.path}")
    rd.close()
    return rd, results


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    run(cfg, args.out, args.device)


if __name__ == "__main__":
    cli(main)
