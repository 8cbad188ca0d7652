"""Text a client sends (standing instructions, questions, recall queries): one check for all of it, at the edge.

Accepted text comes back normalised (line breaks as `\\n`, Unicode NFC, surrounding whitespace stripped) and is
then safe everywhere downstream: it encodes as UTF-8 (JSON, msgpack, Redis, the data channel), tokenises and
embeds. Refused text raises `ClientTextError`, whose message says what to change. See docs/protocol.md.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls and DEL; tab and newline are text (a carriage return has become a newline by then).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Halves of UTF-16 surrogate pairs: JSON's `\ud83d` escape yields one, and no UTF-8 encoder takes it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Unicode's noncharacters: U+FDD0..U+FDEF and the last two code points of every plane.
_PLANE_ENDS = "".join(chr(plane + end) for plane in range(0, 0x110000, 0x10000) for end in (0xFFFE, 0xFFFF))
_NONCHARACTER = re.compile(f"[\ufdd0-\ufdef{_PLANE_ENDS}]")
# The brackets of chat control tokens (`<|im_start|>`, `<|image_pad|>`, `<|eot_id|>`, ...). Either half is refused,
# so two messages cannot spell one between them either.
CONTROL_TOKEN_BRACKETS = ("<|", "|>")


class ClientTextError(ValueError):
    """Client text was refused; `reason` names the rule it broke, the message is for the person who sent it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_client_text(text: object, max_chars: int, what: str = "text") -> str:
    """`text` normalised as Vigil keeps it, or ClientTextError when it is not a non-empty string of at most
    `max_chars` characters of valid Unicode without control characters (other than newline and tab) or the
    brackets of the model's control tokens. `what` names the field in the message."""
    if not isinstance(text, str):
        raise ClientTextError("not_text", f"{what} must be a string")
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ClientTextError(
            "invalid_unicode",
            f"{what}: character {bad.start() + 1} (U+{ord(bad.group()):04X}) is half of a UTF-16 surrogate pair, "
            "not a character (was an emoji cut in two?)",
        )
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
    if not text:
        raise ClientTextError("empty", f"{what} must not be empty")
    if len(text) > max_chars:
        raise ClientTextError("too_long", f"{what} of {len(text)} characters is over the {max_chars} limit")
    for pattern, reason, kind in (
        (_CONTROL, "control_character", "a control character (only newline and tab are allowed)"),
        (_NONCHARACTER, "invalid_unicode", "a Unicode noncharacter"),
    ):
        bad = pattern.search(text)
        if bad is not None:
            raise ClientTextError(
                reason, f"{what}: character {bad.start() + 1} (U+{ord(bad.group()):04X}) is {kind}"
            )
    for bracket in CONTROL_TOKEN_BRACKETS:
        at = text.find(bracket)
        if at >= 0:
            raise ClientTextError(
                "control_token",
                f"{what}: '{bracket}' at character {at + 1} may not be sent: it spells the model's control tokens",
            )
    return text
