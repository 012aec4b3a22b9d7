"""Binary byte units, and how llmc prints a byte count and GPU-hours (one definition for every module)."""

from __future__ import annotations

GiB = 2**30
MiB = 2**20


def gib(b: float) -> str:
    """Bytes as GiB (MiB below 1 GiB, so small runs do not read 0.0)."""
    if abs(b) < GiB:
        return f"{b / MiB:.1f} MiB"
    return f"{b / GiB:.1f} GiB"


def gb(x: float) -> str:
    """Bytes in decimal units, as storage is sold: '96.4 GB', '4.87 TB', '15.7 MB'."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if x >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x / 1e3:.3g} kB"


def hours(h: float) -> str:
    """GPU-hours as llmc prints them: whole hours from 10 on, three significant digits below (a CPU run's 0.0134
    does not read 0)."""
    return f"{h:,.0f}" if abs(h) >= 10 else f"{h:.3g}"
