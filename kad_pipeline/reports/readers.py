"""Readers for Open-i XML, MIMIC-CXR free text and CSV/Parquet report tables.

Every reader yields ``RawReport`` records one at a time, so a caller can filter by report id
(for example by hash bucket) before parsing, and a corpus of 200,000 reports never sits in
memory at once. ``parse_raw_reports`` validates and section-parses records into the reports
and invalid_reports tables.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import tarfile
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import polars as pl

from kad_pipeline.reports.schema import (
    INVALID_REPORTS_SCHEMA,
    REPORTS_SCHEMA,
    RawReport,
    ReadResult,
)
from kad_pipeline.reports.sections import split_sections
from kad_pipeline.reports.validation import DEFAULT_MAX_CHARS, decode_text, find_problem

logger = logging.getLogger(__name__)

# UTF-8 needs at most 4 bytes a character, so a file above this many bytes a character of the
# limit is rejected before it is read into memory.
_MAX_BYTES_PER_CHAR = 4
_MIMIC_PATH = re.compile(r"(?:^|/)(?:p(\d+)/)?s(\d+)\.txt$")
_ID_COLUMNS = ("report_id", "id", "study_id", "filename", "uid")
_TEXT_COLUMNS = ("text", "report", "report_text")


def openi_tarball_path() -> Path:
    """Return ``data/NLMCXR_reports.tgz`` of the installed torchxrayvision package (3,955 reports)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "torchxrayvision is not installed, so its Open-i reports are missing; "
            "install torchxrayvision==1.5.7 or pass the path of NLMCXR_reports.tgz"
        )
    path = Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz"
    if not path.is_file():
        raise FileNotFoundError(f"Open-i reports not found at {path}; reinstall torchxrayvision")
    return path


# ---------------------------------------------------------------- Open-i XML

def _parse_openi_xml(data: bytes, source_path: str) -> RawReport:
    if not data.strip():
        return RawReport(None, "openi", source_path, error=("empty", "the XML file is empty"))
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        return RawReport(None, "openi", source_path, error=("malformed-xml", f"XML parse error: {error}"))

    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None else None
    if not report_id:
        return RawReport(None, "openi", source_path, error=("missing-id", "the XML has no uId id attribute"))

    sections: dict[str, str | None] = {}
    for abstract in root.iter("AbstractText"):
        label = (abstract.get("Label") or "").strip().upper()
        sections[label] = "".join(abstract.itertext())
    mesh = [node.text.strip() for node in root.iter("major") if node.text and node.text.strip()]
    image_ids = [node.get("id") for node in root.iter("parentImage") if node.get("id")]
    return RawReport(
        report_id, "openi", source_path,
        findings=sections.get("FINDINGS"), impression=sections.get("IMPRESSION"), presplit=True,
        image_ids=image_ids, mesh=mesh,
    )


def iter_openi(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[RawReport]:
    """Yield Open-i reports from ``NLMCXR_reports.tgz``, a folder of XML files or one XML file."""
    path = Path(path)
    max_bytes = max_chars * _MAX_BYTES_PER_CHAR * 4  # XML markup around the text is several times its size
    if path.is_dir():
        for xml_path in sorted(path.rglob("*.xml")):
            if xml_path.stat().st_size > max_bytes:
                yield RawReport(None, "openi", str(xml_path), error=("too-large", f"the file has {xml_path.stat().st_size} bytes"))
                continue
            yield _parse_openi_xml(xml_path.read_bytes(), str(xml_path))
        return
    if path.suffix.lower() == ".xml":
        yield _parse_openi_xml(path.read_bytes(), str(path))
        return
    with tarfile.open(path, mode="r:*") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith(".xml"):
                continue
            source_path = f"{path}:{member.name}"
            if member.size > max_bytes:
                yield RawReport(None, "openi", source_path, error=("too-large", f"the file has {member.size} bytes"))
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            yield _parse_openi_xml(handle.read(), source_path)


# ---------------------------------------------------------------- MIMIC-CXR

def _mimic_record(name: str, source_path: str, size: int, read: Callable[[], bytes], max_chars: int) -> RawReport | None:
    match = _MIMIC_PATH.search(name.replace("\\", "/"))
    if match is None:
        return None
    subject_id, study_id = match.group(1), match.group(2)
    report_id = f"s{study_id}"
    if size > max_chars * _MAX_BYTES_PER_CHAR:
        return RawReport(report_id, "mimic", source_path, subject_id=subject_id, study_id=study_id,
                         error=("too-large", f"the file has {size} bytes, above the limit of {max_chars} characters"))
    text, problem = decode_text(read())
    return RawReport(report_id, "mimic", source_path, text=text, subject_id=subject_id,
                     study_id=study_id, error=problem)


def iter_mimic(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[RawReport]:
    """Yield MIMIC-CXR reports from ``mimic-cxr-reports.zip`` or a ``files/pNN/pN/sN.txt`` tree.

    The report id is ``s<study_id>``; subject and study ids come from the path.
    """
    path = Path(path)
    if path.is_dir():
        for text_path in sorted(path.rglob("s*.txt")):
            relative = text_path.relative_to(path).as_posix()
            record = _mimic_record(relative, str(text_path), text_path.stat().st_size, text_path.read_bytes, max_chars)
            if record is not None:
                yield record
        return
    if path.suffix.lower() == ".txt":
        record = _mimic_record(path.name, str(path), path.stat().st_size, path.read_bytes, max_chars)
        if record is None:
            raise ValueError(f"{path} is not named like a MIMIC-CXR report (s<study_id>.txt)")
        yield record
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            record = _mimic_record(
                info.filename, f"{path}:{info.filename}", info.file_size,
                lambda info=info: archive.read(info), max_chars,
            )
            if record is not None:
                yield record


# ---------------------------------------------------------------- CSV and Parquet

def _pick_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    by_lower = {column.lower(): column for column in columns}
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    return None


def _table_batches(path: Path, batch_rows: int) -> Iterator[dict[str, list]]:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".parquet":
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=batch_rows):
            yield batch.to_pydict()
        return

    with path.open("rb") as handle:
        header = handle.readline()
    header_text, problem = decode_text(header)
    if problem is not None:
        raise ValueError(f"the header line of {path} is not valid UTF-8; save the table as UTF-8")
    names = next(iter(csv.reader(io.StringIO(header_text))))
    # Every column is read as bytes, so one undecodable cell rejects its row, not the file.
    convert = pa_csv.ConvertOptions(column_types={name: pa.binary() for name in names}, strings_can_be_null=False)
    read = pa_csv.ReadOptions(block_size=1 << 22)
    parse = pa_csv.ParseOptions(newlines_in_values=True)
    reader = pa_csv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    for batch in reader:
        yield batch.to_pydict()


def _cell_text(value: object) -> tuple[str | None, tuple[str, str] | None]:
    if value is None:
        return None, None
    if isinstance(value, bytes):
        return decode_text(value)
    return str(value), None


def iter_table(path: str | Path, batch_rows: int = 10_000) -> Iterator[RawReport]:
    """Yield reports from a CSV or Parquet table.

    The table needs a report id column (``report_id``, ``id``, ``study_id``, ``filename`` or
    ``uid``) and either a text column (``text``, ``report`` or ``report_text``, whose
    sections are then found by header) or ``findings`` and/or ``impression`` columns.
    """
    path = Path(path)
    row_offset = 0
    for batch in _table_batches(path, batch_rows):
        columns = list(batch)
        id_column = _pick_column(columns, _ID_COLUMNS)
        text_column = _pick_column(columns, _TEXT_COLUMNS)
        findings_column = _pick_column(columns, ("findings",))
        impression_column = _pick_column(columns, ("impression",))
        if id_column is None:
            raise ValueError(f"{path} has no report id column; expected one of {', '.join(_ID_COLUMNS)}, found {columns}")
        if text_column is None and findings_column is None and impression_column is None:
            raise ValueError(f"{path} has no text column; expected one of {', '.join(_TEXT_COLUMNS)} or findings/impression, found {columns}")
        subject_column = _pick_column(columns, ("subject_id",))
        study_column = _pick_column(columns, ("study_id",)) if id_column.lower() != "study_id" else id_column

        batch_length = len(batch[id_column])
        for row in range(batch_length):
            report_id, id_problem = _cell_text(batch[id_column][row])
            source_path = f"{path}:row {row_offset + row + 1}"
            if id_problem is not None or not report_id or not report_id.strip():
                yield RawReport(None, "table", source_path, error=("missing-id", "the report id cell is empty or undecodable"))
                continue
            report_id = report_id.strip()
            subject_id = _cell_text(batch[subject_column][row])[0] if subject_column else None
            study_id = _cell_text(batch[study_column][row])[0] if study_column else None
            if text_column is not None:
                text, problem = _cell_text(batch[text_column][row])
                yield RawReport(report_id, "table", source_path, text=text, subject_id=subject_id, study_id=study_id, error=problem)
                continue
            findings, findings_problem = _cell_text(batch[findings_column][row]) if findings_column else (None, None)
            impression, impression_problem = _cell_text(batch[impression_column][row]) if impression_column else (None, None)
            yield RawReport(
                report_id, "table", source_path, findings=findings, impression=impression, presplit=True,
                subject_id=subject_id, study_id=study_id, error=findings_problem or impression_problem,
            )
        row_offset += batch_length


# ---------------------------------------------------------------- format detection

def detect_format(path: str | Path) -> str:
    """Return "openi", "mimic" or "table" for a report file or folder, or raise ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"report input not found: {path}")
    name = path.name.lower()
    if path.is_dir():
        if next(path.rglob("*.xml"), None) is not None:
            return "openi"
        if next(path.rglob("s*.txt"), None) is not None:
            return "mimic"
        raise ValueError(f"{path} contains neither Open-i XML files nor MIMIC-CXR s<study_id>.txt files")
    if name.endswith((".tgz", ".tar.gz", ".tar", ".xml")):
        return "openi"
    if name.endswith((".zip", ".txt")):
        return "mimic"
    if name.endswith((".csv", ".parquet")):
        return "table"
    raise ValueError(
        f"unknown report format for {path}; expected an Open-i .tgz/.xml/folder, "
        "a MIMIC-CXR .zip/files tree, or a .csv/.parquet table"
    )


def iter_raw_reports(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[RawReport]:
    """Yield raw report records of any supported format, one at a time."""
    report_format = detect_format(path)
    logger.info("reading %s reports from %s", report_format, path)
    if report_format == "openi":
        return iter_openi(path, max_chars)
    if report_format == "mimic":
        return iter_mimic(path, max_chars)
    return iter_table(path)


# ---------------------------------------------------------------- parsing

def _sections_of(record: RawReport, max_chars: int) -> tuple[str | None, str | None, str] | tuple[str, str]:
    """Return ``(findings, impression, section_rule)`` or ``(reason, detail)`` for a rejected record."""
    if record.presplit:
        pieces = [piece for piece in (record.findings, record.impression) if piece is not None]
        problem = find_problem("\n".join(pieces), max_chars) if pieces else None
        if problem is not None and problem[0] not in ("empty", "whitespace-only"):
            return problem
        findings = (record.findings or "").strip() or None
        impression = (record.impression or "").strip() or None
        if findings is None and impression is None:
            return "no-sections", "the findings and impression sections are both missing or blank"
        return findings, impression, "xml-labels" if record.source == "openi" else "columns"

    problem = find_problem(record.text, max_chars)
    if problem is not None:
        return problem
    sections = split_sections(record.text or "")
    if sections.section_rule == "no-sections":
        return "no-sections", "no findings or impression section and no other descriptive text"
    return sections.findings, sections.impression, sections.section_rule


def parse_raw_reports(
    records: Iterable[RawReport],
    max_chars: int = DEFAULT_MAX_CHARS,
    seen_ids: set[str] | None = None,
) -> ReadResult:
    """Validate and section-parse raw records into the reports and invalid_reports tables.

    ``seen_ids`` carries report ids across calls, so a duplicate in a later chunk is also
    rejected. Pass the same set to every chunk of one input.
    """
    seen = seen_ids if seen_ids is not None else set()
    rows: dict[str, list] = {name: [] for name in REPORTS_SCHEMA}
    invalid: dict[str, list] = {name: [] for name in INVALID_REPORTS_SCHEMA}

    def reject(record: RawReport, reason: str, detail: str) -> None:
        invalid["report_id"].append(record.report_id)
        invalid["source_path"].append(record.source_path)
        invalid["reason"].append(reason)
        invalid["detail"].append(detail)

    for record in records:
        if record.error is not None:
            reject(record, *record.error)
            continue
        if record.report_id in seen:
            reject(record, "duplicate-id", f"report id {record.report_id} appeared earlier in this input")
            continue
        parsed = _sections_of(record, max_chars)
        if len(parsed) == 2:
            reject(record, *parsed)
            continue
        findings, impression, section_rule = parsed
        seen.add(record.report_id)
        text = "\n".join(section for section in (findings, impression) if section)
        rows["report_id"].append(record.report_id)
        rows["source"].append(record.source)
        rows["findings"].append(findings)
        rows["impression"].append(impression)
        rows["text"].append(text)
        rows["section_rule"].append(section_rule)
        rows["text_sha256"].append(hashlib.sha256(text.encode("utf-8")).hexdigest())
        rows["image_ids"].append(record.image_ids)
        rows["mesh"].append(record.mesh)
        rows["subject_id"].append(record.subject_id)
        rows["study_id"].append(record.study_id)

    result = ReadResult(
        reports=pl.DataFrame(rows, schema=REPORTS_SCHEMA),
        invalid=pl.DataFrame(invalid, schema=INVALID_REPORTS_SCHEMA),
    )
    if result.invalid.height:
        counts = result.invalid.group_by("reason").len().sort("reason").rows()
        logger.warning("rejected %d reports: %s", result.invalid.height, dict(counts))
    return result


def iter_report_batches(
    path: str | Path,
    batch_size: int = 10_000,
    keep: Callable[[str | None], bool] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Iterator[ReadResult]:
    """Yield the reports of ``path`` in parsed batches of at most ``batch_size`` records.

    ``keep`` filters records by report id before parsing, for example to one hash bucket.
    Rejected records with no id are always kept, so they reach invalid_reports.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    records = iter_raw_reports(path, max_chars)
    if keep is not None:
        records = (record for record in records if record.report_id is None or keep(record.report_id))
    seen: set[str] = set()
    while True:
        batch = list(islice(records, batch_size))
        if not batch:
            return
        yield parse_raw_reports(batch, max_chars, seen)


def read_reports(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> ReadResult:
    """Read every report of ``path`` (format detected from the name) into one result."""
    result = ReadResult.concat(list(iter_report_batches(path, max_chars=max_chars)))
    logger.info("read %d valid and %d invalid reports from %s", result.reports.height, result.invalid.height, path)
    return result


def read_openi(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> ReadResult:
    """Read Open-i reports from ``NLMCXR_reports.tgz``, a folder of XML files or one XML file."""
    return parse_raw_reports(iter_openi(path, max_chars), max_chars)


def read_mimic(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> ReadResult:
    """Read MIMIC-CXR reports from ``mimic-cxr-reports.zip`` or an extracted ``files`` tree."""
    return parse_raw_reports(iter_mimic(path, max_chars), max_chars)


def read_report_table(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> ReadResult:
    """Read reports from a CSV or Parquet table (see ``iter_table`` for the columns)."""
    return parse_raw_reports(iter_table(path), max_chars)
