"""Every ```python block of README.md and docs/**/*.md, and every script in examples/, runs.

Each Markdown block runs alone, in a fresh namespace, because a reader copies one block at a time:
a block that needs an import or a model from an earlier block fails here. Scripts run in a
subprocess with ``JDOPTIM_SMALL=1`` so they pick small sizes.
"""

from __future__ import annotations

import importlib.util
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


def markdown_blocks() -> list[tuple[Path, int, str]]:
    return [
        (path, index, block)
        for path in MARKDOWN_FILES
        for index, block in enumerate(python_blocks(path))
    ]


def test_documentation_exists() -> None:
    assert MARKDOWN_FILES and EXAMPLES
    assert any(python_blocks(path) for path in MARKDOWN_FILES)


@pytest.mark.parametrize(
    ("path", "index", "block"),
    markdown_blocks(),
    ids=[f"{path.relative_to(ROOT)}[{index}]" for path, index, _ in markdown_blocks()],
)
# Expected: Lightning's own code (docs/integrations.md) calls a torch pytree API that this torch
# deprecates, and torch.compile's machinery a deprecated torch.jit API; torch also warns when a
# compiled module meets the engine's discovery hook (which ignores the compiled wrapper).
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there")
def test_markdown_python_block_runs_alone(path: Path, index: int, block: str) -> None:
    code = compile(block, f"{path.name}[block {index}]", "exec")
    exec(code, {"__name__": "__docs__"})


def run_example(
    script: Path, output_dir: Path, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Runs an example on this checkout's jdoptim, at small sizes, writing its files to output_dir."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {key: value for key, value in os.environ.items() if key not in unset}
    env.update(JDOPTIM_SMALL="1", JDOPTIM_OUTPUT_DIR=str(output_dir), PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    result = run_example(script, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_demo_prints_its_table_conclusion_and_plot(tmp_path: Path) -> None:
    result = run_example(ROOT / "examples" / "demo.py", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "increased      mean     worst" in result.stdout
    assert "What it shows: SGD's steps increased" in result.stdout
    plotted = (tmp_path / "jdoptim_demo.png").exists()
    assert plotted == (importlib.util.find_spec("matplotlib") is not None)
    assert ("Plot: skipped" in result.stdout) != plotted


def test_ddp_example_without_torchrun_prints_the_command(tmp_path: Path) -> None:
    result = run_example(ROOT / "examples" / "ddp_iwrm.py", tmp_path, unset=("RANK", "WORLD_SIZE"))
    assert result.returncode == 1
    assert "torchrun --nproc_per_node 2 examples/ddp_iwrm.py" in result.stderr
    assert "Traceback" not in result.stderr
