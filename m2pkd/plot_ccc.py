"""Step 6: CCC per dev recording, mean over recordings, CCC of the concatenation; raw, the authors' chain
(x1.45, circular shift 60, box 121) and the AVEC chain fitted on the selection recordings; a PNG per recording.

    python plot_ccc.py RUN_DIR [RUN_DIR ...]     # run directories of mmpkd.py (their config is used)
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script without an install
    sys.path.insert(0, str(HERE.parent))

from common.run import cli  # noqa: E402
from m2pkd import pipeline as PL  # noqa: E402

from common.config import DataError  # noqa: E402


def main(argv=None):
    p = PL.parser(__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories written by mmpkd.py")
    args = p.parse_args(argv)
    for run in args.runs:
        saved = Path(run) / "log" / "config.yaml"
        if not saved.is_file():
            raise DataError(f"{saved}: not found (expected a run directory of mmpkd.py)")
        # the run's own config, then --config / --set (e.g. --set postprocess.authors.scale=1.5)
        cfg = PL.C.resolve(PL.CONFIG, args, layers=[saved])
        PL.plot_ccc(run, cfg)


if __name__ == "__main__":
    cli(main)
