"""Test-wide settings: property-based tests draw the same examples on every run.

A random draw that fails once and passes the next run would make CI depend on luck; derandomized
examples keep every run comparable (a failing example is printed and stays failing).
"""

import gc
from collections.abc import Iterator

import pytest
from hypothesis import settings

settings.register_profile("jdoptim", derandomize=True, database=None, print_blob=True)
settings.load_profile("jdoptim")


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiled code and its caches do not outlive a test (later tests count live tensors);
    dynamo's counters start at zero."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    gc.collect()  # optimizers dropped by earlier tests release their engine hooks
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    gc.collect()
