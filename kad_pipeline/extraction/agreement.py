"""Agreement between extractors' label matrices, and with gold labels: Cohen's kappa per query entity.

Labels are compared as four categories: present (1), absent (0), uncertain (-1) and not
mentioned (null). ``cohen_kappa_present`` compares only "present" against everything else,
the distinction that training on positive labels uses.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from kad_pipeline.queries import KAD_QUERIES

logger = logging.getLogger(__name__)

GOLD_NAME = "gold"
VALID_LABELS = frozenset({1, 0, -1, None})

AGREEMENT_SCHEMA: dict[str, pl.DataType] = {
    "query": pl.String(),
    "pair": pl.String(),
    "extractor_a": pl.String(),
    "extractor_b": pl.String(),
    "n_reports": pl.Int64(),
    "n_agree": pl.Int64(),
    "percent_agreement": pl.Float64(),
    "cohen_kappa": pl.Float64(),
    "cohen_kappa_present": pl.Float64(),
    "present_a": pl.Int64(),
    "present_b": pl.Int64(),
}

DISAGREEMENT_SCHEMA: dict[str, pl.DataType] = {
    "query": pl.String(),
    "pair": pl.String(),
    "extractor_a": pl.String(),
    "extractor_b": pl.String(),
    "report_id": pl.String(),
    "label_a": pl.Int8(),
    "label_b": pl.Int8(),
}


def cohen_kappa(labels_a: Sequence[Any], labels_b: Sequence[Any]) -> float | None:
    """Cohen's kappa of two raters over the same items; None when undefined.

    kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement and p_e the agreement
    expected from each rater's category frequencies (Cohen 1960, Educational and Psychological
    Measurement 20:37-46). It is undefined (None) for no items, or when both raters use one
    and the same category for every item (p_e = 1).
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(f"label sequences differ in length: {len(labels_a)} and {len(labels_b)}")
    n = len(labels_a)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(labels_a, labels_b, strict=True)) / n
    counts_a, counts_b = Counter(labels_a), Counter(labels_b)
    expected = sum(counts_a[category] * counts_b[category] for category in counts_a) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def _validate_matrix(name: str, matrix: pl.DataFrame) -> None:
    if "report_id" not in matrix.columns:
        raise ValueError(f"label matrix {name!r} has no report_id column")
    duplicated = matrix["report_id"].is_duplicated()
    if duplicated.any():
        example = matrix.filter(duplicated)["report_id"][0]
        raise ValueError(f"label matrix {name!r} has duplicate report ids, e.g. {example!r}")


def _check_values(name: str, query: str, values: Sequence[Any]) -> None:
    invalid = {value for value in values if value not in VALID_LABELS}
    if invalid:
        raise ValueError(
            f"label matrix {name!r}, column {query!r} has values {sorted(map(repr, invalid))}; "
            "expected 1, 0, -1 or null"
        )


def agreement_table(
    label_matrices: Mapping[str, pl.DataFrame],
    queries: Sequence[str] = KAD_QUERIES,
    gold: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Compare every pair of extractors, and each extractor with ``gold``, query by query.

    Each matrix has report_id and one column per query (1, 0, -1, null). Only reports present
    in both matrices of a pair are compared. A query missing from a matrix (gold labels often
    cover fewer queries) is skipped for the pairs with that matrix.

    Returns the agreement table (one row per query and pair) and the disagreements (query,
    pair, report_id and both labels; ids only, no report text).
    """
    if GOLD_NAME in label_matrices:
        raise ValueError(f"extractor name {GOLD_NAME!r} is reserved for the gold labels")
    matrices = dict(label_matrices)
    for name, matrix in matrices.items():
        _validate_matrix(name, matrix)
    pairs = list(itertools.combinations(sorted(matrices), 2))
    if gold is not None:
        _validate_matrix(GOLD_NAME, gold)
        pairs += [(GOLD_NAME, name) for name in sorted(matrices)]
        matrices[GOLD_NAME] = gold

    agreement_rows: list[dict[str, Any]] = []
    disagreement_rows: list[dict[str, Any]] = []
    for name_a, name_b in pairs:
        pair = f"{name_a} vs {name_b}"
        common = [query for query in queries if query in matrices[name_a].columns and query in matrices[name_b].columns]
        skipped = [query for query in queries if query not in common]
        if skipped:
            logger.info("%s: %d queries missing from one side, skipped: %s", pair, len(skipped), skipped)
        if not common:
            continue
        joined = matrices[name_a].select("report_id", *common).join(
            matrices[name_b].select("report_id", *common), on="report_id", how="inner", suffix="__b"
        )
        report_ids = joined["report_id"].to_list()
        for query in common:
            labels_a = joined[query].to_list()
            labels_b = joined[f"{query}__b"].to_list()
            _check_values(name_a, query, labels_a)
            _check_values(name_b, query, labels_b)
            n_agree = sum(a == b for a, b in zip(labels_a, labels_b, strict=True))
            n_reports = len(report_ids)
            agreement_rows.append(
                {
                    "query": query,
                    "pair": pair,
                    "extractor_a": name_a,
                    "extractor_b": name_b,
                    "n_reports": n_reports,
                    "n_agree": n_agree,
                    "percent_agreement": 100.0 * n_agree / n_reports if n_reports else None,
                    "cohen_kappa": cohen_kappa(labels_a, labels_b),
                    "cohen_kappa_present": cohen_kappa([a == 1 for a in labels_a], [b == 1 for b in labels_b]),
                    "present_a": sum(a == 1 for a in labels_a),
                    "present_b": sum(b == 1 for b in labels_b),
                }
            )
            disagreement_rows.extend(
                {
                    "query": query,
                    "pair": pair,
                    "extractor_a": name_a,
                    "extractor_b": name_b,
                    "report_id": report_id,
                    "label_a": a,
                    "label_b": b,
                }
                for report_id, a, b in zip(report_ids, labels_a, labels_b, strict=True)
                if a != b
            )
        logger.info("%s: compared %d reports over %d queries", pair, len(report_ids), len(common))

    return (
        pl.DataFrame(agreement_rows, schema=AGREEMENT_SCHEMA),
        pl.DataFrame(disagreement_rows, schema=DISAGREEMENT_SCHEMA),
    )


# Column names of ChestX-ray14-style gold label files that differ from the query name.
_GOLD_COLUMN_ALIASES = {"effusion": "pleural effusion", "pleural thickening": "pleural thicken"}
_GOLD_ID_COLUMNS = ("report_id", "filename", "id")


def gold_label_matrix(table: pl.DataFrame, queries: Sequence[str] = KAD_QUERIES) -> pl.DataFrame:
    """Turn a gold label table (e.g. CSV with ``filename,Atelectasis,Effusion,...``) into a label matrix.

    The id column is the first of report_id, filename, id. Column names are matched to queries
    case-insensitively with "_" read as a space, plus the aliases Effusion -> pleural effusion
    and Pleural_Thickening -> pleural thicken. Columns that match no query are dropped (and
    logged), since no extractor labels them.
    """
    id_column = next((column for column in _GOLD_ID_COLUMNS if column in table.columns), None)
    if id_column is None:
        raise ValueError(f"gold labels need one of the id columns {_GOLD_ID_COLUMNS}, got {table.columns}")
    renamed: dict[str, str] = {id_column: "report_id"}
    unmatched = []
    for column in table.columns:
        if column == id_column:
            continue
        name = " ".join(column.replace("_", " ").lower().split())
        name = _GOLD_COLUMN_ALIASES.get(name, name)
        if name in queries:
            renamed[column] = name
        else:
            unmatched.append(column)
    if unmatched:
        logger.info("gold label columns that match no query entity, ignored: %s", unmatched)
    matrix = table.select(list(renamed)).rename(renamed)
    return matrix.with_columns(pl.col("report_id").cast(pl.String), *(pl.col(q).cast(pl.Int8) for q in renamed.values() if q != "report_id"))


def agreement_wide(agreement: pl.DataFrame, digits: int = 2) -> pl.DataFrame:
    """Return one row per query and one text column per pair, "kappa (percent agreement)", for display.

    An undefined kappa shows as "n/a".
    """
    if agreement.height == 0:
        return pl.DataFrame({"query": []}, schema={"query": pl.String()})
    cells = agreement.with_columns(
        pl.format(
            "{} ({}%)",
            pl.col("cohen_kappa").round(digits).cast(pl.String).fill_null("n/a"),
            pl.col("percent_agreement").round(0).cast(pl.Int64).cast(pl.String).fill_null("n/a"),
        ).alias("cell")
    )
    order = {query: index for index, query in enumerate(dict.fromkeys(agreement["query"].to_list()))}
    wide = cells.pivot(on="pair", index="query", values="cell")
    return wide.sort(pl.col("query").replace_strict(order, return_dtype=pl.Int64))
