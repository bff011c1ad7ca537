"""A log-linear histogram of latencies, every percentile within 1.6 %.

Per-message latencies go into :class:`LogHistogram`: 32 sub-buckets per
power of two, so every percentile read from a bucket's middle is within
1.6 % of the true value; values below 64 ns are exact. A histogram is a
plain ``{bucket: count}`` dict underneath, so a load process sends its
counts to the main process as a dict and the main process merges them.
"""

from __future__ import annotations

import math


class LogHistogram:
    """Log-linear histogram of non-negative integers (nanoseconds here).

    Values below 64 have a bucket each; above, every power of two is split in
    32 buckets, so a bucket's width is under 1/32 of its value and a
    percentile read from the middle of its bucket is within 1.6 %.
    """

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    @staticmethod
    def index(v: int) -> int:
        """The bucket of ``v`` (0 for anything below 1)."""
        if v < 64:
            return v if v > 0 else 0
        shift = v.bit_length() - 6
        return 64 + (shift - 1) * 32 + ((v >> shift) - 32)

    @staticmethod
    def bounds(idx: int) -> tuple[int, int]:
        """[low, high) of a bucket."""
        if idx < 64:
            return idx, idx + 1
        shift = (idx - 64) // 32 + 1
        low = ((idx - 64) % 32 + 32) << shift
        return low, low + (1 << shift)

    def add(self, v: int, n: int = 1) -> None:
        i = self.index(v)
        self.counts[i] = self.counts.get(i, 0) + n

    def merge(self, other: LogHistogram) -> None:
        for i, n in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, p: float) -> float | None:
        """Value at percentile ``p`` (0-100), bucket midpoint; None when empty."""
        total = self.total
        if not total:
            return None
        rank = max(1, math.ceil(total * p / 100.0))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                low, high = self.bounds(i)
                return low if high - low == 1 else (low + high) / 2
        return None  # pragma: no cover - rank <= total

    def max(self) -> float | None:
        if not self.counts:
            return None
        return float(self.bounds(max(self.counts))[1] - 1)

    def min(self) -> float | None:
        if not self.counts:
            return None
        return float(self.bounds(min(self.counts))[0])

    def summary(self) -> dict[str, float | None]:
        return {
            "count": self.total,
            "p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99),
            "p99.9": self.percentile(99.9), "max": self.max(), "min": self.min(),
        }

    def octaves(self) -> list[tuple[int, int, int]]:
        """Counts per power of two: ``(low, high, count)`` from min to max (for drawing)."""
        if not self.counts:
            return []
        per: dict[int, int] = {}
        for i, n in self.counts.items():
            low, _ = self.bounds(i)
            k = max(low, 1).bit_length() - 1
            per[k] = per.get(k, 0) + n
        lo, hi = min(per), max(per)
        return [(1 << k, 1 << (k + 1), per.get(k, 0)) for k in range(lo, hi + 1)]

