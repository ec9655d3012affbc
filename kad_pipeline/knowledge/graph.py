"""The in-memory knowledge graph: concept, definition and triplet tables plus rejected rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

CONCEPT_SCHEMA = {
    "concept_id": pl.String,
    "preferred_name": pl.String,
    "synonyms": pl.List(pl.String),
    "semantic_types": pl.List(pl.String),
}
DEFINITION_SCHEMA = {"concept_id": pl.String, "definition": pl.String}
TRIPLET_SCHEMA = {
    "head_id": pl.String,
    "head": pl.String,
    "relation": pl.String,
    "tail_id": pl.String,
    "tail": pl.String,
}
# One row per input record that a reader could not use: which file, where, and why.
REJECTED_SCHEMA = {"source_path": pl.String, "location": pl.String, "reason": pl.String, "detail": pl.String}


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass
class KnowledgeGraph:
    """Concepts, definitions and triplets of one knowledge source, in the shared table layouts."""

    concepts: pl.DataFrame
    definitions: pl.DataFrame
    triplets: pl.DataFrame
    rejected: pl.DataFrame = field(default_factory=lambda: empty_frame(REJECTED_SCHEMA))
    source: str = ""  # a short description of where the graph came from, for metadata

    def __post_init__(self) -> None:
        self.concepts = self.concepts.select(list(CONCEPT_SCHEMA)).cast(CONCEPT_SCHEMA)
        self.definitions = self.definitions.select(list(DEFINITION_SCHEMA)).cast(DEFINITION_SCHEMA)
        self.triplets = self.triplets.select(list(TRIPLET_SCHEMA)).cast(TRIPLET_SCHEMA)
        self.rejected = self.rejected.select(list(REJECTED_SCHEMA)).cast(REJECTED_SCHEMA)

    def summary(self) -> dict[str, int]:
        return {
            "concepts": self.concepts.height,
            "definitions": self.definitions.height,
            "triplets": self.triplets.height,
            "rejected": self.rejected.height,
        }


def rejected_rows(source_path: str, rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    """Build a rejected-rows table from (location, reason, detail) tuples of one file."""
    return pl.DataFrame(
        {
            "source_path": [source_path] * len(rows),
            "location": [row[0] for row in rows],
            "reason": [row[1] for row in rows],
            "detail": [row[2] for row in rows],
        },
        schema=REJECTED_SCHEMA,
    )
