"""Marks shared by test modules."""

import pytest

# Tests that compile: fresh dynamo state (the fixture is in conftest.py); torch's compile
# machinery itself uses a deprecated torch.jit API on this version; and torch warns when a
# compiled module meets the engine's discovery hook, which ignores the compiled wrapper.
COMPILING = [
    pytest.mark.usefixtures("fresh_dynamo"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
    pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there"),
]
