"""Dagster resources of kad-pipeline: storage, knowledge source, extractors and compute."""
