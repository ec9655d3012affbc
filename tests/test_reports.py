"""Report readers: Open-i XML, MIMIC-CXR text, CSV/Parquet tables, sections and validation."""

import hashlib
import shutil
import tarfile
import zipfile
from pathlib import Path

import polars as pl
import pytest

from kad_pipeline.partitions import bucket_of
from kad_pipeline.reports import (
    INVALID_REPORTS_SCHEMA,
    REPORTS_SCHEMA,
    detect_format,
    find_problem,
    is_placeholder,
    iter_report_batches,
    openi_tarball_path,
    read_mimic,
    read_openi,
    read_report_table,
    read_reports,
    split_sections,
)

FIXTURES = Path(__file__).parent / "fixtures" / "reports"


def reasons(result) -> dict:
    return dict(zip(result.invalid["report_id"].to_list(), result.invalid["reason"].to_list()))


# ---------------------------------------------------------------- Open-i


def test_openi_folder_reads_sections_images_mesh():
    result = read_openi(FIXTURES / "openi")

    assert result.reports.schema == pl.Schema(REPORTS_SCHEMA)
    assert result.reports["report_id"].to_list() == ["CXR101", "CXR102"]
    first = result.reports.row(0, named=True)
    assert first["findings"].startswith("Heart size is normal.")
    assert first["impression"] == "Small right pleural effusion."
    assert first["text"] == first["findings"] + "\n" + first["impression"]
    assert first["image_ids"] == ["CXR101_IM-0001-1001", "CXR101_IM-0001-2001"]
    assert first["mesh"] == ["Pleural Effusion/right/small"]
    assert first["section_rule"] == "xml-labels"
    assert first["source"] == "openi"
    assert first["text_sha256"] == hashlib.sha256(first["text"].encode()).hexdigest()


def test_openi_impression_only_report_is_valid():
    result = read_openi(FIXTURES / "openi")
    second = result.reports.row(1, named=True)
    assert second["findings"] is None
    assert second["text"] == "No acute cardiopulmonary disease."


def test_openi_invalid_rows_have_reasons():
    result = read_openi(FIXTURES / "openi")
    assert result.invalid.schema == pl.Schema(INVALID_REPORTS_SCHEMA)
    assert reasons(result) == {"CXR103": "no-sections", None: "malformed-xml"}
    malformed = result.invalid.filter(pl.col("reason") == "malformed-xml").row(0, named=True)
    assert malformed["source_path"].endswith("104.xml")


def test_openi_tarball_matches_folder(tmp_path):
    archive = tmp_path / "NLMCXR_reports.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for xml in sorted((FIXTURES / "openi").glob("*.xml")):
            tar.add(xml, arcname=f"ecgen-radiology/{xml.name}")

    from_tar = read_reports(archive)
    from_folder = read_openi(FIXTURES / "openi")
    assert from_tar.reports.drop("report_id").equals(from_folder.reports.drop("report_id"))
    assert from_tar.reports["report_id"].to_list() == from_folder.reports["report_id"].to_list()
    assert sorted(from_tar.invalid["reason"].to_list()) == ["malformed-xml", "no-sections"]


def test_openi_shipped_tarball_counts():
    path = openi_tarball_path()
    result = read_openi(path)
    assert result.reports.height + result.invalid.height == 3955
    assert result.invalid["reason"].unique().to_list() == ["no-sections"]
    cxr1 = result.reports.filter(pl.col("report_id") == "CXR1").row(0, named=True)
    assert cxr1["findings"].startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert cxr1["impression"] == "Normal chest x-XXXX."
    assert cxr1["image_ids"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert cxr1["mesh"] == ["normal"]


# ---------------------------------------------------------------- MIMIC-CXR


def test_mimic_tree_ids_and_sections():
    result = read_mimic(FIXTURES / "mimic")
    rows = {row["report_id"]: row for row in result.reports.iter_rows(named=True)}

    assert set(rows) == {"s50000001", "s50000002"}
    with_headers = rows["s50000001"]
    assert (with_headers["subject_id"], with_headers["study_id"]) == ("10000001", "50000001")
    assert with_headers["section_rule"] == "headers"
    # Wrapped lines are joined, so the sentence split across two lines stays one sentence.
    assert with_headers["findings"].endswith("No pleural effusion or pneumothorax.  Heart size is normal.")
    assert with_headers["impression"] == "Left lower lobe pneumonia."
    assert "INDICATION" not in with_headers["text"]
    assert "FINAL REPORT" not in with_headers["text"]

    without_headers = rows["s50000002"]
    assert without_headers["section_rule"] == "no-headers-fallback"
    assert without_headers["text"].endswith("Small bilateral pleural effusions")
    assert reasons(result) == {"s50000003": "empty"}


def test_mimic_zip_matches_tree(tmp_path):
    archive = tmp_path / "mimic-cxr-reports.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for text_file in sorted((FIXTURES / "mimic").rglob("*.txt")):
            handle.write(text_file, text_file.relative_to(FIXTURES / "mimic").as_posix())

    from_zip = read_reports(archive)
    from_tree = read_mimic(FIXTURES / "mimic")
    assert from_zip.reports.select("report_id", "text", "section_rule").equals(
        from_tree.reports.select("report_id", "text", "section_rule")
    )
    assert reasons(from_zip) == {"s50000003": "empty"}


def test_mimic_bad_bytes_quarantined(tmp_path):
    root = tmp_path / "files" / "p12" / "p12000001"
    root.mkdir(parents=True)
    (root / "s1.txt").write_bytes(b"FINDINGS: No effusion.\x00 IMPRESSION: Normal.")
    (root / "s2.txt").write_bytes(b"FINDINGS: No effusion \xff\xfe here.")
    (root / "s3.txt").write_bytes(b"   \n\t  \n")
    (root / "s4.txt").write_bytes(b"FINDINGS: " + b"No effusion. " * 100)
    (root / "s5.txt").write_bytes(b"FINDINGS: Mild cardiomegaly.")

    result = read_mimic(tmp_path, max_chars=1000)
    assert reasons(result) == {
        "s1": "control-characters", "s2": "undecodable", "s3": "whitespace-only", "s4": "too-large",
    }
    assert result.reports["report_id"].to_list() == ["s5"]
    for detail in result.invalid["detail"].to_list():
        assert "effusion" not in detail


# ---------------------------------------------------------------- tables


def test_csv_text_column():
    result = read_report_table(FIXTURES / "reports.csv")
    rows = {row["report_id"]: row for row in result.reports.iter_rows(named=True)}
    assert rows["T1"]["findings"] == "No focal consolidation."
    assert rows["T1"]["impression"] == "Normal chest."
    assert rows["T2"]["findings"] == "Mild cardiomegaly."
    assert rows["T2"]["impression"] == "Cardiomegaly without edema."
    assert reasons(result) == {"T3": "whitespace-only", "T4": "no-sections"}


def test_csv_undecodable_cell_keeps_other_rows(tmp_path):
    table = tmp_path / "reports.csv"
    table.write_bytes(b"id,findings,impression\nA,No effusion.,Normal.\nB,bad \xff byte,Normal.\nC,,Mild edema.\nD,,\n")
    result = read_reports(table)
    assert result.reports["report_id"].to_list() == ["A", "C"]
    assert result.reports["section_rule"].to_list() == ["columns", "columns"]
    assert result.reports.row(1, named=True)["findings"] is None
    assert reasons(result) == {"B": "undecodable", "D": "no-sections"}
    assert result.invalid.filter(pl.col("report_id") == "B")["source_path"].item().endswith("row 2")


def test_parquet_table_and_duplicate_ids(tmp_path):
    table = tmp_path / "reports.parquet"
    pl.DataFrame({
        "report_id": ["A", "B", "A"],
        "text": ["No effusion.", "Small pneumothorax.", "Repeated id."],
        "subject_id": ["1", "2", "1"],
    }).write_parquet(table)
    result = read_reports(table)
    assert result.reports["report_id"].to_list() == ["A", "B"]
    assert result.reports["subject_id"].to_list() == ["1", "2"]
    assert reasons(result) == {"A": "duplicate-id"}


def test_table_without_id_column_raises(tmp_path):
    table = tmp_path / "reports.csv"
    table.write_text("name,text\nA,No effusion.\n")
    with pytest.raises(ValueError, match="no report id column"):
        read_report_table(table)


def test_unknown_format_raises(tmp_path):
    path = tmp_path / "reports.docx"
    path.write_text("x")
    with pytest.raises(ValueError, match="unknown report format"):
        detect_format(path)
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing.csv")


# ---------------------------------------------------------------- streaming


def test_batches_filter_by_bucket_before_parsing(tmp_path):
    table = tmp_path / "reports.csv"
    ids = [f"R{i}" for i in range(50)]
    pl.DataFrame({"report_id": ids, "text": ["Mild atelectasis."] * 50}).write_csv(table)

    batches = list(iter_report_batches(table, batch_size=7, keep=lambda rid: bucket_of(rid, 4) == 1))
    kept = [rid for batch in batches for rid in batch.reports["report_id"].to_list()]
    assert kept == [rid for rid in ids if bucket_of(rid, 4) == 1]
    assert all(batch.reports.height <= 7 for batch in batches)


def test_batches_reject_duplicates_across_batches(tmp_path):
    table = tmp_path / "reports.csv"
    pl.DataFrame({"report_id": ["A", "B", "C", "A"], "text": ["No effusion."] * 4}).write_csv(table)
    batches = list(iter_report_batches(table, batch_size=2))
    assert batches[1].invalid["reason"].to_list() == ["duplicate-id"]


# ---------------------------------------------------------------- sections


@pytest.mark.parametrize(
    "text, findings, impression, rule",
    [
        ("FINDINGS: No effusion.\nIMPRESSION: Normal.", "No effusion.", "Normal.", "headers"),
        ("findings:\nNo effusion.\n\nimpression:\nNormal.", "No effusion.", "Normal.", "headers"),
        ("Findings : No effusion.\nConclusion: Normal.", "No effusion.", "Normal.", "headers"),
        ("  FINAL REPORT\n IMPRESSION: Normal chest.", None, "Normal chest.", "headers"),
        ("FINDINGS: No effusion. IMPRESSION: Normal chest.", "No effusion.", "Normal chest.", "headers"),
        ("INDICATION: cough.\nPA AND LATERAL VIEWS: Mild edema.", "Mild edema.", None, "last-section-fallback"),
        ("FINAL REPORT\nHeart normal. Lungs clear", "Heart normal. Lungs clear", None, "no-headers-fallback"),
        ("INDICATION: cough.\nCOMPARISON: none.", None, None, "no-sections"),
    ],
)
def test_split_sections_rules(text, findings, impression, rule):
    sections = split_sections(text)
    assert sections.findings == findings
    assert sections.impression == impression
    assert sections.section_rule == rule


# ---------------------------------------------------------------- validation and placeholders


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        (None, "empty"),
        (" \n\t ", "whitespace-only"),
        ("No effusion.\x00", "control-characters"),
        ("No \x1b[0m effusion.", "control-characters"),
        ("x" * 11, "too-large"),
        ("No effusion.\r\n\tNormal.", None),
    ],
)
def test_find_problem_reasons(text, reason):
    problem = find_problem(text, max_chars=10 if reason == "too-large" else 100)
    assert (problem[0] if problem else None) == reason


@pytest.mark.parametrize("token, expected", [("XXXX", True), ("___", True), ("X", False), ("XRAY", False), ("_", False)])
def test_placeholder_tokens(token, expected):
    assert is_placeholder(token) is expected


def test_placeholders_kept_verbatim():
    result = read_openi(FIXTURES / "openi")
    assert "x-XXXX" in result.reports.row(0, named=True)["text"]


def test_openi_ids_come_from_uid(tmp_path):
    target = tmp_path / "renamed"
    shutil.copytree(FIXTURES / "openi", target)
    (target / "101.xml").rename(target / "zzz.xml")
    result = read_openi(target)
    assert set(result.reports["report_id"].to_list()) == {"CXR101", "CXR102"}
