"""Stable hash buckets of report ids, the partitioning of every per-report table."""

import hashlib

DEFAULT_BUCKETS = 32


def bucket_of(report_id: str, n_buckets: int) -> int:
    """Return the bucket of a report id: the same on every machine and Python run.

    Python's built-in ``hash`` is salted per process, so a digest is used instead.
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be at least 1, got {n_buckets}")
    digest = hashlib.blake2b(report_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_buckets


def bucket_key(bucket: int) -> str:
    """Return the partition key of a bucket number, e.g. 7 -> "b007"."""
    return f"b{bucket:03d}"


def bucket_keys(n_buckets: int) -> list[str]:
    """Return every partition key for ``n_buckets`` buckets, in order."""
    return [bucket_key(bucket) for bucket in range(n_buckets)]


def bucket_number(key: str) -> int:
    """Return the bucket number of a partition key such as "b007"."""
    if not (key.startswith("b") and key[1:].isdigit()):
        raise ValueError(f"invalid bucket partition key {key!r}: expected 'b' followed by digits")
    return int(key[1:])
