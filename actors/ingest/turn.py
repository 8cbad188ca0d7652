"""Short-lived TURN credentials for clients, in the TURN REST API scheme that coturn's `use-auth-secret` checks.

A browser behind NAT reaches an ingest replica in a pod through a TURN relay. Vigil never stores TURN users:
the relay and Vigil share one secret, and each session is handed a username `"<expiry>:<session id>"` and the
password `base64(HMAC-SHA1(secret, username))`. The relay recomputes the password from the username and refuses
it once the expiry (Unix seconds) has passed. A relay checks the credentials only when a client allocates, so
an established stream outlives them; they only have to last until the session's last reconnect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from actors.common.config import VigilConfig


def turn_password(secret: str, username: str) -> str:
    """The password a TURN relay with this shared secret expects for `username`."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def turn_credentials(secret: str, session_id: str, ttl_s: int, now: float) -> tuple[str, str]:
    """`(username, password)` for `session_id`, valid for `ttl_s` seconds from `now`."""
    username = f"{int(now) + ttl_s}:{session_id}"
    return username, turn_password(secret, username)


def client_ice_servers(config: VigilConfig, session_id: str, now: float | None = None) -> dict[str, Any]:
    """`{"iceServers": [...]}` for a session's client (the RTCConfiguration member, so a browser can pass it as
    is), or `{}` when no TURN relay is configured (`turn_urls` and `turn_secret` both set)."""
    if not config.turn_urls or config.turn_secret is None:
        return {}
    # Unset, the credentials last as long as a session can: a client reconnecting hours later (its replica
    # drained, its network changed) allocates again with the newest ones it was handed.
    ttl_s = config.turn_ttl_s if config.turn_ttl_s is not None else config.session_ttl_s
    username, password = turn_credentials(
        config.turn_secret.get_secret_value(), session_id, ttl_s, time.time() if now is None else now
    )
    return {"iceServers": [{"urls": list(config.turn_urls), "username": username, "credential": password}]}
