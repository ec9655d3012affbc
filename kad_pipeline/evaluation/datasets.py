"""Readers for the label and box files of the public chest X-ray evaluation sets.

Each label reader returns an ``EvaluationLabels``: a wide table (``image_id``,
``patient_id``, ``split``, then one Int8 column per query: 1 positive, 0 negative, null
missing) and a quarantine table of rows that could not be read, with the reason. Box
readers return ``image_id, finding, x0, y0, x1, y1`` in pixels of the original image.

Dataset label names become query names through a mapping per dataset. The defaults below
are plain dicts: pass an edited copy, or load one from JSON with ``load_query_mapping``.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

logger = logging.getLogger(__name__)

# ChestX-ray14 (NIH) label names to the query names used for zero-shot evaluation.
# "Infiltrate" is the spelling of BBox_List_2017.csv; Data_Entry uses "Infiltration".
CHESTXRAY14_QUERIES: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "pleural effusion",
    "Infiltration": "infiltration",
    "Infiltrate": "infiltration",
    "Mass": "lung mass",
    "Nodule": "lung nodule",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Pleural_Thickening": "pleural thicken",
    "Hernia": "hernia",
}
CHESTXRAY14_NO_FINDING = "No Finding"

# The 14 CheXpert observations; the five competition findings come first.
CHEXPERT_QUERIES: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Pleural Effusion": "pleural effusion",
    "No Finding": "normal",
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Lung Opacity": "opacity",
    "Lung Lesion": "lesion",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Pleural Other": "pleural other",
    "Fracture": "fracture",
    "Support Devices": "device",
}
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

CHESTX_DET10_QUERIES: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Calcification": "calcification",
    "Consolidation": "consolidation",
    "Effusion": "pleural effusion",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Fracture": "fracture",
    "Mass": "lung mass",
    "Nodule": "lung nodule",
    "Pneumothorax": "pneumothorax",
}

# PadChest labels are already lower-case English terms; they are queried verbatim unless
# this mapping renames them. These two labels mark unusable images, not findings.
PADCHEST_QUERIES: dict[str, str] = {}
PADCHEST_NON_FINDINGS = frozenset({"exclude", "suboptimal study"})

UncertainRule = Literal["exclude", "positive", "negative"]


@dataclass
class EvaluationLabels:
    """Labels of one evaluation set: the wide table, its query columns and the rows left out."""

    labels: pl.DataFrame  # image_id, patient_id, split, then one Int8 column per query
    queries: list[str]
    quarantine: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(schema={"image_id": pl.String, "reason": pl.String, "detail": pl.String})
    )

    def split(self, name: str) -> pl.DataFrame:
        """Return the rows of one split ("train", "valid" or "test")."""
        return self.labels.filter(pl.col("split") == name)


def load_query_mapping(path: str | Path) -> dict[str, str]:
    """Read a dataset-to-query mapping from a JSON object of label name to query name."""
    mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"{path} must hold a JSON object mapping label names to query names")
    return mapping


def _open_text(path: str | Path) -> io.TextIOBase:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label file not found: {path}")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _quarantine_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"image_id": pl.String, "reason": pl.String, "detail": pl.String})


def _unique_queries(mapping: dict[str, str], names) -> list[str]:
    queries: list[str] = []
    for name in names:
        query = mapping[name]
        if query not in queries:
            queries.append(query)
    return queries


def patient_in_validation(patient_id: str, fraction: float, seed: int = 0) -> bool:
    """Assign a patient to the validation part by a hash, stable across runs and file orders."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------
# ChestX-ray14
# ---------------------------------------------------------------------------

def _read_id_list(path: str | Path) -> list[str]:
    with _open_text(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def read_chestxray14(
    data_entry_csv: str | Path,
    train_val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    *,
    validation_fraction: float = 0.1,
    seed: int = 0,
    mapping: dict[str, str] | None = None,
) -> EvaluationLabels:
    """Read ChestX-ray14 labels from ``Data_Entry_2017*.csv`` and the official split lists.

    Images of ``test_list.txt`` get split "test". From ``train_val_list.txt``, whole
    patients (about ``validation_fraction`` of them, chosen by a seeded hash) get split
    "valid" and the rest "train", so no patient is in two splits. Without the lists every
    image gets split null. Findings are separated by "|"; "No Finding" sets every query to 0.
    Rows with a finding that the mapping lacks are quarantined.
    """
    mapping = dict(CHESTXRAY14_QUERIES if mapping is None else mapping)
    queries = _unique_queries(mapping, list(mapping))

    test_ids = set(_read_id_list(test_list)) if test_list else set()
    train_val_ids = set(_read_id_list(train_val_list)) if train_val_list else set()
    both = test_ids & train_val_ids
    if both:
        raise ValueError(f"{len(both)} image(s) appear in both split lists, e.g. {sorted(both)[:3]}")

    rows: list[dict] = []
    quarantine: list[dict] = []
    with _open_text(data_entry_csv) as handle:
        reader = csv.reader(handle)
        header = next(reader)
        try:
            image_column = header.index("Image Index")
            labels_column = header.index("Finding Labels")
            patient_column = header.index("Patient ID")
        except ValueError:
            raise ValueError(f"{data_entry_csv} lacks ChestX-ray14 columns; header starts {header[:4]}") from None
        for record in reader:
            image_id = record[image_column]
            findings = [f.strip() for f in record[labels_column].split("|") if f.strip()]
            unknown = [f for f in findings if f != CHESTXRAY14_NO_FINDING and f not in mapping]
            if unknown:
                quarantine.append({"image_id": image_id, "reason": "unknown-finding",
                                   "detail": f"findings {unknown} are not in the query mapping"})
                continue
            row = {query: 0 for query in queries}
            for finding in findings:
                if finding != CHESTXRAY14_NO_FINDING:
                    row[mapping[finding]] = 1
            row["image_id"] = image_id
            row["patient_id"] = str(int(record[patient_column])) if record[patient_column].isdigit() else record[patient_column]
            rows.append(row)

    table = pl.DataFrame(rows, schema={"image_id": pl.String, "patient_id": pl.String,
                                       **{q: pl.Int8 for q in queries}})
    split = pl.lit(None, dtype=pl.String)
    if test_ids or train_val_ids:
        validation_patients = {
            patient for patient in table.filter(pl.col("image_id").is_in(train_val_ids)).get_column("patient_id").unique()
            if patient_in_validation(patient, validation_fraction, seed)
        }
        split = (
            pl.when(pl.col("image_id").is_in(test_ids)).then(pl.lit("test"))
            .when(pl.col("image_id").is_in(train_val_ids) & pl.col("patient_id").is_in(validation_patients)).then(pl.lit("valid"))
            .when(pl.col("image_id").is_in(train_val_ids)).then(pl.lit("train"))
            .otherwise(pl.lit(None, dtype=pl.String))
        )
        listed = test_ids | train_val_ids
        known = set(table.get_column("image_id").to_list())
        not_in_table = listed - known - {q["image_id"] for q in quarantine}
        if not_in_table:
            logger.warning("%d listed image(s) have no Data_Entry row, e.g. %s", len(not_in_table), sorted(not_in_table)[:3])
        unlisted = len(known - listed)
        if unlisted:
            logger.warning("%d Data_Entry image(s) are in neither split list; their split is null", unlisted)
    table = table.with_columns(split.alias("split")).select("image_id", "patient_id", "split", *queries)
    logger.info("read %d ChestX-ray14 images (%d quarantined)", table.height, len(quarantine))
    return EvaluationLabels(table, queries, _quarantine_frame(quarantine))


# ---------------------------------------------------------------------------
# CheXpert
# ---------------------------------------------------------------------------

def _chexpert_value(raw: str, uncertain: UncertainRule) -> int | None:
    text = raw.strip()
    if text == "":
        # Blank means "not mentioned" in CheXpert's labeler output: negative for evaluation.
        return 0
    value = float(text)
    if value == 1:
        return 1
    if value == 0:
        return 0
    if value == -1:
        return {"exclude": None, "positive": 1, "negative": 0}[uncertain]
    raise ValueError(f"unexpected CheXpert label value {raw!r}")


def read_chexpert(
    path: str | Path,
    *,
    observations: tuple[str, ...] = CHEXPERT_COMPETITION,
    uncertain: UncertainRule = "exclude",
    mapping: dict[str, str] | None = None,
) -> EvaluationLabels:
    """Read CheXpert labels from ``valid.csv``, a train CSV, or the test ground truth.

    Two layouts are accepted: ``Path`` plus patient details plus the 14 observations
    (valid.csv, train.csv), and ``Study`` plus the 14 observations (test ground truth).
    The image id is the Path or Study value; the split is "test" for the Study layout,
    otherwise "valid" or "train" from the path.

    Uncertain rule: -1 becomes missing with ``"exclude"`` (the image leaves that query's
    evaluation only), 1 with ``"positive"`` and 0 with ``"negative"``. Blank cells are 0.
    The official validation and test labels are radiologist consensus without -1, so the
    rule matters only for train-style files.
    """
    if uncertain not in ("exclude", "positive", "negative"):
        raise ValueError(f"uncertain rule must be 'exclude', 'positive' or 'negative', got {uncertain!r}")
    mapping = dict(CHEXPERT_QUERIES if mapping is None else mapping)
    missing = [o for o in observations if o not in mapping]
    if missing:
        raise ValueError(f"observations {missing} have no query name in the mapping")
    queries = _unique_queries(mapping, observations)

    rows: list[dict] = []
    quarantine: list[dict] = []
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "Path" in fields:
            id_field = "Path"
        elif "Study" in fields:
            id_field = "Study"
        else:
            raise ValueError(f"{path} has neither a 'Path' nor a 'Study' column; header: {fields[:6]}")
        absent = [o for o in observations if o not in fields]
        if absent:
            raise ValueError(f"{path} lacks observation columns {absent}")
        for record in reader:
            image_id = record[id_field]
            try:
                values = {o: _chexpert_value(record[o] or "", uncertain) for o in observations}
            except ValueError as error:
                quarantine.append({"image_id": image_id, "reason": "invalid-label", "detail": str(error)})
                continue
            row = {q: None for q in queries}
            for observation, value in values.items():
                query = mapping[observation]
                if value is not None and (row[query] is None or value > row[query]):
                    row[query] = value
            parts = image_id.split("/")
            row["image_id"] = image_id
            row["patient_id"] = next((p for p in parts if p.startswith("patient")), None)
            if id_field == "Study":
                row["split"] = "test"
            elif "valid" in parts:
                row["split"] = "valid"
            else:
                row["split"] = "train"
            rows.append(row)

    table = pl.DataFrame(rows, schema={"image_id": pl.String, "patient_id": pl.String, "split": pl.String,
                                       **{q: pl.Int8 for q in queries}})
    logger.info("read %d CheXpert rows from %s (uncertain rule %r, %d quarantined)",
                table.height, Path(path).name, uncertain, len(quarantine))
    return EvaluationLabels(table, queries, _quarantine_frame(quarantine))


# ---------------------------------------------------------------------------
# PadChest
# ---------------------------------------------------------------------------

def parse_label_list(text: str | None) -> list[str]:
    """Parse a PadChest list string such as "['normal', 'pleural effusion']".

    Raises ``ValueError`` for anything that is not a Python list of strings.
    """
    if text is None or text.strip().lower() in ("", "nan"):
        raise ValueError(f"no label list (cell is {text!r})")
    value = ast.literal_eval(text.strip())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"not a list of strings: {text[:60]!r}")
    return [v.strip() for v in value if v.strip()]


def read_padchest(
    path: str | Path,
    *,
    annotated_only: bool = False,
    queries: list[str] | None = None,
    mapping: dict[str, str] | None = None,
    max_rows: int | None = None,
) -> EvaluationLabels:
    """Read the PadChest label table (``PADCHEST_chest_x_ray_images_labels_160K*.csv``).

    ``annotated_only`` keeps the rows labelled by physicians (``MethodLabel ==
    "Physician"``, 39,053 of the 160,861 rows of the 01.02.19 release); a text model
    labelled the rest. Query columns are ``queries`` when given, else every label seen except "exclude" and
    "suboptimal study". Rows whose Labels cell does not parse as a list are quarantined.
    The split is "test" for every row, because PadChest is used for evaluation only.
    """
    mapping = dict(PADCHEST_QUERIES if mapping is None else mapping)
    columns = ["ImageID", "PatientID", "MethodLabel", "Labels"]
    frame = pl.read_csv(path, columns=columns, schema_overrides={c: pl.String for c in columns},
                        n_rows=max_rows, infer_schema=False)
    if annotated_only:
        frame = frame.filter(pl.col("MethodLabel") == "Physician")

    parsed: list[tuple[str, str, list[str]]] = []
    quarantine: list[dict] = []
    for image_id, patient_id, _, labels_text in frame.iter_rows():
        try:
            names = [mapping.get(label, label) for label in parse_label_list(labels_text)]
        except (ValueError, SyntaxError) as error:
            quarantine.append({"image_id": image_id, "reason": "unparsable-labels", "detail": str(error)[:200]})
            continue
        parsed.append((image_id, patient_id, names))

    if queries is None:
        seen = {name for _, _, names in parsed for name in names}
        queries = sorted(seen - PADCHEST_NON_FINDINGS)
    query_index = {q: i for i, q in enumerate(queries)}
    matrix = [[0] * len(queries) for _ in parsed]
    for row, (_, _, names) in zip(matrix, parsed):
        for name in names:
            position = query_index.get(name)
            if position is not None:
                row[position] = 1

    table = pl.DataFrame(
        {
            "image_id": [p[0] for p in parsed],
            "patient_id": [p[1] for p in parsed],
            "split": ["test"] * len(parsed),
            **{q: pl.Series(q, [r[i] for r in matrix], dtype=pl.Int8) for i, q in enumerate(queries)},
        },
        schema={"image_id": pl.String, "patient_id": pl.String, "split": pl.String, **{q: pl.Int8 for q in queries}},
    )
    logger.info("read %d PadChest images with %d queries (%d quarantined, annotated_only=%s)",
                table.height, len(queries), len(quarantine), annotated_only)
    return EvaluationLabels(table, list(queries), _quarantine_frame(quarantine))


# ---------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------

BOX_SCHEMA = {"image_id": pl.String, "finding": pl.String, "x0": pl.Float64, "y0": pl.Float64,
              "x1": pl.Float64, "y1": pl.Float64}


def read_nih_boxes(path: str | Path, *, mapping: dict[str, str] | None = None) -> pl.DataFrame:
    """Read ``BBox_List_2017.csv``: one box per row as x, y, width, height in 1024 px images.

    Its header has trailing empty fields, so columns are taken by position. Boxes with a
    finding outside the mapping or a non-positive size raise ``ValueError``.
    """
    mapping = dict(CHESTXRAY14_QUERIES if mapping is None else mapping)
    rows: list[dict] = []
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if not header or header[0] != "Image Index":
            raise ValueError(f"{path} does not look like BBox_List_2017.csv; header starts {header[:3]}")
        for line_number, record in enumerate(reader, start=2):
            if not record or not record[0].strip():
                continue
            image_id, finding = record[0], record[1]
            if finding not in mapping:
                raise ValueError(f"{path}:{line_number}: finding {finding!r} is not in the query mapping")
            x, y, width, height = (float(v) for v in record[2:6])
            if width <= 0 or height <= 0:
                raise ValueError(f"{path}:{line_number}: box of {image_id} has non-positive size {width}x{height}")
            rows.append({"image_id": image_id, "finding": mapping[finding],
                         "x0": x, "y0": y, "x1": x + width, "y1": y + height})
    return pl.DataFrame(rows, schema=BOX_SCHEMA)


def read_chestx_det10(path: str | Path, *, mapping: dict[str, str] | None = None) -> tuple[EvaluationLabels, pl.DataFrame]:
    """Read a ChestX-Det10 JSON file (a list of {file_name, syms, boxes}).

    ``syms`` lists one class name per box and ``boxes`` lists [x0, y0, x1, y1] in pixels.
    Returns the labels (an image is positive for a query when it has a box of it, negative
    otherwise, split "test") and the boxes. Entries whose classes and boxes disagree in
    length are quarantined.
    """
    mapping = dict(CHESTX_DET10_QUERIES if mapping is None else mapping)
    queries = _unique_queries(mapping, list(mapping))
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold a JSON list of image entries")

    label_rows: list[dict] = []
    box_rows: list[dict] = []
    quarantine: list[dict] = []
    for entry in entries:
        image_id = str(entry.get("file_name", ""))
        classes = entry.get("syms", entry.get("classes", []))
        boxes = entry.get("boxes", [])
        if not image_id:
            quarantine.append({"image_id": None, "reason": "no-file-name", "detail": "entry without file_name"})
            continue
        if len(classes) != len(boxes):
            quarantine.append({"image_id": image_id, "reason": "box-count-mismatch",
                               "detail": f"{len(classes)} classes but {len(boxes)} boxes"})
            continue
        unknown = [c for c in classes if c not in mapping]
        if unknown:
            quarantine.append({"image_id": image_id, "reason": "unknown-finding",
                               "detail": f"classes {unknown} are not in the query mapping"})
            continue
        row = {q: 0 for q in queries}
        for name, box in zip(classes, boxes):
            row[mapping[name]] = 1
            x0, y0, x1, y1 = (float(v) for v in box)
            box_rows.append({"image_id": image_id, "finding": mapping[name], "x0": x0, "y0": y0, "x1": x1, "y1": y1})
        row.update(image_id=image_id, patient_id=None, split="test")
        label_rows.append(row)

    labels = pl.DataFrame(label_rows, schema={"image_id": pl.String, "patient_id": pl.String, "split": pl.String,
                                              **{q: pl.Int8 for q in queries}})
    return EvaluationLabels(labels, queries, _quarantine_frame(quarantine)), pl.DataFrame(box_rows, schema=BOX_SCHEMA)


def labels_from_annotations(image_ids: list[str], annotations: pl.DataFrame, queries: list[str]) -> pl.DataFrame:
    """Build a wide 0/1 label table: an image is positive for a finding it has a box of."""
    positives = annotations.select("image_id", "finding").unique()
    rows = {image_id: {q: 0 for q in queries} for image_id in image_ids}
    for image_id, finding in positives.iter_rows():
        if image_id in rows and finding in rows[image_id]:
            rows[image_id][finding] = 1
    return pl.DataFrame(
        [{"image_id": image_id, **values} for image_id, values in rows.items()],
        schema={"image_id": pl.String, **{q: pl.Int8 for q in queries}},
    )
