"""Convert an SSCNet release folder (<stem>.png depth, <stem>.bin, RGB) into the npz layout read by main.py.

    python convert_sscnet.py --src data/depthbin/NYUtrain --dst data/NYUtrain_npz
    python convert_sscnet.py --src ... --dst ... --set convert.depth_decode=divide    # the reference's d / 8000
    python convert_sscnet.py --src sscnet_demo --dst npz_demo --demo 3   # write 3 synthetic SSCNet scenes first
Grid, intrinsics and conversion rules come from config.yaml (grid.*, convert.*). Before converting, every scene's
alignment share (depth-surface voxels with an occupied label) is printed and written to <dst>/convert_report.json;
a median below convert.min_alignment stops with exit 2 (--force converts anyway). Bad scenes are named and skipped.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from common import config as C  # noqa: E402
from common.run import cli, generator_dir  # noqa: E402
from nyu_ssc import engine, sscnet, synth  # noqa: E402


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="folder with <stem>.png + <stem>.bin (+ RGB)")
    p.add_argument("--dst", required=True, help="output folder for <stem>.npz")
    p.add_argument("--demo", type=int, default=0, help="first write this many synthetic scenes into --src, which "
                                                       "must be new or empty (uses configs/demo.yaml's tiny grid)")
    p.add_argument("--force", action="store_true", help="convert even when labels and depth look misaligned")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.demo and not args.config:
        args.config = str(HERE / "configs" / "demo.yaml")
    cfg = C.resolve(HERE / "config.yaml", args)
    engine.check_config(cfg)
    if args.demo:
        src = generator_dir(args.src, "synthetic SSCNet scenes")
        for i in range(args.demo):
            synth.write_sscnet_scene(src, f"NYU{i:04d}_0000", synth.make_scene(i, cfg), cfg["convert"]["rle_order"])
    done, skipped = sscnet.convert_folder(args.src, args.dst, cfg, force=args.force)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(cli(main))
