"""Golden values (tests/golden/golden.npz, written by make_golden.py from the code before the fast engine moved into
common/synthetic): every registered KD term with and without ω, with and without `runs`; ω; the divergences;
Algorithm 1's saliency, removal and joint training on a fixed tiny model; the gauss default table (10 runs), every
gauss method × mask on a short run, and a short sklearn_exp run. A refactor must reproduce them to 1e-6."""
from pathlib import Path

import numpy as np
import pytest

from common.kd import build_loss
from tests.golden import cases

GOLDEN = np.load(Path(__file__).with_name("golden.npz"))
RTOL, ATOL = 1e-6, 1e-6


def _compare(values: dict, prefix: str):
    expected = {k for k in GOLDEN.files if k.startswith(prefix)}
    assert set(values) == expected, sorted(set(values) ^ expected)
    for key, value in values.items():
        np.testing.assert_allclose(value, GOLDEN[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("i", range(len(cases.TERMS)), ids=cases.term_key)
def test_kd_term_reference(i):
    values = {}
    for runs in (None, cases.RUNS):
        for masked in (False, True):
            tag = f"kd/{cases.term_key(i)}/runs{runs or 0}/{'omega' if masked else 'plain'}"
            values.update({f"{tag}/{k}": v for k, v in cases.kd_term(build_loss, i, runs, masked).items()})
    _compare(values, f"kd/{cases.term_key(i)}/")


def test_omega_and_divergences():
    _compare(cases.omega_and_divergences(), ("omega/", "div/"))


def test_algorithm1_saliency_removal_joint_training():
    _compare(cases.saliency_cases(), ("saliency/", "removal/", "joint_train/"))


def test_gauss_default_table():
    _compare(cases.gauss_default(), "gauss_default/")


def test_gauss_every_method_and_mask_short():
    _compare(cases.gauss_all_methods(), "gauss_all/")


def test_sklearn_exp_short_run():
    _compare(cases.sklearn_short(), "sklearn_short/")
