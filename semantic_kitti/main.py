"""NTDH SemanticKITTI: camera teacher → LiDAR student with per-pixel distillation (`bash run.sh` or `python main.py`).

    python main.py --demo                                   # synthetic sequence, teacher then student, on the CPU
    python main.py config_server_kitti.yaml --stage teacher # one stage, the YAML's settings
    python main.py config_server_kitti.yaml --resume        # continue the newest run under save_path
    bash run.sh my.yaml                                     # torchrun, one process per GPU of the YAML's gpu list
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install: make `common` and this package importable
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import config as C  # noqa: E402
from common import ddp  # noqa: E402
from common.run import cli, generator_dir, seed_everything  # noqa: E402
from common.train import add_resume_flag, check_resume_config, resume_dir  # noqa: E402
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
    p.add_argument("--allow-random-init", action="store_const", const=True,
                   help="train the camera network from random weights (teacher.imagenet_weights: none) outside --demo")
    add_resume_flag(p)
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
    return C.resolve(DEFAULTS, args, {"stage": "stage", "parity": "parity", "allow_random_init": "allow_random_init"})


def select_device(opt: Option, want: str) -> torch.device:
    env = ddp.dist_env()
    if want and want != "auto":
        return ddp.device_for(env, want)
    if opt.gpus is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise C.ConfigError(f"gpu: the YAML lists GPUs {opt.gpus} but CUDA is not available; set gpu: cpu")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))  # processes on this node (torchrun sets it)
    if env.distributed and local > len(opt.gpus):
        raise C.ConfigError(f"gpu: the YAML lists {len(opt.gpus)} GPU(s) but torchrun started {local} "
                            f"process(es) on this node; launch with bash run.sh")
    return ddp.device_for(env, "cuda")


def check_weights(cfg: dict) -> None:
    """A camera network trained from random weights must be asked for (the demo's config does)."""
    if cfg["stage"] != "student" and cfg["teacher"]["imagenet_weights"] == "none" and not cfg["allow_random_init"]:
        raise C.ConfigError("teacher.imagenet_weights: none trains the camera network from random weights; pass "
                            "--allow-random-init to mean it, or use torchvision's ImageNet weights (torchvision) or "
                            "a local copy (a path)")


def resume_plan(cfg: dict, resume: str | None) -> tuple[str, Path | None]:
    """(the stage to run, the run directory to continue or None). A resumed run dir is one stage's experiment
    directory: its saved config says which; resuming a teacher under stage both trains the student after it."""
    path = resume_dir(resume, cfg["save_path"], "log")
    if path is None:
        return cfg["stage"], None
    saved = C.load_yaml(path / "log" / "config.yaml")
    role = saved.get("stage")
    if role not in ("teacher", "student"):
        raise C.ConfigError(f"--resume: {path} is not a semantic_kitti stage directory (its config names no stage)")
    if role == "student" and not cfg["teacher_checkpoint"]:
        cfg["teacher_checkpoint"] = saved.get("teacher_checkpoint")
    from semantic_kitti.trainer import IDENTITY_KEYS
    check_resume_config(saved, {**cfg, "stage": role}, IDENTITY_KEYS)
    stage = "both" if role == "teacher" and cfg["stage"] == "both" else role
    return stage, path


def write_demo_data(cfg: dict, env) -> None:
    """--demo: the synthetic sequences under data_root, only into a directory the generator owns."""
    d = cfg["demo"]
    if env.is_main:
        root = generator_dir(cfg["data_root"], "SemanticKITTI demo data")
        demo.write_demo(root, cfg["train_sequences"], cfg["val_sequences"], d["frames"], seed=cfg["seed"],
                        image_size=tuple(d["image_size"]), beams=d["beams"], azimuths=d["azimuths"])
        print(f"demo data written to {root}", flush=True)
    ddp.barrier()


def run(cfg: dict, device: str = "auto", write_demo: bool = False, resume: str | None = None) -> dict:
    """Run the configured stage(s); returns {"teacher": summary, "student": summary} for the stages run."""
    from semantic_kitti.trainer import TeacherTrainer
    from semantic_kitti.trainer_student import StudentTrainer
    opt = Option(cfg)
    check_weights(cfg)
    if opt.stage == "both" and cfg["pretrained_model"]:
        raise C.ConfigError("pretrained_model: name one stage (--stage teacher|student) to initialise; with stage "
                            "both it would be ambiguous")
    stage, path = resume_plan(cfg, resume)
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
        if write_demo and path is None:
            write_demo_data(cfg, env)
        out = {}
        if stage in ("teacher", "both"):
            out["teacher"] = TeacherTrainer(opt, dev, "[teacher] ", resume=path).fit()
            path = None
        if stage in ("student", "both"):
            # the same seed as a student run on its own: initialisation and data order do not depend on whether the
            # teacher was trained first in this process (the KD / no-KD comparison of the report relies on it)
            seed_everything(cfg["seed"], cfg["deterministic"])
            scfg = copy.deepcopy(cfg)
            if stage == "both":
                scfg["teacher_checkpoint"] = out["teacher"]["best_checkpoint"]
            out["student"] = StudentTrainer(Option(scfg), dev, "[student] ", resume=path).fit()
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
    return run(cfg, args.device, write_demo=args.demo, resume=args.resume)


if __name__ == "__main__":
    cli(main)
