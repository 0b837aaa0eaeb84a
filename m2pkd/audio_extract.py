"""Step 2a: audio -> 1-s segments at 22 050 Hz mono -> audio_segments/<rec>/<n>_<rec>.wav.

    python audio_extract.py --data RECOLA_ROOT [--work DIR] [--set key=value ...]
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
    PL.run_step("audio", PL.resolve(args))


if __name__ == "__main__":
    cli(main)
