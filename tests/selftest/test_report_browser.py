"""Render the report in a real browser (headless Chromium): does it show what the HTML claims?

String checks on the HTML cannot see a chart that renders blank or CSS that hides a
table. This opens a synthetic report from disk with Debian's headless Chromium (no
network: the report must not need any), checks the rendered DOM has the tables and
``<svg>`` charts, checks the screenshot is not blank, and keeps the screenshot next to the
report (``summary.png``) for a human to look at. Skips with the reason when Chromium is absent.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from pdperf.report import build_report
from pdperf.report.synthetic import write_demo_run

pytestmark = pytest.mark.selftest

WIDTH, HEIGHT = 1280, 2400
BROWSER_TIMEOUT_S = 90


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    pytest.skip("headless Chromium not found (looked for chromium, chromium-browser, /usr/bin/chromium); "
                "install it with: apt-get install -y chromium")


def _run_chromium(binary: str, html: Path, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="pdperf-chromium-") as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *extra, html.resolve().as_uri()]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"chromium did not finish rendering {html} within {BROWSER_TIMEOUT_S} s: {' '.join(cmd)}")


def png_facts(path: Path) -> tuple[int, int, float]:
    """(width, height, fraction of rows with content) of an 8-bit PNG, without an image library.

    PNG rows are stored filtered: a row that repeats the row above (filter Up) or a uniform
    colour (filter Sub) is all zero bytes after its first pixel. So a row with non-zero filtered
    bytes beyond the first pixel differs from a flat background: it has content.
    """
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat = 8, bytearray()
    width = height = color_type = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert bit_depth == 8 and interlace == 0, f"{path}: unexpected PNG format (depth {bit_depth})"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    channels = {2: 3, 6: 4, 0: 1, 4: 2}[color_type]
    raw = np.frombuffer(zlib.decompress(bytes(idat)), dtype=np.uint8).reshape(height, 1 + width * channels)
    content = raw[:, 1 + channels:]  # drop the filter byte and the first pixel of each row
    rows_with_content = np.count_nonzero(content.any(axis=1))
    return width, height, rows_with_content / height


def test_report_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    run_dir = write_demo_run(tmp_path / "run-browser", n=60)
    html = build_report(run_dir)

    dom = _run_chromium(binary, html, "--dump-dom")
    assert dom.returncode == 0, f"chromium --dump-dom failed ({dom.returncode}): {dom.stderr[-2000:]}"
    rendered = dom.stdout
    assert "pdperf run run-browser" in rendered
    assert len(re.findall(r"<svg\b", rendered)) >= 5
    assert len(re.findall(r"<table\b", rendered)) >= 5
    assert "replica_<wbr>restart_<wbr>during_<wbr>load" in rendered or "replica_restart_during_load" in rendered

    shot = run_dir / "summary.png"  # kept next to the report, for a human to look at
    res = _run_chromium(binary, html, f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), f"no screenshot from chromium: {res.stderr[-2000:]}"
    width, height, content = png_facts(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    assert content > 0.3, f"screenshot {shot} is mostly blank ({content:.0%} of rows have content)"
    print(f"screenshot: {shot}")


def test_png_facts_tells_blank_from_content(tmp_path):
    def png(rows: np.ndarray) -> Path:
        h, w, _ = rows.shape
        raw = b"".join(b"\x02" + (rows[i].astype(np.int16) - (rows[i - 1] if i else 0)).astype(np.uint8).tobytes()
                       for i in range(h))  # filter Up everywhere

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        p = tmp_path / f"img{h}x{w}_{int(rows.sum())}.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
        return p

    blank = np.full((40, 30, 3), 255, dtype=np.uint8)
    assert png_facts(png(blank))[2] <= 1 / 40
    striped = blank.copy()
    striped[::2, 5:20] = 0
    assert png_facts(png(striped))[2] > 0.9
