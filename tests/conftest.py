import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tiny models: a second thread costs more to wake than it saves, and CI shares 2 cores.
torch.set_num_threads(1)


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
