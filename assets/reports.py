"""Reports: raw report files parsed into findings and impression, one table per hash bucket."""

import dagster as dg
import polars as pl

from assets.automation import bucket_automation_condition, report_files
from assets.partitions import N_BUCKETS, partition_output, report_buckets, single_run, split_by_bucket
from kad_pipeline.partitions import bucket_key, bucket_of
from kad_pipeline.reports import iter_raw_reports, parse_raw_reports
from resources.reports import ReportSourceResource

REPORTS_CODE_VERSION = "reports-v1"


@dg.multi_asset(
    outs={
        "reports": dg.AssetOut(
            description="Valid reports: findings and impression sections, the text extractors read, "
            "image ids and MeSH terms where the source has them. One Parquet file per hash bucket.",
            code_version=REPORTS_CODE_VERSION,
            kinds={"polars", "parquet"},
            automation_condition=bucket_automation_condition(),
        ),
        "invalid_reports": dg.AssetOut(
            description="Reports that could not be used (empty, undecodable, control characters, too "
            "large, malformed), with a reason code and a sentence that never quotes the report.",
            code_version=REPORTS_CODE_VERSION,
            kinds={"polars", "parquet"},
            automation_condition=bucket_automation_condition(),
        ),
    },
    deps=[report_files],
    group_name="reports",
    partitions_def=report_buckets,
    backfill_policy=single_run,
)
def reports(context: dg.AssetExecutionContext, report_source: ReportSourceResource):
    """Read the report collection once and parse the reports that fall in the requested buckets.

    A requested bucket with no reports left gets empty tables, so deleted reports leave no rows.
    """
    wanted = set(context.partition_keys)
    path = report_source.resolved_path()
    context.log.info("Reading reports from %s for %d bucket(s)", path, len(wanted))

    def records():
        for record in iter_raw_reports(path):
            routing_id = record.report_id or record.source_path
            if bucket_key(bucket_of(routing_id, N_BUCKETS)) in wanted:
                yield record

    result = parse_raw_reports(records())
    valid = result.reports.sort("report_id")
    invalid = result.invalid

    invalid_routed = invalid.with_columns(pl.coalesce("report_id", "source_path").alias("_routing"))
    valid_by_bucket = split_by_bucket(valid, context.partition_keys)
    invalid_by_bucket = {
        key: frame.drop("_routing")
        for key, frame in split_by_bucket(invalid_routed, context.partition_keys, id_column="_routing").items()
    }

    reasons = invalid.group_by("reason").len().sort("reason").rows() if invalid.height else []
    context.log.info(
        "Parsed %d valid and %d invalid reports (%s)",
        valid.height, invalid.height, ", ".join(f"{reason}: {count}" for reason, count in reasons) or "none invalid",
    )
    yield dg.Output(
        partition_output(context, valid_by_bucket),
        output_name="reports",
        metadata={
            "source": path,
            "section_rules": dg.MetadataValue.json(dict(valid.group_by("section_rule").len().rows()) if valid.height else {}),
        },
    )
    yield dg.Output(
        partition_output(context, invalid_by_bucket),
        output_name="invalid_reports",
        metadata={"reasons": dg.MetadataValue.json(dict(reasons))},
    )

