"""Marks shared by test modules."""

import pytest

# Tests that compile: fresh dynamo state (the fixture is in conftest.py), and torch's compile machinery itself uses a deprecated
# torch.jit API on this version.
COMPILING = [
    pytest.mark.usefixtures("fresh_dynamo"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
]
