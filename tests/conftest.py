import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_cache():
    """Build each tiny pipeline once per session; tests that mutate a pipeline must restore it."""
    from accel.pipelines import tiny

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny.make(name)
        return cache[name]

    return get
