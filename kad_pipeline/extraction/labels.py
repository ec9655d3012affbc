"""The label matrix: one row per report, one Int8 column per query entity.

Values follow the CheXpert labeler convention: 1 present, 0 absent, -1 uncertain, null not
mentioned. Several mentions of one query in a report aggregate as present over uncertain
over absent.

``normal`` is derived, not read from mentions:
- 0 when any other query entity of the entity table is present in the report,
- -1 when none is present but at least one is uncertain,
- 1 when none is present or uncertain and the report has at least one entity of any kind
  (an absent finding, a "no acute disease" phrase, a concept without a query),
- null when the extractor found nothing in the report.
This generalizes the KAD paper's rule (normal when all entities are absent) to uncertain
mentions. Entities without a query, such as HPO concepts outside the query list, never make
a report abnormal.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

NORMAL = "normal"
# Anatomy entities ("ANAT-DP", as RadGraph emits them) count as present for their query.
_RANK = {"OBS-DP": 3, "ANAT-DP": 3, "OBS-U": 2, "OBS-DA": 1}
_VALUE_OF_RANK = {3: 1, 2: -1, 1: 0}


def label_matrix(entities: pl.DataFrame, report_ids: Sequence[str], queries: Sequence[str]) -> pl.DataFrame:
    """Aggregate an entity table into the label matrix for ``report_ids`` and ``queries``.

    Rows follow ``report_ids``; entities of other reports are ignored. Raises ValueError on
    an unknown category or a repeated query name.
    """
    if len(set(queries)) != len(queries):
        raise ValueError(f"queries contain duplicates: {list(queries)}")
    unknown = set(entities["category"].unique().to_list()) - set(_RANK)
    if unknown:
        raise ValueError(f"unknown entity categories {sorted(unknown)}; expected {sorted(_RANK)}")

    ids = pl.DataFrame({"report_id": list(report_ids)}, schema={"report_id": pl.String()})
    ranked = (
        entities.join(ids, on="report_id", how="semi")
        .with_columns(pl.col("category").replace_strict(_RANK, return_dtype=pl.Int8).alias("rank"))
    )

    per_query = (
        ranked.filter(pl.col("query").is_not_null() & (pl.col("query") != NORMAL))
        .group_by("report_id", "query")
        .agg(pl.col("rank").max())
    )
    values: dict[str, dict[str, int]] = {}
    for report_id, query, rank in per_query.iter_rows():
        values.setdefault(query, {})[report_id] = _VALUE_OF_RANK[rank]

    mentioned = set(ranked["report_id"].to_list())
    best_other: dict[str, int] = {}
    for report_id, _, rank in per_query.filter(pl.col("rank") >= 2).iter_rows():
        best_other[report_id] = max(best_other.get(report_id, 0), rank)

    columns: dict[str, list] = {"report_id": list(report_ids)}
    for query in queries:
        if query == NORMAL:
            columns[query] = [_normal_value(report_id, mentioned, best_other) for report_id in report_ids]
        else:
            by_report = values.get(query, {})
            columns[query] = [by_report.get(report_id) for report_id in report_ids]
    schema = {"report_id": pl.String(), **{query: pl.Int8() for query in queries}}
    return pl.DataFrame(columns, schema=schema)


def _normal_value(report_id: str, mentioned: set[str], best_other: dict[str, int]) -> int | None:
    rank = best_other.get(report_id)
    if rank == 3:
        return 0
    if rank == 2:
        return -1
    return 1 if report_id in mentioned else None
