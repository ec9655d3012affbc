"""Dagster asset definitions of kad-pipeline, one module per pipeline stage."""
