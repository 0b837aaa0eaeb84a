"""NTDH / MFH synthetic Gaussian experiments: `python main.py` (in this folder) or `python gauss/main.py`.

    python main.py                                   # reference default (= --preset ntdh): KL, no mask, 100 runs × 6 γ
    python main.py --losses all --masks none,omega   # the full table
    python main.py --preset mfh_gamma                # MFH Figure 2; also mfh_alpha (Figure 3), mfh_modify_gamma (Table 2)
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
from common.synthetic import sweep  # noqa: E402
from common.run import RunDir, cli  # noqa: E402
from gauss import data, experiment, figures, modify  # noqa: E402

PRESETS = HERE / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(out=str(HERE / "runs"))
    p.add_argument("--preset", help=f"a configuration of configs/ ({', '.join(presets())}), applied before --config")
    sweep.add_flags(p, "reproduce the reference's number-changing behaviours (reversed JS, ω not detached, FitNet "
                       "regressor and CRD embeddings untrained; "
                       "mfh_modify_gamma: regular KD with swapped inputs, random columns with replacement)")
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    defaults = HERE / "config.yaml"
    preset = getattr(args, "preset", None)
    if preset is not None and preset not in presets():
        raise C.ConfigError(f"--preset: unknown preset {preset!r}; available: {', '.join(presets())}")
    sweep.split_lists(args, [k for k in C.load_yaml(defaults)["kd"]["methods"] if k != "_open"])
    # config.yaml ← preset ← --config ← --set ← flags, each layer validated against config.yaml
    cfg = C.resolve(defaults, args, sweep.FLAGS, layers=[PRESETS / f"{preset}.yaml"] if preset else [])
    sweep.check_config(cfg)
    check(cfg)
    return cfg


def check(cfg: dict) -> None:
    """What the declared `_checks` of config.yaml cannot say, as one-line ConfigErrors before anything is written."""
    d, m = cfg["data"], cfg["modify"]

    def need(ok: bool, msg: str):
        if not ok:
            raise C.ConfigError(msg)

    need(cfg["workers"] == 1 or cfg["data"]["generator"] != "modify_gamma",
         "workers: the modify_gamma table runs in one process (a few seconds); use workers: 1")
    settings = {"increase_gamma": "overlaps", "increase_alpha": "exclusive_dims", "modify_gamma": "xs2_dims"}
    key = settings[d["generator"]]
    need(bool(d[key]) and all(isinstance(v, int) and not isinstance(v, bool) for v in d[key]),
         f"data.{key}: expected a non-empty list of integers, got {d[key]!r}")
    if d["generator"] == "modify_gamma":
        need(bool(m["modes"]) and len(set(m["modes"])) == len(m["modes"]),
             f"modify.modes: expected distinct entries of {', '.join(modify.MODES)}, got {m['modes']!r}")
        need(not cfg["parity"] or d["x1_dim"] == d["x2_dim"], "parity with modify_gamma swaps x1 and x2 for the "
             f"regular KD student, so it needs x1_dim == x2_dim, got {d['x1_dim']} and {d['x2_dim']}")
    # the generators' own checks (dimensions that must fit), on a one-sample draw
    small = dict(n_train=1, n_test=1, x1_dim=d["x1_dim"], x2_dim=d["x2_dim"], a_dim=d["a_dim"], decision=d["decision"])
    try:
        if d["generator"] == "increase_gamma":
            data.increase_gamma([0], d["overlaps"], xs1_dim=d["xs1_dim"], xs2_dim=d["xs2_dim"], **small)
        elif d["generator"] == "increase_alpha":
            data.increase_alpha([0], d["exclusive_dims"], xs2_dim=d["xs2_dim"], **small)
        else:
            data.modify_gamma([0], d["xs2_dims"], xs1_dim=d["xs1_dim"], **small)
    except ValueError as e:
        raise C.ConfigError(f"data ({d['generator']}): {e}") from None


def run(cfg: dict, out: str | Path, device: str = "auto") -> tuple[RunDir, dict]:
    """Run the sweep into a new run directory; returns it and the results."""
    return sweep.run_in_dir(cfg, out, device, HERE, _run)


def _run(cfg: dict, rd: RunDir, dev: torch.device, trainer: str) -> dict:
    generator = cfg["data"]["generator"]
    if generator == "modify_gamma":
        results = modify.run_table(cfg, dev, log=rd.log)
        rd.write_csv("summary.csv", results["rows"], modify.CSV_COLUMNS)
        plots = figures.plot_modify(results, rd.path)
        extra = {"identification": results["identification"], "chance": results["chance"]}
    else:
        results = experiment.run_sweep(cfg, dev, log=rd.log)
        rd.write_csv("summary.csv", results["rows"], experiment.csv_columns(generator))
        rd.write_csv("runs.csv", experiment.run_rows(results, cfg["seed"]))
        plots = figures.plot(results, rd.path)
        extra = {"divergence": results["divergence"], "correlations": results["correlations"],
                 "error_distribution": results["error_distribution"]}
    rd.write_summary({"experiment": "gauss", "generator": generator, "config": cfg, "seconds": results["seconds"],
                      "rows": results["rows"], **extra, "plots": [p.name for p in plots]})
    for r in results["rows"]:
        if generator == "modify_gamma":
            tag = f"{r['loss']}_{r['mask']}_{r['mode']}"
            rd.scalar(f"{tag}/student_diff_mean", r["student_diff_mean"], r["xs2_dim"])
            rd.scalar(f"{tag}/mg_kd_acc", r["mg_kd_acc"], r["xs2_dim"])
            continue
        tag, step = f"{r['loss']}_{r['mask']}", r.get("exclusive_dim", r["overlap_dim"])
        rd.scalar(f"{tag}/delta_mean", r["delta_mean"], step)
        rd.scalar(f"{tag}/kd_acc", r["kd_acc"], step)
    return results


def main(argv=None):
    sweep.main(parse_args, resolve_config, run, argv)


if __name__ == "__main__":
    cli(main)
