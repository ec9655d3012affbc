"""The long entity table that every extractor writes: one row per mention."""

import polars as pl

# Categories are RadGraph's: for observations they encode presence (DP present, U
# uncertain, DA absent). Offsets index the reports table's ``text`` column.
ENTITY_SCHEMA: dict[str, pl.DataType] = {
    "report_id": pl.String(),
    "sentence_index": pl.Int32(),
    "char_start": pl.Int32(),
    "char_end": pl.Int32(),
    "entity": pl.String(),
    "query": pl.String(),
    "category": pl.String(),
    "cui": pl.String(),
    "semantic_type": pl.String(),
    "extractor": pl.String(),
    "extractor_version": pl.String(),
}
