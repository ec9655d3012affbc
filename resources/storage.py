"""The artifact storage resource: one setting moves every artifact between a folder and S3."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from kad_pipeline.storage import ArtifactStore


def default_artifacts_uri() -> str:
    """Return ``$KAD_ARTIFACTS_URI``, or the ``.kad_artifacts`` folder of the working directory."""
    return os.environ.get("KAD_ARTIFACTS_URI") or str(Path.cwd() / ".kad_artifacts")


class ArtifactStorageResource(dg.ConfigurableResource):
    """Storage location of checkpoints, caches, images and reports: a local folder or ``s3://bucket/prefix``."""

    base_uri: str = Field(default_factory=default_artifacts_uri, description="Local folder or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of an S3-compatible store (MinIO, Ceph); unset for AWS S3."
    )

    def store(self) -> ArtifactStore:
        """Return the library-level store for this configuration."""
        return ArtifactStore(self.base_uri, s3_endpoint_url=self.s3_endpoint_url)

    def uri(self, key: str) -> str:
        return self.store().uri(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        return self.store().put_bytes(key, data)

    def get_bytes(self, uri_or_key: str) -> bytes:
        return self.store().get_bytes(uri_or_key)

    def put_file(self, local_path: str | os.PathLike, key: str) -> str:
        return self.store().put_file(local_path, key)

    def get_file(self, uri_or_key: str, local_path: str | os.PathLike) -> Path:
        return self.store().get_file(uri_or_key, local_path)

    def put_dir(self, local_dir: str | os.PathLike, key: str) -> str:
        return self.store().put_dir(local_dir, key)

    def get_dir(self, uri_or_key: str, local_dir: str | os.PathLike | None = None) -> Path:
        return self.store().get_dir(uri_or_key, local_dir)

    def put_json(self, key: str, value: Any) -> str:
        return self.store().put_json(key, value)
