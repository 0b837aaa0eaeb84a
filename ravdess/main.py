"""RAVDESS audio → face-image KD with MFH Algorithm 1: `python main.py` (in this folder) or `python ravdess/main.py`.

    python main_overlap_tag.py --place 5 --num-permute 10 --first_time --cal_tag   # step 1 + 2 (saliency)
    python main_overlap_tag.py --ratio 0.75 --mode 1 --eval_tag                    # step 3, mode 0|1|2
    python main.py plot_tag                                                         # plot the newest saliency
    python main.py compare_modes                                                    # modes 0, 1, 2: table + bars
    python main.py preprocess --raw-dir RAVDESS --data data                         # raw release → feature layout
    python main.py --demo                                                           # tiny raw tree, end to end
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from common import config as C  # noqa: E402
from common.run import RunDir, atomic_write_json, cli, generator_dir, seed_everything  # noqa: E402
from common.train import add_resume_flag, check_resume_config, resume_dir  # noqa: E402
from ravdess import data as D  # noqa: E402
from ravdess import demo as demo_lib  # noqa: E402
from ravdess import experiment as X  # noqa: E402
from ravdess import preprocess as P  # noqa: E402

COMMANDS = ("run", "preprocess", "compare_modes", "plot_tag")
FLAGS = {"place": "tag.place", "num_permute": "tag.num_permute", "first_time": "tag.first_time",
         "distance": "tag.distance", "ratio": "eval.ratio", "mode": "eval.mode", "fill": "eval.fill",
         "num_runs": "eval.num_runs", "checkpoint": "eval.checkpoint", "batch_size": "data.batch_size",
         "batch_size2": "data.batch_size2", "num_workers": "data.num_workers", "gt_weight": "kd.gt_weight",
         "pl_weight": "kd.pl_weight", "distill": "kd.distill", "mask": "kd.mask", "data": "data.dir",
         "raw_dir": "data.raw_dir", "layout": "data.layout", "parity": "parity", "num_epochs": "tag.epochs",
         "lr": "tag.lr", "teacher": "teacher"}
# what a run is: a resumed run must not change these (common.train.check_resume_config names the keys it refuses)
IDENTITY = ("seed", "parity", "teacher", "model", "tag", "kd", "preprocess", "data.layout", "data.n_mels",
            "data.frames", "data.image_height", "data.image_width", "data.normalization", "data.audio_norm",
            "data.image_norm", "data.batch_size", "data.batch_size2", "data.split_files", "eval.mode", "eval.ratio",
            "eval.fill", "eval.num_runs", "eval.epochs", "eval.lr", "eval.momentum", "eval.baseline",
            "eval.checkpoint", "eval.modes")


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(out=str(HERE / "runs"))
    p.add_argument("command", nargs="?", default="run", choices=COMMANDS,
                   help="run (default: the steps named by --cal_tag / --eval_tag), preprocess, compare_modes, plot_tag")
    a = p.add_argument
    a("--cal_tag", "--cal-tag", dest="cal_tag", action="store_true", help="Algorithm 1 steps 1-2: the saliency vector")
    a("--eval_tag", "--eval-tag", dest="eval_tag", action="store_true", help="step 3: remove channels, distil")
    a("--first-time", "--first_time", dest="first_time", action="store_const", const=True,
      help="joint training from scratch (else reuse the step-1 nets of tag.load_from / the newest run)")
    a("--place", type=int, help="intervention place 0-6 (5 = fc2, 128 channels)")
    a("--num-permute", "--num_permute", dest="num_permute", type=int, help="permutation repeats M")
    a("--distance", help="step 1/2 distance: mse (MFH) | ncjsd (NTDH) | js (full-distribution JS)")
    a("--ratio", type=float, help="fraction of the channels removed")
    a("--mode", type=int, help="-1 none, 0 random, 1 least salient removed, 2 most salient removed")
    a("--fill", help="removal fill: mean (MFH) | zero (NTDH)")
    a("--num-runs", "--num_runs", dest="num_runs", type=int, help="students per mode")
    a("--num-epochs", "--num_epochs", dest="num_epochs", type=int, help="epochs of joint training and of KD")
    a("--lr", type=float, help="learning rate of joint training and of KD")
    a("--batch-size", "--batch_size", dest="batch_size", type=int)
    a("--batch-size2", "--batch_size2", dest="batch_size2", type=int, help="batch of the saliency loader")
    a("--num-workers", "--num_workers", dest="num_workers", type=int)
    a("--gt-weight", "--gt_weight", dest="gt_weight", type=float, help="weight of CE on labels")
    a("--pl-weight", "--pl_weight", dest="pl_weight", type=float, help="weight of the distillation terms")
    a("--distill", help="KD method, a key of kd.methods (kl, dkd, hint, js, mse, cosine, rkd, pkt, similarity, crd)")
    a("--mask", help="none | omega")
    a("--stu-type", "--stu_type", dest="stu_type", type=int, default=0, help="0: image student (the only one)")
    a("--gpu", type=int, help="CUDA device index (used when --device is auto and CUDA is present)")
    a("--checkpoint", help="step-1 checkpoint (alg1.pth) or run directory for --eval_tag / plot_tag")
    a("--data", help="feature-layout folder (data.dir)")
    a("--raw-dir", "--raw_dir", dest="raw_dir", help="raw RAVDESS folder with Actor_XX/ (data.raw_dir)")
    a("--layout", help="features | raw")
    a("--parity", action="store_const", const=True, help="the reference's number-changing behaviours")
    a("--demo", action="store_true", help="write a tiny raw tree to a temp folder and run steps 1-3 on it")
    a("--demo-dir", "--demo_dir", dest="demo_dir",
      help="with --demo: keep the tree here (a new or empty folder, or one an earlier demo wrote)")
    a("--teacher", help="joint (Alg. 1 step 1 with the agreement term) | independent (CE only)")
    add_resume_flag(p)
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    if args.demo and not args.config:
        args.config = str(HERE / "configs" / "demo.yaml")
    if args.stu_type != 0:
        raise C.ConfigError(f"--stu-type: only 0 (the image student) exists, got {args.stu_type}")
    cfg = C.resolve(HERE / "config.yaml", args, FLAGS)
    # --num-epochs / --lr were checked as tag.epochs / tag.lr (eval.* have the same declared ranges)
    if args.num_epochs is not None:
        cfg["eval"]["epochs"] = args.num_epochs
    if args.lr is not None:
        cfg["eval"]["lr"] = args.lr
    X.check(cfg)
    return cfg


def device_of(args) -> torch.device:
    if args.gpu is not None and args.device == "auto" and torch.cuda.is_available():
        return C.resolve_device(f"cuda:{args.gpu}")
    return C.resolve_device(args.device)


def run_name(cfg: dict, args) -> str:
    if args.command == "compare_modes":
        return "ravdess_compare"
    if args.cal_tag and args.eval_tag:
        return "ravdess"
    return "ravdess_cal" if args.cal_tag else f"ravdess_eval_mode{cfg['eval']['mode']}"


def open_run(cfg: dict, args, out: str | Path) -> RunDir:
    """A new run directory, or with --resume the one to continue: same command, and a config that does not change
    what the run is (IDENTITY); locked against a second process."""
    name = run_name(cfg, args)
    invocation = {"command": args.command, "cal_tag": bool(args.cal_tag), "eval_tag": bool(args.eval_tag)}
    path = resume_dir(args.resume, out, name)
    if path is None:
        rd = RunDir.create(out, name, config=cfg, code_from=HERE).lock()
        atomic_write_json(rd.log_dir / "invocation.json", invocation)
        return rd
    check_resume_config(C.load_yaml(path / "log" / "config.yaml"), cfg, IDENTITY)
    saved = path / "log" / "invocation.json"
    if not saved.is_file() or json.loads(saved.read_text()) != invocation:
        raise C.ConfigError(f"--resume: {path} was not started by this command ({invocation}); give the same "
                            f"command and flags as the run it continues")
    rd = RunDir.open(path).lock()
    rd.log(f"resuming {path}")
    return rd


def run(cfg: dict, args, out: str | Path) -> dict:
    """Everything a command line asks for; returns the results (for report.py and the tests)."""
    dev = device_of(args)
    if cfg["torch_threads"] > 0:
        torch.set_num_threads(cfg["torch_threads"])
    seed_everything(cfg["seed"], cfg["deterministic"])
    command = args.command
    if command == "run" and not (args.cal_tag or args.eval_tag):
        raise C.ConfigError("nothing to do: give --cal_tag and/or --eval_tag, a command "
                            f"({', '.join(COMMANDS[1:])}), or --demo")
    if command == "preprocess":
        d = cfg["data"]
        if not d["raw_dir"]:
            raise C.ConfigError("preprocess: give --raw-dir (data.raw_dir), the folder holding Actor_XX/")
        return P.preprocess(d["raw_dir"], d["dir"], cfg, progress=cfg["progress"])
    if command == "plot_tag":
        path = X.find_checkpoint(args.checkpoint or cfg["eval"]["checkpoint"], out)
        ck = X.load_alg1(path, cfg)
        png = X.plot_saliency(ck["saliency"].numpy(), path.parent.parent / f"saliency_place{ck['place']}.png",
                              cfg["eval"]["ratio"], title=f"Algorithm-1 saliency, place {ck['place']}")
        print(f"wrote {png}")
        return {"plot": png}
    if cfg["data"]["layout"] == "features":
        X.data_root(cfg)  # fail on a missing dataset before a run directory is made
    if (args.eval_tag or command == "compare_modes") and not args.cal_tag and not args.resume:
        X.load_alg1(X.find_checkpoint(cfg["eval"]["checkpoint"], out), cfg)  # likewise for a missing / wrong step 1
    rd = open_run(cfg, args, out)
    try:
        return _steps(cfg, args, rd, dev, out)
    finally:
        rd.close()


def _steps(cfg: dict, args, rd: RunDir, dev, out) -> dict:
    rd.log(f"run directory {rd.path} (device {dev})")
    root = X.data_root(cfg, log=rd.log)
    note = X.features_note(root, cfg)
    if note:
        rd.log(f"results {note}")
    results: dict = {"run_dir": rd.path, "counts": {s: len(D.read_split(root, cfg, s)) for s in D.SPLITS},
                     "features_note": note}
    ck = None
    if args.cal_tag:
        results["cal"] = X.cal_tag(cfg, root, rd, dev, out)
        ck = results["cal"]["checkpoint"]
    if args.eval_tag or args.command == "compare_modes":
        own = rd.checkpoint_dir / X.CHECKPOINT
        ck = ck or (own if own.is_file() and not cfg["eval"]["checkpoint"] else
                    X.find_checkpoint(cfg["eval"]["checkpoint"], out))
        rd.log(f"step 3 uses {ck}")
        base = X.baseline(cfg, root, rd, dev, ck) if cfg["eval"]["baseline"] else None
        if args.command == "compare_modes":
            results["modes"] = X.compare_modes(cfg, root, rd, dev, ck, base)
        else:
            results["modes"] = [X.eval_tag(cfg, root, rd, dev, ck)]
            print(results["modes"][0]["line"])
        results["baseline"] = base
    rd.write_summary(summary(cfg, args, results))
    return results


def summary(cfg: dict, args, results: dict) -> dict:
    out = {"experiment": "ravdess", "command": args.command, "config": cfg, "counts": results["counts"],
           "teacher": cfg["teacher"], "features_note": results["features_note"]}
    if "cal" in results:
        c = results["cal"]
        out["alg1"] = {"checkpoint": str(c["checkpoint"]), "accuracy": c["accuracy"], "channels": c["channels"],
                       "saliency": c["saliency"].tolist(), "joint_history": c["joint_history"],
                       "source": c["source"], "teacher": c["teacher_kind"], "seconds": c["seconds"]}
    if "modes" in results:
        out["modes"] = results["modes"]
        out["baseline"] = results["baseline"]
    return out


def run_demo(cfg: dict, args) -> dict:
    """Write the tiny raw tree, preprocess it, run steps 1-3 (and all modes) on it. --demo-dir keeps the tree in a
    directory this generator owns (new, empty, or marked by an earlier demo); anything else is refused."""
    dm = cfg["demo"]
    tmp = None if args.demo_dir else tempfile.TemporaryDirectory(prefix="ravdess_demo_")
    base = generator_dir(args.demo_dir, "the RAVDESS demo tree") if args.demo_dir else Path(tmp.name)
    try:
        demo_lib.make_raw_tree(base / "raw", actors=range(1, dm["actors"] + 1),
                               repetitions=range(1, dm["repetitions"] + 1), seconds=dm["seconds"],
                               sr=dm["sample_rate"], frames=dm["video_frames"], size=dm["video_size"], seed=cfg["seed"])
        cfg["data"].update(layout="raw", raw_dir=str(base / "raw"), dir=str(base / "features"))
        cfg["tag"]["first_time"] = True
        args.cal_tag, args.eval_tag = True, True
        args.command = "compare_modes"
        return run(cfg, args, args.out)
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    if args.demo:
        return run_demo(cfg, args)
    return run(cfg, args, args.out)


if __name__ == "__main__":
    cli(main)
