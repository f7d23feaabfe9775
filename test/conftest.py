"""Fixtures shared by the core tests (no ROS here: conftest is loaded for every test module)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def log_records() -> Iterator[Callable[[str], list[logging.LogRecord]]]:
    """``capture(name)``: the WARNING+ records of logger ``name`` from now on, read from the logger
    itself (the launch_testing pytest plugin installs a logger class that does not propagate, so
    ``caplog`` would miss them).
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
