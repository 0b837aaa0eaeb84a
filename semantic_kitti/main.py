"""NTDH SemanticKITTI: camera teacher → LiDAR student with per-pixel distillation (`bash run.sh` or `python main.py`).

    python main.py --demo                                   # synthetic sequence, teacher then student, on the CPU
    python main.py config_server_kitti.yaml --stage teacher # one stage, the YAML's settings
    bash run.sh my.yaml                                     # torchrun, one process per GPU of the YAML's gpu list
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install: make `common` and this package importable
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import config as C  # noqa: E402
from common import ddp  # noqa: E402
from common.run import cli, seed_everything  # noqa: E402
from semantic_kitti import demo  # noqa: E402
from semantic_kitti.option import Option  # noqa: E402

DEFAULTS = HERE / "config_server_kitti.yaml"
DEMO = HERE / "configs" / "demo.yaml"


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(out=None)
    p.add_argument("config_file", nargs="?", help="YAML merged over config_server_kitti.yaml (same as --config)")
    p.add_argument("--stage", choices=["teacher", "student", "both"], help="which network(s) to train")
    p.add_argument("--demo", action="store_true",
                   help="write a small synthetic sequence (configs/demo.yaml), then train and evaluate on it")
    p.add_argument("--parity", action="store_const", const=True, help="the reference's number-changing behaviours")
    p.add_argument("--print-gpu", action="store_true", help="print the resolved gpu list and the number of GPUs here (for run.sh), then exit")
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    if args.config_file:
        if args.config:
            raise C.ConfigError("give the YAML either as the positional argument or with --config, not both")
        args.config = args.config_file
    if args.demo:
        if args.config:
            raise C.ConfigError("--demo uses configs/demo.yaml; change it with --set KEY=VALUE instead of --config")
        args.config = str(DEMO)
    if args.out is not None:
        args.set = [f"save_path={args.out}"] + list(args.set)
    return C.resolve(DEFAULTS, args, {"stage": "stage", "parity": "parity"})


def select_device(opt: Option, want: str) -> torch.device:
    env = ddp.dist_env()
    if want and want != "auto":
        return ddp.device_for(env, want)
    if opt.gpus is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise C.ConfigError(f"gpu: the YAML lists GPUs {opt.gpus} but CUDA is not available; set gpu: cpu")
    if env.distributed and env.world_size != len(opt.gpus):
        raise C.ConfigError(f"gpu: the YAML lists {len(opt.gpus)} GPU(s) but torchrun started {env.world_size} "
                            f"process(es); launch with bash run.sh")
    return ddp.device_for(env, "cuda")


def run(cfg: dict, device: str = "auto", write_demo: bool = False) -> dict:
    """Run the configured stage(s); returns {"teacher": summary, "student": summary} for the stages run."""
    from semantic_kitti.trainer import TeacherTrainer
    from semantic_kitti.trainer_student import StudentTrainer
    opt = Option(cfg)
    if opt.stage == "both" and (cfg["checkpoint"] or cfg["pretrained_model"]):
        raise C.ConfigError("checkpoint / pretrained_model: name one stage (--stage teacher|student) to resume or "
                            "initialise; with stage both they would be ambiguous")
    dev = select_device(opt, device)
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    try:
        env = ddp.init_distributed(dev)
    except BaseException:
        torch.set_num_threads(threads)
        raise
    seed_everything(cfg["seed"], cfg["deterministic"])
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
    try:
        if write_demo:
            d = cfg["demo"]
            if env.is_main:
                demo.write_demo(cfg["data_root"], cfg["train_sequences"], cfg["val_sequences"], d["frames"],
                                seed=cfg["seed"], image_size=tuple(d["image_size"]), beams=d["beams"],
                                azimuths=d["azimuths"])
                print(f"demo data written to {cfg['data_root']}", flush=True)
            ddp.barrier()
        out = {}
        if opt.stage in ("teacher", "both"):
            out["teacher"] = TeacherTrainer(opt, dev, "[teacher] ").run()
        if opt.stage in ("student", "both"):
            # the same seed as a student run on its own: initialisation and data order do not depend on whether the
            # teacher was trained first in this process (the KD / no-KD comparison of the report relies on it)
            seed_everything(cfg["seed"], cfg["deterministic"])
            scfg = copy.deepcopy(cfg)
            if opt.stage == "both":
                scfg["teacher_checkpoint"] = out["teacher"]["best_checkpoint"]
            out["student"] = StudentTrainer(Option(scfg), dev, "[student] ").run()
        return out
    finally:
        ddp.destroy()
        torch.set_num_threads(threads)  # process-wide: give the caller (tests, reproduce) its own setting back


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    if args.print_gpu:
        gpus = Option(cfg).gpus
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print("cpu" if gpus is None else ",".join(map(str, gpus)), count)
        return None
    return run(cfg, args.device, write_demo=args.demo)


if __name__ == "__main__":
    cli(main)
