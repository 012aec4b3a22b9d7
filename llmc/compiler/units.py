"""Binary byte units and how llmc prints a byte count (one definition for every module)."""

from __future__ import annotations

GiB = 2**30
MiB = 2**20


def gib(b: float) -> str:
    """Bytes as GiB (MiB below 1 GiB, so small runs do not read 0.0)."""
    if abs(b) < GiB:
        return f"{b / MiB:.1f} MiB"
    return f"{b / GiB:.1f} GiB"
