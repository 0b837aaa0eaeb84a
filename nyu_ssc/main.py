"""NYUDepthV2 / NYUCAD semantic scene completion (SSCNet data), optionally with cross-modal KD into a depth student.

    python main.py --demo                               # synthetic scenes on a tiny grid: train, select, test
    python main.py --demo --kd                          # RGB-D teacher → depth student (ω-masked KL), plus baseline
    python main.py --demo --kd --teacher ddrnet_rgb     # the strictly cross-modal pair: RGB teacher → depth student
    python main.py --model=ddrnet --dataset=nyu --epochs=50 --batch_size=4 --lr=0.01
    python main.py --kd --teacher ddrnet_rgbd --teacher-checkpoint runs/.../cpBest_teacher.pth
    python main.py --resume [runs/nyu_ssc_...]          # continue a run (no value: the newest run under --out)
    torchrun --nproc_per_node 2 main.py ...             # DDP (run_SSC_train.sh launches it from NPROC_PER_NODE)
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install: make `common` and `nyu_ssc` importable
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import config as C  # noqa: E402
from common import ddp  # noqa: E402
from common.run import RunDir, cli  # noqa: E402
from common.train import add_resume_flag, check_resume_config, resume_dir  # noqa: E402
from nyu_ssc import engine, outputs, trainer  # noqa: E402

FLAGS = {"model": "model.name", "dataset": "data.dataset", "epochs": "train.epochs", "batch_size": "train.batch_size",
         "workers": "data.workers", "lr": "train.lr", "lr_adj_n": "train.lr_adj_n", "lr_adj_rate": "train.lr_adj_rate",
         "model_name": "name", "parity": "parity", "kd": "kd.enabled", "teacher": "kd.teacher",
         "teacher_checkpoint": "kd.teacher_checkpoint", "amp": "train.amp", "channels_last": "train.channels_last_3d",
         "seed": "seed"}
# what a run is: a resume may extend epochs or change workers, never these (common.train.check_resume_config)
IDENTITY = ("seed", "parity", "grid", "convert", "model", "kd", "data.dataset", "data.root", "data.splits",
            "data.val_fraction", "data.max_items", "data.demo", "train.class_weights", "train.batch_size")


def add_common_flags(p):
    p.set_defaults(out=str(HERE / "runs"))
    p.add_argument("--model", help="ddrnet | ddrnet_rgb | ddrnet_rgbd | aicnet | grfnet | palnet")
    p.add_argument("--dataset", help="nyu | nyucad | debug | demo (paths in config.yaml data.splits)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--model_name", help="run name (run directory prefix)")
    p.add_argument("--seed", type=int)
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
    add_resume_flag(p)
    return p.parse_args(argv)


def _resolve(args, flags) -> dict:
    if args.demo and not args.config:
        args.config = str(HERE / "configs" / "demo.yaml")
        args.dataset = None  # --demo wins over the seed scripts' --dataset
    elif args.demo:
        raise C.ConfigError("--demo uses configs/demo.yaml; combine it with --set, not --config")
    cfg = C.resolve(HERE / "config.yaml", args, {k: v for k, v in flags.items() if hasattr(args, k)})
    engine.check_config(cfg)
    return cfg


def resolve_config(args, flags=FLAGS) -> dict:
    """The run's config; with --resume the saved log/config.yaml with the flags / --set on top, refused (naming the
    keys) when they change what the run is. Sets `args.run_dir` (the run to continue, or None)."""
    args.run_dir = None
    if not getattr(args, "resume", None):
        return _resolve(args, flags)
    if args.config:
        raise C.ConfigError("--resume uses the run's saved log/config.yaml; combine it with --set, not --config")
    name = args.model_name or C.load_yaml(HERE / "config.yaml")["name"]
    args.run_dir = resume_dir(args.resume, args.out, name)
    saved_path = args.run_dir / "log" / "config.yaml"
    args.config, args.demo = str(saved_path), False
    cfg = _resolve(args, flags)
    check_resume_config(C.load_yaml(saved_path), cfg, IDENTITY)
    return cfg


def set_threads(cfg: dict) -> None:
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])


def open_run_dir(cfg: dict, out, run_dir: Path | None) -> RunDir:
    """Rank 0 creates (or reopens, to resume) and locks the run directory; the other ranks get its path, disabled."""
    path = None
    if ddp.is_main():
        rd = RunDir.open(run_dir) if run_dir else RunDir.create(out, cfg["name"], config=cfg, code_from=HERE)
        rd.lock()
        path = str(rd.path)
    path = ddp.broadcast_object(path)
    return rd if ddp.is_main() else RunDir(path, enabled=False)


def run(cfg: dict, out, device: str = "auto", resume: Path | None = None) -> tuple[RunDir, dict]:
    """Train (and distil) as configured into a new run directory (or the `resume` one); returns it and the summary."""
    env = ddp.init_distributed(None if device == "auto" else device)
    dev = ddp.device_for(env, device)
    set_threads(cfg)
    rd = open_run_dir(cfg, out, resume)
    try:
        rd.log(f"run directory {rd.path} (device {dev}, {ddp.world_size()} process(es))")
        if dev.type != "cuda" and (cfg["train"]["amp"] or cfg["train"]["channels_last_3d"]):
            rd.log("train.amp / train.channels_last_3d apply to CUDA only: ignored on this CPU run")
        warning = trainer.lr_warning(cfg["train"], cfg["train"]["epochs"], cfg["parity"])
        if warning:
            rd.log(warning)
        sets = engine.datasets(cfg, engine.data_dirs(cfg, rd.path, log=rd.log))
        ctx = trainer.Context(cfg, dev, rd, sets, rd.log)
        trained = phases(ctx)
        summary = outputs.finish(cfg, rd, trained) if ddp.is_main() else {}
    finally:
        rd.close()
    ddp.barrier()
    return rd, summary


def phases(ctx: trainer.Context) -> dict:
    """Without KD: the configured model. With KD: the teacher (trained here or loaded), the no-KD baseline, the KD
    student, and with kd.ablate_mask the student with the other mask; teacher and baseline logits on the
    validation scenes go to the NTD advisor."""
    cfg, kd_cfg = ctx.cfg, ctx.cfg["kd"]
    if not kd_cfg["enabled"]:
        name = cfg["model"]["name"]
        return {name: trainer.fit(ctx, name, name, name)}
    trained = {}
    if kd_cfg["teacher_checkpoint"]:
        teacher = engine.build(cfg, kd_cfg["teacher"], ctx.device)
        engine.load_weights(teacher, kd_cfg["teacher_checkpoint"])
        ctx.log(f"teacher {kd_cfg['teacher']} loaded from {kd_cfg['teacher_checkpoint']}")
    else:
        ctx.log(f"no kd.teacher_checkpoint: training the {kd_cfg['teacher']} teacher first")
        trained["teacher"] = trainer.fit(ctx, kd_cfg["teacher"], "teacher", "teacher",
                                         epochs=kd_cfg["teacher_epochs"] or None)
        teacher = trained["teacher"]["model"]           # the selected weights, on every rank (no file read)
    save_ntd_logits(ctx, teacher, "teacher")
    if kd_cfg["baseline"]:
        trained["baseline"] = trainer.fit(ctx, kd_cfg["student"], "baseline", "student")
        save_ntd_logits(ctx, trained["baseline"]["model"], "probe")
    mask = kd_cfg["loss"]["mask"]
    trained["student"] = trainer.fit(ctx, kd_cfg["student"], "student", "student", kd=engine.KD(cfg, teacher))
    if kd_cfg["ablate_mask"]:
        other = "none" if mask == "omega" else "omega"
        trained[f"student_{other}"] = trainer.fit(ctx, kd_cfg["student"], f"student_{other}", "student",
                                                  kd=engine.KD(cfg, teacher, mask=other))
    return trained


def save_ntd_logits(ctx: trainer.Context, model, role: str) -> None:
    """Per-voxel logits and labels on the validation scenes for `common.ntd` (role teacher | probe)."""
    from common import ntd
    z, y = engine.voxel_logits(model, engine.eval_loader(ctx.cfg, ctx.sets["val"]), ctx.cfg, ctx.device,
                               ctx.cfg["eval"]["ntd_rows"], ctx.cfg["seed"])
    if ddp.is_main():
        path = ntd.save_logits(ctx.rd.path, role, z, y, max_rows=ctx.cfg["eval"]["ntd_rows"],
                               source=f"nyu_ssc {type(model).__name__}, labelled voxels of the validation scenes")
        ctx.log(f"NTD advisor: {role} logits of {len(y)} validation voxels written to {path}")


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    try:
        run(cfg, args.out, args.device, args.run_dir)
    finally:
        ddp.destroy()


if __name__ == "__main__":
    cli(main)
