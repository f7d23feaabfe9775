"""The repository passes `ruff check` with the rules in ruff.toml (line length 120, Google docstrings)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ruff() -> list[str]:
    """The ruff command: the one next to this Python (the venv's), else the one on PATH.

    Returns:
        The command line prefix that runs ruff.
    """
    found = Path(sys.executable).with_name('ruff')
    if found.is_file():
        return [str(found)]
    on_path = shutil.which('ruff')
    if on_path is None:
        pytest.fail(f'ruff is not installed next to {sys.executable} nor on PATH: it comes with '
                    'requirements/test.txt and requirements/jetson.txt (make setup, tools/setup.sh jetson)',
                    pytrace=False)
    return [on_path]


def test_repository_is_lint_clean():
    result = subprocess.run([*ruff(), 'check', '--no-cache', '--output-format', 'concise', '.'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f'ruff check found problems:\n{result.stdout}{result.stderr}'
