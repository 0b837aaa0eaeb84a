"""Step 4-5: train one model for one dimension, or run the whole demo.

    python mmpkd.py teacher  --data ROOT --dim arousal --visual-weights FER.t7 [--audio-weights R18.pth]
    python mmpkd.py baseline --data ROOT --dim arousal --visual-weights FER.t7
    python mmpkd.py student  --data ROOT --dim arousal --visual-weights FER.t7 --teacher runs/teacher_arousal_<ts>
    python mmpkd.py student  ... --resume [RUN_DIR]   # continue a run from its last checkpoint (default: newest)
    python mmpkd.py --demo [--dims arousal,valence]   # synthetic RECOLA tree in a temp dir, steps 1-6, CCC table
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install
    sys.path.insert(0, str(HERE.parent))

from common.run import cli  # noqa: E402
from m2pkd import pipeline as PL  # noqa: E402

from common.config import ConfigError, resolve_device  # noqa: E402


def parse_args(argv=None):
    p = PL.parser(__doc__.splitlines()[0], flags=("train",))
    p.add_argument("role", nargs="?", choices=["teacher", "baseline", "student", "demo"],
                   help="what to train (demo: the whole pipeline on generated data)")
    p.add_argument("--dims", help="demo: comma-separated dimensions (default: dim)")
    p.add_argument("--demo-data", help="demo: where to write the demo tree (default: a new temporary directory)")
    args = p.parse_args(argv)
    if args.role == "demo":
        args.demo = True
    if args.role is None and not args.demo:
        p.error("give a role (teacher, baseline, student) or --demo")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = PL.resolve(args)
    device = resolve_device(args.device)
    if args.demo and args.role in (None, "demo"):
        dims = [d.strip() for d in args.dims.split(",")] if args.dims else None
        bad = [d for d in dims or [] if d not in ("arousal", "valence")]
        if bad:
            raise ConfigError(f"--dims: expected arousal and/or valence, got {bad}")
        if args.resume:
            raise ConfigError("--resume: continues one training run (teacher, baseline or student), not the demo")
        return PL.demo(cfg, args.out, device, dims=dims, data_dir=args.demo_data)
    return PL.train(cfg, args.role, args.out, device, resume=args.resume)


if __name__ == "__main__":
    cli(main)
