"""MFH's entry-point name for the same program as main.py (`python main_overlap_tag.py --place 5 ... --cal_tag`)."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from common.run import cli  # noqa: E402
from ravdess.main import main  # noqa: E402

if __name__ == "__main__":
    cli(main)
