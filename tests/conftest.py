import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for every test: the tests train tiny models, which gain nothing from a second intra-op
    thread, and on a busy 2-core machine its OpenMP synchronisation makes every step several times slower (the
    synthetic experiments' `threads: 1` default for the same reason). Restored after each test, so a test that sets
    its own count (a run's `threads` config) cannot leak it into the next."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
