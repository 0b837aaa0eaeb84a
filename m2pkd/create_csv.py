"""Step 3: per-recording CSVs image_name,spec_name,arousal,valence -> Annotations/{Train,Val}_Set/<rec>.csv.

    python create_csv.py --data RECOLA_ROOT [--work DIR] [--set key=value ...]
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
    args = PL.parser(__doc__.splitlines()[0], flags=("",)).parse_args(argv)
    PL.run_step("csv", PL.resolve(args))


if __name__ == "__main__":
    cli(main)
