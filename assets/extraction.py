"""Extraction: clinical entities and presence labels from report text with the rules extractor.

Per-report results come from the extraction cache where the report text was seen before, so
re-running a bucket after one report changed extracts only that report.
"""

import dagster as dg
import polars as pl
from pydantic import Field

from assets.automation import bucket_automation_condition
from assets.metadata import markdown_table
from assets.partitions import N_BUCKETS, partition_output, report_buckets, single_run, split_by_bucket
from kad_pipeline.extraction.cache import ExtractionCache
from kad_pipeline.extraction.labels import label_matrix
from kad_pipeline.extraction.rules import RulesExtractor
from kad_pipeline.queries import KAD_QUERIES
from resources.storage import ArtifactStorageResource


class RulesExtractionConfig(dg.Config):
    """Settings of the rules extractor."""

    mode: str = Field(
        default="scoped",
        description="'scoped': negation and uncertainty cues with a scope; 'paper': the KAD paper's "
        "sentence rule (no/none/normal makes every entity of the sentence absent).",
    )


@dg.asset(
    group_name="extraction",
    partitions_def=report_buckets,
    backfill_policy=single_run,
    code_version="report-entities-rules-v2",
    kinds={"polars", "parquet"},
    automation_condition=bucket_automation_condition(),
)
def report_entities_rules(
    context: dg.AssetExecutionContext,
    config: RulesExtractionConfig,
    reports: pl.DataFrame,
    storage: ArtifactStorageResource,
):
    """Entity mentions found by the knowledge-base rules extractor, one row per mention.

    Columns: report_id, sentence_index, char_start, char_end, entity, query, category
    (ANAT-DP, OBS-DP present, OBS-U uncertain, OBS-DA absent), cui, semantic_type,
    extractor, extractor_version.
    """
    extractor = RulesExtractor(queries=KAD_QUERIES, mode=config.mode)
    cache = ExtractionCache(storage.store(), "rules", extractor.version, N_BUCKETS)
    cached = cache.extract(reports, extractor.extract, context.partition_keys)
    entities = cached.table
    context.log.info(
        "Rules extractor %s (%s mode) found %d mentions in %d reports; %d texts from the cache, %d extracted",
        extractor.version, config.mode, entities.height, reports.height, cached.hits, cached.misses,
    )
    frames = split_by_bucket(entities, context.partition_keys)
    return dg.Output(
        partition_output(context, frames),
        metadata={
            "extractor_version": extractor.version,
            "mode": config.mode,
            "reports": reports.height,
            "cache_hits": cached.hits,
            "extracted": cached.misses,
            "cache_uri": cache.store.uri(cache.folder_key()),
            "mentions_by_category": dg.MetadataValue.json(
                dict(entities.group_by("category").len().rows()) if entities.height else {}
            ),
        },
    )


@dg.asset(
    group_name="extraction",
    partitions_def=report_buckets,
    backfill_policy=single_run,
    code_version="report-labels-v1",
    kinds={"polars", "parquet"},
    automation_condition=bucket_automation_condition(),
)
def report_labels(context: dg.AssetExecutionContext, reports: pl.DataFrame, report_entities_rules: pl.DataFrame):
    """The label matrix: one row per report, one column per KAD query entity.

    Values follow the CheXpert labeler: 1 present, 0 absent, -1 uncertain, null not
    mentioned. Training decides how null and -1 map to targets.
    """
    labels = label_matrix(report_entities_rules, reports["report_id"].to_list(), KAD_QUERIES)
    positives = {
        query: int((labels[query] == 1).sum()) for query in KAD_QUERIES if (labels[query] == 1).sum() > 0
    }
    context.log.info("Labelled %d reports over %d queries", labels.height, len(KAD_QUERIES))
    return dg.Output(
        partition_output(context, split_by_bucket(labels, context.partition_keys)),
        metadata={"queries": len(KAD_QUERIES), "positives_by_query": dg.MetadataValue.json(positives)},
    )


@dg.asset(
    group_name="extraction",
    code_version="entity-vocabulary-v1",
    kinds={"polars", "parquet"},
    automation_condition=bucket_automation_condition(),
    ins={"report_entities_rules": dg.AssetIn()},
)
def entity_vocabulary(context: dg.AssetExecutionContext, report_entities_rules: pl.DataFrame) -> dg.Output:
    """Every entity surface form the extractor found, with its query entity and mention counts.

    Columns: entity, query, cui, mentions, reports, present, absent, uncertain (the last
    three count observation mentions by presence).
    """
    entities = report_entities_rules.with_columns(pl.col("entity").str.to_lowercase())
    vocabulary = (
        entities.group_by("entity", "query", "cui")
        .agg(
            pl.len().alias("mentions"),
            pl.col("report_id").n_unique().alias("reports"),
            (pl.col("category") == "OBS-DP").sum().alias("present"),
            (pl.col("category") == "OBS-DA").sum().alias("absent"),
            (pl.col("category") == "OBS-U").sum().alias("uncertain"),
        )
        .sort(["mentions", "entity"], descending=[True, False])
    )
    top = vocabulary.head(15).select("entity", "query", "mentions", "reports")
    context.log.info("Vocabulary of %d surface forms from %d mentions", vocabulary.height, entities.height)
    return dg.Output(
        vocabulary,
        metadata={
            "surface_forms": vocabulary.height,
            "queries_covered": vocabulary["query"].drop_nulls().n_unique() if vocabulary.height else 0,
            "top_entities": dg.MetadataValue.md(markdown_table(top)),
        },
    )

