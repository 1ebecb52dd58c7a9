"""Training tests run tiny models: one intra-op thread avoids oversubscribing a busy CPU and keeps
CPU results reproducible run to run."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
