"""A lossy network for one aiortc peer connection, in the style of aiortc's own tests: its UDP datagrams (STUN,
DTLS, SRTP, SCTP alike) are dropped on purpose, both ways, at a loss rate or all of them (a blackout).

The drop happens between aioice's `StunProtocol` and its asyncio datagram transport, so everything above (ICE
consent checks, RTP retransmissions, SCTP retransmissions) sees real loss and reacts as it would on a bad link.
Only the peer connection it is attached to is impaired: another peer in the same process (the gateway's, in the
local tests) keeps its own network.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
from aiortc import RTCPeerConnection


@dataclass
class PathCounters:
    """Datagrams that went through and that were dropped, each way."""

    sent: int = 0
    received: int = 0
    dropped_out: int = 0
    dropped_in: int = 0


class _LossyTransport:
    """An asyncio datagram transport whose `sendto` drops what the path says to drop."""

    def __init__(self, inner: Any, path: ImpairedPath) -> None:
        self._inner = inner
        self._path = path

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self._path.drops():
            self._path.counters.dropped_out += 1
            return
        self._path.counters.sent += 1
        self._inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class ImpairedPath:
    """Loss on the media path of the peer connections it is attached to: `loss` is the share of datagrams
    dropped each way; during a blackout every datagram is."""

    loss: float = 0.0
    seed: int = 0
    counters: PathCounters = field(default_factory=PathCounters)
    blackout_since: float | None = None
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def drops(self) -> bool:
        return self.blackout_since is not None or (self.loss > 0 and self._random.random() < self.loss)

    def black_out(self) -> float:
        """Drop everything from now on, until `restore`; returns when it began (monotonic)."""
        self.blackout_since = time.monotonic()
        return self.blackout_since

    def restore(self) -> float:
        """End a blackout (the loss rate stays); returns when (monotonic)."""
        self.blackout_since = None
        return time.monotonic()

    def attach(self, pc: RTCPeerConnection) -> None:
        """Impair every datagram socket of `pc`'s ICE transports (call it once candidates are gathered)."""
        for connection in ice_connections(pc):
            for protocol in connection._protocols:
                self._wrap(protocol)

    def _wrap(self, protocol: aioice.ice.StunProtocol) -> None:
        if isinstance(protocol.transport, _LossyTransport):
            return
        protocol.transport = _LossyTransport(protocol.transport, self)  # type: ignore[assignment]
        deliver = protocol.datagram_received

        def datagram_received(data: bytes | str, addr: tuple[Any, ...]) -> None:
            if self.drops():
                self.counters.dropped_in += 1
                return
            self.counters.received += 1
            deliver(data, addr)

        protocol.datagram_received = datagram_received  # type: ignore[method-assign]


def ice_connections(pc: RTCPeerConnection) -> list[aioice.ice.Connection]:
    """The aioice connections under a peer connection's media and data transports (one when bundled)."""
    transports = [t.sender.transport for t in pc.getTransceivers() if t.sender.transport is not None]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    connections: list[aioice.ice.Connection] = []
    for dtls in transports:
        connection = dtls.transport._connection
        if connection not in connections:
            connections.append(connection)
    return connections
