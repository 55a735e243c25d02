"""poll_until on a fake clock (no real sleeping), plus one short real-time timeout; free_port.

The fake clock replaces ``pdperf.waiting.time``: ``sleep`` advances virtual time, so the
back-off schedule and the deadline are checked exactly and the tests take no time.
"""

from __future__ import annotations

import socket

import pytest

from pdperf import waiting
from pdperf.errors import DeployError
from pdperf.waiting import WaitTimeout, free_port, poll_until

pytestmark = pytest.mark.selftest


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(waiting, "time", fake)
    return fake


def probe_sequence(*values):
    """A probe returning these values in turn (then the last one forever); counts its calls."""
    seq = list(values)

    def probe():
        probe.calls += 1
        return seq.pop(0) if len(seq) > 1 else seq[0]

    probe.calls = 0
    return probe


def test_returns_the_value_once_the_probe_has_one(clock):
    probe = probe_sequence(None, None, {"ready": True})
    assert poll_until(probe, what="the thing", timeout_s=60, interval_s=1.0) == {"ready": True}
    assert probe.calls == 3
    assert clock.sleeps == [1.0, 1.5]


@pytest.mark.parametrize("falsy", [0, False, "", []])
def test_a_falsy_value_is_an_answer_only_none_means_not_yet(clock, falsy):
    assert poll_until(probe_sequence(falsy), what="x", timeout_s=1) == falsy
    assert clock.sleeps == []


def test_backs_off_to_the_cap_and_stops_at_the_deadline(clock):
    probe = probe_sequence(None)
    with pytest.raises(WaitTimeout):
        poll_until(probe, what="x", timeout_s=20, interval_s=1.0, max_interval_s=3.0)
    assert clock.sleeps[:4] == [1.0, 1.5, 2.25, 3.0]
    assert max(clock.sleeps) == 3.0
    assert sum(clock.sleeps) == pytest.approx(20.0)  # the last sleep is cut to the deadline
    assert probe.calls == len(clock.sleeps) + 1  # a final look after the last sleep


def test_timeout_names_what_was_awaited_and_the_last_state(clock):
    states = iter(["replicas 0/2 starting", "replicas 1/2 starting"])
    last = []

    def describe():
        last.append(next(states))
        return last[-1]

    with pytest.raises(WaitTimeout) as e:
        poll_until(probe_sequence(None), what="Serve application 'x' to be RUNNING", timeout_s=0.2, interval_s=0.05,
                   describe=describe)
    msg = str(e.value)
    assert msg == "timed out after 0.2 s waiting for Serve application 'x' to be RUNNING; last state: replicas 0/2 starting"
    assert isinstance(e.value, TimeoutError)
    assert len(last) == 1  # described once, at the deadline


def test_timeout_without_describe(clock):
    with pytest.raises(WaitTimeout) as e:
        poll_until(probe_sequence(None), what="port 1 to answer", timeout_s=5)
    assert str(e.value) == "timed out after 5 s waiting for port 1 to answer"


def test_zero_timeout_still_probes_once(clock):
    probe = probe_sequence(None)
    with pytest.raises(WaitTimeout):
        poll_until(probe, what="x", timeout_s=0)
    assert probe.calls == 1 and clock.sleeps == []


def test_probe_exception_propagates_at_once(clock):
    err = DeployError("topology t: Serve reports DEPLOY_FAILED")
    calls = []

    def probe():
        calls.append(1)
        if len(calls) == 2:
            raise err
        return None

    with pytest.raises(DeployError) as e:
        poll_until(probe, what="x", timeout_s=600)
    assert e.value is err and len(calls) == 2 and len(clock.sleeps) == 1


def test_real_clock_short_timeout():
    """The real clock and sleep, under a 0.2 s deadline (asserts the outcome, not the time taken)."""
    with pytest.raises(WaitTimeout, match=r"waiting for nothing; last state: idle"):
        poll_until(lambda: None, what="nothing", timeout_s=0.2, interval_s=0.01, describe=lambda: "idle")


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()


def test_progress_reports_each_change_and_a_heartbeat(clock):
    states = iter(["DEPLOYING", "DEPLOYING", "DEPLOYING", "RUNNING?"] + ["RUNNING?"] * 100)
    lines: list[str] = []
    probe = probe_sequence(*([None] * 40), True)
    poll_until(probe, what="app", timeout_s=600, interval_s=1.0, describe=lambda: next(states),
               progress=lines.append, progress_every_s=60)
    assert lines[0] == "waiting 0 s for app: DEPLOYING"
    assert "RUNNING?" in lines[1] and "DEPLOYING" not in lines[1]
    # the later lines are heartbeats of an unchanged state, at least 60 s apart
    assert len(lines) >= 3 and all("RUNNING?" in ln for ln in lines[2:])


def test_interrupt_reports_the_last_state_then_propagates(clock):
    lines: list[str] = []

    def probe():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        poll_until(probe, what="app", timeout_s=60, describe=lambda: "app DEPLOYING; 1 placement group(s) not yet "
                   "placed", progress=lines.append)
    assert lines == ["interrupted after waiting 0 s for app: app DEPLOYING; 1 placement group(s) not yet placed"]


def test_without_progress_describe_is_only_used_on_timeout(clock):
    calls = []
    with pytest.raises(WaitTimeout, match="last state: s"):
        poll_until(lambda: None, what="x", timeout_s=5, describe=lambda: calls.append(1) or "s")
    assert len(calls) == 1


def test_interrupt_with_a_broken_describe_reports_the_last_state_seen(clock):
    lines: list[str] = []
    calls = {"n": 0}

    def describe():
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("the client is gone")
        return "app DEPLOYING"

    def probe():
        if calls["n"] >= 1:
            raise KeyboardInterrupt
        return None

    with pytest.raises(KeyboardInterrupt):
        poll_until(probe, what="app", timeout_s=60, describe=describe, progress=lines.append)
    assert lines == ["waiting 0 s for app: app DEPLOYING",
                     "interrupted after waiting 0 s for app; last state seen: app DEPLOYING"]
