"""Hypothesis strategies for what a hostile or careless client sends as text, and the bounded settings to run them.

Texts mix arbitrary code points (control characters, halves of surrogate pairs, unassigned and private-use
ones) with fragments aimed at Vigil's layers: the tiny VLM's control tokens and its decision tags, the private
markers transformers uses to sanitize prompts, template syntax, long runs of one character.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from actors.interaction.models.tiny_vlm import SPECIAL_TOKENS

# Fragments the text check lets through: they must do no harm downstream.
TRICKY: tuple[str, ...] = (
    "</response>", "</silence>", "</delegation>", "<0.0 seconds>", "<", "|", ">", "im_start", "image_pad",
    "\t", "\n", " ", "\U000f0000", "\U000f0001", "\u202e", "\u200b", "\u200d", "\ufeff", "e\u0301", "\u037e",
    "\U0001f600", "\u4e2d\u6587", "{{ messages }}", "{% for m in messages %}", "%s%n", "' OR 1=1 --",
    "a" * 300, "\n" * 120, "\U0001f600" * 200, "\u0301" * 200,
)
# Fragments it refuses: control tokens and their halves, control characters, what is not Unicode.
REFUSED: tuple[str, ...] = (
    *SPECIAL_TOKENS, "<|image_", "pad|>", "<|", "|>", "\x00", "\x1b[31m", "\x7f", "\x85", "\x0b",
    "\ud83d", "\ude00", "\udfff", "\ufffe", "\uffff", "\ufdd0", "\U0010ffff",
)

any_character = st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]))
hostile_text = st.lists(
    st.one_of(st.text(any_character, max_size=20), st.sampled_from(TRICKY), st.sampled_from(REFUSED)), max_size=6
).map("".join)
tricky_text = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=["Cc", "Cs", "Cn"]), max_size=20), st.sampled_from(TRICKY)),
    min_size=1, max_size=6,
).map("".join)
client_text = st.one_of(hostile_text, tricky_text)
# Two texts that spell one of the tiny VLM's control tokens only when written side by side.
split_control_token = st.tuples(st.sampled_from(SPECIAL_TOKENS), st.integers(1, 14), tricky_text, tricky_text).map(
    lambda drawn: [drawn[2] + drawn[0][: drawn[1]], drawn[0][drawn[1] :] + drawn[3]]
)

# Text as careful clients write it: letters, digits, punctuation, symbols and spaces of any script.
plain_text = st.text(st.characters(categories=["L", "M", "N", "P", "S", "Zs"]), min_size=1, max_size=200)


def wire_message(kind: str, text: object, ascii_only: bool) -> str:
    """A data-channel message as a browser would send it: JSON, escaping everything but ASCII or not.

    With `ascii_only`, a half of a surrogate pair travels as its `\\udXXX` escape, which is valid JSON."""
    return json.dumps({"type": kind, "text": text}, ensure_ascii=ascii_only)


# Reproducible and quick: no example database, examples derived from each test's name, a bounded count. Tests
# that run a model take fewer: `@settings(BOUNDED, max_examples=10)`.
BOUNDED = settings(
    derandomize=True, database=None, max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
