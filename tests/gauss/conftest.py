import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test, as the MFH presets (`threads: 1`): these tests train tens to hundreds of tiny models,
    which gain nothing from a second thread, and on a busy 2-core machine its synchronisation makes every step
    several times slower. The thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
