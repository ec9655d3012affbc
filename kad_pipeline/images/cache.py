"""An on-disk cache of decoded, resized radiographs that training reads through memory maps.

Layout of a cache folder:

- ``shards/<size>px-<token>.npy``: uint8 arrays of shape (n, size, size), one per build batch.
- ``index.parquet``: image_id, path, file_bytes, file_mtime_ns, content_sha256, size, shard, row.

Entries are keyed by (content SHA-256, size): a rebuild decodes only images whose bytes or
target size changed, and reuses every other row where it already lies. File size and
modification time let a rebuild skip rehashing files that did not change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from kad_pipeline.images.io import QUARANTINE_SCHEMA, ImageDecodeError, decode_image, resize_square

logger = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
SHARD_DIR = "shards"
INDEX_SCHEMA = {
    "image_id": pl.String,
    "path": pl.String,
    "file_bytes": pl.Int64,
    "file_mtime_ns": pl.Int64,
    "content_sha256": pl.String,
    "size": pl.Int32,
    "shard": pl.String,
    "row": pl.Int32,
}


class ImageCache:
    """Read access to a built cache folder: ``cache.get(image_id)`` returns a (size, size) uint8 array.

    Shards are opened lazily as read-only memory maps. A pickled cache (for DataLoader workers)
    carries only its paths and reopens the maps in the worker process.
    """

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"image cache index not found: {index_path}; build the cache first")
        self.index = pl.read_parquet(index_path)
        sizes = self.index["size"].unique().to_list()
        if len(sizes) > 1:
            raise ValueError(f"image cache {self.cache_dir} mixes sizes {sizes}; expected one size per folder")
        self.size = int(sizes[0]) if sizes else 0
        self.image_ids: list[str] = self.index["image_id"].to_list()
        self._position = {image_id: position for position, image_id in enumerate(self.image_ids)}
        self.shard_names: list[str] = sorted(self.index["shard"].unique().to_list())
        shard_number = {name: number for number, name in enumerate(self.shard_names)}
        self.shard_of = np.array([shard_number[name] for name in self.index["shard"].to_list()], dtype=np.int64)
        self.row_of = self.index["row"].to_numpy().astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._position

    def position(self, image_id: str) -> int:
        """Return the row of ``image_id`` in ``index``."""
        try:
            return self._position[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in the cache at {self.cache_dir}") from None

    def _shard(self, number: int) -> np.ndarray:
        shard = self._maps.get(number)
        if shard is None:
            shard = np.load(self.cache_dir / SHARD_DIR / self.shard_names[number], mmap_mode="r")
            self._maps[number] = shard
        return shard

    def get_by_position(self, position: int) -> np.ndarray:
        """Return the (size, size) uint8 pixels at index row ``position`` (a read-only view)."""
        return self._shard(int(self.shard_of[position]))[self.row_of[position]]

    def get(self, image_id: str) -> np.ndarray:
        """Return the (size, size) uint8 pixels of ``image_id`` (a read-only view)."""
        return self.get_by_position(self.position(image_id))


@dataclass
class CacheBuildResult:
    """The built cache, images that could not be cached with reasons, and counts."""

    cache: ImageCache
    quarantine: pl.DataFrame
    stats: dict[str, int] = field(default_factory=dict)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode_and_resize(task: tuple[str, int]) -> tuple[np.ndarray | None, str, str]:
    path, size = task
    try:
        return resize_square(decode_image(path), size), "", ""
    except ImageDecodeError as error:
        return None, error.reason, error.detail


def _write_npy_atomic(array: np.ndarray, final_path: Path) -> None:
    handle, name = tempfile.mkstemp(dir=final_path.parent, prefix=f".{final_path.stem}.", suffix=".npy.tmp")
    with os.fdopen(handle, "wb") as stream:
        np.save(stream, array)
    os.replace(name, final_path)


def _write_index_atomic(index: pl.DataFrame, final_path: Path) -> None:
    handle, name = tempfile.mkstemp(dir=final_path.parent, prefix=".index.", suffix=".parquet.tmp")
    os.close(handle)
    index.write_parquet(name)
    os.replace(name, final_path)


def build_image_cache(
    manifest: pl.DataFrame,
    cache_dir: str | Path,
    size: int,
    shard_size: int = 4096,
    num_workers: int = 0,
) -> CacheBuildResult:
    """Decode and resize the manifest's images (image_id, path) into ``cache_dir``.

    Only images whose content hash or target size is not in the existing index are decoded.
    Unreadable, truncated or missing files go to the returned quarantine table with a reason,
    and the build goes on. ``num_workers`` > 0 decodes in that many processes.
    """
    if size < 8:
        raise ValueError(f"cache image size must be at least 8 pixels, got {size}")
    for column in ("image_id", "path"):
        if column not in manifest.columns:
            raise ValueError(f"manifest has no {column!r} column; found {manifest.columns}")
    cache_dir = Path(cache_dir)
    (cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    index_path = cache_dir / INDEX_FILE
    old = pl.read_parquet(index_path) if index_path.is_file() else pl.DataFrame(schema=INDEX_SCHEMA)
    old_by_path = {row["path"]: row for row in old.iter_rows(named=True)}
    old_by_key = {(row["content_sha256"], row["size"]): row for row in old.iter_rows(named=True)}

    quarantine: list[dict[str, str]] = []
    reused_rows: list[dict] = []
    to_decode: list[dict] = []
    seen: set[str] = set()
    for image_id, path in zip(manifest["image_id"].to_list(), manifest["path"].to_list()):
        if image_id in seen:
            quarantine.append({"image_id": image_id, "path": path, "reason": "duplicate-id", "detail": "image_id listed twice; the first is kept"})
            continue
        seen.add(image_id)
        try:
            stat = os.stat(path)
        except OSError as error:
            quarantine.append({"image_id": image_id, "path": path, "reason": "missing", "detail": str(error)})
            continue
        previous = old_by_path.get(path)
        if previous is not None and previous["file_bytes"] == stat.st_size and previous["file_mtime_ns"] == stat.st_mtime_ns:
            sha = previous["content_sha256"]
        else:
            sha = _sha256_file(path)
        entry = {"image_id": image_id, "path": path, "file_bytes": stat.st_size, "file_mtime_ns": stat.st_mtime_ns,
                 "content_sha256": sha, "size": size}
        cached = old_by_key.get((sha, size))
        if cached is not None:
            reused_rows.append({**entry, "shard": cached["shard"], "row": cached["row"]})
        else:
            to_decode.append(entry)
    logger.info("image cache %s: %d reused, %d to decode, %d quarantined before decoding",
                cache_dir, len(reused_rows), len(to_decode), len(quarantine))

    tasks = [(entry["path"], size) for entry in to_decode]
    if num_workers > 0 and len(tasks) > 64:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            decoded = list(pool.map(_decode_and_resize, tasks, chunksize=32))
    else:
        decoded = [_decode_and_resize(task) for task in tasks]

    new_rows: list[dict] = []
    pending: list[np.ndarray] = []
    shards_written = 0

    def flush() -> None:
        nonlocal pending, shards_written
        if not pending:
            return
        name = f"{size}px-{secrets.token_hex(6)}.npy"
        _write_npy_atomic(np.stack(pending), cache_dir / SHARD_DIR / name)
        for row in new_rows[-len(pending):]:
            row["shard"] = name
        pending = []
        shards_written += 1

    for entry, (pixels, reason, detail) in zip(to_decode, decoded):
        if pixels is None:
            quarantine.append({"image_id": entry["image_id"], "path": entry["path"], "reason": reason, "detail": detail})
            logger.warning("image %s quarantined: %s (%s)", entry["image_id"], reason, detail)
            continue
        new_rows.append({**entry, "shard": "", "row": len(pending)})
        pending.append(pixels)
        if len(pending) >= shard_size:
            flush()
    flush()

    index = pl.DataFrame(reused_rows + new_rows, schema=INDEX_SCHEMA)
    _write_index_atomic(index, index_path)

    referenced = set(index["shard"].to_list())
    removed = 0
    for shard_path in (cache_dir / SHARD_DIR).glob("*.npy"):
        if shard_path.name not in referenced:
            shard_path.unlink()
            removed += 1
    # NOTE: a shard stays whole while any of its rows is referenced, so a cache whose images
    # mostly changed keeps unreferenced rows on disk until every row of a shard is replaced.

    stats = {"images": index.height, "reused": len(reused_rows), "decoded": len(new_rows), "quarantined": len(quarantine),
             "shards_written": shards_written, "shards_removed": removed}
    logger.info("image cache %s built: %s", cache_dir, stats)
    return CacheBuildResult(ImageCache(cache_dir), pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA), stats)
