"""Write tests/golden/golden.npz from today's code: `python tests/golden/make_golden.py` (from the repository root).

Run it only when a change of numbers is intended and understood (say so in the commit); a refactor must leave
tests/golden/test_golden.py passing against the stored file unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.kd import build_loss  # noqa: E402
from tests.golden import cases  # noqa: E402

GOLDEN = HERE / "golden.npz"


def collect() -> dict:
    out = {}
    out.update(cases.kd_terms(build_loss))
    out.update(cases.omega_and_divergences())
    out.update(cases.saliency_cases())
    out.update(cases.gauss_default())
    out.update(cases.gauss_all_methods())
    out.update(cases.sklearn_short())
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    values = collect()
    np.savez_compressed(GOLDEN, **values)
    print(f"{len(values)} arrays written to {GOLDEN.relative_to(HERE.parents[1])}")
