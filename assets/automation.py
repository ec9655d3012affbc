"""Re-extraction of changed report buckets: the report_files source, its schedule and automation.

The loop has three parts. The ``observe_report_files`` schedule observes ``report_files``,
which records one data version per hash bucket, computed from the report contents. Every
per-report asset carries ``bucket_automation_condition()``: it requests a bucket when an
upstream partition of that bucket got a new data version, or when the bucket was never
materialized. ``kad_automation_sensor`` evaluates those conditions and launches the runs.
Both ship stopped, so users switch them on in the UI (Automation tab) or with
``dagster schedule start`` and ``dagster sensor start``.

Dagster counts a new observation of an observable source asset as an update only when its
data version differs from the previous one (``CachingInstanceQueryer``, dagster 1.13), so
observing an unchanged collection requests nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import dagster as dg

from assets.partitions import N_BUCKETS, report_buckets
from kad_pipeline.partitions import bucket_key, bucket_keys, bucket_of
from kad_pipeline.reports import RawReport, iter_raw_reports
from resources.reports import ReportSourceResource

OBSERVE_JOB_NAME = "observe_report_files"
OBSERVE_SCHEDULE_NAME = "observe_report_files_schedule"
AUTOMATION_SENSOR_NAME = "kad_automation_sensor"
DEFAULT_OBSERVE_CRON = "*/15 * * * *"

# Fields that identify where a record was read, not its contents. Moving the collection to
# another folder must not re-run every bucket.
_LOCATION_FIELDS = ("source_path",)


def record_digest(record: RawReport) -> str:
    """Return the SHA-256 of a raw report's contents, excluding the path it was read from."""
    fields = {name: value for name, value in asdict(record).items() if name not in _LOCATION_FIELDS}
    if record.report_id is None:
        # Without an id the file path is the record's identity and routes it to its bucket.
        fields["source_path"] = record.source_path
    payload = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=list)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def bucket_data_versions(records: Iterable[RawReport], n_buckets: int) -> dict[str, str]:
    """Return one data version per bucket key: a digest of the sorted record digests in it.

    Every bucket gets a version, an empty bucket the digest of nothing, so a bucket whose
    last report was deleted changes version and re-runs, which empties its tables.
    """
    digests: dict[str, list[str]] = {key: [] for key in bucket_keys(n_buckets)}
    for record in records:
        routing_id = record.report_id or record.source_path
        digests[bucket_key(bucket_of(routing_id, n_buckets))].append(record_digest(record))
    versions = {}
    for key, members in digests.items():
        digest = hashlib.sha256()
        for member in sorted(members):
            digest.update(member.encode("ascii"))
        versions[key] = digest.hexdigest()[:32]
    return versions


@dg.observable_source_asset(
    partitions_def=report_buckets,
    group_name="reports",
    description="The raw report collection as the report source resource reads it: one data version "
    "per hash bucket of report ids, computed from the report contents (not file times).",
)
def report_files(context: dg.AssetExecutionContext, report_source: ReportSourceResource):
    path = report_source.resolved_path()
    versions = bucket_data_versions(iter_raw_reports(path), N_BUCKETS)
    # Only buckets whose version differs from their latest observation are recorded, so an
    # unchanged collection adds no events to the event log.
    previous = latest_bucket_versions(context.instance, context.asset_key)
    changed = {key: version for key, version in versions.items() if previous.get(key) != version}
    context.log.info("Observed %s: %d of %d buckets changed", path, len(changed), len(versions))
    return dg.DataVersionsByPartition({key: dg.DataVersion(version) for key, version in changed.items()})


def latest_bucket_versions(instance: dg.DagsterInstance, asset_key: dg.AssetKey, page_size: int = 1000) -> dict[str, str]:
    """Return the latest observed data version of every bucket, paging back through observations."""
    versions: dict[str, str] = {}
    current_keys = set(bucket_keys(N_BUCKETS))
    cursor = None
    while True:
        page = instance.fetch_observations(asset_key, limit=page_size, cursor=cursor)
        for record in page.records:
            observation = record.asset_observation
            if observation is None or observation.partition is None or observation.data_version is None:
                continue
            versions.setdefault(observation.partition, observation.data_version)
        if not page.has_more or current_keys <= versions.keys():
            return versions
        cursor = page.cursor


def bucket_automation_condition() -> dg.AutomationCondition:
    """Return the condition of per-report assets: run a bucket when its upstream changed.

    This is ``eager()`` without its reset on the first evaluation. A bucket runs when a
    parent partition got a new materialization or a new observed data version, or when it
    is missing. That includes the very first evaluation, so the first tick after the first
    observation backfills every bucket, whereas plain ``eager()`` ignores partitions that
    are already missing when it is first evaluated. It waits while a parent is missing or
    in progress. An unpartitioned asset that reads every bucket can use it too, and then
    runs once after any bucket changed.
    """
    handled = (dg.AutomationCondition.newly_requested() | dg.AutomationCondition.newly_updated()).with_label(
        "handled"
    )
    return dg.AutomationCondition.eager().replace("handled", handled).with_label("bucket_changed")


def with_bucket_automation(assets_defs: Sequence) -> list:
    """Give every asset partitioned by report buckets the bucket condition, unless it has one."""

    def apply(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.partitions_def != report_buckets or spec.automation_condition is not None:
            return spec
        return spec.replace_attributes(automation_condition=bucket_automation_condition())

    result = []
    for definition in assets_defs:
        if isinstance(definition, dg.AssetsDefinition) and definition.is_executable and not definition.is_observable:
            definition = definition.map_asset_specs(apply)
        result.append(definition)
    return result


observe_report_files_job = dg.define_asset_job(
    OBSERVE_JOB_NAME,
    selection=[report_files],
    description="Observe the report collection and record one data version per bucket.",
)

observe_report_files_schedule = dg.ScheduleDefinition(
    name=OBSERVE_SCHEDULE_NAME,
    job=observe_report_files_job,
    cron_schedule=os.environ.get("KAD_OBSERVE_CRON", DEFAULT_OBSERVE_CRON),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Observe the report collection; with the automation sensor on, changed buckets re-run.",
)

kad_automation_sensor = dg.AutomationConditionSensorDefinition(
    AUTOMATION_SENSOR_NAME,
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    description="Evaluate the automation conditions: re-materialize the buckets whose reports changed.",
)

SCHEDULES = [observe_report_files_schedule]
SENSORS = [kad_automation_sensor]
JOBS = [observe_report_files_job]
