"""The repository passes `ruff check` with the rules in ruff.toml (line length 120, Google docstrings)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEING_REWRITTEN = (
    'trident_ros/node.py', 'trident_ros/fake_camera.py', 'trident_ros/refinement.py', 'trident_ros/sliding_window.py',
    'trident_ros/clip_attention.py', 'trident_ros/config.py', 'trident_ros/vocabulary.py', 'trident_ros/demo.py',
    'trident_ros/cli.py', 'launch', 'bench/node_bench.py', 'test/test_node.py', 'test/test_reliability.py',
    'test/test_launch.py', 'test/test_refinement.py', 'test/test_sliding_window.py', 'test/test_methods.py',
    'test/ros_helpers.py', 'tools',
)
"""TEMPORARY: files other changes are rewriting at the same time; linted once those are merged (then
this list goes)."""


def ruff() -> list[str]:
    found = Path(sys.executable).with_name('ruff')
    if found.is_file():
        return [str(found)]
    if shutil.which('ruff'):
        return ['ruff']
    pytest.skip('ruff is not installed (make setup installs it)')


def test_repository_is_lint_clean():
    result = subprocess.run([*ruff(), 'check', '--no-cache', '--output-format', 'concise',
                             '--extend-exclude', ','.join(BEING_REWRITTEN), '.'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f'ruff check found problems:\n{result.stdout}{result.stderr}'

