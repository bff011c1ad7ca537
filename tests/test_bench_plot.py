"""``chatpair bench --plot`` and the data behind it in ``--json``.

The picture is drawn from the histogram buckets and the throughput series
that ``--json`` prints; these tests check that the two agree with the run's
counts, that the SVG is well-formed and has both charts, and (where
``rsvg-convert`` is installed) that it renders to a PNG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from chatpair.bench import BenchConfig, LogHistogram, run_bench
from chatpair.bench.plot import latency_bins, nice_ticks, render_svg, time_ticks
from chatpair.bench.result import BenchResult

ROOT = Path(__file__).resolve().parent.parent
SVG = "{http://www.w3.org/2000/svg}"
pytestmark = pytest.mark.timeout(60)


def _texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


# -- pure pieces ----------------------------------------------------------------------------


def test_bins_keep_every_sample_and_ticks_are_round() -> None:
    h = LogHistogram()
    for v in range(1, 5000):
        h.add(v * 997)
    bins = latency_bins(h)
    assert sum(n for _, _, n in bins) == h.total
    assert all(low < high for low, high, _ in bins)
    assert nice_ticks(2.003, 8)[-1] >= 2.003 and nice_ticks(0) == [0.0, 1.0]
    assert nice_ticks(4_700_000, 4) == [0, 2_000_000, 4_000_000, 6_000_000]
    assert time_ticks(400e3, 15e6) == [500e3, 1e6, 2e6, 5e6, 10e6]


def test_an_empty_result_still_draws() -> None:
    result = BenchResult(config={}, mode="flood", pairs=1, procs=1, size=64)
    texts = _texts(render_svg(result))
    assert "no samples" in texts and "no messages were delivered" in texts


# -- a real run ----------------------------------------------------------------------------------


def test_json_has_buckets_and_series_the_counts_agree_with() -> None:
    result = run_bench(BenchConfig(mode="flood", pairs=2, duration=0.5, size=40))
    assert result.ok, result.failures
    data = json.loads(json.dumps(result.to_dict()))
    buckets = data["latency"]["buckets"]
    assert sum(n for _, _, n in buckets) == data["latency"]["count"] == data["delivered"]
    assert all(low < high for low, high, _ in buckets)
    series = data["throughput_series"]
    assert series["interval_s"] == 0.1  # a short run: per tenth of a second
    assert sum(series["delivered"]) == data["delivered"]
    assert len(series["start_s"]) == len(series["msgs_per_s"]) == len(series["width_s"])
    assert 3 <= len(series["start_s"]) <= 7
    assert series["start_s"] == sorted(series["start_s"])
    assert all(rate > 0 for rate in series["msgs_per_s"][:-1])

    texts = _texts(render_svg(result))
    assert any(t.startswith("One-way latency") for t in texts)
    assert any(t.startswith("Throughput over time") for t in texts)
    assert any(t.startswith("p99 ") for t in texts) and any(t.startswith("mean ") for t in texts)


def test_pingpong_and_idle_draw_what_they_have() -> None:
    pingpong = run_bench(BenchConfig(mode="pingpong", pairs=1, messages=50, size=40))
    texts = _texts(render_svg(pingpong))
    assert any("round trip p50" in t for t in texts)
    assert any("too short" in t for t in texts)  # the warning is on the picture too
    idle = run_bench(BenchConfig(mode="idle", pairs=2, duration=0.1))
    texts = _texts(render_svg(idle))
    assert any(t.startswith("Time to pair") for t in texts) and "idle mode sends no messages" in texts
    assert idle.to_dict()["throughput_series"]["delivered"] == []


def test_cli_writes_svg_and_png(tmp_path: Path) -> None:
    svg, png = tmp_path / "run.svg", tmp_path / "run.png"
    proc = subprocess.run(
        [sys.executable, "-m", "chatpair", "bench", "--pairs", "2", "--messages", "200", "--plot", str(svg)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "120"}, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    ET.fromstring(svg.read_text(encoding="utf-8"))  # well-formed
    if shutil.which("rsvg-convert") is None:
        pytest.skip("rsvg-convert (librsvg2-bin) is not installed: PNG not checked")
    proc = subprocess.run(
        [sys.executable, "-m", "chatpair", "bench", "--pairs", "2", "--messages", "200", "--plot", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- percentile labels ------------------------------------------------------------------------


def _marks(svg: str) -> tuple[dict[str, tuple[float, str]], dict[str, tuple[float, float, str, float]]]:
    """The dashed percentile lines by colour (x) and their labels by name: (anchor x, y, anchor, width)."""
    from chatpair.bench.plot import text_width

    root = ET.fromstring(svg)
    lines = {ln.get("stroke"): float(ln.get("x1")) for ln in root.iter(f"{SVG}line")
             if ln.get("stroke-dasharray") == "4 3"}
    labels = {}
    for t in root.iter(f"{SVG}text"):
        text = "".join(t.itertext())
        name = text.split(" ")[0]
        if name in ("p50", "p99", "p99.9"):
            labels[name] = (float(t.get("x")), float(t.get("y")), t.get("text-anchor"), text_width(text),
                            t.get("fill"))
    return lines, labels


def test_close_p99_and_p999_labels_sit_each_by_its_own_line() -> None:
    """The case from the field: p99 13 ms and p99.9 14.8 ms near the right end, p50 2 ms.

    ``p99.9 14.81 ms`` used to end just left of its line, across the p99 line,
    with ``p99 12.98 ms`` starting right of that: the labels read crossed.
    """
    import random

    rng = random.Random(1)
    result = BenchResult(config={}, mode="flood", pairs=10, procs=1, size=64)
    for _ in range(98_000):
        result.latency.add(int(rng.lognormvariate(14.5, 0.5)))
    for _ in range(1_850):
        result.latency.add(int(rng.uniform(12.5e6, 13.3e6)))
    for _ in range(150):
        result.latency.add(int(rng.uniform(14.6e6, 15.0e6)))
    lines, labels = _marks(render_svg(result))
    assert set(labels) == {"p50", "p99", "p99.9"} and len(lines) == 3  # one colour per percentile
    boxes = {}
    for name, (x, y, anchor, width, colour) in labels.items():
        own = lines[colour]  # the label has its line's colour ...
        assert abs(x - own) == pytest.approx(4)  # ... and touches that line
        left, right = (x, x + width) if anchor == "start" else (x - width, x)
        assert not any(left - 4 < other < right + 4 for other in lines.values() if other != own), name
        boxes[name] = (left, right, y)
    # left to right, p99 before p99.9; they are close, so p99's label is on the left of its line
    assert labels["p99"][2] == "end" and labels["p99.9"][2] == "start"
    assert boxes["p99"][1] < lines[labels["p99"][4]] < lines[labels["p99.9"][4]] < boxes["p99.9"][0]
    for a, b in (("p50", "p99"), ("p99", "p99.9"), ("p50", "p99.9")):
        (la, ra, ya), (lb, rb, yb) = boxes[a], boxes[b]
        assert ya != yb or ra < lb or rb < la  # labels never overlap


def test_labels_never_swap_nor_overlap() -> None:
    """place_labels on many random line positions, crowded ones included."""
    import random

    from chatpair.bench.plot import GAP, out_of_order, place_labels

    rng = random.Random(7)
    texts = ["p50 2.02 ms", "p99 12.98 ms", "p99.9 14.81 ms"]
    for _ in range(3000):
        xs = sorted(rng.uniform(95, 875) for _ in range(3))
        if rng.random() < 0.4:  # the two tails close together
            xs[2] = min(xs[1] + rng.uniform(0, 40), 875)
        placed = place_labels(list(zip(xs, texts)), 90, 880)
        for p in placed:
            assert abs(p.anchor_x - xs[p.index]) == pytest.approx(GAP)  # beside its own line
        for i, a in enumerate(placed):
            for b in placed[i + 1:]:
                assert not out_of_order((a.left, a.right, a.anchor, 0), (b.left, b.right, b.anchor, 0)), xs
                assert a.row != b.row or a.right < b.left or b.right < a.left, xs
        if min(xs[1] - xs[0], xs[2] - xs[1]) > 110:  # room on some side: no label across another line
            for p in placed:
                assert not any(p.left - GAP < xv < p.right + GAP for k, xv in enumerate(xs) if k != p.index)
