"""A progress bar on stderr for a replay: seconds of video done out of the total, and responses so far.

tqdm draws it where it is installed (it comes with transformers); otherwise a plain line rewritten in place.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class _PlainBar:
    """The bar without tqdm: `name  12/60 s  3 responses`, redrawn at most 10 times a second."""

    def __init__(self, total: float | None, desc: str, file: TextIO) -> None:
        self.total, self.desc, self.file = total, desc, file
        self.n = 0.0
        self.postfix = ""
        self._drawn = 0.0

    def update(self, seconds: float) -> None:
        self.n += seconds
        if time.monotonic() - self._drawn >= 0.1:
            self._draw()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        total = f"/{self.total:.0f}" if self.total else ""
        self.file.write(f"\r{self.desc}  {self.n:.0f}{total} s  {self.postfix}")
        self.file.flush()

    def close(self) -> None:
        self._draw()
        self.file.write("\n")
        self.file.flush()


class Progress:
    """Seconds replayed and responses heard; draws nothing when `enabled` is False."""

    def __init__(self, total_s: float | None, desc: str, enabled: bool, file: TextIO = sys.stderr) -> None:
        self._bar: Any = None
        self.responses = 0
        self._done_s = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = _PlainBar(total_s, desc, file)
        else:
            self._bar = tqdm(total=round(total_s, 1) if total_s else None, desc=desc, unit="s", file=file,
                             dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                        "[{elapsed}<{remaining}{postfix}]" if total_s else None)
        self._bar.set_postfix_str("0 responses", refresh=False)

    def advance(self, to_s: float, spoke: bool) -> None:
        if spoke:
            self.responses += 1
        if self._bar is None:
            return
        if spoke:
            self._bar.set_postfix_str(f"{self.responses} response{'s' if self.responses != 1 else ''}",
                                      refresh=False)
        self._bar.update(max(0.0, to_s - self._done_s))
        self._done_s = max(self._done_s, to_s)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
