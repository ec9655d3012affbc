"""Extraction with RadGraph and with an LLM, and the agreement between all extractors that ran.

Both extractors are optional: while their resource is not configured the asset logs why and
materializes nothing, so the rest of the pipeline runs without them.
"""

import tempfile
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from assets.metadata import markdown_table
from assets.partitions import N_BUCKETS, partition_output, report_buckets, single_run, split_by_bucket
from kad_pipeline.extraction.cache import ExtractionCache
from kad_pipeline.extraction.agreement import agreement_table, agreement_wide, gold_label_matrix
from kad_pipeline.extraction.labels import label_matrix
from kad_pipeline.extraction.llm import LLMExtractor
from kad_pipeline.extraction.radgraph import (
    INSTALL_HINT,
    RadGraphEntities,
    check_radgraph_environment,
    convert_radgraph,
    load_radgraph_json,
    report_id_of_key,
    runner_command,
    write_runner_input,
)
from kad_pipeline.parquet import read_parquet
from kad_pipeline.partitions import bucket_key, bucket_of
from kad_pipeline.queries import KAD_QUERIES
from resources.io_manager import ParquetIOManager
from resources.llm import LLMExtractorResource
from resources.radgraph import RadGraphResource
from resources.storage import ArtifactStorageResource

# Rows of id lists shown in metadata; the full tables are in the logs and the outputs.
_METADATA_ROWS = 50


def _counts_by(df: pl.DataFrame, column: str) -> dict[str, int]:
    return {str(key): int(count) for key, count in df[column].value_counts().iter_rows()} if df.height else {}


# --------------------------------------------------------------------------------------------
# RadGraph
# --------------------------------------------------------------------------------------------


def _radgraph_from_json(context: dg.AssetExecutionContext, reports: pl.DataFrame, path: str) -> RadGraphEntities:
    requested_ids = set(reports["report_id"].to_list())
    data = load_radgraph_json(path)
    # The file covers every report; only the keys of this run's buckets are converted.
    selected = {key: value for key, value in data.items() if report_id_of_key(key) in requested_ids}
    context.log.info("RadGraph JSON %s: %d of its %d reports are in this run", path, len(selected), len(data))
    return convert_radgraph(selected, KAD_QUERIES, reports)


def _radgraph_from_runner(
    context: dg.AssetExecutionContext,
    reports: pl.DataFrame,
    radgraph: RadGraphResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> RadGraphEntities:
    versions = check_radgraph_environment(radgraph.python_executable)
    context.log.info("RadGraph environment %s: %s", radgraph.python_executable, versions)
    with tempfile.TemporaryDirectory(prefix="radgraph-") as folder:
        input_path = write_runner_input(reports, Path(folder) / "reports.jsonl")
        output_path = Path(folder) / "radgraph.json"
        try:
            invocation = pipes_subprocess_client.run(
                command=runner_command(radgraph.python_executable),
                context=context,
                extras={
                    "input_path": str(input_path),
                    "output_path": str(output_path),
                    "model_type": radgraph.model_type,
                    "batch_size": radgraph.batch_size,
                },
            )
        except dg.DagsterPipesExecutionError as error:
            raise RuntimeError(
                f"the RadGraph runner failed ({error}); the error it logged above gives the reason. {INSTALL_HINT}"
            ) from error
        progress = invocation.get_custom_messages()
        if progress:
            context.log.info("RadGraph runner finished: %s", progress[-1])
        return convert_radgraph(load_radgraph_json(output_path), KAD_QUERIES, reports)


@dg.asset(
    group_name="extraction",
    partitions_def=report_buckets,
    backfill_policy=single_run,
    code_version="report-entities-radgraph-v1",
    kinds={"polars", "parquet"},
    output_required=False,
)
def report_entities_radgraph(
    context: dg.AssetExecutionContext,
    reports: pl.DataFrame,
    radgraph: RadGraphResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
):
    """Entity mentions found by RadGraph (or RadGraph-XL), one row per mention.

    From the published RadGraph JSON (``radgraph_json``) or from a run of the model in its
    own Python environment through Dagster Pipes (``python_executable``). Observations are
    normalized to the KAD query entities, with the anatomy they are located at. Same columns
    as ``report_entities_rules``. Not materialized while RadGraph is not configured.
    """
    if radgraph.mode is None:
        context.log.warning(
            "RadGraph extractor is off: set the radgraph resource's radgraph_json (published output) or "
            "python_executable (a separate environment). Nothing materialized."
        )
        return
    if radgraph.mode == "json":
        converted = _radgraph_from_json(context, reports, radgraph.radgraph_json)
    else:
        converted = _radgraph_from_runner(context, reports, radgraph, pipes_subprocess_client)

    entities, rejects = converted.entities, converted.rejects
    annotated = entities["report_id"].n_unique() if entities.height else 0
    context.log.info(
        "RadGraph: %d entities in %d of %d reports, %d rejected", entities.height, annotated, reports.height, rejects.height
    )
    yield dg.Output(
        partition_output(context, split_by_bucket(entities, context.partition_keys)),
        metadata={
            "source": radgraph.radgraph_json if radgraph.mode == "json" else f"run: {radgraph.model_type}",
            "reports": reports.height,
            "reports_annotated": annotated,
            "entities_by_category": dg.MetadataValue.json(_counts_by(entities, "category")),
            "rejects_by_reason": dg.MetadataValue.json(_counts_by(rejects, "reason")),
            "rejects": dg.MetadataValue.md(markdown_table(rejects.head(_METADATA_ROWS))) if rejects.height else "none",
        },
    )


# --------------------------------------------------------------------------------------------
# LLM
# --------------------------------------------------------------------------------------------


class LLMExtractionConfig(dg.Config):
    """Run settings of the LLM extractor."""

    max_failed_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Largest fraction of reports without a usable response that still materializes the buckets. "
        "Above it the run fails. Responses received so far stay cached, so a re-run sends requests only for the rest.",
    )


@dg.asset(
    group_name="extraction",
    partitions_def=report_buckets,
    backfill_policy=single_run,
    code_version="report-entities-llm-v1",
    kinds={"openai", "polars", "parquet"},
    output_required=False,
)
def report_entities_llm(
    context: dg.AssetExecutionContext,
    config: LLMExtractionConfig,
    reports: pl.DataFrame,
    llm: LLMExtractorResource,
    storage: ArtifactStorageResource,
):
    """Findings an OpenAI-compatible chat model reports as present, absent or uncertain, one row per finding.

    Responses are cached by model, prompt version and report text hash, so a re-run sends requests
    only for new or failed reports. The per-bucket entity cache in the artifact store serves
    unchanged reports even where the client's answer cache folder is empty (a fresh pod). Metadata has token usage, the cost estimate and the failed
    report ids with reasons. Not materialized while the llm resource has no base_url.
    """
    if not llm.enabled:
        context.log.warning("LLM extractor is off: set the llm resource's base_url and model. Nothing materialized.")
        return
    extractor = LLMExtractor(llm.config(), KAD_QUERIES)
    results = []

    def extract_missing(missing: pl.DataFrame):
        results.append(extractor.extract(missing))
        return results[-1].entities, set(results[-1].failures["report_id"].to_list())

    cache = ExtractionCache(storage.store(), "llm", extractor.version, N_BUCKETS)
    cached = cache.extract(reports, extract_missing, context.partition_keys)
    context.log.info("LLM entity cache: %d reports served, %d sent to the extractor", cached.hits, cached.misses)
    result = results[-1] if results else extractor.extract(reports.head(0))
    usage = result.usage.as_dict()
    failed_fraction = result.failures.height / reports.height if reports.height else 0.0
    metadata = {
        "extractor_version": extractor.version,
        "reports": reports.height,
        "cache_hits": cached.hits,
        "failed_reports": result.failures.height,
        "failures_by_reason": dg.MetadataValue.json(_counts_by(result.failures, "reason")),
        "rejected_findings_by_reason": dg.MetadataValue.json(_counts_by(result.rejected_findings, "reason")),
        "usage": dg.MetadataValue.json(usage),
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "estimated_cost_usd": usage["estimated_cost_usd"]
        if usage["estimated_cost_usd"] is not None
        else "unknown: set prompt_price_per_million and completion_price_per_million",
        "failed_report_ids": dg.MetadataValue.md(markdown_table(result.failures.head(_METADATA_ROWS)))
        if result.failures.height
        else "none",
    }
    if failed_fraction > config.max_failed_fraction:
        raise dg.Failure(
            description=f"{result.failures.height} of {reports.height} reports got no usable LLM answer "
            f"({failed_fraction:.1%} > max_failed_fraction {config.max_failed_fraction:.1%}). Answers received "
            "are cached; re-run to ask again for the failed reports only.",
            metadata=metadata,
        )
    if result.failures.height:
        # NOTE: failed reports have no rows, so downstream label matrices read them as "not mentioned".
        context.log.warning("%d reports have no LLM answer and count as not mentioned", result.failures.height)
    yield dg.Output(partition_output(context, split_by_bucket(cached.table, context.partition_keys)), metadata=metadata)


# --------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------


class AgreementConfig(dg.Config):
    """Settings of the extractor agreement."""

    gold_labels_path: str | None = Field(
        default=None,
        description="CSV or Parquet of gold labels: an id column (report_id or filename) and one column per "
        "finding (1, 0, -1, empty). Unset compares extractors only.",
    )


def _load_optional_entities(
    context: dg.AssetExecutionContext, storage: ArtifactStorageResource, asset_name: str, reports: pl.DataFrame
) -> tuple[pl.DataFrame, list[str]] | None:
    """Read the stored buckets of an optional extractor; return its entities and the report ids they cover."""
    store = storage.store()
    frames, buckets = [], []
    for partition in report_buckets.get_partition_keys():
        key = ParquetIOManager.table_key(dg.AssetKey(asset_name), partition)
        if store.exists(key):
            frames.append(read_parquet(store, key))
            buckets.append(partition)
    if not frames:
        context.log.info("%s has no materialized buckets; left out of the agreement", asset_name)
        return None
    covered = set(buckets)
    report_ids = [
        report_id for report_id in reports["report_id"].to_list() if bucket_key(bucket_of(report_id, N_BUCKETS)) in covered
    ]
    context.log.info("%s: %d of %d buckets materialized, %d reports", asset_name, len(buckets), N_BUCKETS, len(report_ids))
    return pl.concat(frames, how="diagonal_relaxed"), report_ids


def _read_gold(path: str) -> pl.DataFrame:
    table = pl.read_parquet(path) if path.endswith(".parquet") else pl.read_csv(path, infer_schema_length=10000)
    return gold_label_matrix(table, KAD_QUERIES)


@dg.multi_asset(
    group_name="extraction",
    code_version="extractor-agreement-v1",
    outs={
        "extractor_agreement": dg.AssetOut(
            kinds={"polars", "parquet"},
            description="Cohen's kappa and percent agreement per query entity for each pair of extractors "
            "that ran, and against gold labels when configured.",
        ),
        "extractor_disagreements": dg.AssetOut(
            kinds={"polars", "parquet"},
            description="Report ids where two extractors (or an extractor and gold) disagree, per query "
            "entity, with both labels. Ids only, no report text.",
        ),
    },
    deps=["report_entities_radgraph", "report_entities_llm"],
)
def extractor_agreement(
    context: dg.AssetExecutionContext,
    config: AgreementConfig,
    reports: pl.DataFrame,
    report_entities_rules: pl.DataFrame,
    storage: ArtifactStorageResource,
):
    """Agreement between the rules, RadGraph and LLM extractors (those that ran), and with gold labels.

    Labels are compared in four categories (present, absent, uncertain, not mentioned), and
    for "present" against the rest. RadGraph and LLM buckets are read when materialized, so an
    extractor that is not configured is simply left out.
    """
    all_ids = reports["report_id"].to_list()
    matrices = {"rules": label_matrix(report_entities_rules, all_ids, KAD_QUERIES)}
    for name, asset_name in (("radgraph", "report_entities_radgraph"), ("llm", "report_entities_llm")):
        loaded = _load_optional_entities(context, storage, asset_name, reports)
        if loaded is not None:
            entities, report_ids = loaded
            matrices[name] = label_matrix(entities, report_ids, KAD_QUERIES)
    gold = _read_gold(config.gold_labels_path) if config.gold_labels_path else None

    agreement, disagreements = agreement_table(matrices, KAD_QUERIES, gold)
    if agreement.height == 0:
        context.log.warning("only %s produced labels and no gold labels are set: nothing to compare", sorted(matrices))
    summary = agreement_wide(agreement)
    context.log.info(
        "Agreement over %d pairs and %d queries; %d disagreements",
        agreement["pair"].n_unique() if agreement.height else 0,
        agreement["query"].n_unique() if agreement.height else 0,
        disagreements.height,
    )
    yield dg.Output(
        agreement,
        output_name="extractor_agreement",
        metadata={
            "extractors": sorted(matrices),
            "gold_labels": config.gold_labels_path or "none",
            "kappa_by_query": dg.MetadataValue.md(
                "Cohen's kappa over present/absent/uncertain/not mentioned, with percent agreement.\n\n"
                + markdown_table(summary)
                if summary.height
                else "no pairs to compare"
            ),
            "mean_kappa_by_pair": dg.MetadataValue.json(
                {pair: kappa for pair, kappa in agreement.group_by("pair").agg(pl.col("cohen_kappa").mean()).rows()}
                if agreement.height
                else {}
            ),
        },
    )
    yield dg.Output(
        disagreements,
        output_name="extractor_disagreements",
        metadata={
            "disagreements": disagreements.height,
            "by_query": dg.MetadataValue.md(
                markdown_table(
                    disagreements.group_by("query", "pair").len("reports").sort("reports", descending=True).head(_METADATA_ROWS)
                )
                if disagreements.height
                else "none"
            ),
        },
    )
