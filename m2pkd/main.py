"""M2PKD dispatcher: python main.py STEP [args], STEP one of faces, audio, melspec, csv, train, plot, demo.

    python main.py demo                       # = python mmpkd.py --demo
    python main.py faces --data ROOT          # = python face_detector.py --data ROOT
    python main.py train teacher --data ROOT --dim valence
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install
    sys.path.insert(0, str(HERE.parent))

from common.run import cli  # noqa: E402

STEPS = {"faces": "face_detector", "audio": "audio_extract", "melspec": "audio_melspec", "csv": "create_csv",
         "train": "mmpkd", "plot": "plot_ccc", "demo": "mmpkd"}


def main(argv=None):
    import importlib
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STEPS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    step, rest = argv[0], argv[1:]
    if step == "demo":
        rest = ["demo", *rest]
    return importlib.import_module(f"m2pkd.{STEPS[step]}").main(rest)


if __name__ == "__main__":
    cli(main)
