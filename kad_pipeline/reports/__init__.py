"""Report readers: Open-i XML, MIMIC-CXR free text and CSV/Parquet tables, with validation."""

from kad_pipeline.reports.readers import (
    detect_format,
    iter_mimic,
    iter_openi,
    iter_raw_reports,
    iter_report_batches,
    iter_table,
    openi_tarball_path,
    parse_raw_reports,
    read_mimic,
    read_openi,
    read_report_table,
    read_reports,
)
from kad_pipeline.reports.schema import (
    INVALID_REPORTS_SCHEMA,
    REPORTS_SCHEMA,
    RawReport,
    ReadResult,
    empty_invalid,
    empty_reports,
)
from kad_pipeline.reports.sections import Sections, split_sections
from kad_pipeline.reports.validation import DEFAULT_MAX_CHARS, PLACEHOLDER_PATTERN, find_problem, is_placeholder

__all__ = [
    "DEFAULT_MAX_CHARS", "INVALID_REPORTS_SCHEMA", "PLACEHOLDER_PATTERN", "REPORTS_SCHEMA",
    "RawReport", "ReadResult", "Sections", "detect_format", "empty_invalid", "empty_reports",
    "find_problem", "is_placeholder", "iter_mimic", "iter_openi", "iter_raw_reports",
    "iter_report_batches", "iter_table", "openi_tarball_path", "parse_raw_reports",
    "read_mimic", "read_openi", "read_report_table", "read_reports", "split_sections",
]
