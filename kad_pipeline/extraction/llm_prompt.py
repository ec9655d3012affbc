"""The LLM extractor's prompt, its JSON schema for structured output, and validation of answers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Bump when the wording or the schema changes: the version is part of every cache key, so
# answers to an older prompt are never reused.
PROMPT_VERSION = "findings-v1"

STATUSES = ("present", "absent", "uncertain")
CATEGORY_BY_STATUS = {"present": "OBS-DP", "absent": "OBS-DA", "uncertain": "OBS-U"}

_SYSTEM_PROMPT = """\
You label chest X-ray radiology reports for a research data set.
You receive a list of finding names and one report. For every finding that the report \
mentions, answer whether the report says it is present, absent or uncertain. Leave out \
findings the report does not mention at all.
Use only names from the list, spelled exactly as listed. Several names are word stems: \
"pleural thicken" is pleural thickening, "hyperinflate" is hyperinflation, "blunt" is blunting \
of a costophrenic angle, "aerate" is aeration, "obscure" is an obscured structure, "tip" is the \
position of a tube or line tip, "marking" is prominent lung markings. "normal" means the \
report describes a normal examination.
A hedge such as "may", "possible" or "cannot be excluded" makes a finding uncertain. A \
negation such as "no" or "without" makes it absent.
For evidence, copy the shortest phrase of the report that supports your answer, verbatim."""


def system_prompt() -> str:
    return _SYSTEM_PROMPT


def user_prompt(text: str, queries: Sequence[str]) -> str:
    finding_list = "\n".join(f"- {query}" for query in queries)
    return f"Finding names:\n{finding_list}\n\nReport:\n<<<\n{text}\n>>>"


def build_messages(text: str, queries: Sequence[str]) -> list[dict[str, str]]:
    """Return the chat messages that ask for the findings of one report."""
    return [
        {"role": "system", "content": system_prompt()},
        {"role": "user", "content": user_prompt(text, queries)},
    ]


def response_format(queries: Sequence[str]) -> dict[str, Any]:
    """Return the ``response_format`` argument: JSON that matches our schema (strict mode)."""
    schema = {
        "type": "object",
        "properties": {
            "findings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": list(queries)},
                        "status": {"type": "string", "enum": list(STATUSES)},
                        "evidence": {"type": "string"},
                    },
                    "required": ["name", "status", "evidence"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["findings"],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": "report_findings", "strict": True, "schema": schema}}


class AnswerFormatError(ValueError):
    """An answer that cannot be used at all; ``reason`` is a short code for the failures table."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Finding:
    name: str
    status: str
    evidence: str


@dataclass
class ParsedAnswer:
    """Valid findings of one answer, and the items that were rejected with a reason."""

    findings: list[Finding] = field(default_factory=list)
    rejected: list[dict[str, str | None]] = field(default_factory=list)


def _describe_item(item: Any) -> str:
    # Items can quote the report, which is patient data, so only their shape is recorded.
    if isinstance(item, dict):
        return f"object with keys {sorted(map(str, item))[:10]} and no string 'name'"
    return f"{type(item).__name__} instead of an object"


def parse_answer(content: str | None, queries: Sequence[str]) -> ParsedAnswer:
    """Validate an answer against the schema, item by item.

    Raises :class:`AnswerFormatError` when the answer as a whole is unusable (empty, not JSON,
    no ``findings`` array). Items with an unknown finding name or an invalid status are put in
    ``rejected`` and the other items are kept, because servers that do not enforce the schema
    can still answer most items well.
    """
    if content is None or not content.strip():
        raise AnswerFormatError("empty-answer", "the response has no content")
    try:
        data = json.loads(content)
    except json.JSONDecodeError as error:
        raise AnswerFormatError("malformed-json", f"{error.msg} at character {error.pos}") from error
    if not isinstance(data, dict) or not isinstance(data.get("findings"), list):
        raise AnswerFormatError("schema-mismatch", "expected an object with a 'findings' array")

    by_lower_name = {query.lower(): query for query in queries}
    parsed = ParsedAnswer()
    for item in data["findings"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            parsed.rejected.append({"name": None, "status": None, "reason": "invalid-item", "detail": _describe_item(item)})
            continue
        name = item["name"]
        status = item.get("status")
        query = by_lower_name.get(" ".join(name.lower().split()))
        if query is None:
            parsed.rejected.append(
                {"name": name[:200], "status": str(status), "reason": "unknown-finding", "detail": "not a query entity"}
            )
            continue
        if status not in STATUSES:
            parsed.rejected.append(
                {"name": query, "status": str(status)[:50], "reason": "invalid-status", "detail": f"expected one of {STATUSES}"}
            )
            continue
        evidence = item.get("evidence")
        parsed.findings.append(Finding(query, status, evidence if isinstance(evidence, str) else ""))
    return parsed
