"""Shared test set-up: every test starts from the same seed, with a fixed profile."""

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests are derandomized so that a run is reproducible on any machine.
settings.register_profile(
    "gradcent",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("gradcent")

# The suite runs small tensors on a couple of shared cores: one intra-op thread
# avoids spin-waiting between oversubscribed threads (5-10x faster here).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # impl="fused" needs a newer torch than the library (optim/_impl.py,
    # FUSED_MIN_TORCH): every test that runs it carries the `fused` marker, so
    # the oldest-torch run (Makefile, test-oldest) can leave exactly those out.
    for item in items:
        spec = getattr(item, "callspec", None)
        values = spec.params.values() if spec is not None else ()
        if item.path.name == "test_fused.py" or any(v == "fused" for v in values):
            item.add_marker(pytest.mark.fused)
