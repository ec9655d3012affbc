"""Image manifests: which image files exist, which report or labels each belongs to, and its split.

A manifest has the columns image_id, report_id, path, split (train|valid|test) and source.
Three layouts are read: MIMIC-CXR-JPG (joined to reports by study id), NIH ChestX-ray14 (whose
finding labels stand in for reports) and a generic CSV or Parquet table.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from kad_pipeline.images.io import QUARANTINE_SCHEMA

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = {
    "image_id": pl.String,
    "report_id": pl.String,
    "path": pl.String,
    "split": pl.String,
    "source": pl.String,
}
SPLITS = ("train", "valid", "test")
FRONTAL_VIEWS = ("PA", "AP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# NIH ChestX-ray14 finding names mapped to query names. Names that are KAD queries use the KAD
# spelling ("pleural thicken" is a stem in the KAD vocabulary). Fibrosis is not a KAD query and
# keeps its own name, so it can only be scored zero-shot.
NIH_FINDING_TO_QUERY = {
    "No Finding": "normal",
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Effusion": "pleural effusion",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Hernia": "hernia",
    "Infiltration": "infiltration",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pleural_Thickening": "pleural thicken",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}


@dataclass
class ManifestResult:
    """A manifest, label matrix when the layout carries labels instead of reports, and quarantine rows."""

    manifest: pl.DataFrame
    labels: pl.DataFrame | None = None
    quarantine: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=QUARANTINE_SCHEMA))


def hash_split(key: str, valid_fraction: float = 0.1, test_fraction: float = 0.2) -> str:
    """Assign ``key`` to train, valid or test by a stable digest, the same on every machine."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + valid_fraction:
        return "valid"
    return "train"


def _study_digits(value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text[1:] if text[:1] in ("s", "S") else text


def _check_files(frame: pl.DataFrame, source: str) -> tuple[pl.DataFrame, list[dict[str, str]]]:
    exists = [Path(path).is_file() for path in frame["path"].to_list()]
    present = frame.filter(pl.Series(exists))
    missing = frame.filter(~pl.Series(exists))
    rows = [
        {"image_id": image_id, "path": path, "reason": "missing-file", "detail": f"{source} image listed but not found"}
        for image_id, path in zip(missing["image_id"].to_list(), missing["path"].to_list())
    ]
    if rows:
        logger.warning("%s manifest: %d listed images not found on disk", source, len(rows))
    return present, rows


def mimic_cxr_manifest(
    root: str | Path,
    reports: pl.DataFrame | None = None,
    views: tuple[str, ...] | None = FRONTAL_VIEWS,
    check_files: bool = True,
) -> ManifestResult:
    """Read the MIMIC-CXR-JPG layout under ``root``.

    ``root`` contains ``mimic-cxr-2.0.0-metadata.csv``, ``mimic-cxr-2.0.0-split.csv`` (optionally
    gzipped) and ``files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg``. Images are joined to
    ``reports`` (the reports table) by study id, with or without the leading "s". Without
    ``reports`` the report id is ``s<study_id>``. ``views`` keeps only those ViewPosition values
    (frontal PA and AP by default); None keeps all views.
    """
    root = Path(root)
    metadata_path = _find_one(root, "mimic-cxr-2.0.0-metadata.csv")
    split_path = _find_one(root, "mimic-cxr-2.0.0-split.csv")
    metadata = pl.read_csv(metadata_path, infer_schema_length=0)
    splits = pl.read_csv(split_path, infer_schema_length=0).select("dicom_id", "split")

    frame = metadata.select("dicom_id", "subject_id", "study_id", "ViewPosition").join(splits, on="dicom_id", how="left")
    quarantine: list[dict[str, str]] = []
    if views is not None:
        kept = frame.filter(pl.col("ViewPosition").is_in(list(views)))
        logger.info("MIMIC-CXR: kept %d of %d images with views %s", kept.height, frame.height, views)
        frame = kept

    frame = frame.with_columns(
        pl.format("{}/files/p{}/p{}/s{}/{}.jpg", pl.lit(str(root)), pl.col("subject_id").str.slice(0, 2),
                  pl.col("subject_id"), pl.col("study_id"), pl.col("dicom_id")).alias("path"),
        pl.col("split").replace({"validate": "valid"}),
    )
    unsplit = frame.filter(pl.col("split").is_null() | ~pl.col("split").is_in(list(SPLITS)))
    quarantine += [
        {"image_id": row["dicom_id"], "path": row["path"], "reason": "no-split", "detail": "dicom_id missing from the split file"}
        for row in unsplit.iter_rows(named=True)
    ]
    frame = frame.filter(pl.col("split").is_in(list(SPLITS)))

    if reports is not None:
        report_keys = (
            reports.filter(pl.col("study_id").is_not_null())
            .select(pl.col("study_id").map_elements(_study_digits, return_dtype=pl.String).alias("study_id"), "report_id")
            .unique(subset="study_id", keep="first")
        )
        frame = frame.join(report_keys, on="study_id", how="left")
        unmatched = frame.filter(pl.col("report_id").is_null())
        quarantine += [
            {"image_id": row["dicom_id"], "path": row["path"], "reason": "no-report", "detail": f"no report for study s{row['study_id']}"}
            for row in unmatched.iter_rows(named=True)
        ]
        frame = frame.filter(pl.col("report_id").is_not_null())
    else:
        frame = frame.with_columns(pl.format("s{}", pl.col("study_id")).alias("report_id"))

    manifest = frame.select(
        pl.col("dicom_id").alias("image_id"), "report_id", "path", "split", pl.lit("mimic").alias("source")
    ).cast(MANIFEST_SCHEMA)
    if check_files:
        manifest, missing = _check_files(manifest, "MIMIC-CXR")
        quarantine += missing
    logger.info("MIMIC-CXR manifest: %d images, %d quarantined", manifest.height, len(quarantine))
    return ManifestResult(manifest, None, pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA))


def _find_one(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name} (or {name}.gz) not found in {root}")


def _nih_split_table(root: Path, image_ids: list[str], patient_ids: list[str]) -> dict[str, str]:
    split_csv = root / "split.csv"
    if split_csv.is_file():
        table = pl.read_csv(split_csv, infer_schema_length=0)
        return dict(zip(table["Image Index"].to_list(), table["split"].str.replace("validate", "valid").to_list()))

    train_val, test = root / "train_val_list.txt", root / "test_list.txt"
    if train_val.is_file() and test.is_file():
        # The official lists only separate train_val from test; valid is carved out of train_val by
        # patient, so no patient appears in two splits.
        test_ids = set(test.read_text().split())
        splits = {}
        for image_id, patient in zip(image_ids, patient_ids):
            if image_id in test_ids:
                splits[image_id] = "test"
            else:
                splits[image_id] = "valid" if hash_split(patient, 0.1, 0.0) == "valid" else "train"
        return splits

    logger.info("NIH: no split.csv or official lists in %s; splitting by patient digest", root)
    return {image_id: hash_split(patient) for image_id, patient in zip(image_ids, patient_ids)}


def nih_chestxray14_manifest(root: str | Path, check_files: bool = True) -> ManifestResult:
    """Read the NIH ChestX-ray14 layout under ``root``.

    ``root`` contains ``Data_Entry_2017*.csv`` and the PNGs anywhere below it (``images/`` or the
    official ``images_NNN/images/`` folders). Splits come from ``split.csv`` (Image Index, split),
    else from ``train_val_list.txt`` and ``test_list.txt``, else from a digest of the patient id.
    The report id of an image is its image id, and the returned label matrix has one Int8
    column per finding (1 listed, 0 not listed) named by ``NIH_FINDING_TO_QUERY``.
    """
    root = Path(root)
    entries = sorted(root.glob("Data_Entry_2017*.csv")) + sorted(root.glob("Data_Entry_2017*.csv.gz"))
    if not entries:
        raise FileNotFoundError(f"no Data_Entry_2017*.csv in {root}")
    table = pl.read_csv(entries[0], infer_schema_length=0)
    logger.info("NIH: read %d rows from %s", table.height, entries[0].name)

    files = {path.name: path for suffix in ("*.png", "*.PNG") for path in root.rglob(suffix)}
    names = table["Image Index"].to_list()
    image_ids = [Path(name).stem for name in names]
    splits = _nih_split_table(root, names, table["Patient ID"].to_list())

    quarantine: list[dict[str, str]] = []
    manifest_rows, label_rows = [], []
    unknown_findings: set[str] = set()
    for name, image_id, findings in zip(names, image_ids, table["Finding Labels"].to_list()):
        path = files.get(name)
        if path is None and check_files:
            quarantine.append({"image_id": image_id, "path": str(root / name), "reason": "missing-file", "detail": "NIH image listed but not found"})
            continue
        split = splits.get(name)
        if split not in SPLITS:
            quarantine.append({"image_id": image_id, "path": str(path), "reason": "no-split", "detail": f"split {split!r} is not one of {SPLITS}"})
            continue
        manifest_rows.append({"image_id": image_id, "report_id": image_id, "path": str(path or root / name), "split": split, "source": "nih"})
        labels = {"report_id": image_id}
        for finding in (findings or "").split("|"):
            finding = finding.strip()
            if not finding:
                continue
            query = NIH_FINDING_TO_QUERY.get(finding)
            if query is None:
                unknown_findings.add(finding)
                query = finding.replace("_", " ").lower()
            labels[query] = 1
        label_rows.append(labels)
    if unknown_findings:
        logger.warning("NIH: findings without a query mapping kept under lower-case names: %s", sorted(unknown_findings))

    queries = list(dict.fromkeys(list(NIH_FINDING_TO_QUERY.values()) + sorted(
        {key for row in label_rows for key in row if key != "report_id"} - set(NIH_FINDING_TO_QUERY.values()))))
    labels = pl.DataFrame(
        [{"report_id": row["report_id"], **{query: row.get(query, 0) for query in queries}} for row in label_rows],
        schema={"report_id": pl.String, **{query: pl.Int8 for query in queries}},
    )
    manifest = pl.DataFrame(manifest_rows, schema=MANIFEST_SCHEMA)
    logger.info("NIH manifest: %d images, %d quarantined", manifest.height, len(quarantine))
    return ManifestResult(manifest, labels, pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA))


def generic_manifest(table_path: str | Path, source: str = "table", check_files: bool = True) -> ManifestResult:
    """Read a CSV or Parquet manifest with a ``path`` column plus ``report_id`` or ``labels``.

    Relative paths are resolved against the table's folder. ``image_id`` defaults to the file
    stem and ``split`` to a digest of the image id. ``labels`` contains query names joined by "|".
    When present, a label matrix (1 listed, 0 not listed) is returned and the report id is the
    image id.
    """
    table_path = Path(table_path)
    if not table_path.is_file():
        raise FileNotFoundError(f"manifest table not found: {table_path}")
    if table_path.suffix == ".parquet":
        table = pl.read_parquet(table_path)
    else:
        table = pl.read_csv(table_path, infer_schema_length=0)
    if "path" not in table.columns:
        raise ValueError(f"{table_path} has no 'path' column; found {table.columns}")
    if "report_id" not in table.columns and "labels" not in table.columns:
        raise ValueError(f"{table_path} needs a 'report_id' or a 'labels' column; found {table.columns}")

    base = table_path.parent
    paths = [str(Path(path) if Path(path).is_absolute() else base / path) for path in table["path"].to_list()]
    table = table.with_columns(pl.Series("path", paths, dtype=pl.String))
    if "image_id" not in table.columns:
        table = table.with_columns(pl.Series("image_id", [Path(path).stem for path in paths], dtype=pl.String))
    if "report_id" not in table.columns:
        table = table.with_columns(pl.col("image_id").alias("report_id"))
    if "split" not in table.columns:
        table = table.with_columns(pl.col("image_id").map_elements(hash_split, return_dtype=pl.String).alias("split"))
    table = table.with_columns(pl.col("split").replace({"validate": "valid", "val": "valid"}))

    quarantine: list[dict[str, str]] = []
    bad_split = table.filter(~pl.col("split").is_in(list(SPLITS)))
    quarantine += [
        {"image_id": row["image_id"], "path": row["path"], "reason": "no-split", "detail": f"split {row['split']!r} is not one of {SPLITS}"}
        for row in bad_split.iter_rows(named=True)
    ]
    table = table.filter(pl.col("split").is_in(list(SPLITS)))

    labels = None
    if "labels" in table.columns:
        label_lists = [[name.strip() for name in (text or "").split("|") if name.strip()] for text in table["labels"].to_list()]
        queries = list(dict.fromkeys(name for names in label_lists for name in names))
        labels = pl.DataFrame(
            [{"report_id": report_id, **{query: int(query in names) for query in queries}}
             for report_id, names in zip(table["report_id"].to_list(), label_lists)],
            schema={"report_id": pl.String, **{query: pl.Int8 for query in queries}},
        )

    manifest = table.select("image_id", "report_id", "path", "split", pl.lit(source).alias("source")).cast(MANIFEST_SCHEMA)
    if check_files:
        manifest, missing = _check_files(manifest, source)
        quarantine += missing
    return ManifestResult(manifest, labels, pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA))
