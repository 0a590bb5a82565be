import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Why: two OpenMP threads on a shared 2-core machine spin against other work and run 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
