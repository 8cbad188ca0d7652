"""Session quotas: how many sessions one API key and one client address may hold at once, on every replica."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from typing import Literal, cast

import redis.asyncio as redis

from actors.common.session_store import KEY_PREFIX as SESSION_PREFIX

log = logging.getLogger(__name__)

Quota = Literal["key", "address"]
QUOTA_PREFIX = "vigil:quota:"

# KEYS[1]: the set of quotas the session is in; KEYS[2..]: the quotas it joins. ARGV[1]: the session id;
# ARGV[2]: now; ARGV[3]: when it leaves (epoch seconds); ARGV[2 + i]: the limit of KEYS[i].
# Prunes every quota of the sessions that have left it. If one is full (and does not hold the session already),
# writes nothing and returns {its position among KEYS[2..], the soonest time a session leaves it}; else the
# session joins them all: {}.
_ADMIT = """
local now = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('zremrangebyscore', KEYS[i], '-inf', now)
  if not redis.call('zscore', KEYS[i], ARGV[1]) and redis.call('zcard', KEYS[i]) >= tonumber(ARGV[i + 2]) then
    local soonest = redis.call('zrange', KEYS[i], 0, 0, 'WITHSCORES')
    return {i - 1, soonest[2]}
  end
end
for i = 2, #KEYS do
  redis.call('zadd', KEYS[i], ARGV[3], ARGV[1])
  redis.call('sadd', KEYS[1], KEYS[i])
  local latest = redis.call('zrange', KEYS[i], -1, -1, 'WITHSCORES')
  redis.call('expireat', KEYS[i], string.format('%.0f', math.ceil(tonumber(latest[2]))))
end
redis.call('expireat', KEYS[1], string.format('%.0f', math.ceil(tonumber(ARGV[3]))))
return {}
"""


class QuotaExceeded(Exception):
    """The API key or the client address already holds as many sessions as its quota allows."""

    def __init__(self, quota: Quota, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the {quota} quota of {limit} sessions is used up; a slot frees in {retry_after_s} s")
        self.quota: Quota = quota
        self.limit = limit
        self.retry_after_s = retry_after_s


def key_id(api_key: str) -> str:
    """What a key quota is kept under: a hash of the API key, never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def address_id(host: str) -> str:
    """What an address quota is kept under: an IPv4 address, or the /64 network of an IPv6 one (one subscriber's
    allocation holds many addresses); a host that is not an IP address, as given."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def client_address(peer: str | None, forwarded_for: str, trust_forwarded_for: bool) -> str:
    """The address a session is counted against: the connection's peer; or, when a proxy in front is trusted,
    the address that proxy appended to X-Forwarded-For (the right-most: those before it are the client's word)."""
    if trust_forwarded_for:
        appended = forwarded_for.rpartition(",")[2].strip()
        try:
            return address_id(str(ipaddress.ip_address(appended)))
        except ValueError:
            pass
    return address_id(peer or "unknown")


class SessionQuotas:
    """Caps on the sessions one API key and one client address hold at once, counted in Redis so that every ingest
    replica sees one count.

    Keys: `vigil:quota:key:<sha256 of the key>` and `vigil:quota:address:<address>`, sorted sets of session ids
    scored by when each leaves (epoch seconds), and `vigil:session:<id>:quotas`, the quotas a session is in. A
    session leaves when it is released (ended, or its peer closed) or when its score passes (expired). Pruning,
    the check and the join run in one script, so two replicas cannot both take the last slot.
    """

    def __init__(self, client: redis.Redis, max_per_key: int, max_per_address: int) -> None:
        self._redis = client
        self._limits: dict[Quota, int] = {"key": max_per_key, "address": max_per_address}
        self._admit = client.register_script(_ADMIT)

    @staticmethod
    def _quota_key(quota: Quota, holder: str) -> str:
        return f"{QUOTA_PREFIX}{quota}:{holder}"

    @staticmethod
    def _session_key(session_id: str) -> str:
        return f"{SESSION_PREFIX}{session_id}:quotas"

    async def admit(self, session_id: str, address: str, api_key_id: str | None, expires_at: float) -> None:
        """Count a new session against its address (and its API key's id, if any) until `expires_at`.

        Raises QuotaExceeded, counting nothing, when either quota is full.
        """
        holders: list[tuple[Quota, str]] = [("address", address)]
        if api_key_id is not None:
            holders.insert(0, ("key", api_key_id))
        now = time.time()
        keys = [self._session_key(session_id), *(self._quota_key(q, h) for q, h in holders)]
        args: list[str | int] = [session_id, repr(now), repr(expires_at), *(self._limits[q] for q, _ in holders)]
        full = cast(list[bytes | int], await self._admit(keys=keys, args=args))
        if full:
            quota = holders[int(full[0]) - 1][0]
            raise QuotaExceeded(quota, self._limits[quota], max(1, math.ceil(float(full[1]) - now)))

    async def readmit(self, session_id: str, expires_at: float) -> None:
        """Count a session that connects again (a reconnect, a resume) in the quotas it was admitted to, until
        `expires_at`: a session whose peer closed left them, and may not come back past a full one.

        Raises QuotaExceeded, counting nothing, when one of them is full."""
        members = sorted(cast(set[bytes], await self._redis.smembers(self._session_key(session_id))))
        quotas = [member.decode() for member in members]
        kinds = [cast(Quota, quota.removeprefix(QUOTA_PREFIX).partition(":")[0]) for quota in quotas]
        known = [(quota, kind) for quota, kind in zip(quotas, kinds, strict=True) if kind in self._limits]
        if not known:
            return  # in no quota (created before quotas were kept): nothing to count against
        now = time.time()
        keys = [self._session_key(session_id), *(quota for quota, _ in known)]
        args: list[str | int] = [session_id, repr(now), repr(expires_at), *(self._limits[kind] for _, kind in known)]
        full = cast(list[bytes | int], await self._admit(keys=keys, args=args))
        if full:
            kind = known[int(full[0]) - 1][1]
            raise QuotaExceeded(kind, self._limits[kind], max(1, math.ceil(float(full[1]) - now)))

    async def hold(self, session_id: str, expires_at: float) -> None:
        """Keep the session counted until `expires_at`, in every quota it was admitted to (its peer connected)."""
        try:
            quotas = await self._redis.smembers(self._session_key(session_id))
            async with self._redis.pipeline(transaction=True) as pipe:
                for quota in quotas:
                    pipe.zadd(quota, {session_id: expires_at})
                    pipe.expireat(quota, math.ceil(expires_at))  # no member leaves later than a connected one
                pipe.expireat(self._session_key(session_id), math.ceil(expires_at))
                await pipe.execute()
        except redis.RedisError as exc:
            log.warning("session %s: quotas not extended (%r); its slot frees early", session_id, exc)

    async def release(self, session_id: str) -> None:
        """The session leaves its quotas now; an accepted offer for it later counts it again (`hold`)."""
        try:
            quotas = await self._redis.smembers(self._session_key(session_id))
            async with self._redis.pipeline(transaction=True) as pipe:
                for quota in quotas:
                    pipe.zrem(quota, session_id)
                await pipe.execute()
        except redis.RedisError as exc:
            log.warning("session %s: quotas not released (%r); its slot frees when it expires", session_id, exc)

    async def held(self, quota: Quota, holder: str) -> int:
        """How many sessions `holder` (an address id, or an API key id) holds now."""
        return int(await self._redis.zcount(self._quota_key(quota, holder), f"({time.time()!r}", "+inf"))
