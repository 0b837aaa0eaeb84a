"""NTDH MNIST (teacher) → MNIST-M (student) with Algorithm-1 channel removal: `python main.py` or `python mnist/main.py`.

    python main.py                                  # Algorithm 1 from scratch, then distil (mode 2, ratio 0.75, place 1)
    python main.py --cal_tag --first-time           # joint training + saliency vector (checkpoints + .npz in the run)
    python main.py --eval_tag --mode 0,1,2          # distil from the newest run's saliency teacher, three modes
    python main.py --base_line --num-runs 3         # CE-only student
    python main.py --heat_map                       # input-gradient maps of the saliency teacher
    python main.py --eval_tag --distill kl --mask omega --gt-weight 1 --pl-weight 1
    python main.py --resume                         # continue the newest run under --out after a crash or kill
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install: make `common` and `mnist` importable
    sys.path.insert(0, str(HERE.parent))

import json  # noqa: E402

import torch  # noqa: E402

from common import config as C  # noqa: E402
from common.run import RunDir, atomic_write_json, cli, seed_everything  # noqa: E402
from common.train import add_resume_flag, check_resume_config, resume_dir  # noqa: E402
from mnist import data as D  # noqa: E402
from mnist import experiment as E  # noqa: E402
from mnist.distill import base_line, eval_tag  # noqa: E402
from mnist.heatmap import heat_map  # noqa: E402
from mnist.losses import check_objective  # noqa: E402

ACTIONS = ("cal_tag", "eval_tag", "base_line", "heat_map")
STEPS = {"cal_tag": E.cal_tag, "eval_tag": eval_tag, "base_line": base_line, "heat_map": heat_map}
# what a run is: a resume may change only the rest (threads, progress, checkpoint_every, deterministic, heat_map)
IDENTITY = ("name", "seed", "parity", "stu_type", "place", "teacher", "data", "model", "train", "cal", "eval",
            "distill")
FLAGS = {"stu_type": "stu_type", "place": "place", "parity": "parity", "data_root": "data.root",
         "noise_level": "data.noise_level", "num_runs": "train.num_runs", "num_epochs": "train.epochs",
         "batch_size": "train.batch_size", "lr": "train.lr", "first_time": "cal.first_time",
         "cal_epochs": "cal.epochs", "num_permute": "cal.num_permute", "op": "cal.op", "mode": "eval.modes",
         "ratio": "eval.ratio", "teacher": "eval.teacher", "tag": "eval.tag", "distill": "distill.method",
         "mask": "distill.mask", "gt_weight": "distill.gt_weight", "pl_weight": "distill.pl_weight"}


def _modes(text: str) -> list[int]:
    try:
        return [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise C.ConfigError(f"--mode: expected comma-separated integers among -1, 0, 1, 2, got {text!r}") from None


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(out=str(HERE / "runs"))
    a = p.add_argument
    a("--cal_tag", action="store_true", help="Algorithm 1: (joint training,) saliency vector of the teacher")
    a("--first-time", dest="first_time", action="store_const", const=True,
      help="train the joint teacher/student (else load them from cal.teacher/cal.student or the newest run)")
    a("--eval_tag", action="store_true", help="distil from the channel-removed saliency teacher")
    a("--base_line", action="store_true", help="train the student with CE only")
    a("--heat_map", action="store_true", help="input-gradient heat maps of the saliency teacher")
    a("--stu-type", dest="stu_type", type=int, help="0: student MNIST-M, teacher MNIST; 1: the other way")
    a("--place", type=int, help="0 input, 1, 2, 3 logits")
    a("--mode", help="removal mode(s), comma-separated: 0 random, 1 least salient, 2 most salient, -1 none")
    a("--ratio", type=float, help="fraction of channels removed")
    a("--num-permute", dest="num_permute", type=int, help="repeats M of the saliency intervention")
    a("--op", help="saliency intervention: zero | permute | mean")
    a("--num-runs", dest="num_runs", type=int)
    a("--num-epochs", dest="num_epochs", type=int, help="student epochs")
    a("--cal-epochs", dest="cal_epochs", type=int, help="joint training epochs")
    a("--batch-size", dest="batch_size", type=int)
    a("--lr", type=float)
    a("--noise_level", "--noise-level", dest="noise_level", type=float)
    a("--data-root", "--data_root", dest="data_root")
    a("--distill", help="KD method: a key of distill.methods or any registered loss")
    a("--mask", help="none | omega")
    a("--gt-weight", dest="gt_weight", type=float)
    a("--pl-weight", dest="pl_weight", type=float)
    a("--teacher", help="saliency teacher checkpoint (default: this run's, else the newest run under --out)")
    a("--tag", help="saliency .npz (or a bare .npy; default: the one beside the teacher)")
    a("--parity", action="store_const", const=True, help="the reference's number-changing behaviours")
    add_resume_flag(p)
    args = p.parse_args(argv)
    if args.mode is not None:
        args.mode = _modes(args.mode)
    return args


def resolve_config(args) -> tuple[dict, list[str]]:
    cfg = C.resolve(HERE / "config.yaml", args, FLAGS)
    actions = [a for a in ACTIONS if getattr(args, a, False)]
    if not actions:  # the whole experiment: Algorithm 1 from scratch, then distillation (the reference's default)
        actions = ["cal_tag", "eval_tag"]
        cfg["cal"]["first_time"] = True
    check_objective(cfg)  # distill.method and every term's options, before anything runs
    return cfg, actions


def resume_run(args, cfg: dict, actions: list[str]) -> tuple[Path | None, list[str]]:
    """--resume: the run directory, and its actions (the saved ones when none are given); refuses a config that
    changes what the run is."""
    path = resume_dir(args.resume, args.out, cfg["name"])
    if path is None:
        return None, actions
    saved_cfg = C.load_yaml(path / "log" / "config.yaml")
    saved_actions = json.loads((path / "log" / "actions.json").read_text()) \
        if (path / "log" / "actions.json").is_file() else actions
    if not any(getattr(args, a, False) for a in ACTIONS):
        actions = saved_actions
        cfg["cal"]["first_time"] = C.get(saved_cfg, "cal.first_time")
    elif actions != saved_actions:
        raise C.ConfigError(f"--resume: the run did {', '.join(saved_actions)}, not {', '.join(actions)}; give no "
                            f"action flags to continue it")
    check_resume_config(saved_cfg, cfg, IDENTITY)
    return path, actions


def _open_run(cfg: dict, actions: list[str], out, resume: Path | None) -> RunDir:
    if resume is not None:
        rd = RunDir.open(resume).lock()
        rd.log(f"resuming {rd.path}")
        return rd
    rd = RunDir.create(out, cfg["name"], config=cfg, code_from=HERE).lock()
    atomic_write_json(rd.log_dir / "actions.json", actions)
    return rd


def run(cfg: dict, actions: list[str], out, device: str = "auto", resume: Path | None = None) -> tuple[RunDir, dict]:
    dev = C.resolve_device(device)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    seed_everything(cfg["seed"], cfg["deterministic"])
    rd = _open_run(cfg, actions, out, resume)
    try:
        rd.log(f"run directory {rd.path}; actions: {', '.join(actions)}; device {dev}")
        s = E.make_setup(cfg, dev, HERE, rd, resume=resume is not None)
    except (C.ConfigError, C.DataError):
        if resume is None:
            rd.discard()   # bad input: nothing was produced, leave no empty run directory behind
        else:
            rd.close()
        raise
    try:
        results: dict = {"experiment": "mnist", "actions": actions, "data_source": s.pair.source,
                         "sizes": {k: len(v) for k, v in s.splits.items()}}
        if s.pair.is_standin:
            results["data_note"] = D.STANDIN_NOTE
        for action in actions:
            results[action] = STEPS[action](s, rd)
            rd.write_summary({**results, "config": cfg})
        rd.log(f"done; summary.json in {rd.path}")
    finally:
        rd.close()
    return rd, results


def main(argv=None):
    args = parse_args(argv)
    cfg, actions = resolve_config(args)
    resume, actions = resume_run(args, cfg, actions)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run(cfg, actions, args.out, args.device, resume)


if __name__ == "__main__":
    cli(main)
