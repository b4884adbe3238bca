import pytest
import torch


@pytest.fixture
def one_thread():
    # torch's single-tensor AdamW reference is pathologically slow with 2 threads on a busy 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
