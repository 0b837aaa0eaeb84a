"""Golden values (tests/golden/golden.npz, written by make_golden.py from the code before the fast engine moved into
common/synthetic): every registered KD term with and without ω, with and without `runs`; ω; the divergences;
Algorithm 1's saliency, removal and joint training on a fixed tiny model; the gauss default table (10 runs), every
gauss method × mask on a short run, and a short sklearn_exp run. A refactor must reproduce them to 1e-6."""
from pathlib import Path

import numpy as np
import pytest

from common.kd import build_loss
from common.synthetic import dispatch, fused
from tests.golden import cases

GOLDEN = np.load(Path(__file__).with_name("golden.npz"))
RTOL, ATOL = 1e-6, 1e-6


def _compare(values: dict, prefix: str):
    expected = {k for k in GOLDEN.files if k.startswith(prefix)}
    assert set(values) == expected, sorted(set(values) ^ expected)
    for key, value in values.items():
        np.testing.assert_allclose(value, GOLDEN[key], rtol=RTOL, atol=ATOL, err_msg=key)


def _kd_values(build, i: int) -> dict:
    values = {}
    for runs in (None, cases.RUNS):
        for masked in (False, True):
            tag = f"kd/{cases.term_key(i)}/runs{runs or 0}/{'omega' if masked else 'plain'}"
            values.update({f"{tag}/{k}": v for k, v in cases.kd_term(build, i, runs, masked).items()})
    return values


@pytest.mark.parametrize("i", range(len(cases.TERMS)), ids=cases.term_key)
def test_kd_term_reference(i):
    """common.kd's plain autograd terms."""
    _compare(_kd_values(build_loss, i), f"kd/{cases.term_key(i)}/")


@pytest.mark.parametrize("i", [i for i, t in enumerate(cases.TERMS) if t[0] in fused.FUSED], ids=cases.term_key)
def test_kd_term_fused(i):
    """The synthetic engine's fused terms (closed-form gradients) give the references' frozen values."""
    _compare(_kd_values(fused.build_loss, i), f"kd/{cases.term_key(i)}/")


def test_omega_and_divergences():
    _compare(cases.omega_and_divergences(), ("omega/", "div/"))


def test_algorithm1_saliency_removal_joint_training():
    _compare(cases.saliency_cases(), ("saliency/", "removal/", "joint_train/"))


def test_synthetic_saliency_dispatch():
    """common.synthetic.dispatch.saliency (the rank-1 stack path when fast) gives the reference's frozen values."""
    t_runs, s_runs, xt, xs, yr = cases.runs_models()
    values = cases.runs_saliency(lambda fast, **kw: dispatch.saliency(t_runs, s_runs, xt, xs, yr, fast=fast, **kw))
    _compare(values, "saliency/runs/")


def test_gauss_default_table():
    _compare(cases.gauss_default(), "gauss_default/")


def test_gauss_every_method_and_mask_short():
    _compare(cases.gauss_all_methods(), "gauss_all/")


def test_sklearn_exp_short_run():
    _compare(cases.sklearn_short(), "sklearn_short/")
