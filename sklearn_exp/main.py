"""NTDH sklearn experiment with Algorithm-1 input masking: `python main.py` (here) or `python sklearn_exp/main.py`.

    python main.py                                   # reference default: KL, no mask, Alg. 1, 10 runs × 5 γ
    python main.py --losses all --masks none,omega   # the full table
    python main.py --mode random --mask-dim 5 --runs 3 --out /tmp/runs
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install: make `common` and `sklearn_exp` importable
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import config as C  # noqa: E402
from common.synthetic import sweep  # noqa: E402
from common.run import RunDir, cli  # noqa: E402
from sklearn_exp import experiment, figures  # noqa: E402


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(out=str(HERE / "runs"))
    sweep.add_flags(p, "reproduce the reference's number-changing behaviours (scaler leak, same data every run, "
                       "identical Alg.1 init, reversed JS, ω not detached, FitNet regressor and CRD embeddings "
                       "untrained, random mode with replacement)")
    p.add_argument("--mode", help="Algorithm-1 selection: alg1, random or reverse")
    p.add_argument("--mask-dim", type=int, dest="mask_dim", help="teacher (x1) columns kept by Algorithm 1")
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    defaults = HERE / "config.yaml"
    sweep.split_lists(args, [k for k in C.load_yaml(defaults)["kd"]["methods"] if k != "_open"])
    cfg = C.resolve(defaults, args, {**sweep.FLAGS, "mode": "alg1.mode", "mask_dim": "alg1.mask_dim"})
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """What the declared `_checks` of config.yaml cannot say, as one-line ConfigErrors before anything is written."""
    d, a = cfg["data"], cfg["alg1"]
    sweep.check_config(cfg)
    if a["mask_dim"] > d["x_dim"]:
        raise C.ConfigError(f"alg1.mask_dim must lie in [1, data.x_dim={d['x_dim']}], got {a['mask_dim']}")
    if not d["overlaps"] or any(not isinstance(o, int) or not 0 <= o <= d["fixed_dim"] for o in d["overlaps"]):
        raise C.ConfigError(f"data.overlaps must be integers in [0, fixed_dim={d['fixed_dim']}], got {d['overlaps']}")
    if 2 * d["fixed_dim"] > min(d["x_dim"], d["n_features"]):
        raise C.ConfigError(f"data: 2·fixed_dim={2 * d['fixed_dim']} real columns do not fit in x_dim={d['x_dim']} "
                            f"/ n_features={d['n_features']}")


def run(cfg: dict, out: str | Path, device: str = "auto") -> tuple[RunDir, dict]:
    """Run the sweep into a new run directory; returns it and the results."""
    return sweep.run_in_dir(cfg, out, device, HERE, _run)


def _run(cfg: dict, rd: RunDir, dev: torch.device, trainer: str) -> dict:
    results = {**experiment.run_sweep(cfg, dev, log=rd.log), "trainer": trainer}
    rd.write_csv("summary.csv", results["rows"], experiment.CSV_COLUMNS)
    plots = figures.plot(results, rd.path)
    sal = results["saliency"]
    rd.write_summary({"experiment": "sklearn_exp", "config": cfg, "seconds": results["seconds"],
                      "cpu_seconds": results["cpu_seconds"], "threads": results["threads"],
                      "workers": results["workers"], "trainer": results["trainer"],
                      "timings": results["timings"], "cpu_timings": results["cpu_timings"], "rows": results["rows"],
                      "divergence": results["divergence"], "correlations": results["correlations"],
                      "error_distribution": results["error_distribution"],
                      "alg1": {"mode": results["mode"], "mask_dim": results["mask_dim"],
                               "kept_x1": sal["kept_x1"], "kept_x2": sal["kept_x2"],
                               "general_hits_x1": sal["general_hits_x1"].mean(1),
                               "general_hits_x2": sal["general_hits_x2"].mean(1),
                               "joint_teacher_acc": sal["joint_teacher_acc"].mean(1),
                               "joint_student_acc": sal["joint_student_acc"].mean(1)},
                      "plots": [p.name for p in plots]})
    for r in results["rows"]:
        tag = f"{r['loss']}_{r['mask']}"
        rd.scalar(f"{tag}/delta_mean", r["delta_mean"], r["overlap_dim"])
        rd.scalar(f"{tag}/kd_acc", r["kd_acc"], r["overlap_dim"])
        rd.scalar(f"{tag}/masked_student_acc", r["masked_student_acc"], r["overlap_dim"])
    return results


def main(argv=None):
    sweep.main(parse_args, resolve_config, run, argv)


if __name__ == "__main__":
    cli(main)
