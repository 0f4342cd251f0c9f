"""Every ```python block of README.md and docs/**/*.md, and every script in examples/, runs.

The blocks of one Markdown file run in order in one namespace, as a reader would type them. Scripts
run in a subprocess with ``JDOPTIM_SMALL=1`` so they pick small sizes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)

MARKDOWN_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# ddp_*.py and fsdp_*.py need several processes: tests/distributed launches them with torchrun.
EXAMPLES = sorted(
    p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith(("_", "ddp_", "fsdp_"))
)


def python_blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text(encoding="utf-8"))


def test_documentation_exists() -> None:
    assert MARKDOWN_FILES and EXAMPLES
    assert any(python_blocks(path) for path in MARKDOWN_FILES)


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_blocks_run(path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for index, block in enumerate(python_blocks(path)):
        code = compile(block, f"{path.name}[block {index}]", "exec")
        exec(code, namespace)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path) -> None:
    env = {**os.environ, "JDOPTIM_SMALL": "1"}
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
