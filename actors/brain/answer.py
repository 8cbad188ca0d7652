"""From a backend's raw text to a result a session can use: the rich part taken out, the spoken part condensed,
everything bounded.

A backend's answer may hold one rich part, as a fenced block (```html, ```table, ```chart) or a Markdown
table. It is taken out of the text and kept whole (up to RICH_MAX_CHARS), to be shown as its own card; the rest
is the answer's text. What is spoken and what enters the prompt is that text condensed to `spoken_chars`:
whole sentences where they fit, else whole words and an ellipsis; the whole text is kept beside it (up to
FULL_TEXT_MAX_CHARS) when it is longer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from actors.brain.backend import BrainAnswer
from actors.common.messages import RICH_KINDS, RichPart

log = logging.getLogger(__name__)

SPOKEN_MAX_CHARS = 300
FULL_TEXT_MAX_CHARS = 32_000
RICH_MAX_CHARS = 256 * 1024

# The language tag of a fenced block, as models write it, to the rich part's kind.
_FENCE_KINDS = {
    "html": "html",
    "table": "table",
    "markdown": "table",
    "md": "table",
    "csv": "table",
    "chart": "chart",
    "vega-lite": "chart",
    "vega": "chart",
}
_FENCE = re.compile(r"```[ \t]*([A-Za-z-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_SENTENCE_END = re.compile(r"[.!?…](?=\s|$)")


@dataclass(frozen=True, slots=True)
class BoundedAnswer:
    """An answer as a result carries it."""

    text: str
    full_text: str = ""
    rich: RichPart | None = None


def split_answer(raw: str) -> BrainAnswer:
    """Take the first rich part (a fenced block of a known kind, else a Markdown table) out of `raw`."""
    for match in _FENCE.finditer(raw):
        kind = _FENCE_KINDS.get(match.group(1).lower())
        content = match.group(2).strip()
        if kind is None or not content or (kind == "table" and not _has_table(content) and "," not in content):
            continue
        text = re.sub(r"\n{3,}", "\n\n", raw[: match.start()] + raw[match.end():]).strip()
        return BrainAnswer(text=text or _on_the_page(kind), rich=RichPart(kind=kind, content=content))
    table = _markdown_table(raw)
    if table is not None:
        start, end = table
        lines = raw.splitlines()
        content = "\n".join(lines[start:end]).strip()
        text = "\n".join(lines[:start] + lines[end:]).strip()
        return BrainAnswer(text=text or _on_the_page("table"), rich=RichPart(kind="table", content=content))
    return BrainAnswer(text=raw.strip())


def _on_the_page(kind: str) -> str:
    return {"html": "The answer is on the page.", "chart": "The chart is on the page."}.get(
        kind, "The table is on the page."
    )


def _has_table(text: str) -> bool:
    return _markdown_table(text) is not None


def _markdown_table(text: str) -> tuple[int, int] | None:
    """The line range of the first Markdown table (a header row, a rule, rows) in `text`."""
    lines = text.splitlines()
    for index in range(len(lines) - 1):
        if _TABLE_ROW.match(lines[index]) and _TABLE_RULE.match(lines[index + 1]) and "-" in lines[index + 1]:
            end = index + 2
            while end < len(lines) and _TABLE_ROW.match(lines[end]):
                end += 1
            return index, end
    return None


def condense(text: str, limit: int = SPOKEN_MAX_CHARS) -> str:
    """`text` with its whitespace collapsed, at most `limit` characters: the sentences that fit, or, when the
    first sentence alone is too long, the words that fit and an ellipsis."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    head = flat[:limit]
    ends = [match.end() for match in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] >= limit // 3:
        return head[: ends[-1]]
    cut = head[: limit - 1].rsplit(" ", 1)[0] if " " in head[: limit - 1] else head[: limit - 1]
    return cut.rstrip(" ,;:") + "…"


def bound_answer(answer: BrainAnswer, spoken_chars: int = SPOKEN_MAX_CHARS) -> BoundedAnswer:
    """The answer condensed for speech and the prompt, its whole text and rich part bounded. A rich part of an
    unknown kind or over RICH_MAX_CHARS is left out (a truncated page or chart would not render)."""
    spoken = condense(answer.text, spoken_chars)
    whole = answer.text.strip()
    full_text = whole[:FULL_TEXT_MAX_CHARS] if spoken != " ".join(whole.split()) else ""
    rich = answer.rich
    if rich is not None and (rich.kind not in RICH_KINDS or len(rich.content) > RICH_MAX_CHARS):
        log.warning("left out a rich part (%s, %d characters): an unknown kind or over %d characters",
                    rich.kind, len(rich.content), RICH_MAX_CHARS)
        rich = None
    return BoundedAnswer(text=spoken, full_text=full_text, rich=rich)
