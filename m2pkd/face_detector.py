"""Step 1: MTCNN face crops every 40 ms -> Cropped_Aligned/<rec>/image<j>.jpg (no face: a black frame, or the last
face with --frame-retention). Exits 2 naming the first failure if any recording could not be processed.

    python face_detector.py --data RECOLA_ROOT [--work DIR] [--set key=value ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install
    sys.path.insert(0, str(HERE.parent))

from common.run import cli  # noqa: E402
from m2pkd import pipeline as PL  # noqa: E402


def main(argv=None):
    args = PL.parser(__doc__.splitlines()[0], flags=("faces",)).parse_args(argv)
    PL.run_step("faces", PL.resolve(args))


if __name__ == "__main__":
    cli(main)
