import pytest
import torch

from tests.nyu_ssc.ssc_testutil import tiny_cfg


@pytest.fixture
def cfg():
    torch.manual_seed(0)
    return tiny_cfg()
