"""Fixtures and hooks shared by every test module (no ROS here: conftest is loaded for every leg)."""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator

import pytest

LAUNCH_REASON = 'needs launch_ros (a ROS install: PyPI has no launch packages)'
HAS_LAUNCH = importlib.util.find_spec('launch_ros') is not None
NOT_RUN = pytest.StashKey[list]()
"""The node ids of the tests deselected for want of launch_ros."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``launch`` run where launch_ros can be imported; elsewhere they are deselected and counted."""
    if HAS_LAUNCH:
        return
    needs_launch = [item for item in items if item.get_closest_marker('launch')]
    if needs_launch:
        config.hook.pytest_deselected(items=needs_launch)
        items[:] = [item for item in items if not item.get_closest_marker('launch')]
    config.stash[NOT_RUN] = [item.nodeid for item in needs_launch]



def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ARG001
    """Say which tests did not run here and why (tools/test.sh repeats the count in each leg's summary)."""
    not_run = config.stash.get(NOT_RUN, [])
    if not_run:
        terminalreporter.section('not run here')
        for nodeid in not_run:
            terminalreporter.write_line(f'{nodeid}: {LAUNCH_REASON}')
        terminalreporter.write_line(f'launch tests not run: {len(not_run)} ({LAUNCH_REASON})')


@pytest.fixture
def log_records() -> Iterator[Callable[[str], list[logging.LogRecord]]]:
    """``capture(name)``: the WARNING+ records of logger ``name`` from now on, read from the logger
    itself (a plugin may install a logger class that does not propagate, so ``caplog`` could miss them).
    """
    attached: list[tuple[logging.Logger, logging.Handler]] = []

    def capture(name: str) -> list[logging.LogRecord]:
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        attached.append((logger, handler))
        return records

    yield capture
    for logger, handler in attached:
        logger.removeHandler(handler)
