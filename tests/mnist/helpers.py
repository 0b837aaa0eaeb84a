"""Helpers of the mnist tests: a tiny configuration and one in-process run."""
import json

from mnist import main as M

TINY = ["--set", "model.hidden=[24,12]", "--set", "progress=false", "--set", "train.epochs=2",
        "--set", "cal.epochs=2", "--set", "train.batch_size=32", "--set", "cal.batch_size=64",
        "--set", "heat_map.num_images=3", "--set", "data.val_fraction=0.25"]


def run(dataset, out, *extra):
    args = M.parse_args(["--out", str(out), "--device", "cpu", "--data-root", str(dataset),
                         "--set", f"data.backgrounds={dataset / 'bg'}", *TINY, *extra])
    cfg, actions = M.resolve_config(args)
    rd, results = M.run(cfg, actions, args.out, args.device)
    return rd.path, results, json.loads((rd.path / "summary.json").read_text())
