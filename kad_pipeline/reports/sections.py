"""Find the findings and impression sections of a free-text radiology report.

KAD trains on the findings and impression sections only, so the other sections
(indication, history, technique, comparison) are left out of the text that extractors read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FINDINGS_HEADERS = frozenset({
    "findings", "finding", "findings and impression", "findings/impression",
    "findings and impressions", "report", "description",
})
IMPRESSION_HEADERS = frozenset({
    "impression", "impressions", "conclusion", "conclusions", "summary", "opinion",
    "impression/recommendation", "impression and recommendation", "interpretation",
})
# Sections that never describe the images themselves.
ADMINISTRATIVE_HEADERS = frozenset({
    "examination", "exam", "type of examination", "indication", "indications", "history",
    "clinical history", "clinical information", "reason for exam", "reason for examination",
    "technique", "comparison", "comparisons", "procedure", "notification", "recommendation",
    "recommendations", "wet read", "addendum", "clinical indication", "clinical data",
    "provisional findings impression (pfi)", "study", "date",
})
_KNOWN_HEADERS = FINDINGS_HEADERS | IMPRESSION_HEADERS | ADMINISTRATIVE_HEADERS

# A header is a short name at the start of a line followed by a colon. The name is accepted
# when it is a known header in any case, or when it is written in capitals.
_HEADER_LINE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&()'-]{0,48}?)[ \t]*:", re.MULTILINE)
_INLINE_HEADER = re.compile(r"(?<![A-Za-z])([A-Z][A-Z /&]{2,40}?)[ \t]*:")
_PREAMBLE = re.compile(r"^\s*(final report|preliminary report|wet read)\s*$", re.IGNORECASE | re.MULTILINE)
_SPACES = re.compile(r"\s+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Sections:
    """The sections an extractor reads, and the rule that found them."""

    findings: str | None
    impression: str | None
    section_rule: str


def normalize_header(name: str) -> str:
    """Return a header name in lower case with single spaces, e.g. "FINDINGS " -> "findings"."""
    return _SPACES.sub(" ", name.strip().lower())


def _clean(section: str) -> str | None:
    """Join a section's wrapped lines with spaces and its paragraphs with line feeds.

    MIMIC-CXR wraps sentences at about 80 characters, so a line feed inside a paragraph is
    not a sentence boundary, while a blank line is. Returns None when nothing is left.
    """
    paragraphs = []
    for paragraph in _PARAGRAPH_BREAK.split(section):
        joined = " ".join(line.strip() for line in paragraph.splitlines() if line.strip())
        if joined:
            paragraphs.append(joined)
    return "\n".join(paragraphs) or None


def _find_headers(text: str) -> list[tuple[str, int, int]]:
    headers = {}
    for match in _HEADER_LINE.finditer(text):
        raw = match.group(1)
        name = normalize_header(raw)
        letters = [c for c in raw if c.isalpha()]
        if name in _KNOWN_HEADERS or (len(letters) >= 3 and raw.upper() == raw):
            headers[match.start()] = (name, match.start(), match.end())
    # Reports flattened to one line keep their headers inside the line, in capitals:
    # "FINDINGS: No effusion. IMPRESSION: Normal chest."
    for match in _INLINE_HEADER.finditer(text):
        name = normalize_header(match.group(1))
        if name in _KNOWN_HEADERS and not any(start <= match.start() < end for _, start, end in headers.values()):
            headers[match.start()] = (name, match.start(), match.end())
    return [headers[start] for start in sorted(headers)]


def split_sections(text: str) -> Sections:
    """Split free text into findings and impression.

    Rules, in order, recorded in ``section_rule``:
    ``headers``: a findings or impression header exists, so those sections are kept.
    ``last-section-fallback``: headers exist but none of them is findings or impression,
    so the last section that is not administrative (indication, comparison, ...) or the
    text before the first header becomes the findings.
    ``no-headers-fallback``: no header at all, so the whole text (without a "FINAL REPORT"
    line) becomes the findings.
    ``no-sections``: nothing describing the images is left; callers reject the report.
    """
    body = _PREAMBLE.sub("", text)
    headers = _find_headers(body)
    if not headers:
        findings = _clean(body)
        return Sections(findings, None, "no-headers-fallback" if findings else "no-sections")

    preamble = _clean(body[: headers[0][1]])
    sections: list[tuple[str, str | None]] = []
    for index, (name, _, content_start) in enumerate(headers):
        content_end = headers[index + 1][1] if index + 1 < len(headers) else len(body)
        sections.append((name, _clean(body[content_start:content_end])))

    findings_parts = [content for name, content in sections if name in FINDINGS_HEADERS and content]
    impression_parts = [content for name, content in sections if name in IMPRESSION_HEADERS and content]
    if findings_parts or impression_parts:
        return Sections(
            "\n".join(findings_parts) or None, "\n".join(impression_parts) or None, "headers"
        )

    descriptive = [content for name, content in sections if name not in ADMINISTRATIVE_HEADERS and content]
    if descriptive:
        return Sections(descriptive[-1], None, "last-section-fallback")
    if preamble:
        return Sections(preamble, None, "last-section-fallback")
    return Sections(None, None, "no-sections")
