import pytest
import torch

from tests.nyu_ssc.ssc_testutil import tiny_cfg


@pytest.fixture
def cfg():
    torch.manual_seed(0)
    return tiny_cfg()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread (what the demo config sets), restored afterwards for other folders' tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
