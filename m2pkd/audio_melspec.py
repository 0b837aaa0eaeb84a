"""Step 2b: segments -> log-mel spectrogram pictures specs/<rec>/<n>_<rec>.jpg (the reference's audio_melspec.py:
librosa specshow, magma), or the dB matrices <n>_<rec>.npy with audio.format=npy. Exits 2 if a recording failed.

    python audio_melspec.py --data RECOLA_ROOT [--work DIR] [--set key=value ...]
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
    PL.run_step("melspec", PL.resolve(args))


if __name__ == "__main__":
    cli(main)
