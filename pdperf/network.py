"""The KV path between prefill and decode engines, from the engines' own metrics.

The reference study's worst failure: UCX fell back to TCP across nodes and TTFT went from
0.36 s to 64 s while decode looked healthy. So a PD point's KV transfers are measured from
NIXL's Prometheus metrics on the engines (``vllm:nixl_*``): how many, how many bytes, how
long; the study's rule of thumb is that healthy EFA SRD moves 10-12 GB/s and below 1 GB/s
across nodes means the wrong transport.
"""

from __future__ import annotations

from pdperf.results import Telemetry


def kv_bandwidth_gb_s(telemetry: Telemetry) -> float | None:
    """Mean NIXL KV transfer bandwidth of a point (GB/s): bytes / (mean transfer time x transfers)."""
    if not telemetry.kv_bytes or not telemetry.kv_transfer_time_s or not telemetry.kv_transfers:
        return None
    return float(telemetry.kv_bytes) / (float(telemetry.kv_transfer_time_s) * float(telemetry.kv_transfers)) / 1e9


def kv_bandwidth_note(telemetry: Telemetry) -> str:
    """"" when the transfer time is exact; else the bandwidth range its histogram buckets prove
    (Ray's metrics export keeps no sums: ``kv_transfer_time_s`` is then a bucket-midpoint estimate)."""
    if "kv_transfer_time_s" not in telemetry.estimated_means:
        return ""
    lo_s, hi_s = telemetry.mean_bounds("kv_transfer_time_s") or (None, None)
    gb = float(telemetry.kv_bytes or 0) / float(telemetry.kv_transfers or 1) / 1e9
    slow = f"{gb / hi_s:.2f}" if hi_s else "0"
    proven = f"{slow} to {gb / lo_s:.2f} GB/s" if lo_s else f"at least {slow} GB/s"
    return f" (estimated: the transfer time comes from Ray's histogram buckets, which prove only {proven})"
