"""Waiting without fixed sleeps: poll a condition under a deadline, say what was awaited.

Readiness in a serving stack is a race of several outcomes (ready, a process died, a
deployment failed, time ran out); ``poll_until`` runs a probe that may return a value (done),
None (not yet) or raise (fatal), and on timeout raises with the name of the awaited thing
and the last state the probe saw, so a user can tell "still loading" from "stuck".
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    pass


def poll_until(probe: Callable[[], T | None], *, what: str, timeout_s: float, interval_s: float = 0.5,
               max_interval_s: float = 5.0, describe: Callable[[], str] | None = None,
               progress: Callable[[str], None] | None = None, progress_every_s: float = 60.0) -> T:
    """Call ``probe`` until it returns non-None; back off from ``interval_s`` to ``max_interval_s``.

    With ``describe`` and ``progress``, every change of the described state (and the state at
    least every ``progress_every_s``) is passed to ``progress`` as one line with the seconds
    waited, so a long wait shows where it stands; an interrupt (Ctrl-C, a CI time limit) also
    reports the last state before it propagates.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    delay = interval_s
    last_state, last_report = None, start

    def report(force: bool = False, prefix: str = "") -> None:
        nonlocal last_state, last_report
        if describe is None or progress is None:
            return
        state = describe()
        now = time.monotonic()
        if force or state != last_state or now - last_report >= progress_every_s:
            progress(f"{prefix}waiting {now - start:.0f} s for {what}: {state}")
            last_state, last_report = state, now

    try:
        while True:
            value = probe()
            if value is not None:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = f"; last state: {describe()}" if describe else ""
                raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}{state}")
            report()
            time.sleep(min(delay, remaining))  # a poll interval, not a readiness guess
            delay = min(delay * 1.5, max_interval_s)
    except KeyboardInterrupt:
        try:
            report(force=True, prefix="interrupted after ")
        except Exception:  # noqa: BLE001 - the interrupt may have broken the probe's client: say what was seen
            if progress is not None and last_state is not None:
                progress(f"interrupted after waiting {time.monotonic() - start:.0f} s for {what}; "
                         f"last state seen: {last_state}")
        raise


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (bind to 0). Never a fixed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
