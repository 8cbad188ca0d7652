"""Every tick of a stream accounted for, from its session's event log once the stream has ended.

The log must hold ticks 1..n, each number once; n must be what the time the session streamed gives at Vigil's tick
rate; and every tick the stream heard must be in it. The session ticked from its offer's answer (between starting
to connect and having connected) until its end (between starting to close and having closed), so n lies between
those times over the tick interval, give or take `TICK_SLACK`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

TICK_SLACK = 2  # ticks: the first and last of a session fall either side of the generator's clock readings
PAGE = 1000  # the events endpoint's largest page
MAX_PAGES = 100
LISTED = 20  # missing or duplicated tick numbers listed in the report, at most


@dataclass(frozen=True, slots=True)
class TickLedger:
    """One stream's ticks as its session's event log holds them."""

    stream: int
    session_id: str
    logged: int
    expected_min: int
    expected_max: int
    streamed_s: float
    first: int | None = None
    last: int | None = None
    missing: int = 0
    duplicated: int = 0
    heard_not_logged: int = 0
    examples: list[int] = field(default_factory=list)  # a few of the missing and duplicated numbers
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.logged > 0 and self.first == 1 and self.missing == 0
                and self.duplicated == 0 and self.heard_not_logged == 0
                and self.expected_min <= self.logged <= self.expected_max)

    def described(self) -> str:
        if self.error is not None:
            return f"not checked: {self.error}"
        problems = []
        if self.logged and self.first != 1:
            problems.append(f"starts at {self.first}")
        if self.missing:
            problems.append(f"{self.missing} missing")
        if self.duplicated:
            problems.append(f"{self.duplicated} recorded twice")
        if self.heard_not_logged:
            problems.append(f"{self.heard_not_logged} heard but not logged")
        if not self.expected_min <= self.logged <= self.expected_max:
            problems.append(f"{self.logged} for {self.streamed_s:.0f} s of streaming, expected "
                            f"{self.expected_min}-{self.expected_max}")
        return "ok" if not problems else "; ".join(problems)


def account(
    stream: int, session_id: str, logged: Sequence[int], heard: Iterable[int], interval_s: float,
    connect_began: float, connected_at: float, closing_at: float, closed_at: float,
) -> TickLedger:
    """Check the tick numbers of one session's event log (`logged`, in log order) against the ticks its stream
    `heard` and the generator's monotonic times around its connecting and closing."""
    counts = Counter(logged)
    last = max(counts) if counts else None
    missing = sorted(set(range(1, (last or 0) + 1)) - set(counts))
    duplicated = sorted(n for n, c in counts.items() if c > 1)
    return TickLedger(
        stream=stream, session_id=session_id, logged=len(logged),
        expected_min=max(0, math.floor((closing_at - connected_at) / interval_s) - TICK_SLACK),
        expected_max=math.ceil((closed_at - connect_began) / interval_s) + TICK_SLACK,
        streamed_s=closing_at - connected_at, first=min(counts) if counts else None, last=last,
        missing=len(missing), duplicated=len(duplicated), heard_not_logged=len(set(heard) - set(counts)),
        examples=(missing + duplicated)[:LISTED],
    )


async def logged_ticks(http: httpx.AsyncClient, session_id: str, token: str) -> list[int]:
    """The tick numbers of a session's event log, in log order, read a page at a time."""
    headers = {"Authorization": f"Bearer {token}", "x-session-id": session_id}
    numbers: list[int] = []
    after = 0
    for _ in range(MAX_PAGES):
        reply = await http.get(f"/v1/sessions/{session_id}/events", params={"after": after, "limit": PAGE},
                               headers=headers)
        reply.raise_for_status()
        events: list[dict[str, Any]] = reply.json()["events"]
        numbers += [int(event["tick"]) for event in events]
        if len(events) < PAGE:
            return numbers
        after = numbers[-1]
    raise RuntimeError(f"more than {MAX_PAGES * PAGE} events")
