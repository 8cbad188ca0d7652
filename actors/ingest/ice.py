"""ICE settings of Vigil's peer connections: STUN/TURN servers, host addresses, and allowed remote networks.

aiortc gathers host candidates on every interface but loopback and offers no setting to change that, so
`restrict_host_addresses` replaces the address lookup of aioice for the whole process. Vigil uses it to keep
a loopback deployment (tests, benchmarks, a laptop) on 127.0.0.1 only.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

log = logging.getLogger(__name__)

_original_get_host_addresses = aioice.ice.get_host_addresses


def rtc_configuration(ice_servers: Sequence[str]) -> RTCConfiguration:
    """Peer connection configuration; no STUN server unless configured (aiortc would use a public one)."""
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in ice_servers])


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Gather host candidates on exactly these addresses (empty: aioice's default, loopback excluded)."""
    for address in addresses:
        ipaddress.ip_address(address)
    if not addresses:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    chosen = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (ipaddress.ip_address(a).version == 4 and use_ipv4)
                or (ipaddress.ip_address(a).version == 6 and use_ipv6)]

    aioice.ice.get_host_addresses = host_addresses
    log.info("ICE host candidates restricted to %s", chosen)


def filter_remote_candidates(sdp: str, allowed_networks: Sequence[str]) -> str:
    """Drop `a=candidate` lines whose address is outside `allowed_networks` (no filter when empty).

    Candidates with a hostname (mDNS) are dropped too when a filter is set: they cannot be checked.
    """
    if not allowed_networks:
        return sdp
    networks = [ipaddress.ip_network(net, strict=False) for net in allowed_networks]
    kept: list[str] = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            try:
                address = ipaddress.ip_address(parts[4])
            except (IndexError, ValueError):
                continue
            if not any(address in net for net in networks):
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"
