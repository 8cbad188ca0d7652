"""Stream time as people read it: the HH:MM:SS that memory lines, recalls and the prompt show."""

from __future__ import annotations


def clock(stream_time: float) -> str:
    """Stream time as HH:MM:SS, e.g. `03:14:07` for 3 h 14 min 7.9 s."""
    seconds = int(stream_time)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
