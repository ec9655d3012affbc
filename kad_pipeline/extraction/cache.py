"""A per-report cache of extractor results, keyed by report text hash and extractor version.

An extractor's output for a report depends only on the report text and the extractor (its
name, version and settings), so a result computed once is reused by every later run that
reads the same text. The cache lives in the artifact store, one Parquet shard per hash bucket
of the report id, so it works on a local folder and on S3 alike:

    caches/extraction/<extractor>/<version>/<bucket>.parquet

A shard has one row per text hash, with that text's result rows (everything but report_id)
in a list column. Rewriting a shard keeps only the texts of the reports that the bucket contains
now, so an edited or deleted report leaves no stale entry behind. Two runs of one bucket at
once each rewrite its shard and the last write wins. Every entry is a pure function of its
text, so a lost entry only costs a recomputation.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import polars as pl

from kad_pipeline.parquet import read_lineage, read_parquet, write_parquet
from kad_pipeline.partitions import bucket_key, bucket_of
from kad_pipeline.storage import ArtifactNotFoundError, ArtifactStore

logger = logging.getLogger(__name__)

CACHE_PREFIX = "caches/extraction"
_RESULT = "result"
_SAFE_COMPONENT = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass
class CachedExtraction:
    """Result rows for every requested report, and how many texts the cache served or missed."""

    table: pl.DataFrame
    hits: int
    misses: int
    failed: int
    pruned: int


class ExtractionCache:
    """Results of one extractor version for every report text it has already processed.

    ``extractor`` names the extractor ("rules", "llm", "radgraph"). ``version`` must change
    whenever the output for the same text could change (code, model, prompt, settings),
    because it is the only thing that separates old entries from new ones.
    """

    def __init__(self, store: ArtifactStore, extractor: str, version: str, n_buckets: int):
        if not extractor or not version:
            raise ValueError(f"extractor and version must be non-empty, got {extractor!r} and {version!r}")
        self.store = store
        self.extractor = extractor
        self.version = version
        self.n_buckets = n_buckets

    def folder_key(self) -> str:
        """Return the artifact key of the folder that contains this extractor version's shards."""
        return f"{CACHE_PREFIX}/{_safe_component(self.extractor)}/{_safe_component(self.version)}"

    def shard_key(self, bucket: str) -> str:
        """Return the artifact key of one bucket's shard."""
        return f"{self.folder_key()}/{bucket}.parquet"

    def load_shard(self, bucket: str) -> pl.DataFrame | None:
        """Return a bucket's shard (text_sha256, result), or None when it was never written."""
        key = self.shard_key(bucket)
        try:
            lineage = read_lineage(self.store, key)
            shard = read_parquet(self.store, key)
        except ArtifactNotFoundError:
            return None
        # Sanitizing the path components can map two versions to one path, so the footer decides.
        if lineage.get("extractor") != self.extractor or lineage.get("extractor_version") != self.version:
            logger.warning(
                "Ignoring cache shard %s: it was written by %s %s, not %s %s",
                self.store.uri(key), lineage.get("extractor"), lineage.get("extractor_version"),
                self.extractor, self.version,
            )
            return None
        return shard

    def extract(
        self,
        reports: pl.DataFrame,
        extract: Callable[[pl.DataFrame], pl.DataFrame | tuple[pl.DataFrame, Collection[str]]],
        buckets: Sequence[str],
    ) -> CachedExtraction:
        """Return ``extract(reports)``, computing it only for texts that no shard contains yet.

        ``reports`` needs report_id and text (plus what ``extract`` reads); text_sha256 is
        computed from the text when the frame lacks it. It must
        contain every report of ``buckets`` and nothing else. ``extract`` is called at most once,
        with one report per uncached text, and returns rows with a report_id column. It may
        also return ``(rows, failed_report_ids)``: the texts of failed reports are neither
        cached nor returned, so the next run tries them again. Each bucket's shard is
        rewritten when it gained or lost entries.
        """
        if "text_sha256" not in reports.columns and "text" in reports.columns:
            reports = reports.with_columns(
                pl.col("text")
                .map_elements(lambda text: hashlib.sha256(text.encode("utf-8")).hexdigest(), return_dtype=pl.String)
                .alias("text_sha256")
            )
        for column in ("report_id", "text_sha256"):
            if column not in reports.columns:
                raise ValueError(f"the reports frame has no {column!r} column; columns: {reports.columns}")
        buckets = list(buckets)
        report_buckets = [bucket_key(bucket_of(report_id, self.n_buckets)) for report_id in reports["report_id"]]
        outside = sorted(set(report_buckets) - set(buckets))
        if outside:
            raise ValueError(f"reports fall in buckets {outside} outside the requested buckets {buckets}")
        reports = reports.with_columns(pl.Series("_bucket", report_buckets, dtype=pl.String))

        shards = {bucket: self.load_shard(bucket) for bucket in buckets}
        cached = _concat_shards([shard for shard in shards.values() if shard is not None])
        if cached is not None:
            # Reports with the same text in different buckets store the entry in each shard.
            cached = cached.unique("text_sha256", keep="first", maintain_order=True)
        cached_hashes = set(cached["text_sha256"].to_list()) if cached is not None else set()

        current_hashes = reports["text_sha256"].unique()
        missing = reports.filter(~pl.col("text_sha256").is_in(sorted(cached_hashes))).unique(
            "text_sha256", keep="first", maintain_order=True
        )
        failed = 0
        if missing.height or cached is None:
            # With nothing cached, an empty call still yields the result schema.
            fresh, failed = self._run_extractor(extract, missing.drop("_bucket"))
        else:
            fresh = cached.head(0)
        kept_entries = cached.filter(pl.col("text_sha256").is_in(current_hashes.implode())) if cached is not None else None
        entries = _concat_shards([frame for frame in (kept_entries, fresh) if frame is not None])
        if entries is None:
            entries = fresh

        pruned = self._write_shards(reports, entries, shards, fresh_hashes=set(missing["text_sha256"].to_list()))
        hits = current_hashes.len() - missing.height
        logger.info(
            "Extraction cache %s %s: %d texts served from the cache, %d extracted (%d failed), %d stale entries dropped",
            self.extractor, self.version, hits, missing.height, failed, pruned,
        )
        table = _expand(reports.select("report_id", "text_sha256"), entries)
        return CachedExtraction(table=table, hits=hits, misses=missing.height, failed=failed, pruned=pruned)

    def _run_extractor(self, extract, missing: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """Run the extractor on uncached texts; return one entry per text and the failure count."""
        output = extract(missing)
        rows, failed = output if isinstance(output, tuple) else (output, ())
        if "report_id" not in rows.columns:
            raise ValueError(f"the {self.extractor} extractor returned no report_id column; columns: {rows.columns}")
        failed = set(failed)
        if failed:
            logger.warning("The %s extractor failed on %d reports; their texts stay uncached", self.extractor, len(failed))
            missing = missing.filter(~pl.col("report_id").is_in(sorted(failed)))
            rows = rows.filter(~pl.col("report_id").is_in(sorted(failed)))
        unknown = set(rows["report_id"].to_list()) - set(missing["report_id"].to_list())
        if unknown:
            raise ValueError(
                f"the {self.extractor} extractor returned rows for {len(unknown)} report ids it was not "
                f"given, e.g. {sorted(unknown)[:3]}"
            )
        value_columns = [column for column in rows.columns if column != "report_id"]
        grouped = rows.group_by("report_id", maintain_order=True).agg(
            pl.struct(value_columns).alias(_RESULT)
        )
        # Texts with no result rows still get an entry (an empty list), so they count as done.
        entries = (
            missing.select("report_id", "text_sha256")
            .join(grouped, on="report_id", how="left")
            .with_columns(pl.col(_RESULT).fill_null(pl.lit([], dtype=grouped.schema[_RESULT])))
            .select("text_sha256", _RESULT)
        )
        return entries, len(failed)

    def _write_shards(
        self,
        reports: pl.DataFrame,
        entries: pl.DataFrame,
        shards: dict[str, pl.DataFrame | None],
        fresh_hashes: set[str],
    ) -> int:
        """Rewrite the shards that gained or lost entries; return how many entries were dropped."""
        pruned = 0
        for bucket, old in shards.items():
            bucket_hashes = reports.filter(pl.col("_bucket") == bucket)["text_sha256"].unique()
            shard = entries.filter(pl.col("text_sha256").is_in(bucket_hashes.implode())).sort("text_sha256")
            old_hashes = set(old["text_sha256"].to_list()) if old is not None else set()
            dropped = len(old_hashes - set(bucket_hashes.to_list()))
            pruned += dropped
            gained = bool(fresh_hashes & set(bucket_hashes.to_list()))
            if old is not None and not gained and not dropped:
                continue
            lineage = {"extractor": self.extractor, "extractor_version": self.version, "bucket": bucket}
            write_parquet(self.store, self.shard_key(bucket), shard, lineage)
        return pruned


def _concat_shards(frames: list[pl.DataFrame]) -> pl.DataFrame | None:
    frames = [frame for frame in frames if frame.height]
    if not frames:
        return None
    return pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]


def _expand(reports: pl.DataFrame, entries: pl.DataFrame | None) -> pl.DataFrame:
    """Turn cache entries back into result rows, one set per report that has the text."""
    joined = reports.join(entries, on="text_sha256", how="left")
    joined = joined.filter(pl.col(_RESULT).list.len() > 0)
    field_names = [field.name for field in entries.schema[_RESULT].inner.fields]
    table = joined.select("report_id", _RESULT).explode(_RESULT).unnest(_RESULT)
    return table.select("report_id", *field_names).sort("report_id", maintain_order=True)


def _safe_component(value: str) -> str:
    return _SAFE_COMPONENT.sub("_", value)
