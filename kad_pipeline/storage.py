"""Artifact storage under one base URI: a local folder or an S3 prefix.

Every artifact of the pipeline (tables, caches, checkpoints, reports) is addressed by a key
relative to the base URI, so moving a deployment from a laptop to object storage is one
setting. Writes are atomic on both backends: a reader sees the old object or the new one,
never a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# A folder uploaded with put_dir is complete only once this file, written last, lists it.
DIR_MANIFEST = "_MANIFEST.json"


class ArtifactNotFoundError(FileNotFoundError):
    """An artifact key or URI does not exist in the store."""


class ArtifactCorruptError(RuntimeError):
    """A stored file does not match the manifest of the folder it belongs to."""


class ArtifactStore:
    """Read and write artifacts by key under a base URI (``/path``, ``file://`` or ``s3://``)."""

    def __init__(self, base_uri: str, *, s3_client: Any = None, s3_endpoint_url: str | None = None):
        self.base_uri = base_uri.rstrip("/")
        self.is_s3 = self.base_uri.startswith("s3://")
        if self.is_s3:
            bucket_and_prefix = self.base_uri[len("s3://"):]
            self.bucket, _, self.prefix = bucket_and_prefix.partition("/")
            if not self.bucket:
                raise ValueError(f"invalid S3 base URI {base_uri!r}: expected s3://bucket/prefix")
            if s3_client is None:
                import boto3

                s3_client = boto3.client("s3", endpoint_url=s3_endpoint_url)
            self.s3 = s3_client
        else:
            local = self.base_uri[len("file://"):] if self.base_uri.startswith("file://") else self.base_uri
            self.root = Path(local).expanduser().resolve()

    # -- addressing -------------------------------------------------------------------

    def uri(self, key: str) -> str:
        """Return the full URI of a key."""
        key = _clean_key(key)
        if self.is_s3:
            return f"s3://{self.bucket}/{self._s3_key(key)}"
        return str(self.root / key)

    def key_of(self, uri_or_key: str) -> str:
        """Return the key of a URI under this store, or the argument itself if it is a key."""
        if self.is_s3 and uri_or_key.startswith("s3://"):
            prefix = f"s3://{self.bucket}/{self.prefix}".rstrip("/") + "/"
            if not uri_or_key.startswith(prefix):
                raise ValueError(f"URI {uri_or_key!r} is outside the artifact store {self.base_uri!r}")
            return uri_or_key[len(prefix):]
        if not self.is_s3 and os.path.isabs(uri_or_key):
            path = Path(uri_or_key).resolve()
            try:
                return str(path.relative_to(self.root))
            except ValueError:
                raise ValueError(
                    f"path {uri_or_key!r} is outside the artifact store {self.base_uri!r}"
                ) from None
        return _clean_key(uri_or_key)

    def _s3_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- bytes ------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` under ``key`` atomically and return its URI."""
        key = _clean_key(key)
        if self.is_s3:
            # A single PUT is atomic in S3: the object appears whole or not at all.
            self.s3.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data)
        else:
            target = self.root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp.name, target)
        return self.uri(key)

    def get_bytes(self, uri_or_key: str) -> bytes:
        """Return the bytes stored under a key or URI."""
        key = self.key_of(uri_or_key)
        if self.is_s3:
            try:
                response = self.s3.get_object(Bucket=self.bucket, Key=self._s3_key(key))
            except self.s3.exceptions.NoSuchKey:
                raise ArtifactNotFoundError(f"artifact not found: {self.uri(key)}") from None
            return response["Body"].read()
        path = self.root / key
        if not path.is_file():
            raise ArtifactNotFoundError(f"artifact not found: {path}")
        return path.read_bytes()

    def put_json(self, key: str, value: Any) -> str:
        """Write a JSON document atomically and return its URI."""
        return self.put_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode("utf-8"))

    def get_json(self, uri_or_key: str) -> Any:
        """Return a JSON document read from a key or URI."""
        return json.loads(self.get_bytes(uri_or_key))

    # -- files and folders ------------------------------------------------------------

    def put_file(self, local_path: str | os.PathLike, key: str) -> str:
        """Upload one local file atomically and return its URI."""
        key = _clean_key(key)
        if self.is_s3:
            self.s3.upload_file(str(local_path), self.bucket, self._s3_key(key))
            return self.uri(key)
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}"
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, target)
        return self.uri(key)

    def get_file(self, uri_or_key: str, local_path: str | os.PathLike) -> Path:
        """Download one artifact to ``local_path`` and return that path."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        local_path.write_bytes(self.get_bytes(uri_or_key))
        return local_path

    def local_path(self, uri_or_key: str) -> Path | None:
        """Return the local path of an artifact when the store is a local folder, else None."""
        if self.is_s3:
            return None
        return self.root / self.key_of(uri_or_key)

    def put_dir(self, local_dir: str | os.PathLike, key: str) -> str:
        """Upload a folder (a checkpoint, a cache) and return its URI.

        Files go first and a manifest with their sizes and SHA-256 goes last, so a folder
        whose upload crashed has no manifest and ``get_dir`` rejects it rather than reading
        a mix of old and new files.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotADirectoryError(f"cannot upload {local_dir}: not a folder")
        key = _clean_key(key)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != DIR_MANIFEST)
        manifest = {"files": {}}
        for path in files:
            relative = path.relative_to(local_dir).as_posix()
            manifest["files"][relative] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
            self.put_file(path, f"{key}/{relative}")
        self.put_json(f"{key}/{DIR_MANIFEST}", manifest)
        logger.info("Uploaded %d files to %s", len(files), self.uri(key))
        return self.uri(key)

    def get_dir(self, uri_or_key: str, local_dir: str | os.PathLike | None = None) -> Path:
        """Return a local folder holding an uploaded folder, downloading it if needed.

        For a local store without ``local_dir`` the stored folder itself is returned. Every
        file is checked against the size and SHA-256 in the manifest, so a folder whose
        re-upload to the same key crashed half way is rejected rather than read as a mix of
        versions. Writers should still use a new key per version.
        """
        key = self.key_of(uri_or_key)
        try:
            manifest = self.get_json(f"{key}/{DIR_MANIFEST}")
        except ArtifactNotFoundError:
            raise ArtifactNotFoundError(
                f"no complete folder at {self.uri(key)}: its manifest is missing, so it was never "
                "uploaded or its upload did not finish; materialize the asset that writes it again"
            ) from None
        if not self.is_s3 and local_dir is None:
            folder = self.root / key
            for relative, expected in manifest["files"].items():
                _verify(folder / relative, expected, self.uri(f"{key}/{relative}"))
            return folder
        if local_dir is None:
            local_dir = Path(tempfile.mkdtemp(prefix="kad-artifact-"))
        local_dir = Path(local_dir)
        for relative, expected in manifest["files"].items():
            path = self.get_file(f"{key}/{relative}", local_dir / relative)
            _verify(path, expected, self.uri(f"{key}/{relative}"))
        return local_dir

    # -- listing ----------------------------------------------------------------------

    def exists(self, uri_or_key: str) -> bool:
        """Return whether an object exists under the key or URI."""
        key = self.key_of(uri_or_key)
        if self.is_s3:
            try:
                self.s3.head_object(Bucket=self.bucket, Key=self._s3_key(key))
            except self.s3.exceptions.ClientError:
                return False
            return True
        return (self.root / key).is_file()

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Yield every object key under ``prefix``, in sorted order on local folders."""
        prefix = prefix.strip("/")
        if self.is_s3:
            if prefix:
                full_prefix = self._s3_key(prefix)
            elif self.prefix:
                full_prefix = f"{self.prefix}/"
            else:
                full_prefix = ""
            paginator = self.s3.get_paginator("list_objects_v2")
            strip = len(f"{self.prefix}/") if self.prefix else 0
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][strip:]
            return
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix()

    def delete(self, uri_or_key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""
        key = self.key_of(uri_or_key)
        if self.is_s3:
            self.s3.delete_object(Bucket=self.bucket, Key=self._s3_key(key))
        else:
            (self.root / key).unlink(missing_ok=True)


def _clean_key(key: str) -> str:
    key = key.strip("/")
    if not key or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid artifact key {key!r}: use a relative path without '.' or '..' parts")
    return key


def _verify(path: Path, expected: dict, uri: str) -> None:
    if not path.is_file():
        raise ArtifactNotFoundError(f"{uri} is listed in its folder manifest but missing")
    if path.stat().st_size != expected["size"] or _sha256_file(path) != expected["sha256"]:
        raise ArtifactCorruptError(
            f"{uri} does not match its folder manifest (size or SHA-256): an upload to the same key "
            "did not finish; materialize the asset that writes it again"
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
