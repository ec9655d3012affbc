"""The Dagster code location: every asset, resource, schedule and sensor of kad-pipeline.

This is the one library module that imports Dagster. ``dagster dev``, ``dagster definitions
validate`` and ``dagster asset materialize -m kad_pipeline.definitions`` load ``defs``.
Settings come from the environment, so the same code runs on a laptop and in a cluster:

- ``KAD_ARTIFACTS_URI``: base of every artifact, a folder or ``s3://bucket/prefix``
  (default: ``.kad_artifacts`` in the working directory).
- ``KAD_S3_ENDPOINT_URL``: endpoint of an S3-compatible store (unset for AWS S3).
- ``KAD_REPORT_BUCKETS``: number of hash buckets of report ids (default 32).
- ``KAD_DEPLOYMENT``: ``local`` (the default executor, training in this process) or
  ``production`` (the Kubernetes executor and the ``stage1_pod`` and ``stage2_pod``
  training pod resources, configured as ``resources/deploy.py`` describes).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

from assets import automation, evaluation, extraction, extraction_models, images, knowledge, reports, training
from resources.io_manager import ParquetIOManager
from resources.reports import ReportSourceResource
from resources.storage import ArtifactStorageResource, default_artifacts_uri

logger = logging.getLogger(__name__)

# Run tags that make one run cover a range of partitions (single-run backfill policy).
PARTITION_RANGE_START = "dagster/asset_partition_range_start"
PARTITION_RANGE_END = "dagster/asset_partition_range_end"

ASSET_MODULES = (automation, reports, extraction, extraction_models, knowledge, images, training, evaluation)
DEPLOYMENT_MODES = ("local", "production")


def deployment_mode() -> str:
    """Return ``$KAD_DEPLOYMENT``: "local" (the default) or "production"."""
    mode = os.environ.get("KAD_DEPLOYMENT") or "local"
    if mode not in DEPLOYMENT_MODES:
        raise ValueError(f"KAD_DEPLOYMENT must be one of {', '.join(DEPLOYMENT_MODES)}, got {mode!r}")
    return mode


def default_resources(artifacts_uri: str | None = None, s3_endpoint_url: str | None = None) -> dict[str, Any]:
    """Return the resources of the embedded offline configuration."""
    from resources.compute import ComputeResource
    from resources.knowledge import KnowledgeSourceResource
    from resources.llm import LLMExtractorResource
    from resources.radgraph import RadGraphResource
    from resources.text_encoder import TextEncoderResource

    artifacts_uri = artifacts_uri or default_artifacts_uri()
    s3_endpoint_url = s3_endpoint_url or os.environ.get("KAD_S3_ENDPOINT_URL") or None
    return {
        "io_manager": ParquetIOManager(base_uri=artifacts_uri, s3_endpoint_url=s3_endpoint_url),
        "storage": ArtifactStorageResource(base_uri=artifacts_uri, s3_endpoint_url=s3_endpoint_url),
        "report_source": ReportSourceResource(),
        "knowledge_source": KnowledgeSourceResource(),
        "text_encoder": TextEncoderResource(),
        "llm": LLMExtractorResource(),
        "radgraph": RadGraphResource(),
        "compute": ComputeResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        # Training pods exist only in production mode; locally stage 2 runs as a subprocess.
        "stage1_pod": dg.ResourceDefinition.none_resource(),
        "stage2_pod": dg.ResourceDefinition.none_resource(),
    }


def build_definitions(
    artifacts_uri: str | None = None,
    s3_endpoint_url: str | None = None,
    resource_overrides: Mapping[str, Any] | None = None,
) -> dg.Definitions:
    """Build the code location; tests pass small resources through ``resource_overrides``."""
    resources = default_resources(artifacts_uri, s3_endpoint_url)
    executor = None
    if deployment_mode() == "production":
        from resources.deploy import production_executor, training_pod_resources

        resources.update(training_pod_resources())
        executor = production_executor()
    resources.update(resource_overrides or {})
    return dg.Definitions(
        assets=automation.with_bucket_automation(dg.load_assets_from_modules(list(ASSET_MODULES))),
        resources=resources,
        executor=executor,
        jobs=automation.JOBS,
        schedules=automation.SCHEDULES,
        sensors=automation.SENSORS,
    )


def materialize_all(
    defs: dg.Definitions,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
    log=logger.info,
) -> dict:
    """Materialize every asset of ``defs``: observe the report source, materialize the
    bucketed per-report assets in one run over the whole bucket range, then everything
    downstream in a second run.

    ``instance`` defaults to the one of ``$DAGSTER_HOME``; ``run_config`` contains asset
    settings by op name (``{"ops": {"kad_model": {"config": {...}}}}``). Returns the run
    ids by step and raises ``RuntimeError`` when a run fails.
    """
    instance = instance or dg.DagsterInstance.get()
    graph = defs.resolve_asset_graph()
    keys = graph.materializable_asset_keys
    partitioned = sorted((k for k in keys if graph.get(k).is_partitioned), key=lambda k: k.to_user_string())
    unpartitioned = sorted((k for k in keys if not graph.get(k).is_partitioned), key=lambda k: k.to_user_string())
    job = defs.resolve_implicit_global_asset_job_def()
    run_ids = {}

    # Observing the report source first records each bucket's data version, so that a
    # schedule or sensor switched on later finds no new version and re-runs nothing.
    observe = defs.resolve_job_def(automation.OBSERVE_JOB_NAME)
    result = observe.execute_in_process(instance=instance, raise_on_error=False)
    _check(result, "report source observation")
    run_ids["observe"] = result.run_id

    if partitioned:
        partition_keys = graph.get(partitioned[0]).partitions_def.get_partition_keys()
        log(f"Step 1/2: {len(partitioned)} per-report assets over {len(partition_keys)} buckets")
        started = time.monotonic()
        result = job.execute_in_process(
            instance=instance,
            asset_selection=partitioned,
            run_config=_run_config_for(defs, run_config, partitioned),
            tags={PARTITION_RANGE_START: partition_keys[0], PARTITION_RANGE_END: partition_keys[-1]},
            raise_on_error=False,
        )
        _check(result, "per-report assets")
        run_ids["per_report"] = result.run_id
        log(f"Step 1/2 finished in {time.monotonic() - started:.0f} s (run {result.run_id})")

    log(f"Step 2/2: {len(unpartitioned)} assets: vocabulary, knowledge, training, evaluation")
    started = time.monotonic()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=unpartitioned,
        run_config=_run_config_for(defs, run_config, unpartitioned),
        raise_on_error=False,
    )
    _check(result, "downstream assets")
    run_ids["downstream"] = result.run_id
    log(f"Step 2/2 finished in {time.monotonic() - started:.0f} s (run {result.run_id})")
    return run_ids


def _run_config_for(
    defs: dg.Definitions, run_config: Mapping[str, Any] | None, keys: list[dg.AssetKey]
) -> dict[str, Any]:
    """Keep the op settings of the selected assets: a run rejects config for ops it does not run."""
    if not run_config:
        return {}
    names = {defs.resolve_assets_def(key).node_def.name for key in keys}
    ops = {name: value for name, value in run_config.get("ops", {}).items() if name in names}
    return {**{k: v for k, v in run_config.items() if k != "ops"}, "ops": ops}


def _check(result, description: str) -> None:
    if result.success:
        return
    failures = [
        f"{event.step_key}: {event.event_specific_data.error.message.strip()}"
        for event in result.all_events
        if event.is_step_failure
    ]
    raise RuntimeError(f"the run of the {description} failed:\n" + "\n".join(failures))


def latest_metadata(asset: str, instance: dg.DagsterInstance | None = None) -> dict[str, Any]:
    """Return the metadata values of an asset's latest materialization, or {} if it has none."""
    instance = instance or dg.DagsterInstance.get()
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


defs = build_definitions()
