"""Waiting without fixed sleeps: poll a condition under a deadline, say what was awaited.

Readiness in a serving stack is a race of several outcomes (ready, a process died, a
deployment failed, time ran out); ``poll_until`` runs a probe that may return a value (done),
None (not yet) or raise (fatal), and on timeout raises with the name of the awaited thing
and the last state the probe saw, so a user can tell "still loading" from "stuck".
"""

from __future__ import annotations

import socket
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    pass


def poll_until(probe: Callable[[], T | None], *, what: str, timeout_s: float, interval_s: float = 0.5,
               max_interval_s: float = 5.0, describe: Callable[[], str] | None = None) -> T:
    """Call ``probe`` until it returns non-None; back off from ``interval_s`` to ``max_interval_s``."""
    deadline = time.monotonic() + timeout_s
    delay = interval_s
    while True:
        value = probe()
        if value is not None:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            state = f"; last state: {describe()}" if describe else ""
            raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}{state}")
        time.sleep(min(delay, remaining))  # a poll interval, not a readiness guess
        delay = min(delay * 1.5, max_interval_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (bind to 0). Never a fixed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
