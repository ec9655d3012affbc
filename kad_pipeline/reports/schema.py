"""Raw report records, the reports and invalid_reports table schemas, and the read result."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

REPORTS_SCHEMA: dict[str, pl.DataType] = {
    "report_id": pl.String(),
    "source": pl.String(),
    "findings": pl.String(),
    "impression": pl.String(),
    "text": pl.String(),
    "section_rule": pl.String(),
    "text_sha256": pl.String(),
    "image_ids": pl.List(pl.String()),
    "mesh": pl.List(pl.String()),
    "subject_id": pl.String(),
    "study_id": pl.String(),
}

INVALID_REPORTS_SCHEMA: dict[str, pl.DataType] = {
    "report_id": pl.String(),
    "source_path": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
}


@dataclass
class RawReport:
    """One report as a reader found it, before validation and section parsing.

    A reader sets either ``text`` (free text whose sections still have to be found) or
    ``findings``/``impression`` (sections the source format already separates). A reader
    that could not decode or parse the record sets ``error`` to ``(reason, detail)``.
    """

    report_id: str | None
    source: str
    source_path: str
    text: str | None = None
    findings: str | None = None
    impression: str | None = None
    presplit: bool = False
    image_ids: list[str] = field(default_factory=list)
    mesh: list[str] = field(default_factory=list)
    subject_id: str | None = None
    study_id: str | None = None
    error: tuple[str, str] | None = None


@dataclass
class ReadResult:
    """Valid reports (the reports table) and rejected ones (the invalid_reports table)."""

    reports: pl.DataFrame
    invalid: pl.DataFrame

    @staticmethod
    def concat(results: list["ReadResult"]) -> "ReadResult":
        """Concatenate several results, keeping both schemas when the list is empty."""
        reports = [result.reports for result in results] or [empty_reports()]
        invalid = [result.invalid for result in results] or [empty_invalid()]
        return ReadResult(reports=pl.concat(reports), invalid=pl.concat(invalid))


def empty_reports() -> pl.DataFrame:
    """Return an empty reports table with its schema."""
    return pl.DataFrame(schema=REPORTS_SCHEMA)


def empty_invalid() -> pl.DataFrame:
    """Return an empty invalid_reports table with its schema."""
    return pl.DataFrame(schema=INVALID_REPORTS_SCHEMA)
