"""The integrations are optional: ``import jdoptim`` never imports a trainer, and a missing trainer
gives an ImportError naming the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = ("lightning", "pytorch_lightning", "accelerate")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_importing_jdoptim_imports_no_trainer() -> None:
    result = run_python(
        "import sys, jdoptim, jdoptim.integrations\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINERS!r}))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked"),
    [("lightning", ("lightning", "lightning.pytorch")), ("accelerate", ("accelerate",))],
)
def test_a_missing_trainer_names_the_extra(module: str, blocked: tuple[str, ...]) -> None:
    # A None entry in sys.modules makes `import name` raise ImportError, as if not installed.
    result = run_python(
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "try:\n"
        f"    import jdoptim.integrations.{module}\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert f"pip install jdoptim[{module}]" in result.stdout
