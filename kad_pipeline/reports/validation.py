"""Checks that reject unusable report texts with a reason code instead of dropping them."""

from __future__ import annotations

import re

# An estimate: chest X-ray reports run to a few thousand characters at most, so a text
# above this limit is most likely a concatenation of reports or binary data.
DEFAULT_MAX_CHARS = 100_000

# C0 control characters and DEL, except tab, line feed, form feed and carriage return,
# which real report files contain.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")

# De-identification placeholders: "___" in MIMIC-CXR, "XXXX" in Open-i. Readers keep them
# verbatim so that character offsets stay valid; extractors must never report them.
PLACEHOLDER_PATTERN = re.compile(r"_{2,}|(?<![A-Za-z])X{3,}(?![A-Za-z])")


def find_problem(text: str | None, max_chars: int = DEFAULT_MAX_CHARS) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` when a text is unusable, else None.

    The detail names positions and sizes only, never the text itself.
    """
    if text is None or text == "":
        return "empty", "the report has no text"
    if len(text) > max_chars:
        return "too-large", f"the text has {len(text)} characters, above the limit of {max_chars}"
    match = _CONTROL_CHARACTERS.search(text)
    if match is not None:
        code = ord(match.group())
        name = "NUL byte" if code == 0 else f"control character U+{code:04X}"
        return "control-characters", f"{name} at character {match.start()}"
    if text.strip() == "":
        return "whitespace-only", "the text contains only whitespace"
    return None


def decode_text(data: bytes) -> tuple[str | None, tuple[str, str] | None]:
    """Decode report bytes as UTF-8 (a BOM is dropped); return ``(text, problem)``."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as error:
        return None, ("undecodable", f"invalid UTF-8 byte at offset {error.start}")


def is_placeholder(token: str) -> bool:
    """Return True when a token is a de-identification placeholder such as ``___`` or ``XXXX``."""
    return PLACEHOLDER_PATTERN.fullmatch(token) is not None
