"""The integrations are optional: ``import jdoptim`` never imports a trainer, and a missing trainer
gives an ImportError naming the extra to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = ("lightning", "pytorch_lightning", "accelerate")

# One fresh interpreter (importing torch is the slow part) answers every question below.
_PROBE = f"""
import json, sys
import jdoptim, jdoptim.integrations
report = {{"imported": sorted(m for m in sys.modules if m.split(".")[0] in {TRAINERS!r})}}
for name in ("lightning", "lightning.pytorch", "accelerate"):
    sys.modules[name] = None  # `import name` now raises ImportError, as if not installed
for module in ("lightning", "accelerate"):
    try:
        __import__("jdoptim.integrations." + module)
        report[module] = "imported"
    except ImportError as error:
        report[module] = str(error)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_importing_jdoptim_imports_no_trainer(probe: dict[str, Any]) -> None:
    assert probe["imported"] == []


@pytest.mark.parametrize("module", ["lightning", "accelerate"])
def test_a_missing_trainer_names_the_extra(probe: dict[str, Any], module: str) -> None:
    assert f"pip install jdoptim[{module}]" in probe[module]
