"""Reader for the CSV layout of the KAD reference code.

Three files: definitions with columns `CUI,NAME,DEF`, triplets with `source,target,edge`
(names), and a file with `source_cui,target_cui` whose row i gives the concept ids of
triplet row i. The two triplet files share no key, so a row shift between them would
silently attach relations to the wrong concepts. The reader therefore rejects files whose
row counts differ or whose names fit a shifted alignment better than the direct one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import polars as pl

from kad_pipeline.knowledge.graph import REJECTED_SCHEMA, KnowledgeGraph, rejected_rows

logger = logging.getLogger(__name__)

DEFINITION_COLUMNS = ("CUI", "NAME", "DEF")
TRIPLET_COLUMNS = ("source", "target", "edge")
TRIPLET_CUI_COLUMNS = ("source_cui", "target_cui")
MAX_CHECKED_SHIFT = 3


class MisalignedFilesError(ValueError):
    """The triplet file and its concept-id file do not line up row by row."""


def _read_csv(path: str | os.PathLike, required: tuple[str, ...]) -> pl.DataFrame:
    csv_path = Path(path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"KAD CSV file not found: {csv_path}")
    frame = pl.read_csv(csv_path, infer_schema=False)
    missing = [name for name in required if name not in frame.columns]
    if missing:
        raise ValueError(f"{csv_path} lacks columns {missing}. Found {frame.columns}, expected {list(required)}")
    return frame.select(pl.col(name).fill_null("").str.strip_chars() for name in required)


def _name_match_rate(names: pl.Series, cuis: pl.Series, known: dict[str, set[str]], shift: int) -> tuple[int, int]:
    """Count rows whose name is a known name of the concept id `shift` rows away."""
    checked = matched = 0
    name_list = names.to_list()
    cui_list = cuis.to_list()
    for index, name in enumerate(name_list):
        other = index + shift
        if not 0 <= other < len(cui_list):
            continue
        names_of_cui = known.get(cui_list[other])
        if names_of_cui is None:
            continue
        checked += 1
        matched += name.lower() in names_of_cui
    return matched, checked


def check_alignment(triplets: pl.DataFrame, cuis: pl.DataFrame, known: dict[str, set[str]], names_path: str) -> None:
    """Raise MisalignedFilesError when row counts differ or a row shift fits the names better."""
    if triplets.height != cuis.height:
        raise MisalignedFilesError(
            f"{names_path} has {triplets.height} triplet rows but its concept-id file has {cuis.height}: "
            "the files must be row-aligned (row i of one describes row i of the other); regenerate them together"
        )
    names = pl.concat([triplets["source"], triplets["target"]])
    ids = pl.concat([cuis["source_cui"], cuis["target_cui"]])
    direct, checked = _name_match_rate(names, ids, known, 0)
    if checked == 0:
        return
    for shift in range(-MAX_CHECKED_SHIFT, MAX_CHECKED_SHIFT + 1):
        if shift == 0:
            continue
        shifted, shifted_checked = _name_match_rate(names, ids, known, shift)
        if shifted_checked and shifted > 2 * direct and shifted / shifted_checked > 0.5:
            raise MisalignedFilesError(
                f"{names_path} and its concept-id file look shifted by {shift} rows: {shifted} of "
                f"{shifted_checked} names match the concept {shift} rows away but only {direct} of "
                f"{checked} match their own row; fix the files so that row i describes the same triplet"
            )


def read_kad_csv(
    definitions_csv: str | os.PathLike,
    triplets_csv: str | os.PathLike | None = None,
    triplet_cuis_csv: str | os.PathLike | None = None,
) -> KnowledgeGraph:
    """Read the KAD reference CSV files into a KnowledgeGraph.

    The first NAME of a CUI is its preferred name, other names of the CUI (from either file)
    become synonyms. Rows without a CUI or name are rejected with a reason.
    """
    if (triplets_csv is None) != (triplet_cuis_csv is None):
        raise ValueError("give both the triplet CSV and its concept-id CSV, or neither")
    definitions_raw = _read_csv(definitions_csv, DEFINITION_COLUMNS).with_row_index("row", offset=2)
    rejected_parts = [pl.DataFrame(schema=REJECTED_SCHEMA)]

    bad = definitions_raw.filter((pl.col("CUI") == "") | (pl.col("NAME") == ""))
    if bad.height:
        rejected_parts.append(
            rejected_rows(str(definitions_csv), [(f"line {row}", "missing-id-or-name", "CUI or NAME is empty") for row in bad["row"]])
        )
    definitions_raw = definitions_raw.filter((pl.col("CUI") != "") & (pl.col("NAME") != ""))
    names = definitions_raw.select(pl.col("CUI").alias("concept_id"), pl.col("NAME").alias("name"), "row")
    definitions = (
        definitions_raw.filter(pl.col("DEF") != "")
        .select(pl.col("CUI").alias("concept_id"), pl.col("DEF").alias("definition"))
        .unique(maintain_order=True)
    )

    triplets = pl.DataFrame(schema={"head_id": pl.String, "head": pl.String, "relation": pl.String, "tail_id": pl.String, "tail": pl.String})
    if triplets_csv is not None:
        named = _read_csv(triplets_csv, TRIPLET_COLUMNS)
        ids = _read_csv(triplet_cuis_csv, TRIPLET_CUI_COLUMNS)
        known: dict[str, set[str]] = {}
        for concept_id, name in names.select("concept_id", "name").iter_rows():
            known.setdefault(concept_id, set()).add(name.lower())
        check_alignment(named, ids, known, str(triplets_csv))

        joined = pl.concat([named, ids], how="horizontal").with_row_index("row", offset=2)
        incomplete = joined.filter(pl.any_horizontal(pl.col(*TRIPLET_COLUMNS, *TRIPLET_CUI_COLUMNS) == ""))
        if incomplete.height:
            rejected_parts.append(
                rejected_rows(str(triplets_csv), [(f"line {row}", "incomplete-triplet", "a name, relation or concept id is empty") for row in incomplete["row"]])
            )
        complete = joined.filter(pl.all_horizontal(pl.col(*TRIPLET_COLUMNS, *TRIPLET_CUI_COLUMNS) != ""))
        triplets = complete.select(
            pl.col("source_cui").alias("head_id"),
            pl.col("source").alias("head"),
            pl.col("edge").str.replace_all("_", " ").alias("relation"),
            pl.col("target_cui").alias("tail_id"),
            pl.col("target").alias("tail"),
        )
        offset = (names["row"].max() or 0) + 1
        triplet_names = pl.concat(
            [
                triplets.select(pl.col("head_id").alias("concept_id"), pl.col("head").alias("name")),
                triplets.select(pl.col("tail_id").alias("concept_id"), pl.col("tail").alias("name")),
            ]
        ).with_row_index("row", offset=offset).select("concept_id", "name", "row")
        names = pl.concat([names, triplet_names.cast({"row": names.schema["row"]})])

    concepts = (
        names.sort("row")
        .group_by("concept_id", maintain_order=True)
        .agg(pl.col("name").first().alias("preferred_name"), pl.col("name").alias("all_names"))
        .with_columns(
            pl.col("all_names")
            .list.eval(pl.element().filter(pl.element().str.to_lowercase() != pl.element().first().str.to_lowercase()))
            .list.unique(maintain_order=True)
            .alias("synonyms"),
            pl.lit([], dtype=pl.List(pl.String)).alias("semantic_types"),
        )
        .drop("all_names")
    )
    graph = KnowledgeGraph(
        concepts=concepts,
        definitions=definitions,
        triplets=triplets,
        rejected=pl.concat(rejected_parts),
        source=f"kad-csv:{Path(definitions_csv).name}",
    )
    logger.info("read KAD CSV files: %s", graph.summary())
    return graph
