"""NYUDepthV2 / NYUCAD semantic scene completion (SSCNet data), optionally with cross-modal KD into a depth student.

    python main.py --demo                               # synthetic scenes on a tiny grid: train + test, CPU minutes
    python main.py --demo --kd                          # RGB-D teacher → depth student (ω-masked KL), plus baseline
    python main.py --model=ddrnet --dataset=nyu --epochs=5 --batch_size=4 --lr=0.01 --lr_adj_n=1
    python main.py --kd --teacher ddrnet_rgbd --teacher-checkpoint runs/.../cpBest_ddrnet_rgbd.pth
    python main.py --resume runs/nyu_ssc_.../         # continue a run (its checkpoints) where it stopped
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install: make `common` and `nyu_ssc` importable
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import config as C  # noqa: E402
from common.run import RunDir, cli, seed_everything  # noqa: E402
from nyu_ssc import engine, report  # noqa: E402

FLAGS = {"model": "model.name", "dataset": "data.dataset", "epochs": "train.epochs", "batch_size": "train.batch_size",
         "workers": "data.workers", "lr": "train.lr", "lr_adj_n": "train.lr_adj_n", "lr_adj_rate": "train.lr_adj_rate",
         "model_name": "name", "parity": "parity", "kd": "kd.enabled", "teacher": "kd.teacher",
         "teacher_checkpoint": "kd.teacher_checkpoint", "amp": "train.amp", "channels_last": "train.channels_last_3d"}


def add_common_flags(p):
    p.set_defaults(out=str(HERE / "runs"))
    p.add_argument("--model", help="ddrnet | ddrnet_rgb | ddrnet_rgbd | aicnet | grfnet | palnet")
    p.add_argument("--dataset", help="nyu | nyucad | debug | demo (paths in config.yaml data.splits)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--model_name", help="run name (run directory prefix)")
    p.add_argument("--parity", action="store_const", const=True,
                   help="the reference's number-changing behaviours (constant LR, clipped projection, per-sample IoU)")
    p.add_argument("--demo", action="store_true", help="synthetic scenes on a tiny grid (configs/demo.yaml)")
    p.add_argument("--amp", action="store_const", const=True, help="CUDA autocast (ignored on CPU)")
    p.add_argument("--channels-last", dest="channels_last", action="store_const", const=True,
                   help="channels_last_3d memory format (CUDA only)")
    return p


def parse_args(argv=None):
    p = add_common_flags(C.base_parser(__doc__.splitlines()[0]))
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr_adj_n", type=int, help="StepLR step size (epochs)")
    p.add_argument("--lr_adj_rate", type=float, help="StepLR gamma")
    p.add_argument("--kd", action="store_const", const=True, help="distil a teacher (kd.teacher) into kd.student")
    p.add_argument("--teacher", help="teacher model name (default ddrnet_rgbd)")
    p.add_argument("--teacher-checkpoint", dest="teacher_checkpoint", help="trained teacher weights")
    p.add_argument("--resume", help="run directory (or a checkpoint inside it) to continue")
    return p.parse_args(argv)


def resolve_config(args, flags=FLAGS) -> dict:
    if getattr(args, "resume", None):
        # continue with the run's own resolved config; --set and flags still apply on top (e.g. more --epochs)
        saved = _resume_dir(args.resume) / "log" / "config.yaml"
        if args.config:
            raise C.ConfigError("--resume uses the run's saved log/config.yaml; combine it with --set, not --config")
        args.config, args.demo = str(saved), False
    if args.demo:
        if args.config:
            raise C.ConfigError("--demo uses configs/demo.yaml; combine it with --set, not --config")
        args.config = str(HERE / "configs" / "demo.yaml")
        args.dataset = None  # --demo wins over the seed scripts' --dataset
    cfg = C.resolve(HERE / "config.yaml", args, {k: v for k, v in flags.items() if hasattr(args, k)})
    engine.check_config(cfg)
    return cfg


def set_threads(cfg: dict) -> None:
    if cfg["threads"] < 0:
        raise C.ConfigError(f"threads: expected 0 (torch default) or a positive count, got {cfg['threads']}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])


def _resume_dir(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent.parent if p.parent.name == "checkpoint" else p.parent
    if not (p / "checkpoint").is_dir():
        raise C.DataError(f"{path}: not a run directory (expected a checkpoint/ folder)")
    return p


def run(cfg: dict, out, device: str = "auto", resume: str | None = None) -> tuple[RunDir, dict]:
    """Train (and distil) as configured into a new run directory (or `resume`); returns it and the summary."""
    dev = C.resolve_device(device)
    set_threads(cfg)
    seed_everything(cfg["seed"], cfg["deterministic"])
    rd = RunDir.open(_resume_dir(resume)) if resume else RunDir.create(out, cfg["name"], config=cfg, code_from=HERE)
    rd.log(f"run directory {rd.path} (device {dev})")
    if dev.type != "cuda" and (cfg["train"]["amp"] or cfg["train"]["channels_last_3d"]):
        rd.log("train.amp / train.channels_last_3d apply to CUDA only: ignored on this CPU run")
    dirs = engine.data_dirs(cfg, rd.path, log=rd.log)
    loaders = engine.make_loaders(cfg, dirs)
    trained = {}
    kd_cfg = cfg["kd"]
    if kd_cfg["enabled"]:
        teacher = engine.build(cfg, kd_cfg["teacher"], dev)
        if kd_cfg["teacher_checkpoint"]:
            engine.load_weights(teacher, kd_cfg["teacher_checkpoint"])
            rd.log(f"teacher {kd_cfg['teacher']} loaded from {kd_cfg['teacher_checkpoint']}")
        else:
            rd.log(f"no kd.teacher_checkpoint: training the {kd_cfg['teacher']} teacher first")
            seed_everything(cfg["seed"], cfg["deterministic"])
            trained["teacher"] = engine.fit(cfg, kd_cfg["teacher"], "teacher", loaders, dev, rd,
                                            epochs=kd_cfg["teacher_epochs"] or None, log=rd.log)
            engine.load_weights(teacher, trained["teacher"]["best_path"])
        if kd_cfg["baseline"]:
            seed_everything(cfg["seed"], cfg["deterministic"])
            trained["baseline"] = engine.fit(cfg, kd_cfg["student"], "baseline", loaders, dev, rd, log=rd.log)
        seed_everything(cfg["seed"], cfg["deterministic"])
        trained["student"] = engine.fit(cfg, kd_cfg["student"], "student", loaders, dev, rd,
                                        kd=engine.KD(cfg, teacher), log=rd.log)
    else:
        name = cfg["model"]["name"]
        trained[name] = engine.fit(cfg, name, name, loaders, dev, rd, log=rd.log)
    summary = report.finish(cfg, rd, trained)
    rd.close()
    return rd, summary


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    run(cfg, args.out, args.device, args.resume)


if __name__ == "__main__":
    cli(main)
