"""Harness tests: many small convs on a shared 2-core box, one torch thread each.

The fixture gives a test's thread count back afterwards, so a test that changes
it (the benchmarks' style) cannot slow down the ones after it.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
