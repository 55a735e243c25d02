"""Start-up progress reaches the terminal past pytest's capture (fixtures/session.py)."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest

from fixtures.session import TerminalProgress

pytestmark = pytest.mark.selftest


class FakeTerminal:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def write_line(self, line: str) -> None:
        self.events.append(f"line {line}")

    def flush(self) -> None:
        self.events.append("flush")


class FakeCapture:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    @contextmanager
    def global_and_fixture_disabled(self):
        self.events.append("capture off")
        yield
        self.events.append("capture on")


def test_progress_line_is_written_with_capture_suspended_and_flushed():
    events: list[str] = []
    logger = logging.getLogger("pdperf.progress.test")
    handler = TerminalProgress(FakeTerminal(events), FakeCapture(events))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.info("topology %s: waiting %d s", "colloc-2xtp1", 60)
    finally:
        logger.removeHandler(handler)
    assert events == ["capture off", "line pdperf: topology colloc-2xtp1: waiting 60 s", "flush", "capture on"]


def test_progress_without_a_capture_manager():
    events: list[str] = []
    handler = TerminalProgress(FakeTerminal(events), None)
    handler.emit(logging.LogRecord("pdperf.progress", logging.INFO, __file__, 1, "x %s", ("y",), None))
    assert events == ["line pdperf: x y", "flush"]
