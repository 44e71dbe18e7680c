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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped with the reason when it is absent (scripts/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
