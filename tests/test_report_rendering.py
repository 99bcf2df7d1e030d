"""The HTML report opens in a real headless browser and shows the matrix in colour.

Renders with scripts/render-report.sh (chromium), decodes the PNG and counts the pass and fail
cell colours. Skipped only where no chromium is installed (.ci/run installs it).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from hal.cli import main
from hal.conformance.report import _COLOURS, _NEAR

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "render-report.sh"

pytestmark = pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")), reason="no headless browser installed"
)


def decode_png(path: Path) -> tuple[int, int, list[bytes], int]:
    """Width, height, unfiltered RGB(A) rows and channel count of an 8-bit non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour in (2, 6)
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, up_left = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows, channels


def count_colour(rows: list[bytes], channels: int, hex_colour: str) -> int:
    target = bytes.fromhex(hex_colour.lstrip("#"))
    return sum(1 for row in rows for i in range(0, len(row), channels) if row[i : i + 3] == target)


def test_report_renders_with_pass_and_fail_cells(install_plugins, tmp_path):
    """The report a vendor publishes: identity, failures with their reasons in plain text, the matrix, thresholds."""
    install_plugins({"wrong_scale": "wrong_scale"})
    assert main(["conformance", "--backend", "reference", "--backend", "wrong_scale", "--op", "gemm_fp8_nt", "--report", str(tmp_path)]) == 1
    result = subprocess.run([str(SCRIPT), str(tmp_path / "report.html"), str(tmp_path / "report.png")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    width, height, rows, channels = decode_png(tmp_path / "report.png")
    assert (width, height) == (1100, 1400)
    # Passing cells are green (dark: error under half its threshold; light: at least half).
    green = count_colour(rows, channels, _COLOURS["pass"]) + count_colour(rows, channels, _NEAR)
    red = count_colour(rows, channels, _COLOURS["fail"])
    assert green > 2000 and red > 2000, (green, red)  # eleven pass cells (10 reference + 1) and six fail cells, plus legend chips
    assert green > red


def test_failure_reasons_are_in_the_document_not_only_in_tooltips(install_plugins, tmp_path):
    import re

    install_plugins({"wrong_scale": "wrong_scale"})
    main(["conformance", "--backend", "reference", "--backend", "wrong_scale", "--op", "gemm_fp8_nt", "--report", str(tmp_path), "--no-certify"])
    page = (tmp_path / "report.html").read_text()
    visible = re.sub(r'title="[^"]*"', "", page)  # what a printout or screenshot shows
    assert '<ul id="failures">' in visible and "expected" in visible.split('<ul id="failures">')[1].split("</ul>")[0]
    assert "<title>unihal conformance: reference, wrong_scale" in page and 'id="thresholds"' in page
    markdown = (tmp_path / "report.md").read_text()
    assert "mismatches 0 (< 0)" not in markdown and "## Failures (6)" in markdown
