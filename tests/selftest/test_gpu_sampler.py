"""GPU clocks during a load point (pdperf.loadgen.telemetry.GpuSampler).

These machines have no GPU: a stand-in ``nvidia-smi`` on PATH plays one, reading its rows from
a file the test rewrites between samples. The point is the parsing and the summary.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from pdperf.loadgen.telemetry import GpuSampler, TelemetryWindow, reason_names

pytestmark = pytest.mark.selftest


@pytest.fixture
def smi(tmp_path, monkeypatch):
    """Returns set_rows(text, fail_on_event_field=False): what the next nvidia-smi call prints."""
    rows, argv = tmp_path / "rows.txt", tmp_path / "argv.txt"
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n"
                    f'echo "$@" >> {argv}\n'
                    f'if [ -f {tmp_path}/old-driver ] && echo "$@" | grep -q clocks_event_reasons; then\n'
                    '  echo "Field clocks_event_reasons.active is not a valid field" >&2; exit 2; fi\n'
                    f"cat {rows}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")

    def set_rows(text: str, *, old_driver: bool = False) -> None:
        rows.write_text(text)
        (tmp_path / "old-driver").touch() if old_driver else None

    set_rows.argv = argv
    return set_rows


def test_a_point_keeps_each_gpus_series_and_the_reasons_while_busy(smi):
    ticks = iter(range(100))
    gpu = GpuSampler(clock=lambda: float(next(ticks)))
    smi("0, 1980, 650.5, 61, 0x0000000000000000\n1, 345, 70.1, 35, 0x0000000000000001\n")
    gpu.sample()
    smi("0, 1410, 699.9, 84, 0x0000000000000024\n1, 345, 70.3, 35, 0x0000000000000001\n")
    gpu.sample()
    r = gpu.result()
    busy = r["per_gpu"]["0"]
    assert busy["sm_clock_mhz_min"] == 1410 and busy["sm_clock_mhz_max"] == 1980 and busy["temp_c_max"] == 84
    assert busy["clock_reasons_busy"] == ["sw_power_cap", "sw_thermal_slowdown"]
    idle = r["per_gpu"]["1"]  # idle throughout (a PD run on 2 of 4 GPUs): its idle clocks are still shown
    assert idle["busy_samples"] == 2 and idle["clock_reasons_busy"] == []
    assert r["series"]["0"][1] == [1.0, 1410.0, 699.9, 84.0, 0x24]
    json.loads(json.dumps(r, allow_nan=False))  # strict JSON: no NaN where a field is not reported


def test_an_older_driver_gets_the_older_field_name(smi):
    smi("0, 1980, [N/A], 61, 0x0000000000000004\n", old_driver=True)
    gpu = GpuSampler()
    gpu.sample()
    gpu.sample()
    r = gpu.result()["per_gpu"]["0"]
    assert r["clock_reasons_busy"] == ["sw_power_cap"] and r["power_w_max"] is None
    calls = smi.argv.read_text().splitlines()
    assert "clocks_throttle_reasons.active" in calls[-1] and len(calls) == 3  # the new name tried once only


def test_failures_are_kept_not_raised(smi, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    gpu = GpuSampler()
    gpu.sample()
    assert "FileNotFoundError" in gpu.result()["errors"][0]


def test_the_telemetry_window_carries_it_and_nothing_without_it(smi):
    smi("0, 1980, 650, 61, 0x0\n")
    window = TelemetryWindow([], gpu=GpuSampler())
    window.start(), window.sample(), window.stop()
    assert window.result().gpu["per_gpu"]["0"]["samples"] == 3
    plain = TelemetryWindow([])
    plain.start(), plain.sample(), plain.stop()
    assert not plain.result().gpu


def test_reason_names():
    assert reason_names(0x45) == ["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]
    assert reason_names(0x400) == ["0x400"]
